"""Two nodes on this machine: two `torchrun --nnodes 2 --node-rank {0,1}` launches rendezvousing at 127.0.0.1
(static rendezvous, as on a cluster without etcd), one process each, over gloo, one shared run folder (the shared
filesystem). They train the same tiny stage as one process, to the same losses within float32 reordering of the
gradient all-reduce (tests/tolerance.py `reordered`)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train_distributed import GLOBAL_BATCH, ROOT, STEPS, WEIGHTS, WORKER, _port, final, losses, run
from tolerance import adam_steps, approx, reordered


def worker_env(train: dict | None = None, fault: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(PYTHONPATH=str(ROOT), DIST_WORKER_TRAIN=json.dumps(train or {}),
               DIST_WORKER_FAULT=json.dumps(fault or {}))
    return env


def launch_nodes(run_dir, zero: int, steps: int = STEPS, train: dict | None = None, fault: dict | None = None,
                 restarts: int = 0, nodes: int = 2) -> list[subprocess.CompletedProcess]:
    """One torchrun per node, all on 127.0.0.1; each node's output is returned as its stdout. With `restarts`,
    an elastic launch: c10d rendezvous, and a rendezvous store of its own per attempt (the shared one keeps the
    previous attempt's gloo addresses: pytorch/pytorch#135712)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    port = _port()
    args = [str(WORKER), str(run_dir), str(zero), "fp32", str(GLOBAL_BATCH), str(steps), "1e-3", ""]
    env = worker_env(train, fault)
    if restarts:
        rendezvous = ["--max-restarts", str(restarts), "--rdzv-backend", "c10d", "--rdzv-endpoint",
                      f"127.0.0.1:{port}", "--rdzv-id", "test"]
        env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    logs = [run_dir / f"node{rank}.log" for rank in range(nodes)]
    procs = []
    for rank, log in enumerate(logs):
        if not restarts:
            rendezvous = ["--node_rank", str(rank), "--master_addr", "127.0.0.1", "--master_port", str(port)]
        with open(log, "w") as f:  # a file, not a pipe: a pipe left unread would fill and block the node
            procs.append(subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nodes),
                                           "--nproc_per_node", "1", *rendezvous, *args],
                                          env=env, stdout=f, stderr=subprocess.STDOUT))
    for p in procs:
        p.wait(timeout=600)
    return [subprocess.CompletedProcess(p.args, p.returncode, log.read_text(), "")
            for p, log in zip(procs, logs, strict=True)]


def test_two_nodes_match_one_process(tmp_path):
    single = run(tmp_path / "single", zero=0, nproc=1)
    nodes = launch_nodes(tmp_path / "shared" / "run", zero=2)
    assert [n.returncode for n in nodes] == [0, 0], nodes[0].stdout[-2000:] + nodes[1].stdout[-2000:]
    two = tmp_path / "shared" / "run"
    assert len(losses(two)) == STEPS
    assert losses(two) == approx(losses(single), reordered(losses(single)))
    a, b = final(single, "model.safetensors"), final(two, "model.safetensors")
    for k in a:
        torch.testing.assert_close(b[k], a[k], **WEIGHTS, msg=k)


def test_a_stop_signal_on_one_node_stops_both_after_the_same_steps_checkpoint(tmp_path):
    """`sbatch --signal=B:USR1@120` may reach one node's ranks before the other's: the ranks agree after each step,
    so both write step 3's checkpoint (ckpt_every is 100) and stop; rerunning both nodes finishes the run."""
    run_dir = tmp_path / "run"
    train = {"ckpt_every": 100}
    nodes = launch_nodes(run_dir, zero=2, train=train, fault={"rank": 1, "at": "after-step:2:SIGUSR1"})
    assert [n.returncode != 0 for n in nodes] == [True, True]
    assert (run_dir / "checkpoints" / "latest").read_text() == "step-000003", nodes[1].stdout[-2000:]
    assert "rank 1: equivalence stopped by SIGUSR1 after step 3" in nodes[1].stdout, nodes[1].stdout[-2000:]
    assert "rank 0: equivalence stopped by another rank's stop signal after step 3" in nodes[0].stdout, \
        nodes[0].stdout[-2000:]
    again = launch_nodes(run_dir, zero=2, train=train)
    assert [n.returncode for n in again] == [0, 0], again[0].stdout[-2000:]
    assert "resumed from" in again[0].stdout and len(losses(run_dir)) == STEPS


def test_a_lost_node_stops_the_other_within_the_collective_timeout(tmp_path):
    """Node 1 freezes (SIGSTOP: its sockets stay open, as when a machine drops off the network) after the first
    checkpoint; node 0 waits `train.collective_timeout_s` in its next collective, then exits with one line."""
    import time

    import psutil

    timeout = 15
    env = worker_env({"ckpt_every": 5, "collective_timeout_s": timeout})
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
        lost = time.monotonic()
        procs[0].wait(timeout=timeout + 120)
        waited = time.monotonic() - lost
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
    # the configured bound, not PyTorch's 30 minutes (rank 0 may have entered its collective before the freeze)
    assert timeout / 2 <= waited <= timeout + 60, waited



RESUME_STEPS, RESUME_TRAIN = 12, {"ckpt_every": 4, "record_keys": True}  # the default collective timeout


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    nodes = launch_nodes(run_dir, zero=2, steps=RESUME_STEPS, train=RESUME_TRAIN)
    assert [n.returncode for n in nodes] == [0, 0], nodes[0].stdout[-3000:]
    return run_dir


def assert_same_run(run_dir: Path, reference: Path) -> None:
    """Bitwise the same weights, EMA and optimizer-visible data order (each rank's keys per step)."""
    last = f"checkpoints/step-{RESUME_STEPS:06d}"
    for file in ("model.safetensors", "ema.safetensors"):
        a, b = load_file(reference / last / file), load_file(run_dir / last / file)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{file} {k}"
    for rank in range(2):
        keys = (run_dir / f"keys-rank{rank}.jsonl").read_text()
        assert keys == (reference / f"keys-rank{rank}.jsonl").read_text()
        assert len(keys.splitlines()) == RESUME_STEPS


def test_rerunning_both_nodes_after_one_was_killed_resumes_bitwise(uninterrupted, tmp_path):
    """Node 1's worker is killed (SIGKILL) after step 6, past the step-4 checkpoint; node 0 stops with one line
    naming that checkpoint, at once: the dead process's sockets are closed by its kernel, so nothing waits for the
    collective timeout (the default, 600 s, here). The same two commands run again resume from that checkpoint
    and end where an uninterrupted run ends, bitwise in fp32."""
    import time

    run_dir = tmp_path / "run"
    start = time.time()
    broken = launch_nodes(run_dir, zero=2, steps=RESUME_STEPS, train=RESUME_TRAIN,
                          fault={"rank": 1, "at": "after-step:6"})
    took = time.time() - start
    assert [n.returncode != 0 for n in broken] == [True, True]
    lines = [line for line in broken[0].stdout.splitlines() if "a collective failed during step" in line]
    assert len(lines) == 1 and "checkpoints/step-000004" in lines[0], broken[0].stdout[-3000:]
    assert took < 400, took  # start-up, six steps and the stop (about a minute): below the 600 s timeout
    print(f"both nodes stopped {took:.0f} s after launch")
    rerun = launch_nodes(run_dir, zero=2, steps=RESUME_STEPS, train=RESUME_TRAIN)
    assert [n.returncode for n in rerun] == [0, 0], rerun[0].stdout[-3000:]
    assert "resumed from " + str(run_dir / "checkpoints/step-000004") in rerun[0].stdout  # not from scratch,
    assert_same_run(run_dir, uninterrupted)


def test_an_elastic_restart_resumes_from_the_last_checkpoint_by_itself(uninterrupted, tmp_path):
    """Two nodes under `torchrun --max-restarts 1`: node 1's worker is killed (SIGKILL) after step 6; both agents
    restart their workers, which resume from the step-4 checkpoint and end bitwise where an uninterrupted run
    ends. One command per node, run once."""
    run_dir = tmp_path / "run"
    nodes = launch_nodes(run_dir, zero=2, steps=RESUME_STEPS, train=RESUME_TRAIN, restarts=1,
                         fault={"rank": 1, "at": "after-step:6"})
    assert [n.returncode for n in nodes] == [0, 0], nodes[0].stdout[-3000:] + nodes[1].stdout[-3000:]
    assert "a collective failed during step 7" in nodes[0].stdout  # the first attempt did fail
    assert "resumed from " + str(run_dir / "checkpoints/step-000004") in nodes[0].stdout
    assert_same_run(run_dir, uninterrupted)


def test_a_node_lost_for_good_leaves_the_other_to_finish_under_elastic(uninterrupted, tmp_path):
    """`torchrun --nnodes 1:2 --max-restarts 1` and `train.elastic`: node 1 freezes after step 6 (SIGSTOP), then
    dies whole, agent and worker (SIGKILL), and does not come back. Node 0's agent restarts its worker alone, which
    converts the step-4 checkpoint for one process and ends near where the two nodes would have: the same global
    batches, only the reduction order differs."""
    import time

    import psutil

    run_dir, port = tmp_path / "run", _port()
    run_dir.mkdir()
    env = worker_env({**RESUME_TRAIN, "elastic": True}, {"rank": 1, "at": "after-step:6:SIGSTOP"})
    env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    args = [str(WORKER), str(run_dir), "2", "fp32", str(GLOBAL_BATCH), str(RESUME_STEPS), "1e-3", ""]
    logs = [open(tmp_path / f"node{rank}.log", "w") for rank in range(2)]
    procs = []
    try:
        for log in logs:  # node 0 first: its agent hosts the rendezvous, as node0 does on a cluster
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1:2", "--nproc_per_node", "1",
                 "--max-restarts", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
                 "--rdzv-id", "test", "--rdzv-conf", "last_call_timeout=5", *args],
                env=env, stdout=log, stderr=subprocess.STDOUT))
            time.sleep(3)
        node1, deadline = psutil.Process(procs[1].pid), time.monotonic() + 300
        while not any(p.status() == psutil.STATUS_STOPPED for p in node1.children(recursive=True)):
            assert time.monotonic() < deadline and procs[0].poll() is None, "node 1 never reached step 6"
            time.sleep(0.2)
        for p in [node1, *node1.children(recursive=True)]:
            p.kill()
        procs[0].wait(timeout=300)
    finally:
        for p in procs:
            for child in psutil.Process(p.pid).children(recursive=True) if p.poll() is None else []:
                child.kill()
            p.kill()
        for log in logs:
            log.close()
    out = (tmp_path / "node0.log").read_text()
    assert procs[0].returncode == 0, out[-3000:]
    assert "a collective failed during step 7" in out  # the first attempt did lose its peer
    assert "resumed from " + str(run_dir / "checkpoints/step-000004") in out
    assert "to a universal checkpoint for another world size" in out  # (its folder is pruned by the end)
    gone = [json.loads(line)["step"] for line in (run_dir / "keys-rank1.jsonl").read_text().splitlines()]
    assert gone == [1, 2, 3, 4]  # node 1's steps 5 and 6 were redone without it
    assert losses(run_dir) == approx(losses(uninterrupted), reordered(losses(uninterrupted)))
    last = f"checkpoints/step-{RESUME_STEPS:06d}/model.safetensors"
    a, b = load_file(uninterrupted / last), load_file(run_dir / last)
    for k in a:
        torch.testing.assert_close(b[k], a[k], **adam_steps(1e-3, RESUME_STEPS - 1.5), msg=k)
