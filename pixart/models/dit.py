"""Class-conditional DiT (Peebles & Xie), key for key as facebookresearch/DiT.

Stage 1 of the recipe, and the source of the DiT -> PixArt reparameterization.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from pixart.models.config import ModelConfig
from pixart.models.layers import (
    Attention,
    LabelEmbedder,
    Mlp,
    PatchEmbed,
    TimestepEmbedder,
    check_attn_backend,
    checkpointed_count,
    modulate,
    sincos_pos_embed,
    unpatchify,
    xavier_init_,
)


class DiTBlock(nn.Module):
    """adaLN-Zero block: each block maps the condition to its own 6 modulation vectors."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, backend: str):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads, backend)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        modulation = self.adaLN_modulation(c)[:, None].chunk(6, dim=2)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation
        x = x + gate_msa * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class DiTFinalLayer(nn.Module):
    def __init__(self, dim: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c)[:, None].chunk(2, dim=2)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        check_attn_backend(config.attn_backend)
        self.config = config
        self.checkpointed_blocks = 0  # the first k blocks recompute their activations in backward
        D, p = config.hidden_size, config.patch_size
        self.x_embedder = PatchEmbed(p, config.in_channels, D)
        self.t_embedder = TimestepEmbedder(D)
        self.y_embedder = LabelEmbedder(config.num_classes, D, config.class_dropout_prob)
        grid = config.input_size // p
        # A fixed Parameter, not a buffer, because the official checkpoints store it as one.
        self.pos_embed = nn.Parameter(sincos_pos_embed(D, grid, grid, base_size=grid)[None], requires_grad=False)
        self.blocks = nn.ModuleList(
            DiTBlock(D, config.num_heads, config.mlp_ratio, config.attn_backend) for _ in range(config.depth)
        )
        self.final_layer = DiTFinalLayer(D, p, config.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's init: xavier linears, adaLN-Zero (every block starts as the identity)."""
        xavier_init_(self)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def set_grad_checkpointing(self, blocks: bool | int = True) -> None:
        """Checkpoint all blocks (True), none (False), or the first `blocks` of them."""
        self.checkpointed_blocks = checkpointed_count(self.blocks, blocks)

    def condition(self, t: torch.Tensor, y: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The vector c = t_emb + y_emb that every block's adaLN reads."""
        return self.t_embedder(t) + self.y_embedder(y, self.training, force_drop_ids)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, force_drop_ids=None) -> torch.Tensor:
        h, w = x.shape[-2] // self.config.patch_size, x.shape[-1] // self.config.patch_size
        x = self.x_embedder(x) + self.pos_embed
        c = self.condition(t, y, force_drop_ids)
        for i, block in enumerate(self.blocks):
            if i < self.checkpointed_blocks and torch.is_grad_enabled():
                x = checkpoint(block, x, c, use_reentrant=False)
            else:
                x = block(x, c)
        x = self.final_layer(x, c)
        return unpatchify(x, h, w, self.config.patch_size, self.config.out_channels)
