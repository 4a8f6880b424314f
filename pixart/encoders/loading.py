"""Shared plumbing for loading frozen pretrained parts: path checks, dtypes, one-line errors."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from ..errors import PixArtError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Same shape the hub accepts: "name" or "org/name", word chars plus "." and "-".
_HUB_ID = re.compile(r"^(?:[\w.-]+/)?[\w.-]+$")


class EncoderLoadError(PixArtError):
    """A frozen encoder could not be loaded; the message is one line and names the source
    (a PixArtError, so the CLI prints it as one line instead of a traceback)."""


def is_hub_id(path: str) -> bool:
    """True for strings that could name a hub repo (and so may be fetched or found in the cache)."""
    s = str(path)
    return bool(_HUB_ID.match(s)) and ".." not in s and "--" not in s and not s.startswith((".", "-"))


def check_source(path: str | os.PathLike, what: str) -> str:
    """Fail early and clearly when `path` is neither an existing local dir nor a hub id."""
    s = os.fspath(path)
    if Path(s).exists() or is_hub_id(s):
        return s
    raise EncoderLoadError(f"{what}: '{s}' does not exist locally and is not a hub id (org/name)")


def pipeline_part(path: str, subfolder: str | None, part: str) -> str | None:
    """`subfolder` as given, else `part` when `path` is a local diffusers pipeline folder (it has a
    model_index.json): so a pipeline folder, such as an export or a downloaded PixArt repo, names its own
    text encoder, tokenizer and VAE."""
    if subfolder is None and (Path(path) / "model_index.json").is_file():
        return part
    return subfolder


def load_error(what: str, path: str, subfolder: str | None, err: BaseException) -> EncoderLoadError:
    """Wrap any loader exception as a one-line EncoderLoadError naming the source (hub ids fail this way offline)."""
    where = f"'{path}'" + (f" (subfolder '{subfolder}')" if subfolder else "")
    first = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
    return EncoderLoadError(f"{what}: failed to load from {where}: {type(err).__name__}: {first}")


def local_config(path: str, subfolder: str | None) -> dict | None:
    """A local model folder's config.json, or None (a hub id, no such file, not a JSON object): the loader then
    says why it cannot load it."""
    try:
        cfg = json.loads((Path(path) / (subfolder or "") / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return cfg if isinstance(cfg, dict) else None


def config_kind(cfg: dict) -> str:
    """What a config says it is, for errors: "model_type 't5'" (transformers), "_class_name 'AutoencoderKL'"
    (diffusers, whose configs have no model_type)."""
    if "model_type" not in cfg and "_class_name" in cfg:
        return f"_class_name {cfg['_class_name']!r}"
    return f"model_type {cfg.get('model_type')!r}"


def not_t5(path: str, cfg: dict) -> EncoderLoadError:
    return EncoderLoadError(f"T5 text encoder: '{path}' is not a T5 encoder (its config has {config_kind(cfg)}, "
                            "not model_type 't5')")


def not_vae(path: str, cfg: dict) -> EncoderLoadError:
    return EncoderLoadError(f"VAE: '{path}' is not a VAE (its config has {config_kind(cfg)}, not _class_name "
                            "'AutoencoderKL')")


def resolve_dtype(name: str, allowed: tuple[str, ...], what: str) -> torch.dtype:
    """Map 'fp32'/'bf16'/'fp16' to torch dtypes, refusing names this component does not support."""
    if name not in allowed:
        raise PixArtError(f"{what}: dtype {name!r} not supported; use one of {allowed}")
    return DTYPES[name]
