"""The architecture of one network, as a typed record that `config.json` stores.

A checkpoint folder must rebuild its model with no other file, so everything
that shapes a parameter lives here, and nothing else does.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Literal

from pixart.errors import PixArtError

Arch = Literal["pixart", "dit"]
AttnBackend = Literal["sdpa", "xformers"]


@dataclass
class ModelConfig:
    arch: Arch = "pixart"
    input_size: int = 32  # latent side the positional embedding is built for
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    learn_sigma: bool = True
    # PixArt only
    caption_channels: int = 4096
    model_max_length: int = 120
    micro_conditions: bool = False  # PixArtMS: image size and aspect ratio embedders
    pe_interpolation: float = 1.0  # PixArt's `lewei_scale`, diffusers' `interpolation_scale`
    # DiT only
    num_classes: int = 1000
    # both: probability of dropping the condition in training (CFG)
    class_dropout_prob: float = 0.1
    attn_backend: AttnBackend = "sdpa"

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            problem = field_problem(f.name, value)
            if problem:
                raise PixArtError(f"model config: {problem}")
            if f.type == "float":
                setattr(self, f.name, float(value))
        if self.arch not in ("pixart", "dit"):
            raise PixArtError(f"model config: arch must be 'pixart' or 'dit', got {self.arch!r}")
        if self.hidden_size % self.num_heads:
            raise PixArtError(
                f"model config: num_heads={self.num_heads} does not divide hidden_size={self.hidden_size}"
            )
        if self.input_size % self.patch_size:
            raise PixArtError(
                f"model config: patch_size={self.patch_size} does not divide input_size={self.input_size}"
            )
        if self.micro_conditions and self.hidden_size % 3:
            raise PixArtError(
                f"model config: micro_conditions need hidden_size divisible by 3, got {self.hidden_size}"
            )
        if self.attn_backend not in ("sdpa", "xformers"):
            raise PixArtError(f"model config: attn_backend must be 'sdpa' or 'xformers', got {self.attn_backend!r}")

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    def check_encoders(self, text_width: int | None = None, latent_channels: int | None = None,
                       text: str = "", vae: str = "") -> None:
        """Encoders another model was trained with fail here in one line, not as a shape error deep in a forward."""
        if text_width is not None and text_width != self.caption_channels:
            raise PixArtError(f"text encoder {text} has width {text_width}; the model expects caption_channels="
                              f"{self.caption_channels}")
        if latent_channels is not None and latent_channels != self.in_channels:
            raise PixArtError(f"VAE {vae} has {latent_channels} latent channels; the model takes in_channels="
                              f"{self.in_channels}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, source: str = "model config") -> ModelConfig:
        if not isinstance(data, dict):
            raise PixArtError(f"{source}: not a model config (a JSON {type(data).__name__}, not an object)")
        if problem := fields_problem(data):
            raise PixArtError(f"{source}: {problem}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


_TYPES = {"int": (int, "an integer"), "float": ((int, float), "a number"), "bool": (bool, "true or false")}


def field_problem(name: str, value) -> str | None:
    """Why `value` cannot be the ModelConfig field `name` (an unknown key, a value of the wrong type, a size below 1),
    or None: a "6" or 6.0 for `depth` in a hand-edited config.json, or a 0 for `model_max_length` from a flag, must
    not surface later as a TypeError or as a model with no tokens."""
    field = next((f for f in dataclasses.fields(ModelConfig) if f.name == name), None)
    if field is None:
        return f"unknown key {name!r}"
    types, what = _TYPES.get(field.type, (str, "a string"))
    if isinstance(value, bool) != (field.type == "bool") or not isinstance(value, types):
        return f"{name} must be {what}, got {value!r}"
    if field.type == "int" and value < 1:  # every int field is a size or a count
        return f"{name} must be positive, got {value}"
    if field.type == "float" and not math.isfinite(value):
        return f"{name} must be a finite number, got {value!r}"
    if name in ("mlp_ratio", "pe_interpolation") and value <= 0:
        return f"{name} must be positive, got {value!r}"
    if name == "class_dropout_prob" and not 0 <= value <= 1:
        return f"{name} must be a probability from 0 to 1, got {value!r}"
    return None


def fields_problem(data: dict) -> str | None:
    """The first `field_problem` of a dict of ModelConfig fields, or None."""
    return next((p for key, value in data.items() if (p := field_problem(key, value))), None)
