"""Preemption: a scheduler's notice ends training after the current step, with a checkpoint of it.

SIGTERM is what Kubernetes (eviction), Slurm (the end of a job's time, `scancel`) and torchrun (stopping its
workers) send before they kill; SIGUSR1 is what `sbatch --signal=B:USR1@120` sends ahead of the end. A rank
that gets one only notes it: the ranks agree after each step (a collective), so that all of them write the
same step's checkpoint and stop, and a rerun resumes from it exactly. A second signal ends the process at once,
as it would have without us; Ctrl-C (SIGINT) stays an interrupt.
"""
from __future__ import annotations

import os
import signal
import threading

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


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
        self._before: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._before[signum] = signal.signal(signum, self._note)
        return self

    def _note(self, signum: int, frame) -> None:
        if self.received is not None:  # asked twice: stop now, as the signal does by default
            self.__exit__()
            os.kill(os.getpid(), signum)
        self.received = signum

    def __exit__(self, *exc) -> None:
        for signum, handler in self._before.items():
            signal.signal(signum, handler)
