"""Stages 2 and 3 again on a finished `pixart demo` folder, with `--set`s, scored on user phrasings (issue 19).

Each variant trains the demo's stage 2 from its reparameterized checkpoint and stage 3 from that, with the
same `--set`s on both, exports stage 3 as the demo does, and scores it on the demo's 54 held-out prompts and
on the held-out triples in every phrasing kind (`pixart.eval.phrasings`). The phrasings are drawn with
sampling seeds 0, 1 and 2, batched as the demo batches them (seed 0 is the demo's own draw), and their mean is
reported beside each seed's: one seed's draw moves a kind by a prompt or two. Runs land in
DEMO/experiments/phrasings/<variant>/ and are skipped when finished.

    pixart demo --out demo_out                                  # once
    python tools/exp_phrasings.py --demo demo_out --set train.seed=1
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

SEEDS = (0, 1, 2)


def train(demo: Path, stage: str, init: Path, run: Path, sets: list[str]) -> None:
    if (run / "DONE.json").is_file():
        return
    cmd = [sys.executable, "-m", "pixart", "train", str(demo / "configs" / f"{stage}.yaml"), "--run-dir", str(run),
           "--set", f"model.init={init}", "--set", "validation.prompts=[]"]
    for s in sets:
        cmd += ["--set", s]
    if subprocess.run(cmd).returncode:  # pixart train has said why, in one line
        sys.exit(1)


def score(export: Path) -> dict:
    from pixart.demo.drawer import Drawer
    from pixart.demo.pipeline import FINAL_SIDE, HOLDOUT, PHRASING_SPECS
    from pixart.eval.heldout import heldout_specs, prompt_for, score_heldout, spread
    from pixart.eval.judge import Judge
    from pixart.eval.phrasings import KINDS, phrasings

    judge, drawer = Judge.load_or_train(), Drawer(export, 20, 1.5)
    specs = heldout_specs(HOLDOUT)
    heldout = score_heldout(judge, drawer.images([prompt_for(s, FINAL_SIDE, FINAL_SIDE) for s in specs], 0), specs)
    triples = spread(specs, PHRASING_SPECS)
    n, prompts = len(triples), [phrasings(s, kind, 0) for kind in KINDS for s in triples]
    per_seed = []
    for seed in SEEDS:
        images = drawer.images(prompts, seed)
        per_seed.append({kind: score_heldout(judge, images[i * n:(i + 1) * n], triples)
                         for i, kind in enumerate(KINDS)})
    kinds = {kind: {a: sum(s[kind][a] for s in per_seed) / len(SEEDS) for a in ("color", "position")} for kind in KINDS}
    return {"heldout": {a: heldout[a] for a in ("color", "position", "shape")},
            "phrasings_per_seed": [{a: sum(s[k][a] for k in KINDS) / len(KINDS) for a in ("color", "position")}
                                   for s in per_seed],
            "phrasings": {a: sum(k[a] for k in kinds.values()) / len(KINDS) for a in ("color", "position")},
            "kinds": kinds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo", default="demo_out", help="a finished `pixart demo` folder (default demo_out)")
    p.add_argument("--set", action="append", default=[], help="a config key for both stages (repeatable)")
    a = p.parse_args()
    from pixart.export.diffusers import PipelineParts, export_checkpoint

    demo = Path(a.demo).resolve()
    if not (demo / "report" / "metrics.json").is_file():
        p.error(f"--demo {a.demo}: not a finished `pixart demo` folder (no report/metrics.json)")
    out = demo / "experiments" / "phrasings" / ("-".join(a.set).replace("/", "_") or "as-the-demo")
    train(demo, "stage2", demo / "runs" / "reparam" / "checkpoint", out / "stage2", a.set)
    train(demo, "stage3", out / "stage2" / "checkpoints" / "latest", out / "stage3", a.set)
    t5 = str(demo / "parts" / "t5")
    export_checkpoint(out / "stage3" / "checkpoints" / "latest", out / "export", PipelineParts(t5, t5, None),
                      overwrite=True)
    result = {"set": a.set, **score(out / "export")}
    (out / "result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
