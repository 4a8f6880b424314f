"""C: the uncentered second moment of caption tokens as the K/V projections see them (after the caption
projection), over a caption corpus; one per base model, saved beside it and reused by every concept.

Perfusion's ports sum e e^T over the caption tokens of ~100K captions and invert without a ridge; ours counts the
real (unpadded) tokens, EOS included. `sim(e)` does not change when C is scaled, so the normalisation is moot.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from tqdm import tqdm

from pixart.atomic import atomic_write
from pixart.checkpoint import read_safetensors, safetensors_bytes
from pixart.errors import PixArtError


def read_captions(source: str, limit: int = 100_000) -> list[str]:
    """Captions from a text file (one per line), a relabeling job's output folder (every `*.jsonl`, `caption`)
    or a glob of its files (`DIR/*.llava.jsonl`: one captioner's, where the job wrote several)."""
    path = Path(source)
    files = [path] if path.is_file() else sorted(path.glob("*.jsonl")) if path.is_dir() else \
        sorted(path.parent.glob(path.name)) if any(c in path.name for c in "*?[") else []
    if not files:
        raise PixArtError(f"--captions {source}: no such file or folder")
    captions = []
    for f in files:
        for number, line in _lines(f):
            if f.suffix != ".jsonl":
                captions.append(line)
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise PixArtError(f"--captions {f}:{number}: not a JSON line ({getattr(e, 'msg', e)})") from None
            if not isinstance(row, dict):
                raise PixArtError(f"--captions {f}:{number}: not a JSON object")
            if row.get("status", "ok") == "ok" and row.get("caption"):
                captions.append(row["caption"])
    if not captions:
        raise PixArtError(f"--captions {source}: no captions found")
    return captions[:limit]


def _lines(path: Path) -> list[tuple[int, str]]:
    """The non-blank lines of a caption file with their line numbers, so that a bad one is named."""
    data = path.read_bytes()
    try:
        text = data.decode()
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise PixArtError(f"--captions {path}:{line}: not UTF-8 text (byte {e.start})") from None
    return [(i, line.strip()) for i, line in enumerate(text.splitlines(), 1) if line.strip()]


@torch.no_grad()
def estimate_covariance(model, text_encoder, captions: list[str], batch: int = 64) -> tuple[torch.Tensor, int]:
    """(C (D, D) float64, tokens counted)."""
    proj = model.y_embedder.y_proj
    dim = proj.fc2.out_features
    total, count = torch.zeros(dim, dim, dtype=torch.float64), 0
    for lo in tqdm(range(0, len(captions), batch), desc="covariance", unit="batch", leave=False):
        feats, mask = text_encoder.encode(captions[lo:lo + batch])
        e = proj(feats.to(proj.fc1.weight.dtype))[mask.bool()].double().cpu()
        total += e.T @ e
        count += e.shape[0]
    return total / count, count


def read_c_inv(path: str | os.PathLike, identity: str, source: str = "this model") -> torch.Tensor:
    """C^-1 (float64) from a covariance file, refused unless it was estimated on the base model `identity`:
    another model's C would edit with the wrong metric, silently."""
    meta, tensors = read_safetensors(path, "covariance file")
    if "C" not in tensors:
        raise PixArtError(f"{path}: not a covariance file (no tensor C)")
    base = meta.get("base_model")
    if base != identity:  # as a concept file, a covariance only works on its own base model
        base = base or "unknown (no base_model in its metadata)"
        raise PixArtError(f"{path}: a covariance of base model {base}, but {source} is {identity}: use the "
                          "covariance file of this base model (beside its checkpoint)")
    c = tensors["C"].double()
    if c.ndim != 2 or c.shape[0] != c.shape[1] or not torch.isfinite(c).all():
        raise PixArtError(f"{path}: a damaged covariance file (C of shape {list(c.shape)}, square and finite "
                          "expected): delete it to estimate it again")
    c_inv, info = torch.linalg.inv_ex(c)
    if info.item() != 0:
        raise PixArtError(f"{path}: a damaged covariance file (C cannot be inverted): delete it to estimate it again")
    return c_inv


COVARIANCE_GLOB = "perfusion-covariance-*.safetensors"  # beside a checkpoint, and copied into its exports


def covariance_path(ckpt: Path, identity: str) -> Path:
    return Path(ckpt) / COVARIANCE_GLOB.replace("*", identity.removeprefix("sha256:"))


def load_or_estimate(ckpt: Path, identity: str, model, text_encoder, captions: str | None,
                     path: Path | None = None) -> torch.Tensor:
    """C^-1 (float64) for this base model: from `path`, or the file beside the checkpoint, or estimated from
    `captions` and saved there."""
    if path and not Path(path).is_file() and captions is None:
        raise PixArtError(f"--covariance {path}: no such file")
    path = Path(path) if path else covariance_path(ckpt, identity)
    if path.is_file():
        if captions is not None:  # say so: the corpus given is not what C was estimated from
            print(f"covariance: reusing {path}; --captions {captions} not read (delete the file to estimate again)")
        return read_c_inv(path, identity)
    if captions is None:
        raise PixArtError(f"{path}: no covariance for this base model yet; pass --captions (a text file or a "
                          "relabeling job's output) to estimate it")
    texts = read_captions(captions)
    c, tokens = estimate_covariance(model, text_encoder, texts)
    rank = int(torch.linalg.matrix_rank(c))
    if rank < c.shape[0]:
        raise PixArtError(f"--captions {captions}: the caption tokens span {rank} of {c.shape[0]} dimensions, "
                          "so C cannot be inverted; give more (and more varied) captions")
    atomic_write(path, safetensors_bytes({"C": c.contiguous()}, {"base_model": identity, "captions": str(len(texts)),
                                                               "tokens": str(tokens)}))
    print(f"covariance: {len(texts)} captions, {tokens} tokens, condition number "
          f"{torch.linalg.cond(c).item():.3g}: {path}")
    return torch.linalg.inv(c)
