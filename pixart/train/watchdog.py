"""A bound on how long a rank waits for the others, wherever it waits.

The process group's timeout ends most waits on a lost node with an error. Some waits have no timeout of their own
(an async op's `wait()` inside DeepSpeed, a backend stuck in a syscall), so a thread also watches the steps: when
none has finished for the collective timeout plus a grace, it prints one line naming the last good checkpoint and
ends the process (exit code 2), so a launcher sees the failure and a rerun resumes.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable


class StepWatchdog:
    def __init__(self, timeout_s: float, message: Callable[[], str], grace_s: float = 30.0):
        self.limit = timeout_s + grace_s
        self.message = message
        self.last = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="step-watchdog", daemon=True)

    def __enter__(self) -> StepWatchdog:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()

    def beat(self) -> None:
        """A step finished."""
        self.last = time.monotonic()

    def _watch(self) -> None:
        while not self._stop.wait(min(5.0, self.limit / 4)):
            if time.monotonic() - self.last > self.limit:
                print(f"pixart: error: {self.message()}", file=sys.stderr, flush=True)
                os._exit(2)
