"""`pixart demo`: the whole staged pipeline at toy scale on a CPU (the steps are `pixart.demo.pipeline`'s)."""
from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    from pixart.demo import pipeline

    p = sub.add_parser("demo", help="the whole staged pipeline at toy scale on a CPU", description=pipeline.__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    p.add_argument("--seed", type=int, default=0, help="seed of the world and the runs (default 0)")
    p.add_argument("--scale", type=float, default=1.0,
                   help="multiply data sizes and training steps (e.g. 0.05 for a smoke run; default 1)")
    p.set_defaults(run=run)


def run(args) -> None:
    import logging

    from pixart.demo import run_demo

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    run_demo(args.out, args.seed, args.scale)
