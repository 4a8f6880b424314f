"""DiT -> PixArt reparameterization (PixArt-alpha, section 2.3).

DiT block i modulates with S_i(t) = W_i SiLU(c(t)) + b_i, where c(t) = t_emb(t) + y_emb(class).
PixArt shares one global MLP: S_i(t) = E_i + W_g SiLU(t_emb'(t)) + b_g.

We make the two agree as closely as the structure allows:
- the null-class embedding is folded into the bias of the timestep MLP's last layer,
  so t_emb'(t) equals DiT's c(t) for the null class at *every* t (exact, not an approximation);
- E_i is solved so that S_i(t_ref) is DiT's exactly (the paper's rule, t_ref = 500);
- the final layer's (2, D) table is solved the same way at t_ref.

What is left is the choice of W_g. Away from t_ref, block i errs by
(W_i - W_g)(SiLU(c(t)) - SiLU(c(t_ref))); summed over blocks this is smallest for the
mean of the W_i (the least-squares fit over t gives the same answer), which is the
default. `block0` and `zero` (a modulation frozen at t_ref) are kept for comparison;
`tools/reparam_error.py` measures all of them.
"""
from __future__ import annotations

import copy
from typing import Literal

import torch
import torch.nn.functional as F

from pixart.errors import PixArtError
from pixart.models.config import ModelConfig
from pixart.models.dit import DiT
from pixart.models.pixart import PixArt

GlobalInit = Literal["mean", "block0", "zero"]
GLOBAL_INITS: tuple[str, ...] = ("mean", "block0", "zero")
DEFAULT_HEADS = {384: 6, 768: 12, 1024: 16, 1152: 16}  # DiT's S, B, L, XL


def infer_dit_config(state_dict: dict[str, torch.Tensor], num_heads: int | None = None,
                     num_classes: int | None = None, source: str = "state dict") -> ModelConfig:
    """DiT architecture from tensor shapes. Not in the shapes: the head count, and whether the
    class table's last row is a null class (official DiTs have one: they train with label dropout)."""
    try:
        patch_w = state_dict["x_embedder.proj.weight"]  # (D, C, p, p)
        hidden, in_channels, patch = patch_w.shape[0], patch_w.shape[1], patch_w.shape[2]
        depth = 1 + max(int(k.split(".")[1]) for k in state_dict if k.startswith("blocks."))
        mlp_hidden = state_dict["blocks.0.mlp.fc1.weight"].shape[0]
        out_channels = state_dict["final_layer.linear.weight"].shape[0] // (patch * patch)
        num_embeddings = state_dict["y_embedder.embedding_table.weight"].shape[0]
        tokens = state_dict["pos_embed"].shape[1]
        state_dict["blocks.0.adaLN_modulation.1.weight"]
    except (KeyError, ValueError, IndexError) as e:
        raise PixArtError(f"{source}: not a DiT state dict (missing {e})") from None
    if num_heads is None:
        if hidden not in DEFAULT_HEADS:
            raise PixArtError(f"{source}: hidden size {hidden} is not a standard DiT size; pass --num-heads")
        num_heads = DEFAULT_HEADS[hidden]
    grid = round(tokens**0.5)
    if out_channels not in (in_channels, 2 * in_channels):
        raise PixArtError(f"{source}: not a DiT state dict: {out_channels} output channels for {in_channels} inputs")
    if num_classes is None:
        num_classes = num_embeddings - 1
    if num_classes not in (num_embeddings - 1, num_embeddings):
        raise PixArtError(f"{source}: num_classes={num_classes} does not fit a class table of {num_embeddings} rows")
    return ModelConfig(
        arch="dit", input_size=grid * patch, patch_size=patch, in_channels=in_channels, hidden_size=hidden,
        depth=depth, num_heads=num_heads, mlp_ratio=mlp_hidden / hidden, learn_sigma=out_channels == 2 * in_channels,
        num_classes=num_classes, class_dropout_prob=0.1 if num_embeddings > num_classes else 0.0,
    )


def pixart_config_from_dit(dit: ModelConfig, caption_channels: int = 4096, model_max_length: int = 120) -> ModelConfig:
    keep = ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads", "mlp_ratio", "learn_sigma")
    return ModelConfig(arch="pixart", caption_channels=caption_channels, model_max_length=model_max_length,
                       **{k: getattr(dit, k) for k in keep})


def _global_mlp(layers: list, init: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared t_block's (weight, bias) in float64, one block at a time (XL's adaLN is 223M numbers)."""
    if init not in GLOBAL_INITS:
        raise PixArtError(f"unknown global init {init!r}; choose from {', '.join(GLOBAL_INITS)}")
    first = layers[0]
    if init == "block0":
        return first.weight.double(), first.bias.double()
    if init == "zero":
        return torch.zeros_like(first.weight, dtype=torch.float64), torch.zeros_like(first.bias, dtype=torch.float64)
    weight = torch.zeros_like(first.weight, dtype=torch.float64)
    bias = torch.zeros_like(first.bias, dtype=torch.float64)
    for layer in layers:
        weight += layer.weight.double()
        bias += layer.bias.double()
    return weight / len(layers), bias / len(layers)


def _null_condition(dit: DiT, timesteps: torch.Tensor) -> torch.Tensor:
    """DiT's c(t) = t_emb(t) + y_emb(null class), in float64."""
    t_embedder = copy.deepcopy(dit.t_embedder).double()
    null = dit.y_embedder.embedding_table.weight[dit.config.num_classes].double()
    return t_embedder(timesteps) + null


@torch.no_grad()
def dit_to_pixart(dit: DiT, *, global_init: GlobalInit = "mean", t_ref: int = 500, caption_channels: int = 4096,
                  model_max_length: int = 120, seed: int = 0) -> PixArt:
    """A PixArt whose output at `t_ref`, for any caption, is the DiT's for the null class.

    The new parts (caption projection, cross-attention, null caption) get PixArt's init
    from `seed`; the cross-attention output starts at zero, so captions change nothing yet.
    The modulation is solved in float64; the weights are shared, not copied, until loaded.
    """
    cfg = dit.config
    if dit.y_embedder.embedding_table.num_embeddings <= cfg.num_classes:
        raise PixArtError("this DiT has no null-class embedding (trained without label dropout): nothing to fold")
    if not 0 <= t_ref < 1000:
        raise PixArtError(f"t_ref must be a timestep in [0, 1000), got {t_ref}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pixart = PixArt(pixart_config_from_dit(cfg, caption_channels, model_max_length))

    D = cfg.hidden_size
    c_ref = _null_condition(dit, torch.tensor([t_ref]))[0]
    s_ref = F.silu(c_ref)
    layers = [b.adaLN_modulation[1] for b in dit.blocks]
    w_g, b_g = _global_mlp(layers, global_init)
    shared_ref = w_g @ s_ref + b_g
    final = dit.final_layer.adaLN_modulation[1]
    final_table = (final.weight.double() @ s_ref + final.bias.double()).view(2, D) - c_ref

    new = pixart.state_dict()
    dit_sd = dit.state_dict()
    shared = ("x_embedder.", "t_embedder.", "final_layer.linear.")
    new.update({k: v for k, v in dit_sd.items() if k.startswith(shared)})
    new.update({k: v for k, v in dit_sd.items() if k.startswith("blocks.") and (".attn." in k or ".mlp." in k)})
    null = dit.y_embedder.embedding_table.weight[cfg.num_classes].double()
    new["t_embedder.mlp.2.bias"] = dit_sd["t_embedder.mlp.2.bias"].double() + null
    new["t_block.1.weight"], new["t_block.1.bias"] = w_g, b_g
    for i, layer in enumerate(layers):  # E_i: block i's modulation at t_ref, less the shared part
        block_ref = layer.weight.double() @ s_ref + layer.bias.double()
        new[f"blocks.{i}.scale_shift_table"] = (block_ref - shared_ref).view(6, D)
    new["final_layer.scale_shift_table"] = final_table
    pixart.load_state_dict(new, strict=True)  # copies (and casts to float32) into PixArt's own tensors
    return pixart


@torch.no_grad()
def modulation_error(dit: DiT, pixart: PixArt, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Relative error of PixArt's modulation against DiT's null-class one, per timestep.

    Returns (blocks, final): ||S_pixart - S_dit|| / ||S_dit|| over all blocks' 6D vectors,
    and the same for the final layer's (shift, scale). Computed in float64, block by block.
    """
    s = F.silu(_null_condition(dit, timesteps))  # (T, D)
    t = copy.deepcopy(pixart.t_embedder).double()(timesteps)
    t_block = pixart.t_block[1]
    t0 = F.silu(t) @ t_block.weight.double().T + t_block.bias.double()  # (T, 6D)
    err, ref = torch.zeros(len(timesteps), dtype=torch.float64), torch.zeros(len(timesteps), dtype=torch.float64)
    for dit_block, block in zip(dit.blocks, pixart.blocks, strict=True):
        layer = dit_block.adaLN_modulation[1]
        target = s @ layer.weight.double().T + layer.bias.double()
        ours = block.scale_shift_table.double().reshape(-1) + t0
        err += (ours - target).square().sum(1)
        ref += target.square().sum(1)
    final = dit.final_layer.adaLN_modulation[1]
    target = s @ final.weight.double().T + final.bias.double()  # (T, 2D)
    ours = (pixart.final_layer.scale_shift_table.double()[None] + t[:, None]).flatten(1)
    final_err = (ours - target).norm(dim=1) / target.norm(dim=1)
    return (err / ref).sqrt().float(), final_err.float()
