"""A bound on how long a rank waits for the others, wherever it waits, and one line when a peer is lost.

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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch.distributed as dist

from pixart.errors import PixArtError, first_line

from . import checkpoints


class PeerLost(PixArtError):
    pass


_COMM_FAILURES = ("gloo", "NCCL", "Connection closed by peer", "Connection reset by peer", "Timed out waiting")


def is_comm_failure(e: RuntimeError) -> bool:
    """A collective that failed for want of a peer: torch's DistError, or the backend's own RuntimeError (gloo
    raises a plain one, "[.../gloo/transport/tcp/...] Timed out waiting 600000ms for recv operation")."""
    return isinstance(e, dist.DistError) or any(s in str(e) for s in _COMM_FAILURES)


def peer_lost_message(e: Exception, rank: int, step: int, run_dir: Path) -> str:
    reason = first_line(e)
    latest = checkpoints.latest_checkpoint(run_dir)
    return (f"rank {rank}: a collective failed during step {step + 1}, so another rank or node is gone "
            f"({type(e).__name__}: {reason}). Last good checkpoint: {latest or 'none yet'}; rerun every node "
            "to resume from it")


SEPARATE_STORE = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"


def restart_hint(e: BaseException) -> str | None:
    """The line for a group that cannot connect under torchrun: its shared rendezvous store hands restarted workers
    the previous attempt's addresses (pytorch/pytorch#135712). A worker restarted because a node joined or
    rejoined keeps TORCHELASTIC_RESTART_COUNT 0, even under `--max-restarts 0`, so any torchrun attempt may be one.
    None for other errors, outside torchrun, or with a store per attempt already."""
    connecting = any(s in str(e) for s in ("refused", "connectFullMesh"))
    if not connecting or SEPARATE_STORE in os.environ or "TORCHELASTIC_RUN_ID" not in os.environ:
        return None
    fix = f"set {SEPARATE_STORE}=1 in torchrun's environment on every node, so that each attempt meets in a store " \
          "of its own"
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0) or 0):
        return f"the process group could not form after a torchrun restart ({first_line(e)}); {fix}"
    return (f"the process group could not form ({first_line(e)}); if torchrun restarted these workers (a node "
            f"joined or rejoined), {fix}")


def lost_peer_line(e: BaseException) -> str | None:
    """One line for a communication failure outside a training loop (set-up, the loader's first exchange,
    teardown), where `watching_peers` does not reach: which rank, and that a rerun resumes (or, after a torchrun
    restart, `restart_hint`). None for any other error. The store's errors (a node that never joined:
    `DistStoreError: wait timeout`) are DistErrors too."""
    if not isinstance(e, RuntimeError) or not is_comm_failure(e):
        return None
    rank = dist.get_rank() if dist.is_initialized() else os.environ.get("RANK", "?")
    hint = restart_hint(e)  # the old attempt's addresses
    if hint is not None:
        return f"rank {rank}: {hint}"
    return (f"rank {rank}: another rank or node was lost or never joined ({type(e).__name__}: {first_line(e)}); "
            "rerun every node's command to resume from the last checkpoint")


@contextmanager
def watching_peers(timeout_s: float, rank: int, run_dir: Path, step: Callable[[], int]) -> Iterator[StepWatchdog]:
    """A training loop's guard: a failed collective becomes PeerLost, and a wait with no timeout of its own ends
    after `timeout_s` plus a grace (the watchdog, which the loop beats once per step); `step()` is the steps done."""
    def stalled() -> str:
        return peer_lost_message(TimeoutError(f"no step finished in {watchdog.limit:.0f} s"), rank, step(), run_dir)

    try:
        with StepWatchdog(timeout_s, stalled) as watchdog:
            yield watchdog
    except RuntimeError as e:
        if not is_comm_failure(e):
            raise
        raise PeerLost(peer_lost_message(e, rank, step(), run_dir)) from None


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
