"""Perfusion's trade-off, traced from one trained concept: concept fidelity against text alignment as the gate's
beta (and tau) change at inference. Lower beta strengthens the concept (the paper's Pareto front, Fig. 7).

Reads a finished demo (its final model, its concept DIR/concepts/zorb.safetensors) and draws the demo's concept
prompts (placements the training images never showed) at each operating point; fidelity and position are the
demo report's (docs/personalize.md).

    python tools/perfusion_pareto.py --demo demo_out      # a table, DIR/report/perfusion_pareto.{png,json}
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo", default="demo_out", help="a finished `pixart demo` folder (default demo_out)")
    p.add_argument("--betas", type=float, nargs="+", default=[0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
    p.add_argument("--taus", type=float, nargs="+", default=[0.1, 0.15, 0.25])
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    from pixart.atomic import atomic_write
    from pixart.demo.perfusion import NAME, ConceptBench
    from pixart.errors import PixArtError

    out = Path(args.demo)
    facts = out / "runs" / "perfusion" / "facts.json"
    if not facts.is_file():
        raise SystemExit(f"perfusion_pareto: {facts}: missing; run `pixart demo --out {out}` first")
    try:
        bench = ConceptBench(out, Path(json.loads(facts.read_text())["base_checkpoint"]), args.seed)
    except PixArtError as e:
        raise SystemExit(f"perfusion_pareto: {e}") from None
    rows = []
    print(f"{'tau':>5} {'beta':>5} {'fidelity':>9} {'position':>9}   ({NAME}, {len(bench.positions)} prompts each)")
    for tau in args.taus:
        for beta in args.betas:
            r = bench.operating_point(beta, tau)
            rows.append({"beta": beta, "tau": tau, "fidelity": r["fidelity"], "position": r["position"]})
            print(f"{tau:5.2f} {beta:5.2f} {r['fidelity']:9.2f} {r['position']:9.2f}", flush=True)
    report = out / "report"
    report.mkdir(parents=True, exist_ok=True)
    atomic_write(report / "perfusion_pareto.json", json.dumps(rows, indent=2))
    plot(rows, report / "perfusion_pareto.png")
    print(f"wrote {report / 'perfusion_pareto.json'} and {report / 'perfusion_pareto.png'}")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pixart.train.monitor import save_figure

    fig, ax = plt.subplots(figsize=(5, 4), dpi=100)
    for tau in sorted({r["tau"] for r in rows}):
        pts = [r for r in rows if r["tau"] == tau]
        ax.plot([r["position"] for r in pts], [r["fidelity"] for r in pts], marker="o", label=f"tau {tau}")
        for r in pts:
            ax.annotate(f"{r['beta']:.2f}", (r["position"], r["fidelity"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    ax.set_xlabel("text alignment (prompted position, new placements)")
    ax.set_ylabel("concept fidelity")
    ax.set_title("Perfusion: one concept, many gates (labels: beta)")
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path)


if __name__ == "__main__":
    main()
