"""DeepSpeed set-up: the process group, the DeepSpeed config a stage config implies, and the engine.

One process with no launcher gets a one-rank group of its own; under `torchrun` or the
`deepspeed` launcher the ranks come from the environment. NCCL on GPUs, gloo on CPUs.
"""
from __future__ import annotations

import atexit
import json
import os
import socket
from functools import partial
from pathlib import Path

import torch

from pixart.errors import PixArtError
from pixart.models import DiT, PixArt

from .config import TrainConfig
from .watchdog import restart_hint


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(timeout_s: float = 600) -> torch.device:
    """Join (or, alone, create) the process group, whose collectives give up after `timeout_s` (a lost node);
    returns this rank's device. Joining waits as long: torchrun's agents have already met when it starts."""
    from datetime import timedelta

    import deepspeed

    cuda = torch.cuda.is_available()
    if not torch.distributed.is_initialized():
        srun_tasks = int(os.environ.get("SLURM_STEP_NUM_TASKS", "1") or 1)
        if srun_tasks > 1 and "WORLD_SIZE" not in os.environ:  # else each task trains alone, into one folder
            raise PixArtError(f"srun started {srun_tasks} tasks (SLURM_STEP_NUM_TASKS) but no launcher told them "
                              "their ranks (no WORLD_SIZE): run one torchrun per node under srun "
                              "(docs/training.md, Slurm), or set WORLD_SIZE=1 where each task trains alone")
        world = os.environ.get("WORLD_SIZE")
        launched = world is not None and (world != "1" or "RANK" in os.environ)  # a bare WORLD_SIZE=1: alone
        alone = {} if launched else dict(  # no launcher: a group of one
            RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
        before = {key: os.environ.get(key) for key in alone}
        os.environ.update(alone)
        if os.environ["WORLD_SIZE"] == "1":  # one rank shares memory with no one: skip compiling DeepSpeed's
            _skip_shm_op()  # CPU shared-memory all-reduce op (about a minute on a fresh 2-core machine)
        try:
            deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", verbose=False,
                                       timeout=timedelta(seconds=timeout_s))
            if not cuda:  # gloo's threads, not NCCL's: destroying an NCCL group waits on its collectives
                atexit.register(leave_process_group)
        except RuntimeError as e:
            hint = restart_hint(e)
            if hint is not None:
                raise PixArtError(hint) from None
            raise
        finally:  # child processes (a nested run) must not take our group of one for a launcher's
            for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):  # LOCAL_RANK stays: DeepSpeed reads it
                if key in alone and before[key] is None:
                    os.environ.pop(key)
                elif key in alone:
                    os.environ[key] = before[key]
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def leave_process_group() -> None:
    """Destroy the process group, if one is up, while the interpreter is whole: left to the interpreter's exit,
    gloo's threads can abort the process ("terminate called without an active exception", pytorch/pytorch#190489).
    `init_distributed` registers it to run at exit for gloo (not sooner: DeepSpeed keeps the group it was started
    with; not for NCCL, whose destroy waits on a lost peer's collective, pytorch/pytorch#141510)."""
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _skip_shm_op() -> None:
    import importlib

    backend = importlib.import_module("deepspeed.comm.torch")  # `import ... as` would give `torch`: the package
    if hasattr(backend, "build_shm_op"):  # binds that name to the torch library
        backend.build_shm_op = lambda: None


def deepspeed_config(cfg: TrainConfig, world_size: int, load_universal: bool = False) -> dict:
    """The DeepSpeed JSON: the user's file (if any) under the keys the stage config owns; `load_universal` for a
    run resumed at another world size (`checkpoints.needs_universal`)."""
    ds: dict = {}
    if cfg.deepspeed.config:
        path = Path(cfg.deepspeed.config)
        try:
            ds = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise PixArtError(f"deepspeed.config {path}: cannot read DeepSpeed JSON ({e})") from None
    precision = cfg.deepspeed.precision
    ds.update(
        train_micro_batch_size_per_gpu=cfg.data.batch_size,
        gradient_accumulation_steps=cfg.optim.grad_accum,
        train_batch_size=cfg.data.batch_size * cfg.optim.grad_accum * world_size,
        gradient_clipping=cfg.optim.grad_clip,
        steps_per_print=10 ** 9,  # our own logging
        wall_clock_breakdown=False,
        bf16={**ds.get("bf16", {}), "enabled": precision == "bf16"},
        fp16={**ds.get("fp16", {}), "enabled": precision == "fp16"},
    )
    ds["zero_optimization"] = {**ds.get("zero_optimization", {}), "stage": cfg.deepspeed.zero_stage}
    ds.setdefault("zero_allow_untested_optimizer", True)  # torch's AdamW: ZeRO only partitions its state
    ds["checkpoint"] = {**ds.get("checkpoint", {}), "load_universal": load_universal}
    return ds


def check_deepspeed(cfg: TrainConfig, world_size: int) -> None:
    """What DeepSpeed would refuse inside `build_engine`, in one line before a run writes anything: an unreadable
    deepspeed.config, and a precision its accelerator does not support here (fp16 on most CPUs)."""
    from deepspeed.accelerator import get_accelerator

    deepspeed_config(cfg, world_size)
    precision, accelerator = cfg.deepspeed.precision, get_accelerator()
    supported = {"fp16": accelerator.is_fp16_supported, "bf16": accelerator.is_bf16_supported}.get(precision)
    if supported is not None and not supported():
        raise PixArtError(f"deepspeed.precision {precision}: DeepSpeed does not support it on this machine "
                          f"({accelerator.device_name()}); use {'bf16 or ' * (precision == 'fp16')}fp32")


def build_engine(model: torch.nn.Module, cfg: TrainConfig, world_size: int, load_universal: bool = False):
    """deepspeed.initialize with torch's fused AdamW (one kernel over all tensors, on GPUs and CPUs alike:
    3x faster than the default on a 2-core CPU) and the warmup schedule.

    ZeRO-3 gathers each transformer block whole (a leaf module): one gather per block rather than per
    linear layer, and no hooks inside a compiled block's forward."""
    import deepspeed
    from deepspeed.utils import set_z3_leaf_modules
    from diffusers.optimization import get_constant_schedule_with_warmup

    o = cfg.optim
    if cfg.deepspeed.zero_stage == 3:  # the blocks of every DiT or PixArt inside `model` (a wrapper's too)
        set_z3_leaf_modules(model, list({type(m.blocks[0]) for m in model.modules() if isinstance(m, (DiT, PixArt))}))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay, fused=True)
    # PixArt's own schedule (diffusion/utils/lr_scheduler.py): linear warmup from lr 0 at the first step, then flat
    schedule = partial(get_constant_schedule_with_warmup, num_warmup_steps=o.warmup_steps)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=schedule,
        config=deepspeed_config(cfg, world_size, load_universal))
    if world_size == 1 and cfg.deepspeed.zero_stage == 0:
        engine.enable_backward_allreduce = False  # one rank: its "all-reduce" would only copy every gradient twice
    if not (engine.zero_optimization() or engine.fp16_enabled() or engine.bfloat16_enabled()):
        _keep_clip_norm(engine)
    return engine, optimizer, scheduler


def _keep_clip_norm(engine) -> None:
    """DeepSpeed's plain fp32 path (ZeRO 0, no mixed precision) clips the gradients but drops the norm it
    computed, so `get_global_grad_norm()` stayed None there (the logs said 0.0): keep it, as its ZeRO and
    mixed-precision paths do. Without clipping (`optim.grad_clip: 0`) no norm is computed, and none is logged."""
    from deepspeed.runtime.utils import clip_grad_norm_

    def clip_and_keep_norm() -> None:
        engine._global_grad_norm = clip_grad_norm_(parameters=engine.module.parameters(),
                                                   max_norm=engine.gradient_clipping(), mpu=engine.mpu)
    engine.clip_fp32_gradients = clip_and_keep_norm
