"""`pixart demo`'s pipeline: the whole mission at toy scale on a CPU (see `pipeline`)."""
from .pipeline import run_demo

__all__ = ["run_demo"]
