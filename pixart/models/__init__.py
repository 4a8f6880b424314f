"""Models by name: `build_model("PixArt-XL/2", input_size=64)`."""
from __future__ import annotations

from torch import nn

from pixart.errors import PixArtError
from pixart.models.config import ModelConfig
from pixart.models.dit import DiT
from pixart.models.pixart import PixArt

# DiT's sizes: (depth, hidden, heads).
SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
FAMILIES = {
    "PixArt": dict(arch="pixart"),
    "PixArtMS": dict(arch="pixart", micro_conditions=True, input_size=128),  # the 1024 px stage
    "DiT": dict(arch="dit"),
}
MODEL_NAMES = [f"{family}-{size}/{patch}" for family in FAMILIES for size in SIZES for patch in (2, 4, 8)]


def model_config(name: str, **overrides) -> ModelConfig:
    """The architecture of a named model, with fields overridden (`input_size`, `caption_channels`, ...)."""
    try:
        family, rest = name.split("-", 1)
        size, patch = rest.split("/")
        depth, hidden, heads = SIZES[size]
        fields = dict(FAMILIES[family], depth=depth, hidden_size=hidden, num_heads=heads, patch_size=int(patch))
    except (ValueError, KeyError):
        raise PixArtError(f"unknown model name {name!r}; known: PixArt-XL/2, PixArtMS-XL/2, DiT-XL/2, "
                          "and S/B/L sizes with /2, /4, /8") from None
    fields.update(overrides)
    # PixArt's rule for new resolutions (lewei_scale / interpolation_scale): 1 up to 512 px, 2 at 1024 px.
    fields.setdefault("pe_interpolation", float(max(fields.get("input_size", 32) // 64, 1)))
    return ModelConfig.from_dict(fields, source="build_model")


def model_from_config(config: ModelConfig) -> nn.Module:
    return DiT(config) if config.arch == "dit" else PixArt(config)


def build_model(name: str, **overrides) -> nn.Module:
    return model_from_config(model_config(name, **overrides))


__all__ = ["ModelConfig", "DiT", "PixArt", "MODEL_NAMES", "build_model", "model_config", "model_from_config"]
