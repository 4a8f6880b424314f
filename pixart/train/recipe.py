"""Recipes: PixArt's training decomposition as a list of steps that `pixart launch` runs in order.

    name: pixart-xl2
    stages:
      - {name: stage1, config: stage1_imagenet256.yaml}          # class-conditional DiT
      - {name: reparam, reparam: {source: stage1}}               # or source: DiT-XL-2-256x256.pt
      - {name: stage2, config: stage2_sam256.yaml, init: reparam}
      - {name: stage3, config: stage3_aesthetic512.yaml, init: stage2}
      - {name: dmd, distill: dmd512.yaml, init: stage3}          # one-step DMD student (pixart distill)

Each step writes RUN/<name>/; a training step's `init` (a previous step) becomes its `model.init`, a
distillation step's its `teacher.init`.
A finished step is skipped (its DONE.json, or the reparameterized folder), an interrupted one
resumes from its own checkpoints. Config paths are relative to the recipe file.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Literal

import torch.distributed as dist
from pydantic import Field, model_validator

from pixart.atomic import atomic_write
from pixart.errors import PixArtError

from .config import Section, load_train_config, read_yaml, validated

log = logging.getLogger("pixart.train")


class Reparam(Section):
    """`pixart.export.dit.ReparamConfig`'s fields, plus where the DiT comes from."""
    source: str  # a previous step's name, or a DiT checkpoint file (facebookresearch/DiT layout)
    global_init: Literal["mean", "block0", "zero"] = "mean"
    t_ref: int = 500
    caption_channels: int = 4096
    max_length: int = 120
    seed: int = 0


class Step(Section):
    name: str
    config: str | None = None  # a stage config (pixart train)
    distill: str | None = None  # a distillation config (pixart distill)
    init: str | None = None  # a previous step whose output starts this stage (or is the teacher)
    set: list[str] = Field(default_factory=list)  # --set overrides for this stage
    reparam: Reparam | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> Step:
        if [self.config, self.distill, self.reparam].count(None) != 2:
            raise ValueError(f"step {self.name!r}: give exactly one of `config` (a training stage), `distill` or "
                             "`reparam`")
        return self


class Recipe(Section):
    name: str
    stages: list[Step]
    collective_timeout_s: float = Field(600, gt=0)  # the launch's process group (train.collective_timeout_s)

    @model_validator(mode="after")
    def _order(self) -> Recipe:
        seen: set[str] = set()
        for s in self.stages:
            for ref in (s.init, s.reparam.source if s.reparam and not _looks_like_file(s.reparam.source) else None):
                if ref is not None and ref not in seen:
                    raise ValueError(f"step {s.name!r}: refers to {ref!r}, which is not an earlier step")
            if s.name in seen:
                raise ValueError(f"step name {s.name!r} is used twice")
            seen.add(s.name)
        return self


def _looks_like_file(source: str) -> bool:
    return Path(source).suffix in (".pt", ".pth", ".safetensors") or "/" in source


def load_recipe(path: str | os.PathLike) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise PixArtError(f"{path}: no such recipe file")
    return validated(Recipe, read_yaml(path), str(path))


def step_config(recipe_path: Path, step: Step, init: str | None):
    """A training or distillation step's config, with `init` (an earlier step's output) as its starting weights."""
    init_key = "teacher.init" if step.distill else "model.init"
    sets = list(step.set) + ([f"{init_key}={init}"] if step.init else [])
    if step.distill:
        from pixart.distill.config import load_distill_config

        return load_distill_config(recipe_path.parent / step.distill, sets)
    return load_train_config(recipe_path.parent / step.config, sets)


def check_inputs(recipe_path: Path, step: Step, cfg) -> None:
    """Before the first step trains: a DeepSpeed JSON that cannot be read stops the launch, and inputs that do not
    exist yet (local shards or scores, an init no earlier step makes) are named in a warning, since they may be
    made while the first stages train. URLs are not listed: a store may be slow to reach, and the loader names a
    wrong one."""
    from pixart.checkpoint import checkpoint_folder, load_config
    from pixart.data.shards import is_url, resolve_shards

    from .engine import deepspeed_config

    source = recipe_path.parent / (step.distill or step.config)
    try:
        deepspeed_config(cfg, 1)
    except PixArtError as e:
        raise PixArtError(f"{source}: {e}") from None
    missing = []
    shards = [cfg.data.shards] if isinstance(cfg.data.shards, str) else cfg.data.shards
    try:
        resolve_shards([s for s in shards if not is_url(s)])
    except PixArtError as e:
        missing.append(f"data.shards: {e}")
    scores = cfg.data.scores_dir
    if scores and not is_url(scores) and not Path(scores).is_dir():
        missing.append(f"data.scores_dir: {scores}: no such folder")
    init_key = "teacher.init" if step.distill else "model.init"
    init = cfg.teacher.init if step.distill else cfg.model.init
    if init and not step.init:  # an earlier step's output does not exist yet
        try:
            load_config(checkpoint_folder(init))
        except PixArtError as e:
            missing.append(f"{init_key}: {e}")
    for problem in missing:
        log.warning("%s: %s; step %s stops there unless it exists by then", source, problem, step.name)


def launch(recipe_path: str | os.PathLike, run_dir: str | os.PathLike | None = None) -> dict[str, str]:
    """Run the recipe's steps in order; returns {step: its output checkpoint folder}. Every step's config is
    loaded first, so that a typo in the last stage's file stops the launch before the first stage trains."""
    from pixart.distill.trainer import DistillTrainer
    from pixart.export.dit import ReparamConfig, convert_dit

    from .engine import init_distributed
    from .trainer import Trainer, is_done

    recipe_path = Path(recipe_path).resolve()
    recipe = load_recipe(recipe_path)
    for step in recipe.stages:
        if step.reparam is None:
            check_inputs(recipe_path, step, step_config(recipe_path, step, "<the output of an earlier step>"))
    root = Path(run_dir or Path("runs") / recipe.name)
    init_distributed(recipe.collective_timeout_s)
    rank = dist.get_rank()
    outputs: dict[str, str] = {}
    for step in recipe.stages:
        out = root / step.name
        if step.reparam is not None:
            r = step.reparam
            target = out / "checkpoint"
            src = outputs.get(r.source, r.source)
            if (target / "config.json").is_file():
                log.info("%s: done (%s), skipped", step.name, target)
            elif rank == 0:
                log.info("%s: reparameterizing %s", step.name, src)
                convert_dit(src, target, ReparamConfig(**r.model_dump(exclude={"source"})), overwrite=True)
            dist.barrier()
            outputs[step.name] = str(target)
            continue
        cfg = step_config(recipe_path, step, outputs.get(step.init))
        done = is_done(out, cfg.train.max_steps)
        if done is not None:
            log.info("%s: done (%s), skipped", step.name, done)
            outputs[step.name] = str(done)
            continue
        outputs[step.name] = str((DistillTrainer if step.distill else Trainer)(cfg, out).run())
    if rank == 0:
        atomic_write(root / "launch.json", json.dumps({"recipe": str(recipe_path), "outputs": outputs}, indent=2))
    return outputs
