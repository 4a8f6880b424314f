"""`pixart train CONFIG`: one training stage on DeepSpeed; resumes by itself from its run folder."""
from __future__ import annotations

import argparse

from pixart.cli import positive_int

EPILOG = """\
examples:
  pixart train configs/pixart_xl2/stage2_sam256.yaml --run-dir runs/stage2
  torchrun --nproc_per_node 8 -m pixart train CONFIG --run-dir runs/stage2
  deepspeed --num_gpus 8 --module pixart train CONFIG --run-dir runs/stage2
  pixart train CONFIG --set optim.lr=1e-4 --set data.batch_size=16 --max-steps 100

The run folder gets config.yaml (resolved), checkpoints/ (latest, step-N/ with config.json +
model.safetensors + ema.safetensors for `export-diffusers` and the next stage), metrics.jsonl,
tensorboard/, samples/ (validation grids), loss.png and DONE.json. Rerunning the same command
resumes from checkpoints/latest, exactly; on another number of processes (a lost node) only with
--set train.elastic=true (docs/training.md, "Fewer nodes").
"""


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="one training stage (DeepSpeed ZeRO, resumable)", description=__doc__,
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="stage config (YAML; `base:` inherits another file)")
    p.add_argument("--run-dir", default=None, help="run folder (default: runs/<stage>)")
    p.add_argument("--max-steps", type=positive_int, default=None, help="stop after this many optimizer steps "
                   "(default: train.max_steps)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key after inheritance, e.g. optim.lr=1e-4 (repeatable)")
    p.set_defaults(run=run)


def run(args) -> None:
    import logging

    from pixart.atomic import check_out_folder
    from pixart.train.config import TrainConfig
    from pixart.train.trainer import Trainer

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = TrainConfig.load(args.config, args.sets)
    if args.max_steps is not None:
        cfg.train.max_steps = args.max_steps
    run_dir = args.run_dir or f"runs/{cfg.stage}"
    check_out_folder(run_dir, "--run-dir")
    final = Trainer(cfg, run_dir).run()
    print(f"{cfg.stage}: done; checkpoint {final}")
