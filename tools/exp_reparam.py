"""Reparameterized init vs random init (PixArt-alpha section 2.3, in miniature).

Stage 2 on the dense captions for the same steps and seed, once from the demo's reparameterized
stage-1 DiT and once from a random init of the same architecture; compares the stage-2 loss
curve and held-out alignment.

    pixart demo --out demo_out                       # once: data, features, stage 1, reparam
    python tools/exp_reparam.py --demo demo_out [--steps 600]
"""
from __future__ import annotations

import argparse
from pathlib import Path

from stage2_runs import reparam_arch, report, run_variant

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo", default="demo_out", help="a finished `pixart demo` folder")
    p.add_argument("--steps", type=int, default=None, help="stage-2 steps per variant (default: the demo's)")
    a = p.parse_args()
    demo = Path(a.demo).resolve()
    out = demo / "experiments"
    results = [run_variant(demo, out, "dense captions (relabeled)", ["data.caption=metadata"], a.steps),
               run_variant(demo, out, "random init", ["data.caption=metadata", "model.init=null",
                                                      reparam_arch(demo)], a.steps)]
    report(results, out, "reparam")
