"""A facebookresearch/DiT checkpoint (or a stage-1 checkpoint folder) -> a reparameterized PixArt folder.

The math is `pixart.models.reparam.dit_to_pixart`; this is the file side: read the DiT (the layout
is inferred from tensor shapes), fold it, and write a checkpoint folder with its provenance.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

from pixart.checkpoint import (
    checkpoint_folder,
    load_into,
    load_model,
    read_state_dict,
    save_checkpoint,
    unwrap_state_dict,
)
from pixart.errors import PixArtError
from pixart.models import DiT, PixArt
from pixart.models.reparam import dit_to_pixart, infer_dit_config


@dataclass(frozen=True)
class ReparamConfig:
    global_init: str = "mean"  # init of the shared t_block: "mean" of the blocks' adaLN MLPs, "block0" or "zero"
    t_ref: int = 500  # timestep at which the modulation equals DiT's exactly (PixArt-alpha section 2.3)
    caption_channels: int = 4096  # text-encoder width (T5-XXL)
    max_length: int = 120  # caption tokens
    seed: int = 0  # init of the new cross-attention and caption layers


def load_dit(src: str | os.PathLike, num_heads: int | None = None, num_classes: int | None = None) -> DiT:
    """A DiT from a .pt/.pth/.safetensors file (raw, or DiT's {'model', 'ema'}: EMA used) or a stage-1 folder
    (or its run's `checkpoints/latest`)."""
    src = checkpoint_folder(src)
    if src.is_dir():
        dit = load_model(src, ema=(src / "ema.safetensors").is_file())
        if not isinstance(dit, DiT):
            raise PixArtError(f"{src}: holds a {dit.config.arch} model, not a class-conditional DiT")
        return dit
    state = unwrap_state_dict(read_state_dict(src), src)
    return load_into(DiT(infer_dit_config(state, num_heads, num_classes, str(src))), state, str(src))


def convert_dit(src: str | os.PathLike, out: str | os.PathLike, cfg: ReparamConfig = ReparamConfig(),
                num_heads: int | None = None, num_classes: int | None = None, overwrite: bool = False) -> PixArt:
    """Write `out` (config.json, model.safetensors, reparam.json) and return the PixArt model."""
    read = checkpoint_folder(src)  # a run's `latest` moves on: record the step folder it named
    dit = load_dit(read, num_heads, num_classes)
    pixart = dit_to_pixart(dit, global_init=cfg.global_init, t_ref=cfg.t_ref, caption_channels=cfg.caption_channels,
                           model_max_length=cfg.max_length, seed=cfg.seed)
    provenance = {"source": str(read), "dit_classes": dit.config.num_classes, **asdict(cfg)}
    save_checkpoint(out, pixart.config, pixart.state_dict(), extra={"reparam.json": json.dumps(provenance, indent=2)},
                    overwrite=overwrite, sources=(src, read))
    return pixart
