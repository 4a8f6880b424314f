"""`pixart distill CONFIG`: DMD one-step distillation of a trained model on DeepSpeed; resumes by itself."""
from __future__ import annotations

import argparse

from pixart.cli import positive_int

EPILOG = """\
examples:
  pixart distill configs/pixart_xl2/dmd512.yaml --run-dir runs/dmd
  torchrun --nproc_per_node 8 -m pixart distill configs/pixart_xl2/dmd512.yaml --run-dir runs/dmd
  pixart distill CONFIG --set teacher.init=runs/stage3/checkpoints/latest --set fake.updates_per_generator=5

Three networks: the generator and the fake score (each initialised from the teacher, each its own ZeRO
engine) and the frozen teacher (the real score). The losses are config switches: dm (distribution matching,
real score with CFG), fake.updates_per_generator (two-time-scale update), regression (on teacher-sampled
pairs, mse or lpips) and gan (a head on the fake score's middle block). The run folder is a training
stage's: checkpoints/ (model.safetensors and ema.safetensors are the generator, student.json marks a
one-step student for `pixart sample` and `export-diffusers`), metrics.jsonl, tensorboard/, samples/
(teacher beside student), loss.png, DONE.json. Rerunning resumes exactly.
"""


def add_parser(sub) -> None:
    p = sub.add_parser("distill", help="DMD one-step distillation of a trained model (DeepSpeed, resumable)",
                       description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="distillation config (YAML; `base:` inherits another file)")
    p.add_argument("--run-dir", default=None, help="run folder (default: runs/<stage>)")
    p.add_argument("--max-steps", type=positive_int, default=None, help="stop after this many generator updates "
                   "(default: train.max_steps)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key after inheritance, e.g. dm.cfg=4.5 (repeatable)")
    p.set_defaults(run=run)


def run(args) -> None:
    import logging

    from pixart.atomic import check_out_folder
    from pixart.distill.config import DistillConfig
    from pixart.distill.trainer import DistillTrainer

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = DistillConfig.load(args.config, args.sets)
    if args.max_steps is not None:
        cfg.train.max_steps = args.max_steps
    run_dir = args.run_dir or f"runs/{cfg.stage}"
    check_out_folder(run_dir, "--run-dir")
    final = DistillTrainer(cfg, run_dir).run()
    print(f"{cfg.stage}: done; one-step student {final}")
