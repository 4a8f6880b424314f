"""The DeepSpeed engine's optimizer: torch's fused AdamW, which must step exactly like the plain one."""
import copy
import os

import pytest
import torch
from tolerance import reordered

from pixart.models import build_model
from pixart.train.config import TrainConfig
from pixart.train.engine import build_engine, init_distributed


def _tiny():
    torch.manual_seed(0)
    return build_model("PixArt-S/2", input_size=8, depth=2, hidden_size=32, num_heads=2, caption_channels=16,
                       model_max_length=8)


def test_engine_uses_fused_adamw_that_steps_like_the_default():
    init_distributed()
    cfg = TrainConfig.model_validate({"stage": "t", "data": {"shards": "unused"}, "optim": {
        "lr": 1e-3, "warmup_steps": 0, "weight_decay": 0.03, "grad_clip": 0}, "deepspeed": {"precision": "fp32"}})
    model = _tiny()
    plain = copy.deepcopy(model)
    engine, optimizer, _ = build_engine(model, cfg, world_size=1)
    assert getattr(optimizer, "optimizer", optimizer).defaults["fused"] is True  # under DeepSpeed's ZeRO wrapper
    reference = torch.optim.AdamW(plain.parameters(), lr=1e-3, betas=cfg.optim.betas, eps=cfg.optim.eps,
                                  weight_decay=0.03, foreach=True)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=g) for p in plain.parameters()]
        engine.backward(sum((p * grad).sum() for p, grad in zip(engine.module.parameters(), grads, strict=True)))
        engine.step()
        for q, grad in zip(plain.parameters(), grads, strict=True):
            q.grad = grad
        reference.step()
    for (name, p), q in zip(engine.module.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p, q, **reordered(q), msg=name)  # the same gradients: only the kernel differs


def test_warmup_is_pixarts_linear_from_zero_then_flat():
    """PixArt-alpha's build_lr_scheduler (diffusion/utils/lr_scheduler.py) is diffusers'
    get_constant_schedule_with_warmup, stepped after each optimizer step (train_scripts/train.py): the first
    update runs at lr 0, the (warmup + 1)-th at the full lr."""
    init_distributed()
    for warmup, want in [(4, [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]), (0, [1.0, 1.0])]:
        cfg = TrainConfig.model_validate({"stage": "t", "data": {"shards": "unused"}, "optim": {
            "lr": 1e-3, "warmup_steps": warmup, "grad_clip": 0}, "deepspeed": {"precision": "fp32"}})
        engine, _, _ = build_engine(_tiny(), cfg, world_size=1)
        lrs = []
        for _ in want:
            lrs.append(engine.get_lr()[0])
            engine.backward(sum(p.sum() for p in engine.module.parameters()))
            engine.step()
        assert lrs == pytest.approx([1e-3 * w for w in want], abs=1e-12)


def test_a_group_of_one_does_not_build_the_shared_memory_op(tmp_path):
    """DeepSpeed compiles its CPU shared-memory all-reduce op when it starts its backend (about a minute on a
    fresh 2-core machine); a process with no launcher is a group of one and has no peer to share with."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = ("from pixart.train.engine import init_distributed; init_distributed(); "
            "import deepspeed.comm.comm as c; print('shm op:', c.cdb.shm_comm_op); "
            "import atexit, torch.distributed as d; atexit._run_exitfuncs(); "
            "print('group left:', not d.is_initialized())")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                          "MASTER_PORT")}
    env.update(TORCH_EXTENSIONS_DIR=str(tmp_path), PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "shm op: None" in r.stdout and not any(tmp_path.iterdir())  # nothing compiled into the fresh cache
    assert "group left: True" in r.stdout  # destroyed at exit, not left to gloo's threads (pytorch/pytorch#190489)


def test_srun_tasks_without_a_launcher_are_refused(monkeypatch):
    """`srun -n 2 python -m pixart train` gives each task SLURM_* variables and no WORLD_SIZE (srun(1)): each
    would train alone, into one folder. Under `srun torchrun` the workers have WORLD_SIZE and go on."""
    import deepspeed

    from pixart.errors import PixArtError

    joined = []
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(deepspeed, "init_distributed", lambda **kw: joined.append(kw))
    monkeypatch.setattr("pixart.train.engine._skip_shm_op", lambda: None)
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "2")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(PixArtError, match=r"^srun started 2 tasks \(SLURM_STEP_NUM_TASKS\) but no launcher told them "
                                          r"their ranks \(no WORLD_SIZE\): run one torchrun per node under srun "
                                          r"\(docs/training.md, Slurm\), or set WORLD_SIZE=1 where each task trains "
                                          r"alone$"):
        init_distributed()
    assert not joined
    monkeypatch.setenv("WORLD_SIZE", "1")  # one task of a sweep, training alone: a group of one of its own
    monkeypatch.setenv("MASTER_ADDR", "node7")
    seen = []
    monkeypatch.setattr(deepspeed, "init_distributed", lambda **kw: seen.append(os.environ["MASTER_ADDR"]))
    init_distributed()
    assert seen == ["127.0.0.1"] and os.environ["MASTER_ADDR"] == "node7" and os.environ["WORLD_SIZE"] == "1"
    monkeypatch.setenv("WORLD_SIZE", "2")  # under srun torchrun: the launcher's ranks
    monkeypatch.setenv("RANK", "1")
    init_distributed()
    assert seen == ["127.0.0.1", "node7"]


def test_a_restarted_worker_that_cannot_join_says_to_give_each_attempt_its_own_store(monkeypatch):
    """torchrun's shared rendezvous store hands restarted workers the old attempt's gloo addresses: instead of
    gloo's traceback, one line naming the variable that fixes it (pytorch/pytorch#135712)."""
    import deepspeed

    from pixart.errors import PixArtError

    def refused(**_):
        raise RuntimeError("Gloo connectFullMesh failed with [../gloo/transport/tcp/pair.cc:144] Connection refused")

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(deepspeed, "init_distributed", refused)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "pixart")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    monkeypatch.delenv("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", raising=False)
    with pytest.raises(PixArtError, match=r"after a torchrun restart \(Gloo connectFullMesh failed.*\); set "
                                          r"TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"):
        init_distributed()
    # a worker restarted because a node rejoined: torchrun leaves its count at 0, even under --max-restarts 0
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    with pytest.raises(PixArtError, match=r"could not form \(Gloo connectFullMesh failed.*\); if torchrun restarted "
                                          r"these workers .*, set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"):
        init_distributed()
    monkeypatch.setenv("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")  # a store per attempt already: gloo's own error
    for without_torchrun in (False, True):
        if without_torchrun:
            monkeypatch.delenv("TORCH_DISABLE_SHARE_RDZV_TCP_STORE")
            monkeypatch.delenv("TORCHELASTIC_RUN_ID")  # another launcher, which restarts nothing
        with pytest.raises(RuntimeError, match="connectFullMesh") as e:
            init_distributed()
        assert not isinstance(e.value, PixArtError)
