"""Shapes-world throughput on one core: images/s for render + PNG + tar, per resolution.

    python tools/bench_shapes.py [--count 2000] [--resolution 32 64 128]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--count", type=int, default=2000)
    p.add_argument("--resolution", type=int, nargs="+", default=[32, 64, 128])
    args = p.parse_args()
    if hasattr(os, "sched_setaffinity"):  # one core, whatever the machine
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    import webdataset  # noqa: F401  (imported once, outside the timing)

    from data_pipelines.shapes import write_shapes

    for res in args.resolution:
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            write_shapes(tmp, args.count, seed=0, resolution=res, shard_size=args.count)
            elapsed = time.perf_counter() - start
        print(f"{res:4d} px: {args.count / elapsed:7.0f} images/s on one core ({args.count} images, {elapsed:.1f}s)")


if __name__ == "__main__":
    main()
