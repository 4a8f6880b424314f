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
resumes from its own checkpoints; either stops, naming both, when the input it recorded (`check_input`) is not the
one it would get now. Config paths are relative to the recipe file.
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
from pixart.checkpoint import read_json
from pixart.errors import PixArtError

from .checkpoints import TRAINER_FILE, changed_input, init_of, latest_checkpoint, started_from
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


def step_config(recipe_path: Path, recipe: Recipe, step: Step, init: str | None):
    """A training or distillation step's config, with `init` (an earlier step's output) as its starting weights
    and the recipe's `collective_timeout_s` as its `train.collective_timeout_s` (its watchdog's), since the launch's
    process group has the recipe's. A bad key in the step's `set:` is blamed on the recipe, not the config file."""
    key = "teacher.init" if step.distill else "model.init"
    ours = [f"train.collective_timeout_s={recipe.collective_timeout_s}"] + ([f"{key}={init}"] if step.init else [])
    if step.distill:
        from pixart.distill.config import load_distill_config as load
    else:
        load = load_train_config
    path = recipe_path.parent / (step.distill or step.config)
    try:
        return load(path, list(step.set) + ours)
    except PixArtError as e:
        if not step.set:
            raise
        load(path, ours)  # the file's own problem: raised as such
        raise PixArtError(f"{recipe_path}: step {step.name}'s set: {str(e).removeprefix(f'{path}: ')}") from None


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
    key, init = init_of(cfg)
    if init and not step.init:  # an earlier step's output does not exist yet
        try:
            load_config(checkpoint_folder(init))
        except PixArtError as e:
            missing.append(f"{key}: {e}")
    for problem in missing:
        log.warning("%s: %s; step %s stops there unless it exists by then", source, problem, step.name)


def launch(recipe_path: str | os.PathLike, run_dir: str | os.PathLike | None = None) -> dict[str, str]:
    """Run the recipe's steps in order; returns {step: its output checkpoint folder}. Every step's config is
    loaded first, so that a typo in the last stage's file stops the launch before the first stage trains."""
    from pixart.distill.trainer import DistillTrainer
    from pixart.export.dit import ReparamConfig, convert_dit

    from .engine import init_distributed
    from .trainer import DONE_FILE, Trainer, is_done

    recipe_path = Path(recipe_path).resolve()
    recipe = load_recipe(recipe_path)
    for step in recipe.stages:
        if step.reparam is None:
            check_inputs(recipe_path, step, step_config(recipe_path, recipe, step, "<the output of an earlier step>"))
    root = Path(run_dir or Path("runs") / recipe.name)
    init_distributed(recipe.collective_timeout_s)
    rank = dist.get_rank()
    say = log.info if rank == 0 else log.debug  # under torchrun: one copy of each line
    outputs: dict[str, str] = {}
    for step in recipe.stages:
        out = root / step.name
        if step.reparam is not None:
            r = step.reparam
            target = out / "checkpoint"
            src = outputs.get(r.source, r.source)
            source = started_from(src, out)
            if (target / "config.json").is_file():
                check_input(step, out, "reparam.source", source)
                say("%s: done (%s), skipped", step.name, target)
            elif rank == 0:
                log.info("%s: reparameterizing %s", step.name, src)
                convert_dit(src, target, ReparamConfig(**r.model_dump(exclude={"source"})), overwrite=True)
                atomic_write(out / DONE_FILE, json.dumps({"checkpoint": str(target), "reparam.source": source}))
            dist.barrier()
            outputs[step.name] = str(target)
            continue
        cfg = step_config(recipe_path, recipe, step, outputs.get(step.init))
        key, init = init_of(cfg)
        check_input(step, out, key, started_from(init, out))
        done = is_done(out, cfg.train.max_steps)
        if done is not None:
            say("%s: done (%s), skipped", step.name, done)
            outputs[step.name] = str(done)
            continue
        outputs[step.name] = str((DistillTrainer if step.distill else Trainer)(cfg, out).run())
    if rank == 0:
        atomic_write(root / "launch.json", json.dumps({"recipe": str(recipe_path), "outputs": outputs}, indent=2))
    return outputs


def check_input(step: Step, out: Path, key: str, now: str | None) -> None:
    """Refuse to skip or resume a step whose recorded input (DONE.json's, else its latest checkpoint's) is not
    the one it would start from now: its output, and every later step's, would silently come from the old one.
    Records from before inputs were recorded are not checked."""
    from .trainer import DONE_FILE

    done, ckpt = out / DONE_FILE, latest_checkpoint(out)
    record = done if done.is_file() else ckpt / TRAINER_FILE if ckpt else None
    was = read_json(record).get(key, now) if record else now
    if was != now:
        raise PixArtError(f"step {step.name}: {changed_input(out, key, was, now)}")
