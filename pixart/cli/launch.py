"""`pixart launch RECIPE`: PixArt's staged training, each stage starting from the previous one's output."""
from __future__ import annotations

import argparse

EPILOG = """\
A recipe lists steps: training stages (`config:` a stage config), DMD distillations (`distill:` a
distillation config) and the DiT -> PixArt reparameterization (`reparam:`). `init` names the step
whose output starts a step, and `set:` overrides its config's keys as --set does. Every step
writes RUN_DIR/<step>/. Every step's config is read before the first step trains; inputs that do
not exist yet (local shards, scores, an init no step makes) are named in a warning, since they
may be made while the first stages train. Rerun the same command after an interruption: finished
steps are skipped and the interrupted one resumes from its last checkpoint. Under torchrun or the
deepspeed launcher every rank runs it (rank 0 prints). Under a recipe, every step's
train.collective_timeout_s is the recipe's collective_timeout_s, and `elastic: true` at the recipe's top lets
every step resume on another number of processes (a node lost for good). A step whose recorded input (the
`init` it was made from, and the id of the run that made it) is not the one it would get now is
refused, not skipped or resumed; so is extending a step past the checkpoint later steps were made
from. A finished step whose config changed since is skipped with a warning naming the keys. A
file reparam.source is relative to the recipe file. One launch at a time per run folder.

examples:
  pixart launch configs/pixart_xl2/recipe.yaml --run-dir runs/pixart-xl2
  torchrun --nproc_per_node 8 -m pixart launch configs/pixart_xl2/recipe.yaml
  TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun --standalone --nproc_per_node 8 --max-restarts 3 \\
      -m pixart launch configs/pixart_xl2/recipe.yaml
"""


def add_parser(sub) -> None:
    p = sub.add_parser("launch", help="run a recipe's stages in order (skips finished ones)", description=__doc__,
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", help="recipe YAML (e.g. configs/pixart_xl2/recipe.yaml)")
    p.add_argument("--run-dir", default=None, help="folder for the steps' outputs (default: runs/<recipe name>)")
    p.set_defaults(run=run)


def run(args) -> None:
    import logging

    from pixart.train.recipe import launch

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import torch.distributed as dist

    outputs = launch(args.recipe, args.run_dir)
    if dist.get_rank() == 0:  # under torchrun: one list, not one per rank
        for step, path in outputs.items():
            print(f"{step}: {path}")
