"""One line per step of a long job, with its time, so a user sees where the time goes."""
from __future__ import annotations

import time
from contextlib import contextmanager


@contextmanager
def step(label: str):
    start = time.time()
    print(f"-> {label} ...", flush=True)
    yield
    print(f"   done in {time.time() - start:.1f}s", flush=True)
