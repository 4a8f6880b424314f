"""`pixart data ...`: the jobs that make training data."""
from __future__ import annotations

from pixart.cli import data_sam, data_score, data_shapes


def add_parser(sub) -> None:
    p = sub.add_parser("data", help="make data: the shapes world, SA-1B ingestion, aesthetic scores",
                       description="Jobs that write webdataset shards (or sidecars next to them).")
    jobs = p.add_subparsers(dest="job", required=True, metavar="JOB")
    for job in (data_shapes, data_sam, data_score):
        job.add_parser(jobs)
