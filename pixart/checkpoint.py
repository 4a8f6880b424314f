"""The checkpoint folder: `config.json` + `model.safetensors` (+ `ema.safetensors`).

It is what `convert-dit` writes and what `sample`, `export-diffusers` and the next
training stage read. Foreign files (`.pt`, `.pth`) are read with
`weights_only=True`: a checkpoint is data, never code.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save, save_file
from torch import nn

from pixart.atomic import atomic_dir
from pixart.errors import PixArtError
from pixart.models import ModelConfig, model_from_config

CONFIG_FILE, MODEL_FILE, EMA_FILE = "config.json", "model.safetensors", "ema.safetensors"
DIFFUSION_FILE = "diffusion.json"  # {"prediction_type"}: what the sampler must assume (trained checkpoints)
ENCODERS_FILE = "encoders.json"  # the text encoder and VAE it was trained with (trained checkpoints)
STUDENT_FILE = "student.json"  # {"start_timestep", "teacher"}: a one-step distilled student (pixart distill)
FRESH_NULL_FILE = "fresh_null_caption.json"  # in an imported checkpoint: its null caption is made up, not learned
LATEST_POINTER = "latest"  # RUN/checkpoints/latest: a text file naming the newest step folder
StateDict = dict[str, torch.Tensor]


_ZIP = b"PK\x03\x04"  # torch.save's format since torch 1.6
# torch.save's legacy format opens with its magic number, pickled with protocol 2
_LEGACY = b"\x80\x02\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")


def safetensors_bytes(tensors: StateDict, metadata: dict[str, str]) -> bytes:
    """safetensors' `save`, with the metadata in key order: the library writes it in a random order, so a rerun's
    file differed from the first in bytes though not in content. The header keeps its length, so the tensors'
    offsets stand."""
    data = save(tensors, metadata=metadata)
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + length])
    header["__metadata__"] = dict(sorted(header.get("__metadata__", {}).items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode().ljust(length)
    return data[:8] + text + data[8 + length:] if len(text) == length else data


def read_safetensors(path: str | os.PathLike, what: str, advice: str = "") -> tuple[dict[str, str], StateDict]:
    """A safetensors file's metadata and tensors; a missing or damaged one (a copy cut short, another format) is
    one line naming the file, what it should be, and `advice` on what to do, not a safetensors error."""
    path = Path(path)
    if not path.is_file():
        raise PixArtError(f"{path}: no such {what}{advice}")
    try:
        with safe_open(path, framework="pt") as f:
            return f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise PixArtError(f"{path}: not a readable {what} ({e}){advice}") from None


def read_state_dict(path: str | os.PathLike) -> StateDict:
    """Tensors from a .safetensors, or from a torch pickle without running any of its code."""
    path = Path(path)
    if not path.is_file():
        raise PixArtError(f"{path}: no such file")
    if path.suffix != ".safetensors":
        _check_torch_file(path)
    try:
        if path.suffix == ".safetensors":
            return load_file(path)
        # DiT's training checkpoints carry their argparse.Namespace: plain data, safe to allow.
        with torch.serialization.safe_globals([argparse.Namespace]), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about pickle protocols it then refuses anyway
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise PixArtError(f"{path}: not a readable checkpoint ({unreadable_reason(e)})") from None


def _check_torch_file(path: Path) -> None:
    """A reason a user can act on for a file that is no torch.save checkpoint, from its first bytes (a zip, a
    legacy torch pickle, or neither): torch's own ("101", "Unsupported operand 149") say nothing to them."""
    with open(path, "rb") as f:
        head = f.read(len(_LEGACY))
    if not head:
        raise PixArtError(f"{path}: the file is empty")
    if not head.startswith((_ZIP, b"\x80")):
        raise PixArtError(f"{path}: not a PyTorch checkpoint (zip or pickle) file, nor .safetensors")
    if head.startswith(b"\x80") and head != _LEGACY:
        raise PixArtError(f"{path}: a plain Python pickle, not a torch.save checkpoint; it may hold Python objects "
                          "other than tensors, so it is refused without unpickling (weights_only)")


def unreadable_reason(e: Exception) -> str:
    """Why torch or safetensors refused a file, in one line. torch's own text for a pickle holding more than
    tensors advises loading it with weights_only=False, i.e. running its code: we never pass that on."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    unpickler = next((line for line in lines if line.startswith(("WeightsUnpickler error:", "Trying to load"))), None)
    if unpickler is not None:  # a global outside the allowlist, or in a module torch blocks outright (os, posix)
        what = unpickler.removeprefix("WeightsUnpickler error:").split(". ")[0].strip().rstrip(".")
        return f"it holds objects other than tensors, which are never unpickled: {what}"
    return next((line for line in lines if "weights_only" not in line), type(e).__name__)


def wrapper_key(obj: dict) -> str:
    """Which of the official layouts' keys holds the weights `unwrap_state_dict` takes: 'ema' or 'model' (DiT's
    trainer), 'state_dict_ema' or 'state_dict' (PixArt's), the EMA when there are both; "" for a raw state dict."""
    return next((k for k in ("ema", "state_dict_ema", "model", "state_dict") if isinstance(obj.get(k), dict)), "")


def unwrap_state_dict(obj, source: str) -> StateDict:
    """The model's tensors out of the official layouts (`wrapper_key`), or of a raw state dict."""
    if not isinstance(obj, dict):
        raise PixArtError(f"{source}: expected a state dict, found {type(obj).__name__}")
    key = wrapper_key(obj)
    obj = obj[key] if key else obj
    tensors = {k.removeprefix("module."): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise PixArtError(f"{source}: no tensors found")
    return tensors


def load_into(model: nn.Module, state_dict: StateDict, source: str) -> nn.Module:
    """`load_state_dict(strict=True)` with a one-line error that says what does not fit."""
    expected = model.state_dict()
    problems = []
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong = [k for k in expected if k in state_dict and state_dict[k].shape != expected[k].shape]
    for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong)):
        if keys:
            more = f" (+{len(keys) - 3} more)" if len(keys) > 3 else ""
            shown = [f"{k} {tuple(state_dict[k].shape)} != {tuple(expected[k].shape)}" if label == "wrong shapes"
                     else k for k in keys[:3]]
            problems.append(f"{label}: {', '.join(shown)}{more}")
    if problems:
        raise PixArtError(f"{source}: does not fit the model: {'; '.join(problems)}")
    model.load_state_dict(state_dict, strict=True)
    return model


def save_checkpoint(out_dir, config: ModelConfig, model_state: StateDict, ema_state: StateDict | None = None,
                    extra: dict[str, str] | None = None, overwrite: bool = False, sources: tuple = (),
                    files: tuple = ()) -> Path:
    """Write the folder atomically (see `atomic_dir`); `extra` adds small text files (e.g. provenance), `files`
    copies of files (a Perfusion covariance)."""
    with atomic_dir(out_dir, overwrite, sources) as tmp:
        (tmp / CONFIG_FILE).write_text(config.to_json())
        write_weights(tmp, model_state, ema_state)
        for name, text in (extra or {}).items():
            (tmp / name).write_text(text)
        for file in files:
            shutil.copyfile(file, tmp / Path(file).name)
    return Path(out_dir)


def write_weights(folder: Path, model_state: StateDict, ema_state: StateDict | None) -> None:
    """A checkpoint folder's model.safetensors and (when given) ema.safetensors, in a folder being written."""
    for name, state in ((MODEL_FILE, model_state), (EMA_FILE, ema_state)):
        if state is not None:
            tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
            save_file(tensors, folder / name, metadata={"format": "pt"})


def read_json(path: str | os.PathLike):
    """A JSON file's contents, or a one-line error naming it: what a hand edit or a full disk leaves in a
    checkpoint's or a run's records must not surface as a traceback."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PixArtError(f"{path}: not readable JSON ({e})") from None


def checkpoint_folder(path: str | os.PathLike) -> Path:
    """`path`, or the step folder it names when it is a run's `checkpoints/latest` (a text file holding the
    newest step's name), so the pointer works wherever a checkpoint folder does."""
    path = Path(path)
    if path.name != LATEST_POINTER or not path.is_file():
        return path
    target = path.parent / path.read_text().strip()
    if not (target / CONFIG_FILE).is_file():
        raise PixArtError(f"{path}: names {target.name!r}, which is not a checkpoint folder")
    return target


def load_config(ckpt_dir) -> ModelConfig:
    folder = Path(ckpt_dir)
    path = folder / CONFIG_FILE
    if not path.is_file() and not folder.exists():
        raise PixArtError(f"{ckpt_dir}: not a checkpoint folder (no such folder)")
    if folder.is_file():
        raise PixArtError(f"{ckpt_dir}: a file, not a checkpoint folder; pass the folder that holds {CONFIG_FILE}")
    if not path.is_file():
        run = folder / "checkpoints" / LATEST_POINTER
        hint = f"; it is a run folder: pass {run}" if run.is_file() else ""
        if (folder / "model_index.json").is_file() or (folder / "transformer" / CONFIG_FILE).is_file():
            hint = f"; it is a diffusers folder: bring it in with `pixart import {ckpt_dir} --out DIR`"
        raise PixArtError(f"{ckpt_dir}: not a checkpoint folder (no {CONFIG_FILE}){hint}")
    data = read_json(path)
    if isinstance(data, dict) and "_class_name" in data:
        raise PixArtError(f"{ckpt_dir}: a diffusers {data['_class_name']} folder, not a checkpoint folder: bring it "
                          f"in with `pixart import {ckpt_dir} --out DIR`")
    return ModelConfig.from_dict(data, source=str(path))


def load_prediction_type(ckpt_dir) -> str:
    """The objective the checkpoint was trained with ("epsilon" when it does not say: DiT, PixArt)."""
    path = Path(ckpt_dir) / DIFFUSION_FILE
    if not path.is_file():
        return "epsilon"
    record = read_json(path)
    kind = record.get("prediction_type") if isinstance(record, dict) else None
    if kind not in ("epsilon", "v_prediction"):
        raise PixArtError(f"{path}: prediction_type must be \"epsilon\" or \"v_prediction\", got {kind!r}")
    return kind


def load_student(folder) -> dict | None:
    """A folder's student.json ({"start_timestep", ...}: a one-step distilled student's checkpoint or export)."""
    path = Path(folder) / STUDENT_FILE
    return read_json(path) if path.is_file() else None


def load_encoders(ckpt_dir) -> dict:
    """A trained checkpoint's encoders.json ({"text_encoder", "image_encoder", ...}); {} when it has none."""
    path = Path(ckpt_dir) / ENCODERS_FILE
    return read_json(path) if path.is_file() else {}


def load_model(ckpt_dir, ema: bool = False) -> nn.Module:
    """Rebuild the model from `config.json` and load its (EMA) weights; a run's `checkpoints/latest` works too."""
    ckpt_dir = checkpoint_folder(ckpt_dir)
    config = load_config(ckpt_dir)
    path = Path(ckpt_dir) / (EMA_FILE if ema else MODEL_FILE)
    if ema and not path.is_file():
        raise PixArtError(f"{ckpt_dir}: has no {EMA_FILE}; pass --no-ema")
    return load_into(model_from_config(config), read_state_dict(path), str(path))
