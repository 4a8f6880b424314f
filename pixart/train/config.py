"""The stage config: one typed, validated record per training stage, read from YAML.

    base: stage2.yaml            # optional: this file's keys are merged over the base's (recursively)
    model: {init: runs/reparam, arch: {input_size: 16}}
    data: {shards: feats/, batch_size: 32}

`--set data.batch_size=8` overrides a key after inheritance (the value is parsed as YAML). An
unknown key or a wrong type is one line naming it. `resolved_yaml()` is what a run writes into
its folder: that file alone reruns the stage.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, field_validator, model_validator
from typing_extensions import Self  # typing.Self from Python 3.11; pydantic depends on typing_extensions

from pixart.errors import PixArtError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class ModelSection(Section):
    init: str | None = None  # a checkpoint folder (config.json + model.safetensors): the previous stage
    name: str = "PixArt-XL/2"  # used when there is no `init`
    init_ema: bool = False  # start from the init's EMA weights instead of its raw ones
    arch: dict[str, Any] = Field(default_factory=dict)  # ModelConfig fields over the name's or the init's
    # Activation checkpointing: all blocks (true), none (false), the first N, or "auto": the fewest blocks
    # whose activations, measured for one block at this batch shape, fit activation_memory_gb.
    grad_checkpointing: bool | int | str = False
    activation_memory_gb: float | None = Field(None, gt=0)  # None: free device memory x 0.9 - weights/optimizer
    compile: bool = False  # torch.compile each block (dynamic shapes: no recompiles across buckets)

    @field_validator("name")
    @classmethod
    def _name(cls, v, info):
        """The name builds the model only without an init (declared first for this): a typo stops at reading."""
        from pixart.models import model_config

        if info.data.get("init") is None:
            try:
                model_config(v)
            except PixArtError as e:
                raise ValueError(str(e)) from None
        return v

    @field_validator("arch")
    @classmethod
    def _arch(cls, v):
        from pixart.models.config import fields_problem

        if problem := fields_problem(v):
            raise ValueError(problem)
        return v

    @field_validator("grad_checkpointing", mode="before")
    @classmethod
    def _checkpointing(cls, v):
        if isinstance(v, bool) or v == "auto" or (isinstance(v, int) and v >= 0):
            return v
        raise ValueError(f"expected true, false, a number of blocks or 'auto', got {v!r}")


class DataSection(Section):
    shards: str | list[str]
    batch_size: int = Field(8, ge=1)  # per process and micro-step
    caption: str | dict[str, float] = "txt"  # a caption source, or a mix {source: probability}
    buckets: int | None = None  # raw shards: aspect buckets for this side
    resolution: int = 256  # raw shards without buckets
    scan_samples: int | None = Field(None, ge=1)  # shards without bucket counts: scan the first N (None: every one)
    num_workers: int = Field(1, ge=0)
    scores_dir: str | None = None  # aesthetic subset: DIR/<shard>.aesthetic.jsonl
    min_score: float | None = None
    expected: dict[str, Any] | None = None  # feature manifest settings checked before step 1
    shard_cache: str | None = None  # a local folder keeping remote shards after their first read (per node)
    shard_cache_gb: float = Field(50, gt=0)  # its bound; the least recently read shards go first


class EncodersSection(Section):
    """Frozen encoders, for raw shards (features not pre-extracted) and for validation prompts."""
    text_encoder: str | None = None  # None: the feature manifest's
    vae: str | None = None  # an AutoencoderKL; None: the manifest's image encoder
    dtype: Literal["bf16", "fp32"] = "bf16"
    max_length: int = 120


class DiffusionSection(Section):
    prediction: Literal["epsilon", "v_prediction"] = "epsilon"  # PixArt's is epsilon (with learned sigma)
    min_snr_gamma: float | None = Field(None, gt=0)  # Min-SNR loss weighting (e.g. 5); None: PixArt's plain MSE
    timesteps: Literal["uniform", "logit_normal"] = "uniform"  # how training draws t (uniform: PixArt's)


class OptimSection(Section):
    # PixArt-alpha: AdamW lr 2e-5, weight decay 0.03, eps 1e-10, grad clip 0.01, 1000 warmup steps.
    lr: float = Field(2e-5, gt=0)
    weight_decay: float = Field(0.03, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-10
    warmup_steps: int = Field(1000, ge=0)
    grad_clip: float = Field(0.01, ge=0)  # 0: no clipping
    grad_accum: int = Field(1, ge=1)


class TrainSection(Section):
    max_steps: int = Field(1000, ge=1)  # optimizer steps
    seed: int = 0
    caption_dropout: float = Field(0.1, ge=0, le=1)  # captions (or class labels) replaced by the null one
    log_every: int = Field(10, ge=1)
    ckpt_every: int = Field(1000, ge=1)
    keep_last: int = Field(2, ge=1)  # checkpoints kept (the newest)
    peak_tflops: float | None = None  # per process, for the MFU estimate; None: known GPUs only
    record_keys: bool = False  # log each step's sample keys to keys-rank<R>.jsonl (audits the data order)
    # How long a rank waits in a collective for the others before it gives up: a lost node stops the run in this
    # time, not PyTorch's 30 minutes. 10 minutes outlasts every legitimate wait we have (rank 0 writing an XL
    # checkpoint with its optimizer state, ~7 GB, or drawing a validation grid, while the others wait).
    collective_timeout_s: float = Field(600, gt=0)
    # Resume a checkpoint saved by another number of processes (after losing a node, or under torchrun --nnodes
    # MIN:MAX): ZeRO state is converted with DeepSpeed's ds_to_universal; the per-process batch stays, so the global
    # batch follows the process count, and the data restarts its epoch. False: such a rerun is refused.
    elastic: bool = False


class EmaSection(Section):
    decay: float = Field(0.9999, ge=0, le=1)  # PixArt's ema_rate
    warmup: bool = False  # decay min(decay, (1 + step) / (10 + step)): for short runs (the demo)


class DeepSpeedSection(Section):
    zero_stage: Literal[0, 1, 2, 3] = 2
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    config: str | None = None  # a DeepSpeed JSON merged under the keys this config sets


class ValidationSection(Section):
    every: int = Field(0, ge=0)  # steps; 0: only at the end
    prompts: list[str] = Field(default_factory=list)  # PixArt stages
    labels: list[int] = Field(default_factory=list)  # class-conditional stage
    seed: int = 0
    steps: int = Field(20, ge=1, le=1000)  # at most the schedule's 1000 timesteps
    cfg: float = Field(4.5, ge=0, allow_inf_nan=False)
    sampler: Literal["dpm-solver++", "ddim", "ddpm"] = "dpm-solver++"
    size: tuple[PositiveInt, PositiveInt] | None = None  # latent (h, w); None: the model's input_size square
    ema: bool = True
    # A one-step (distilled) student: pure noise labelled with this timestep, one forward, its x0 (steps, cfg and
    # sampler unused). None: the sampler above.
    one_step: int | None = Field(None, ge=1, le=999)


class ConfigFile(Section):
    """A whole config file: read with `load`, written into its run folder by `resolved_yaml`."""

    @classmethod
    def load(cls, path: str | os.PathLike, sets: list[str] = ()) -> Self:
        """Read, inherit (`base:`), override (`--set`) and validate."""
        data = _read(Path(path).resolve())
        for s in sets:
            apply_set(data, s)
        return validated(cls, data, str(path))

    def resolved_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


class TrainConfig(ConfigFile):
    stage: str = "stage"
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection
    encoders: EncodersSection = Field(default_factory=EncodersSection)
    diffusion: DiffusionSection = Field(default_factory=DiffusionSection)
    optim: OptimSection = Field(default_factory=OptimSection)
    train: TrainSection = Field(default_factory=TrainSection)
    ema: EmaSection = Field(default_factory=EmaSection)
    deepspeed: DeepSpeedSection = Field(default_factory=DeepSpeedSection)
    validation: ValidationSection = Field(default_factory=ValidationSection)

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.deepspeed.precision != "fp32" and self.deepspeed.zero_stage == 0:
            # Without ZeRO, DeepSpeed trains bf16/fp16 weights in place: no fp32 master copy.
            raise ValueError(f"deepspeed.precision {self.deepspeed.precision} needs zero_stage >= 1 "
                             "(DeepSpeed keeps fp32 master weights only under ZeRO)")
        return self


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_yaml(path: Path):
    """A YAML file's contents ({} when empty), or one line naming the file and, for bad YAML, where it broke."""
    try:
        return yaml.safe_load(path.read_text()) or {}
    except (OSError, UnicodeDecodeError) as e:
        raise PixArtError(f"{path}: not readable as UTF-8 text ({e})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f", line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise PixArtError(f"{path}: invalid YAML ({problem}{where})") from None


def _read(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """The YAML at `path` merged over its `base:` chain; relative paths in `base` are the file's."""
    if path in seen:
        raise PixArtError(f"{path}: circular base: {' -> '.join(map(str, seen + (path,)))}")
    if path.is_dir():
        raise PixArtError(f"{path}: a folder, not a config file; pass a YAML file, e.g. configs/demo/stage2.yaml")
    if not path.is_file():
        raise PixArtError(f"{path}: no such config file")
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise PixArtError(f"{path}: expected a mapping at the top level")
    base = data.pop("base", None)
    if base is None:
        return data
    return _merge(_read((path.parent / base).resolve(), seen + (path,)), data)


def apply_set(data: dict, assignment: str) -> dict:
    """`a.b.c=value` (value parsed as YAML) into a nested dict."""
    key, sep, value = assignment.partition("=")
    if not sep or not key:
        raise PixArtError(f"--set {assignment!r}: expected key=value, e.g. optim.lr=1e-4")
    try:
        parsed = yaml.safe_load(value) if value else ""
    except yaml.YAMLError:
        parsed = value
    node = data
    *parents, leaf = key.split(".")
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise PixArtError(f"--set {key}: {p} is not a section")
    node[leaf] = parsed
    return data


def validated(model: type[BaseModel], data, source: str):
    """`model.model_validate(data)` with the first problem as one line naming the key."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        where = f"{loc}: " if loc else ""  # no location: a rule over the whole config, whose message names the keys
        if err["type"] == "value_error":  # our own validators' messages, without pydantic's "Value error, "
            kind = str(err["ctx"]["error"])
        else:
            kind = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        shown = err["type"] not in ("extra_forbidden", "missing", "value_error")
        got = f" (got {err.get('input')!r})" if shown else ""
        raise PixArtError(f"{source}: {where}{kind}{got}") from None

