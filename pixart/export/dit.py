"""A facebookresearch/DiT checkpoint (or a stage-1 checkpoint folder) -> a reparameterized PixArt folder.

The math is `pixart.models.reparam.dit_to_pixart`; this is the file side: read the DiT (the layout
is inferred from tensor shapes), fold it, and write a checkpoint folder with its provenance.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

from pixart.atomic import check_out_dir
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


def load_dit(src: str | os.PathLike, num_heads: int | None = None,
             num_classes: int | None = None) -> tuple[DiT, str]:
    """A DiT from a .pt/.pth/.safetensors file (raw, or DiT's {'model', 'ema'}: EMA used) or a stage-1 folder
    (or its run's `checkpoints/latest`), and what says its class count. The shapes do not: a table of N rows is
    N - 1 classes and a null class (label dropout) or N classes and none. DiT's train.py saves its `args`, whose
    num_classes decides; a bare state dict (the released DiT-XL-2-256x256.pt) leaves it assumed."""
    src = checkpoint_folder(src)
    if src.is_dir():
        dit = load_model(src, ema=(src / "ema.safetensors").is_file())
        if not isinstance(dit, DiT):
            raise PixArtError(f"{src}: holds a {dit.config.arch} model, not a class-conditional DiT")
        return dit, "from its config.json"
    data = read_state_dict(src)
    said = "from --num-classes" if num_classes is not None else None
    args_classes = getattr(data.get("args") if isinstance(data, dict) else None, "num_classes", None)
    if num_classes is None and isinstance(args_classes, int):
        num_classes, said = args_classes, "from its args.num_classes"
    state = unwrap_state_dict(data, src)
    dit = load_into(DiT(infer_dit_config(state, num_heads, num_classes, str(src))), state, str(src))
    return dit, said or "assumed: the class table's last row is the null class; --num-classes says otherwise"


def convert_dit(src: str | os.PathLike, out: str | os.PathLike, cfg: ReparamConfig = ReparamConfig(),
                num_heads: int | None = None, num_classes: int | None = None,
                overwrite: bool = False) -> tuple[PixArt, dict]:
    """Write `out` (config.json, model.safetensors, reparam.json) and return the PixArt model and the provenance
    that reparam.json holds."""
    read = checkpoint_folder(src)  # a run's `latest` moves on: record the step folder it named
    check_out_dir(out, overwrite, (src, read))
    dit, classes_from = load_dit(read, num_heads, num_classes)
    pixart = dit_to_pixart(dit, global_init=cfg.global_init, t_ref=cfg.t_ref, caption_channels=cfg.caption_channels,
                           model_max_length=cfg.max_length, seed=cfg.seed)
    provenance = {"source": str(read), "dit_classes": dit.config.num_classes, "dit_classes_from": classes_from,
                  **asdict(cfg)}
    save_checkpoint(out, pixart.config, pixart.state_dict(), extra={"reparam.json": json.dumps(provenance, indent=2)},
                    overwrite=overwrite, sources=(src, read))
    return pixart, provenance
