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


def infer_dit_config(state_dict: dict[str, torch.Tensor], num_heads: int | None = None) -> ModelConfig:
    """DiT architecture from tensor shapes; only the head count is not in the shapes."""
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
        raise PixArtError(f"not a DiT state dict (missing {e})") from None
    if num_heads is None:
        if hidden not in DEFAULT_HEADS:
            raise PixArtError(f"hidden size {hidden} is not a standard DiT size; pass --num-heads")
        num_heads = DEFAULT_HEADS[hidden]
    grid = round(tokens**0.5)
    if out_channels not in (in_channels, 2 * in_channels):
        raise PixArtError(f"not a DiT state dict: {out_channels} output channels for {in_channels} input channels")
    return ModelConfig(
        arch="dit", input_size=grid * patch, patch_size=patch, in_channels=in_channels, hidden_size=hidden,
        depth=depth, num_heads=num_heads, mlp_ratio=mlp_hidden / hidden, learn_sigma=out_channels == 2 * in_channels,
        # The official DiT keeps a null-class row iff it was trained with label dropout.
        num_classes=num_embeddings - 1, class_dropout_prob=0.1,
    )


def pixart_config_from_dit(dit: ModelConfig, caption_channels: int = 4096, model_max_length: int = 120) -> ModelConfig:
    keep = ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads", "mlp_ratio", "learn_sigma")
    return ModelConfig(arch="pixart", caption_channels=caption_channels, model_max_length=model_max_length,
                       **{k: getattr(dit, k) for k in keep})


def _global_mlp(weights: torch.Tensor, biases: torch.Tensor, init: str) -> tuple[torch.Tensor, torch.Tensor]:
    if init == "mean":
        return weights.mean(0), biases.mean(0)
    if init == "block0":
        return weights[0], biases[0]
    if init == "zero":
        return torch.zeros_like(weights[0]), torch.zeros_like(biases[0])
    raise PixArtError(f"unknown global init {init!r}; choose from {', '.join(GLOBAL_INITS)}")


@torch.no_grad()
def dit_to_pixart(dit: DiT, *, global_init: GlobalInit = "mean", t_ref: int = 500, caption_channels: int = 4096,
                  model_max_length: int = 120, seed: int = 0) -> PixArt:
    """A PixArt whose output at `t_ref`, for any caption, is the DiT's for the null class.

    The new parts (caption projection, cross-attention, null caption) get PixArt's init
    from `seed`; the cross-attention output starts at zero, so captions change nothing yet.
    """
    cfg = dit.config
    if dit.y_embedder.embedding_table.num_embeddings <= cfg.num_classes:
        raise PixArtError("this DiT has no null-class embedding (trained without label dropout): nothing to fold")
    torch.manual_seed(seed)
    pixart = PixArt(pixart_config_from_dit(cfg, caption_channels, model_max_length))

    src = copy.deepcopy(dit).double().eval()  # solve in float64, store in float32
    D = cfg.hidden_size
    null = src.y_embedder.embedding_table.weight[cfg.num_classes]
    c_ref = src.t_embedder(torch.tensor([t_ref]))[0] + null
    s_ref = F.silu(c_ref)
    weights = torch.stack([b.adaLN_modulation[1].weight for b in src.blocks])  # (N, 6D, D)
    biases = torch.stack([b.adaLN_modulation[1].bias for b in src.blocks])  # (N, 6D)
    w_g, b_g = _global_mlp(weights, biases, global_init)
    tables = (weights @ s_ref + biases) - (w_g @ s_ref + b_g)  # (N, 6D): E_i
    final_table = src.final_layer.adaLN_modulation[1](s_ref).view(2, D) - c_ref

    new = {k: v.double() for k, v in pixart.state_dict().items()}
    dit_sd = src.state_dict()
    shared = ("x_embedder.", "t_embedder.", "final_layer.linear.")
    new.update({k: v for k, v in dit_sd.items() if k.startswith(shared)})
    new.update({k: v for k, v in dit_sd.items() if k.startswith("blocks.") and (".attn." in k or ".mlp." in k)})
    new["t_embedder.mlp.2.bias"] = dit_sd["t_embedder.mlp.2.bias"] + null
    new["t_block.1.weight"], new["t_block.1.bias"] = w_g, b_g
    for i in range(cfg.depth):
        new[f"blocks.{i}.scale_shift_table"] = tables[i].view(6, D)
    new["final_layer.scale_shift_table"] = final_table
    pixart.load_state_dict({k: v.float() for k, v in new.items()}, strict=True)
    return pixart


@torch.no_grad()
def modulation_error(dit: DiT, pixart: PixArt, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Relative error of PixArt's modulation against DiT's null-class one, per timestep.

    Returns (blocks, final): ||S_pixart - S_dit|| / ||S_dit|| over all blocks' 6D vectors,
    and the same for the final layer's (shift, scale).
    """
    dit, pixart = copy.deepcopy(dit).double().eval(), copy.deepcopy(pixart).double().eval()
    D, n = dit.config.hidden_size, len(timesteps)
    null = torch.full((n,), dit.config.num_classes, dtype=torch.long)
    c = dit.condition(timesteps, null)
    ref_blocks = torch.stack([b.adaLN_modulation(c) for b in dit.blocks], 1)  # (T, N, 6D)
    ref_final = dit.final_layer.adaLN_modulation(c)  # (T, 2D)
    t = pixart.t_embedder(timesteps)
    t0 = pixart.t_block(t)
    tables = torch.stack([b.scale_shift_table.reshape(-1) for b in pixart.blocks])  # (N, 6D)
    ours_blocks = tables[None] + t0[:, None]
    ours_final = (pixart.final_layer.scale_shift_table[None] + t[:, None]).reshape(n, 2 * D)

    def rel(a, b):
        return (a - b).flatten(1).norm(dim=1) / b.flatten(1).norm(dim=1)

    return rel(ours_blocks, ref_blocks).float(), rel(ours_final, ref_final).float()
