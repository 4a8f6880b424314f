"""Official PixArt-alpha `.pth` files (`{'state_dict': ...}`) -> our PixArt.

Our parameter names are the official ones, so this is a shape reading plus a
strict load; the only official extra is the fixed `pos_embed`, which we derive.
"""
from __future__ import annotations

from pathlib import Path

import torch

from pixart.checkpoint import CONFIG_FILE, load_into, read_state_dict, unwrap_state_dict, wrapper_key
from pixart.errors import PixArtError
from pixart.models import ModelConfig, PixArt
from pixart.models.reparam import DEFAULT_HEADS


def infer_pixart_config(state: dict, num_heads: int | None = None, input_size: int | None = None,
                        source: str = "state dict") -> ModelConfig:
    try:
        patch_w = state["x_embedder.proj.weight"]
        hidden, in_channels, patch = patch_w.shape[0], patch_w.shape[1], patch_w.shape[2]
        depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
        out_channels = state["final_layer.linear.weight"].shape[0] // (patch * patch)
        max_length, caption_channels = state["y_embedder.y_embedding"].shape
        mlp_ratio = state["blocks.0.mlp.fc1.weight"].shape[0] / hidden
        state["t_block.1.weight"]
    except (KeyError, ValueError, IndexError) as e:
        raise PixArtError(f"{source}: not a PixArt state dict (missing {e})") from None
    micro = "csize_embedder.mlp.0.weight" in state
    if input_size is None:
        # official files keep the buffer for their training resolution; a guessed one runs, but draws noise
        if "pos_embed" not in state:
            beside = Path(source).parent / CONFIG_FILE
            if beside.is_file():
                raise PixArtError(f"{source}: has no pos_embed and {beside} lies beside it: a file of a model folder; "
                                  f"pass the folder {beside.parent}")
            raise PixArtError(f"{source}: has no pos_embed, so its resolution is unknown; pass --input-size, its "
                              "latent side (32 for 256 px, 64 for 512 px, 128 for 1024 px)")
        input_size = round(state["pos_embed"].shape[1] ** 0.5) * patch
    if num_heads is None:
        if hidden not in DEFAULT_HEADS:
            raise PixArtError(f"{source}: hidden size {hidden} is not a standard size; pass --num-heads")
        num_heads = DEFAULT_HEADS[hidden]
    return ModelConfig(
        arch="pixart", input_size=input_size, patch_size=patch, in_channels=in_channels, hidden_size=hidden,
        depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, learn_sigma=out_channels == 2 * in_channels,
        caption_channels=caption_channels, model_max_length=max_length, micro_conditions=micro,
        # the official configs' lewei_scale: 1 up to 512 px, 2 at 1024 px
        pe_interpolation=float(max(input_size // 64, 1)),
    )


def import_official(path: str, num_heads: int | None = None, input_size: int | None = None) -> tuple[PixArt, str]:
    """The file's model at the resolution its `pos_embed` was made for (the table itself is derived again, and
    must equal the file's, up to the rounding of the file's dtype: it is fixed, never trained), and which weights
    it took (`wrapper_key`: "state_dict_ema" for a training state's EMA, or "" for a bare state dict)."""
    data = read_state_dict(path)
    state = unwrap_state_dict(data, path)
    took = wrapper_key(data)
    model = PixArt(infer_pixart_config(state, num_heads, input_size, path))
    table = state.pop("pos_embed", None)
    if table is not None:
        # the values lie in [-1, 1]: an fp16 copy is off by up to 5e-4, a bf16 one by 4e-3
        atol = max(1e-4, torch.finfo(table.dtype).eps if table.is_floating_point() else 0)
        if table.shape != model.pos_embed.shape or not torch.allclose(table.float(), model.pos_embed, atol=atol):
            raise PixArtError(f"{path}: pos_embed {tuple(table.shape)} is not PixArt's sin-cos table for "
                              f"{model.config.input_size * 8} px (lewei_scale {model.config.pe_interpolation:g}); "
                              "pass --input-size to say its latent side")
    return load_into(model, state, path), took
