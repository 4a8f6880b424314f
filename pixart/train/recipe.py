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
A finished step (its DONE.json) is skipped, with a warning when its config has changed since (`warn_changed`); an
interrupted one resumes from its own checkpoints; either stops, naming both, when the input it recorded
(`check_input`: the checkpoint's name and the id of the run that made it) is not the one it would get now. A step
is not extended past the checkpoint later steps were made from (`check_extend`). Config paths and a file
`reparam.source` are relative to the recipe file. One launch at a time holds a run folder (`lock_run`).
"""
from __future__ import annotations

import json
import logging
import os
import re
import uuid
from pathlib import Path
from typing import Literal

import torch.distributed as dist
import yaml
from pydantic import Field, field_validator, model_validator

from pixart.atomic import atomic_write, remove_dead_writers
from pixart.checkpoint import checkpoint_folder, read_json
from pixart.distill.config import DistillConfig
from pixart.errors import PixArtError

from .checkpoints import (
    RUN_ID,
    TRAINER_FILE,
    changed_input,
    hold_on_rank0,
    init_of,
    latest_checkpoint,
    release_folder,
    run_id_of,
    started_from,
    with_run,
)
from .config import Section, TrainConfig, read_yaml, validated

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

    @field_validator("name")
    @classmethod
    def _plain_name(cls, name: str) -> str:  # RUN/<name>/: one folder inside the run folder
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name in (".", ".."):
            raise ValueError(f"step name {name!r}: use one folder name of letters, digits, '-', '_' and '.'")
        return name

    @model_validator(mode="after")
    def _one_kind(self) -> Step:
        if [self.config, self.distill, self.reparam].count(None) != 2:
            raise ValueError(f"step {self.name!r}: give exactly one of `config` (a training stage), `distill` or "
                             "`reparam`")
        if self.reparam is not None and (self.init is not None or self.set):
            raise ValueError(f"step {self.name!r}: init and set do not apply to a reparam step")
        return self

    def source(self) -> str | None:
        """The earlier step or file this step is made from."""
        return self.reparam.source if self.reparam else self.init

    def input_key(self) -> str:
        """The key its records name its input by."""
        return "reparam.source" if self.reparam else "teacher.init" if self.distill else "model.init"


class Recipe(Section):
    name: str
    stages: list[Step]
    collective_timeout_s: float = Field(600, gt=0)  # the launch's process group (train.collective_timeout_s)
    elastic: bool = False  # every step's train.elastic: a step resumes at another world size (fewer nodes)

    @model_validator(mode="after")
    def _order(self) -> Recipe:
        if not self.stages:
            raise ValueError("stages: give at least one step")
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
    if path.is_dir():
        raise PixArtError(f"{path} is a folder, not a recipe file")
    if not path.is_file():
        raise PixArtError(f"{path}: no such recipe file")
    data = read_yaml(path)
    if isinstance(data, dict) and "stages" not in data and {"stage", "base", "teacher"} & data.keys():
        command = "distill" if "teacher" in data else "train"
        raise PixArtError(f"{path}: one stage's config, not a recipe (a recipe lists `stages:`); run it with "
                          f"`pixart {command} {path}`")
    for key in data if isinstance(data, dict) else ():  # before a missing `stages`, which a misspelt one causes
        if key not in Recipe.model_fields:
            raise PixArtError(f"{path}: {key}: unknown key")
    return validated(Recipe, data, str(path))


def reparam_source(recipe_path: Path, outputs: dict[str, str], step: Step) -> str:
    """A reparam step's DiT: an earlier step's output, or a file relative to the recipe file."""
    source = step.reparam.source
    return outputs[source] if source in outputs else str(recipe_path.parent / source)


def step_config(recipe_path: Path, recipe: Recipe, step: Step, init: str | None):
    """A training or distillation step's config, with `init` (an earlier step's output) as its starting weights
    and the recipe's `collective_timeout_s` as its `train.collective_timeout_s` (its watchdog's), since the launch's
    process group has the recipe's; `elastic: true` sets every step's `train.elastic`. A bad key in the step's `set:`
    is blamed on the recipe, not the config file."""
    key = step.input_key()
    ours = [f"train.collective_timeout_s={recipe.collective_timeout_s}", *(["train.elastic=true"] * recipe.elastic),
            *([f"{key}={init}"] if step.init else [])]
    load = DistillConfig.load if step.distill else TrainConfig.load
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
    from pixart.checkpoint import load_config
    from pixart.data.shards import is_url, resolve_shards

    from .engine import deepspeed_config

    if step.reparam is not None:
        source = step.reparam.source
        if _looks_like_file(source) and not (recipe_path.parent / source).exists():
            raise PixArtError(f"{recipe_path}: step {step.name}: reparam.source {source}: no such file "
                              f"({os.path.normpath(recipe_path.parent / source)}: the path is relative to the "
                              "recipe file)")
        return
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


LOCK_FILE = ".launch.lock"
# config keys that do not shape a step's output: a done step whose config changed only there is skipped silently
FREE_KEYS = {"model.init", "teacher.init", "train.log_every", "train.ckpt_every", "train.keep_last",
             "train.peak_tflops", "train.record_keys", "train.collective_timeout_s", "train.elastic",
             "data.num_workers", "data.shard_cache", "data.shard_cache_gb"}


def launch(recipe_path: str | os.PathLike, run_dir: str | os.PathLike | None = None) -> dict[str, str]:
    """Run the recipe's steps in order; returns {step: its output checkpoint folder}. Every step's config is
    loaded first, so that a typo in the last stage's file stops the launch before the first stage trains."""
    from pixart.distill.trainer import DistillTrainer

    from .engine import init_distributed
    from .trainer import Trainer, is_done

    recipe_path = Path(recipe_path).resolve()
    recipe = load_recipe(recipe_path)
    for step in recipe.stages:
        cfg = None if step.reparam else step_config(recipe_path, recipe, step, "<the output of an earlier step>")
        check_inputs(recipe_path, step, cfg)
    root = Path(run_dir or Path("runs") / recipe.name).resolve()
    init_distributed(recipe.collective_timeout_s)
    rank = dist.get_rank()
    say = log.info if rank == 0 else log.debug  # under torchrun: one copy of each line
    lock = lock_run(root)
    try:
        outputs: dict[str, str] = {}
        for step in recipe.stages:
            out = root / step.name
            if rank == 0 and out.is_dir():
                remove_dead_writers(out)  # a killed launch's DONE.json temp
            if step.reparam is not None:
                outputs[step.name] = run_reparam(recipe, root, step, reparam_source(recipe_path, outputs, step), say)
                continue
            cfg = step_config(recipe_path, recipe, step, outputs.get(step.init))
            key, init = init_of(cfg)
            check_input(step, out, key, started_from(init, out), run_id_of(init), later_folders(recipe, root, step))
            done = is_done(out, cfg.train.max_steps)
            if done is not None:
                if rank == 0 and (out / "config.yaml").is_file():
                    warn_changed(step, out, read_yaml(out / "config.yaml"), yaml.safe_load(cfg.resolved_yaml()))
                say("%s: done (%s), skipped", step.name, done)
                outputs[step.name] = str(done)
                continue
            check_extend(recipe, root, step, cfg.train.max_steps)
            outputs[step.name] = str((DistillTrainer if step.distill else Trainer)(cfg, out).run())
        if rank == 0:
            atomic_write(root / "launch.json", json.dumps({"recipe": str(recipe_path), "outputs": outputs}, indent=2))
    finally:
        if lock is not None:
            release_folder(lock)
    return outputs


def lock_run(root: Path) -> int | None:
    """The launch's hold on its run folder (RUN/.launch.lock), rank 0's; every rank stops when it cannot."""
    return hold_on_rank0(root, LOCK_FILE, "launch")


def run_reparam(recipe: Recipe, root: Path, step: Step, src: str, say) -> str:
    """The reparameterization step: done only with its DONE.json. A checkpoint without one (a kill between the
    two) is kept when its reparam.json records this source and these settings, else converted again."""
    from pixart.export.dit import ReparamConfig, convert_dit

    from .trainer import DONE_FILE

    out = root / step.name
    target = out / "checkpoint"
    settings = step.reparam.model_dump(exclude={"source"})
    source, source_id = started_from(src, out), run_id_of(src)
    if (out / DONE_FILE).is_file():
        check_input(step, out, "reparam.source", source, source_id, later_folders(recipe, root, step))
        if dist.get_rank() == 0 and (target / "reparam.json").is_file():
            made = read_json(target / "reparam.json")
            warn_changed(step, out, {f"reparam.{k}": made.get(k) for k in settings},
                         {f"reparam.{k}": v for k, v in settings.items()})
        say("%s: done (%s), skipped", step.name, target)
    elif dist.get_rank() == 0:
        if _converted(target, src, settings):
            log.info("%s: %s was converted from %s; recording it as done", step.name, target, src)
        else:
            log.info("%s: reparameterizing %s", step.name, src)
            convert_dit(src, target, ReparamConfig(**settings), overwrite=True)
        atomic_write(out / DONE_FILE, json.dumps({"checkpoint": str(target), "reparam.source": source,
                                                  f"reparam.source.{RUN_ID}": source_id, RUN_ID: uuid.uuid4().hex}))
    dist.barrier()
    return str(target)


def _converted(target: Path, src: str, settings: dict) -> bool:
    """Whether `target` holds a whole conversion of `src` with `settings` (its reparam.json says so). A source in
    the run folder counts by its name there (`started_from`): the run folder may have been moved since."""
    if not (target / "reparam.json").is_file():
        return False
    made = read_json(target / "reparam.json")
    was, name = Path(str(made.get("source"))), Path(started_from(src, target.parent))
    same = os.path.realpath(was) == os.path.realpath(checkpoint_folder(src)) or (
        not name.is_absolute() and was.parts[-len(name.parts):] == name.parts)
    return same and all(made.get(k) == v for k, v in settings.items())


def _flat(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            flat.update(_flat(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def warn_changed(step: Step, out: Path, was: dict, now: dict) -> None:
    """A done step is skipped even when its config (or a reparam step's settings) changed since: say so, naming
    the first keys that differ, in one line."""
    was, now = _flat(was or {}), _flat(now or {})
    keys = [k for k in {**was, **now} if was.get(k) != now.get(k)
            and k not in FREE_KEYS and not k.startswith("validation.")]
    if keys:
        shown = keys[:3] + ([f"... ({len(keys) - 3} more)"] if len(keys) > 3 else [])

        def values(tree):
            return ", ".join(k if k.startswith("...") else f"{k} {tree.get(k, '(unset)')}" for k in shown)

        log.warning("%s: done with %s; the %s now says %s; delete %s to redo it", step.name, values(was),
                    "recipe" if step.reparam else "config", values(now), out)


def recorded_input(out: Path) -> dict:
    """What a step recorded with its output: its DONE.json, else its latest checkpoint's trainer.json ({})."""
    from .trainer import DONE_FILE

    done, ckpt = out / DONE_FILE, latest_checkpoint(out)
    record = done if done.is_file() else ckpt / TRAINER_FILE if ckpt else None
    return read_json(record) if record else {}


def later_folders(recipe: Recipe, root: Path, step: Step) -> list[Path]:
    """The existing folders of the later steps made from `step`, directly or through each other."""
    names, found = {step.name}, []
    for later in recipe.stages[recipe.stages.index(step) + 1:]:
        if later.source() in names:
            names.add(later.name)
            if (root / later.name).exists():
                found.append(root / later.name)
    return found


def check_extend(recipe: Recipe, root: Path, step: Step, max_steps: int) -> None:
    """Refuse to train a step on past the checkpoint later steps recorded as their input: its `keep_last` would
    prune it, and they would be made from a checkpoint that is gone."""
    out = root / step.name
    ckpt = latest_checkpoint(out)
    if ckpt is None:
        return
    name, users = started_from(ckpt, out), []
    for later in recipe.stages[recipe.stages.index(step) + 1:]:
        if (later.source() == step.name and recorded_input(root / later.name).get(later.input_key()) == name
                or later.source() in users and (root / later.name).exists()):
            users.append(later.name)
    if users:
        at = read_json(ckpt / TRAINER_FILE)["step"]
        raise PixArtError(f"step {step.name}: extending it to {max_steps} steps would leave {', '.join(users)} made "
                          f"from its {ckpt.name}; delete their folders to redo them, or keep train.max_steps {at}")


def check_input(step: Step, out: Path, key: str, now: str | None, now_id: str | None = None,
                later: list[Path] | None = None) -> None:
    """Refuse to skip or resume a step whose recorded input (DONE.json's, else its latest checkpoint's) is not
    the one it would start from now: its output, and every later step's, would silently come from the old one.
    The input is its checkpoint's name and, where both sides know it, the id of the run that made it (a step
    redone in place has the same names). Records from before inputs (or ids) were recorded are not checked."""
    record = recorded_input(out)
    was, was_id = record.get(key, now), record.get(f"{key}.{RUN_ID}")
    if was_id and now_id and was_id != now_id:
        was, now = with_run(was, was_id), with_run(now, now_id)
    if was != now:
        raise PixArtError(f"step {step.name}: {changed_input(out, key, was, now, later)}")
