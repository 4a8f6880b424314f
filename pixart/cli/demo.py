"""`pixart demo`: the whole staged pipeline at toy scale on a CPU (the steps are `pixart.demo.pipeline`'s)."""
from __future__ import annotations

import argparse

from pixart.cli import seed32


def add_parser(sub) -> None:
    from pixart.demo import pipeline

    p = sub.add_parser("demo", help="the whole staged pipeline at toy scale on a CPU", description=pipeline.__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo_out",
                   help="output folder, not the current one (default: demo_out); a rerun into it resumes")
    p.add_argument("--seed", type=seed32, default=0,
                   help="seed of the world and the runs, 0 to 2**32 - 1; a folder keeps its first run's "
                   "(default 0)")
    p.add_argument("--scale", type=float, default=1.0,
                   help="multiply data sizes and training steps, in (0, 10]: 0.01 is a smoke run of every step in "
                   "a minute or two; a folder keeps its first run's (default 1)")
    p.set_defaults(run=run)


def run(args) -> None:
    import logging

    from pixart.demo import run_demo

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    run_demo(args.out, args.seed, args.scale)
