"""Worker processes die with the job that started them. A killed job's leftover workers would otherwise
go on writing into the folder its rerun writes (or hang on full queues, holding memory and GPUs)."""
from __future__ import annotations

import os
import signal
import threading
import time


def die_with_parent(parent: int, *_) -> None:
    """For a forked child (a DataLoader worker): SIGKILL when `parent` dies (Linux). `parent` is taken
    before the fork: one that died in between is seen here as another parent pid."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the parent died before prctl
        os._exit(1)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is dead
    except ProcessLookupError:
        return False
    except OSError:
        return True


def die_with(job_pid: int) -> None:
    """For any worker, a forkserver's or spawn's too (whose parent is not the job, so a parent-death
    signal would not do): a thread kills this process within 0.1 s of the job's end."""
    def loop():
        while alive(job_pid):
            time.sleep(0.1)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=loop, daemon=True).start()
