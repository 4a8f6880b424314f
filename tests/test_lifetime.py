"""Workers die with their job: a `kill -9` of the job leaves no process that goes on writing or holding memory."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pixart.lifetime import alive

JOB = """
import os, sys, time
import multiprocessing as mp
from concurrent.futures import ProcessPoolExecutor
from pixart.lifetime import die_with

if __name__ == "__main__":
    ctx = mp.get_context(sys.argv[1])
    with ProcessPoolExecutor(2, mp_context=ctx, initializer=die_with, initargs=(os.getpid(),)) as pool:
        pids = {pool.submit(os.getpid).result() for _ in range(8)}
        f = pool.submit(time.sleep, 60)  # a worker busy with a long shard
        print(" ".join(map(str, pids)), flush=True)
        time.sleep(60)
"""


@pytest.mark.parametrize("start", ["fork", "forkserver"])  # shapes' pool, and extract-features' (not a child)
def test_pool_workers_die_with_a_killed_job(tmp_path, start):
    script = tmp_path / "job.py"
    script.write_text(JOB)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    job = subprocess.Popen([sys.executable, str(script), start], stdout=subprocess.PIPE, text=True, env=env)
    workers = [int(p) for p in job.stdout.readline().split()]
    assert workers and all(alive(p) for p in workers)
    job.send_signal(signal.SIGKILL)
    job.wait()
    deadline = time.time() + 5
    while any(alive(p) for p in workers) and time.time() < deadline:
        time.sleep(0.05)
    assert not any(alive(p) for p in workers)
