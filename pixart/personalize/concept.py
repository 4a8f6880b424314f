"""The concept file: one safetensors file of a few tensors and a few strings (no pickle).

For PixArt-XL/2 in fp16: the value targets (28 x 1152), i* and i_super (1152 each) and the token embedding
(4096) are 38,656 numbers, 77,312 bytes. The locked key targets are not stored: each block's is W_K i_super.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import torch

from pixart.atomic import atomic_write
from pixart.checkpoint import read_safetensors, safetensors_bytes
from pixart.encoders.loading import DTYPES
from pixart.errors import PixArtError

FORMAT = "pixart-perfusion-1"
TENSORS = ("value_targets", "i_star", "i_super", "embedding")


@dataclass
class Concept:
    name: str  # the word prompts use for it; it becomes one new token of the tokenizer
    super_word: str  # the super-category word its keys are locked to (one token)
    value_targets: torch.Tensor  # (depth, D): o*_V per block
    i_star: torch.Tensor  # (D,): EMA of the concept token's encoding after the caption projection
    i_super: torch.Tensor  # (D,): the super-category word's encoding; o*_K = W_K i_super in every block
    embedding: torch.Tensor  # (text_dim,): the concept token's input embedding in the text encoder
    base_model: str  # `model_identity` of the model it was trained on
    beta: float = 0.7  # the inference gate's defaults (Perfusion's ports: 0.7 and 0.15)
    tau: float = 0.15

    def save(self, path: str | os.PathLike, dtype: str = "fp16") -> int:
        """Write atomically; returns the file's size in bytes."""
        tensors = {k: getattr(self, k).detach().to("cpu", DTYPES[dtype]).contiguous() for k in TENSORS}
        data = safetensors_bytes(tensors, self.metadata())
        atomic_write(path, data)
        return len(data)

    def metadata(self) -> dict[str, str]:
        return {"format": FORMAT, "name": self.name, "super": self.super_word, "base_model": self.base_model,
                "beta": repr(self.beta), "tau": repr(self.tau)}

    @classmethod
    def load(cls, path: str | os.PathLike) -> Concept:
        meta, found = read_safetensors(path, "concept file")
        missing = [k for k in TENSORS if k not in found]
        tensors = {k: found[k].float() for k in TENSORS if k in found}
        if meta.get("format") != FORMAT or missing:
            lacks = f", missing {', '.join(missing)}" if missing else ""
            raise PixArtError(f"{path}: not a {FORMAT} concept file (format {meta.get('format')!r}{lacks})")
        try:
            gate = {k: float(meta[k]) for k in ("beta", "tau")}
            name, super_word, base_model = meta["name"], meta["super"], meta["base_model"]
        except (KeyError, ValueError) as e:
            raise PixArtError(f"{path}: a damaged concept file (metadata {type(e).__name__}: {e})") from None
        bad = [k for k, v in (*gate.items(), *tensors.items()) if not torch.isfinite(torch.as_tensor(v)).all()]
        if bad:
            raise PixArtError(f"{path}: a damaged concept file ({', '.join(bad)} not finite)")
        return cls(name, super_word, base_model=base_model, **gate, **tensors)

    def check_base(self, identity: str, source: str, depth: int, width: int, text_dim: int | None = None) -> None:
        """Refuse a concept of another base model, or one whose tensors do not fit this one (a damaged file, or a
        text encoder of another width)."""
        if identity != self.base_model:
            raise PixArtError(f"concept {self.name!r} was trained on base model {self.base_model}, "
                              f"but {source} is {identity}: a concept only works on its own base model")
        want = {"value_targets": (depth, width), "i_star": (width,), "i_super": (width,), "embedding": (text_dim,)}
        for key, shape in want.items():
            got = tuple(getattr(self, key).shape)
            if got != shape and None not in shape:
                raise PixArtError(f"concept {self.name!r}: {key} has shape {got}, but {source} needs {shape}")


def model_identity(caption_proj: list[torch.Tensor], kv_weights: list[torch.Tensor]) -> str:
    """A hash of what a concept depends on: the caption projection and every block's K/V weights, rounded to
    bf16 so that an fp32 checkpoint and its bf16 copy agree. The same for our model and its diffusers export."""
    h = hashlib.sha256()
    for t in list(caption_proj) + list(kv_weights):
        h.update(json.dumps(list(t.shape)).encode())
        h.update(t.detach().to("cpu", torch.bfloat16).view(torch.int16).numpy().tobytes())
    return "sha256:" + h.hexdigest()[:16]


def _kv_linear(block):
    """A block's cross-attention key/value projection, unwrapped where a concept edits it."""
    kv = block.cross_attn.kv_linear
    return getattr(kv, "linear", kv)


def pixart_shape(model) -> tuple[int, int]:
    """(depth, width) of what a concept edits in our model: its blocks, and their cross-attention's input width."""
    return len(model.blocks), _kv_linear(model.blocks[0]).in_features


def pixart_identity(model) -> str:
    proj = model.y_embedder.y_proj
    kv = [_kv_linear(b).weight for b in model.blocks]
    return model_identity([proj.fc1.weight, proj.fc2.weight], kv)
