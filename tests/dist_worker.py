"""Runs one tiny training stage on fixed synthetic batches; launched by tests (alone or under torchrun).

    python tests/dist_worker.py RUN_DIR ZERO_STAGE PRECISION GLOBAL_BATCH STEPS [LR [MODEL_FLAGS]]

MODEL_FLAGS: comma-separated (possibly empty) boolean `model.` options to switch on, e.g. `compile,grad_checkpointing`.
DIST_WORKER_TRAIN (environment, JSON): `train.` settings merged over the defaults, e.g. {"ckpt_every": 5}.
DIST_WORKER_DEEPSPEED (environment): a DeepSpeed JSON file for `deepspeed.config`.
DIST_WORKER_FAULT (environment, JSON): {"rank": R, "at": "after-step:N"} kills rank R with SIGKILL there, in the
first attempt only (an elastic restart, TORCHELASTIC_RESTART_COUNT > 0, runs clean).
DIST_WORKER_SLOW_CONVERSION (environment, seconds): DeepSpeed's ds_to_universal takes at least that long (an XL
state on a shared filesystem).

Every rank takes its contiguous slice of the same global batches, so any world size trains on the
same data. Not a test module: pytest collects only test_*.py.
"""
import json
import logging
import os
import sys
import time

import torch

from pixart.train.config import TrainConfig
from pixart.train.trainer import Trainer


def global_batches(n_steps: int, batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    for step in range(n_steps):
        lengths = torch.randint(1, 6, (batch,), generator=g)
        mask = (torch.arange(5)[None] < lengths[:, None]).long()
        yield {"keys": [f"{step:04d}-{i:03d}" for i in range(batch)],
               "latents": torch.randn(batch, 4, 8, 8, generator=g),
               "y": torch.randn(batch, 5, 16, generator=g) * mask[..., None],
               "mask": mask}


def rank_slice(batches, rank: int, world: int):
    for b in batches:
        n = len(b["keys"]) // world
        yield {k: v[rank * n:(rank + 1) * n] for k, v in b.items()}


class ResumableBatches:
    """This rank's slice of the global batches, saving and restoring its position as the shard loader does,
    so a resumed run reads the batches an uninterrupted one would."""

    def __init__(self, n_steps: int, batch: int, rank: int, world: int):
        self.n_steps, self.batch, self.rank, self.world = n_steps, batch, rank, world
        self.taken = 0

    def __iter__(self):
        batches = rank_slice(global_batches(self.n_steps, self.batch), self.rank, self.world)
        for i, b in enumerate(batches):
            if i >= self.taken:
                self.taken += 1
                yield b

    def state_dict(self) -> dict:
        return {"taken": self.taken}

    def load_state_dict(self, state: dict) -> None:
        self.taken = state["taken"]


def inject_fault(rank: int) -> None:
    fault = json.loads(os.environ.get("DIST_WORKER_FAULT", "{}"))
    if fault.get("rank") == rank and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
        os.environ["PIXART_FAULT"] = fault["at"]


def slow_conversion(seconds: float) -> None:
    import deepspeed.checkpoint.ds_to_universal as ds_to_universal

    convert = ds_to_universal.main

    def slow(args):
        time.sleep(seconds)
        return convert(args)

    ds_to_universal.main = slow


def config(zero: int, precision: str, batch: int, steps: int, lr: float = 1e-3, flags: tuple[str, ...] = ()):
    return TrainConfig.model_validate({
        "stage": "equivalence",
        "model": {"name": "PixArt-S/2", **dict.fromkeys(flags, True),
                  "arch": {"input_size": 8, "in_channels": 4, "depth": 2, "hidden_size": 64, "num_heads": 4,
                           "caption_channels": 16, "model_max_length": 5}},
        "data": {"shards": "unused", "batch_size": batch},
        "optim": {"lr": lr, "warmup_steps": 2, "grad_clip": 1.0},
        "train": {"max_steps": steps, "log_every": 1, "ckpt_every": steps,
                  **json.loads(os.environ.get("DIST_WORKER_TRAIN", "{}"))},
        "ema": {"decay": 0.9},
        "deepspeed": {"zero_stage": zero, "precision": precision, "config": os.environ.get("DIST_WORKER_DEEPSPEED")},
    })


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # "resumed from ..." shows in the output
    run_dir, zero, precision = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    global_batch, steps = int(sys.argv[4]), int(sys.argv[5])

    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    lr = float(sys.argv[6]) if len(sys.argv) > 6 else 1e-3
    flags = tuple(filter(None, sys.argv[7].split(","))) if len(sys.argv) > 7 else ()
    cfg = config(zero, precision, global_batch // world, steps, lr, flags)
    inject_fault(rank)
    if "DIST_WORKER_SLOW_CONVERSION" in os.environ:
        slow_conversion(float(os.environ["DIST_WORKER_SLOW_CONVERSION"]))
    Trainer(cfg, run_dir, batches=ResumableBatches(steps, global_batch, rank, world)).run()
