"""Runs a tiny DMD distillation on fixed synthetic batches; launched by tests (alone or under torchrun).

    python tests/dist_distill_worker.py RUN_DIR TEACHER_DIR ZERO_STAGE GLOBAL_BATCH STEPS

Every rank takes its contiguous slice of the same global batches (tests/dist_worker.py), so any world size
distills on the same data. The GAN head and two fake updates per generator update are on. DIST_WORKER_TRAIN and
DIST_WORKER_FAULT (environment) as in tests/dist_worker.py. Not a test module.
"""
import json
import logging
import os
import sys

from dist_worker import ResumableBatches, inject_fault

from pixart.distill.config import DistillConfig
from pixart.distill.trainer import DistillTrainer

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # "resumed from ..." shows in the output
    run_dir, teacher, zero = sys.argv[1], sys.argv[2], int(sys.argv[3])
    global_batch, steps = int(sys.argv[4]), int(sys.argv[5])
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    cfg = DistillConfig.model_validate({
        "teacher": {"init": teacher},
        "data": {"shards": "unused", "batch_size": global_batch // world},
        "fake": {"updates_per_generator": 2},
        "gan": {"generator_weight": 1e-2},
        "optim": {"lr": 1e-3, "grad_clip": 1.0},
        "train": {"max_steps": steps, "log_every": 1, "ckpt_every": steps,
                  **json.loads(os.environ.get("DIST_WORKER_TRAIN", "{}"))},
        "ema": {"decay": 0.9},
        "deepspeed": {"zero_stage": zero, "precision": "fp32"},
    })
    inject_fault(rank)
    batches = ResumableBatches(steps * 2, global_batch, rank, world)  # one per fake update (the generator's reused)
    DistillTrainer(cfg, run_dir, batches=batches).run()
