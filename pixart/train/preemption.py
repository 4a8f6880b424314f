"""Preemption: a scheduler's notice ends training after the current step, with a checkpoint of it.

SIGTERM is what Kubernetes (eviction), Slurm (the end of a job's time, `scancel`) and torchrun (stopping its
workers) send before they kill; SIGUSR1 is what `sbatch --signal=USR1@120` sends ahead of the end. A rank
that gets one only notes it: the ranks agree after each step (a collective), so that all of them write the
same step's checkpoint and stop, and a rerun resumes from it exactly. A second signal ends the process at once,
as it would have without us, unless it repeats the first within `ECHO_S`: Slurm signals every process of a job
step and torchrun forwards what it gets, so a worker under both hears one notice twice. Ctrl-C (SIGINT) stays an
interrupt.
"""
from __future__ import annotations

import os
import signal
import threading
import time

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
ECHO_S = 10.0  # the same signal again this soon is the same notice, relayed (torchrun forwards Slurm's)


class Preempted(Exception):
    """Training stopped on a stop signal, after writing a checkpoint of its last step."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum  # as a shell reports a process ended by that signal


class StopSignals:
    """Within it, SIGTERM and SIGUSR1 are noted (`received`) instead of ending the process; the handlers before it
    come back on exit. Outside the main thread (where signals cannot be caught) it notes nothing."""

    def __init__(self):
        self.received: int | None = None
        self._received_at = 0.0
        self._before: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._before[signum] = signal.signal(signum, self._note)
        return self

    def _note(self, signum: int, frame) -> None:
        if self.received is not None:
            if signum == self.received and time.monotonic() - self._received_at < ECHO_S:
                return  # the first notice, relayed
            self.__exit__()  # asked twice: stop now, as the signal does by default
            os.kill(os.getpid(), signum)
        self.received, self._received_at = signum, time.monotonic()

    def __exit__(self, *exc) -> None:
        for signum, handler in self._before.items():
            signal.signal(signum, handler)
