"""Two nodes on this machine: two `torchrun --nnodes 2 --node-rank {0,1}` launches rendezvousing at 127.0.0.1
(static rendezvous, as on a cluster without etcd), one process each, over gloo, one shared run folder (the shared
filesystem). They train the same tiny stage as one process, to the same losses within float32 reordering of the
gradient all-reduce (tests/tolerance.py `reordered`)."""
import os
import subprocess
import sys

import torch
from test_train_distributed import GLOBAL_BATCH, ROOT, STEPS, WEIGHTS, WORKER, _port, final, losses, run
from tolerance import approx, reordered


def launch_nodes(run_dir, zero: int, nodes: int = 2) -> list[subprocess.CompletedProcess]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["PYTHONPATH"] = str(ROOT)
    port = _port()
    args = [str(WORKER), str(run_dir), str(zero), "fp32", str(GLOBAL_BATCH), str(STEPS), "1e-3", ""]
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nodes),
                               "--node_rank", str(rank), "--nproc_per_node", "1", "--master_addr", "127.0.0.1",
                               "--master_port", str(port), *args],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in range(nodes)]
    done = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return done


def test_two_nodes_match_one_process(tmp_path):
    single = run(tmp_path / "single", zero=0, nproc=1)
    nodes = launch_nodes(tmp_path / "shared" / "run", zero=2)
    assert [n.returncode for n in nodes] == [0, 0], nodes[0].stderr[-2000:] + nodes[1].stderr[-2000:]
    two = tmp_path / "shared" / "run"
    assert len(losses(two)) == STEPS
    assert losses(two) == approx(losses(single), reordered(losses(single)))
    a, b = final(single, "model.safetensors"), final(two, "model.safetensors")
    for k in a:
        torch.testing.assert_close(b[k], a[k], **WEIGHTS, msg=k)


def test_a_lost_node_stops_the_other_within_the_collective_timeout(tmp_path):
    """Node 1 freezes (SIGSTOP: its sockets stay open, as when a machine drops off the network) after the first
    checkpoint; node 0 waits `train.collective_timeout_s` in its next collective, then exits with one line."""
    import json
    import time

    import psutil

    timeout = 15
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(PYTHONPATH=str(ROOT), DIST_WORKER_TRAIN=json.dumps({"ckpt_every": 5,
                                                                   "collective_timeout_s": timeout}))
    run_dir, port = tmp_path / "run", _port()
    args = [str(WORKER), str(run_dir), "2", "fp32", str(GLOBAL_BATCH), "100000", "1e-3", ""]
    logs = [open(tmp_path / f"node{rank}.log", "w") for rank in range(2)]  # pipes would fill and block
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank",
                               str(rank), "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port",
                               str(port), *args], env=env, stdout=log, stderr=subprocess.STDOUT)
             for rank, log in enumerate(logs)]
    try:
        deadline = time.time() + 300
        while not (run_dir / "checkpoints" / "step-000005").is_dir():
            assert time.time() < deadline and procs[0].poll() is None, "no checkpoint appeared"
            time.sleep(0.2)
        node1 = psutil.Process(procs[1].pid)
        for p in [node1, *node1.children(recursive=True)]:  # node 1, agent and worker, frozen (SIGSTOP)
            p.suspend()
        lost = time.time()
        procs[0].wait(timeout=timeout + 120)
        waited = time.time() - lost
    finally:
        for p in procs:
            try:
                for child in psutil.Process(p.pid).children(recursive=True):
                    child.kill()
                p.kill()
            except psutil.NoSuchProcess:
                pass
        for log in logs:
            log.close()
    err = (tmp_path / "node0.log").read_text()
    assert procs[0].returncode != 0
    lines = [line for line in err.splitlines() if "a collective failed during step" in line]
    assert len(lines) == 1, err[-3000:]
    assert "Last good checkpoint: " in lines[0] and "/checkpoints/step-0000" in lines[0], lines[0]
    assert timeout - 1 <= waited <= timeout + 60, waited  # the configured bound, not PyTorch's 30 minutes

