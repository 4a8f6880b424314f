"""Guidance scale for a finished demo, chosen on prompts of triples the training data shows.

Samples the demo's export through `PixArtAlphaPipeline` at each `--cfg`, on `--sets` sets of 54 seen
(shape, color, position) prompts, and prints the judge's color and strict position for each; with
`--heldout` it also prints the held-out prompts' scores, for the record, not for the choice.

    python tools/cfg_sweep.py --demo demo_out --cfg 1.5 2 2.5 3 4 --heldout
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pixart.demo.drawer import Drawer  # noqa: E402
from pixart.demo.pipeline import FINAL_SIDE, HOLDOUT, SAMPLE_STEPS  # noqa: E402
from pixart.eval.heldout import heldout_specs, prompt_for, score_heldout, seen_specs  # noqa: E402
from pixart.eval.judge import Judge  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo", default="demo_out", help="a finished `pixart demo` folder (default demo_out)")
    p.add_argument("--cfg", type=float, nargs="+", default=[1.5, 2.0, 2.5, 3.0, 4.0], help="guidance scales")
    p.add_argument("--steps", type=int, default=SAMPLE_STEPS, help="sampler steps")
    p.add_argument("--sets", type=int, default=3, help="sets of 54 seen prompts (seeds 1..N)")
    p.add_argument("--heldout", action="store_true", help="also score the held-out prompts")
    args = p.parse_args()
    demo = Path(args.demo)
    if not (demo / "report" / "metrics.json").is_file():
        p.error(f"--demo {args.demo}: not a finished `pixart demo` folder (no report/metrics.json)")
    export = demo / "export"
    judge = Judge.load_or_train()
    groups = {f"seen-{k}": seen_specs(HOLDOUT, 54, seed=k) for k in range(1, args.sets + 1)}
    if args.heldout:
        groups["held-out"] = heldout_specs(HOLDOUT)
    print(f"{'cfg':>5} {'prompts':>9} {'color':>6} {'position':>9} {'shape':>6}")
    for cfg in args.cfg:
        for name, specs in groups.items():
            prompts = [prompt_for(s, FINAL_SIDE, FINAL_SIDE) for s in specs]
            images = Drawer(export, args.steps, cfg).images(prompts, seed=0)
            r = score_heldout(judge, images, specs)
            print(f"{cfg:>5} {name:>9} {r['color']:>6.2f} {r['position']:>9.2f} {r['shape']:>6.2f}", flush=True)


if __name__ == "__main__":
    main()
