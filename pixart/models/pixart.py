"""PixArt-alpha and PixArtMS: DiT with cross-attention to text tokens and adaLN-single.

adaLN-single: one `t_block` maps the timestep embedding to 6 modulation vectors
shared by all blocks; each block only adds its own learned `scale_shift_table`.
With `micro_conditions` (PixArtMS) the image size and aspect ratio are embedded
and added to the timestep embedding, and positions are built for any H x W.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from pixart.errors import PixArtError
from pixart.models.config import ModelConfig
from pixart.models.layers import (
    Attention,
    CaptionEmbedder,
    CrossAttention,
    Mlp,
    PatchEmbed,
    SizeEmbedder,
    TimestepEmbedder,
    check_attn_backend,
    checkpointed_count,
    modulate,
    sincos_pos_embed,
    unpatchify,
    xavier_init_,
)


class PixArtBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, backend: str):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads, backend)
        self.cross_attn = CrossAttention(dim, num_heads, backend)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.scale_shift_table = nn.Parameter(torch.randn(6, dim) / dim**0.5)

    def forward(self, x: torch.Tensor, y: torch.Tensor, t0: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.scale_shift_table[None] + t0.reshape(t0.shape[0], 6, -1)
        ).chunk(6, dim=1)
        x = x + gate_msa * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + self.cross_attn(x, y, mask)
        return x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class T2IFinalLayer(nn.Module):
    """Final norm modulated by the raw timestep embedding plus a learned (2, D) table."""

    def __init__(self, dim: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.scale_shift_table = nn.Parameter(torch.randn(2, dim) / dim**0.5)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        shift, scale = (self.scale_shift_table[None] + t[:, None]).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class PixArt(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        check_attn_backend(config.attn_backend)
        self.config = config
        self.checkpointed_blocks = 0  # the first k blocks recompute their activations in backward
        D, p = config.hidden_size, config.patch_size
        self.base_size = config.input_size // p
        self.x_embedder = PatchEmbed(p, config.in_channels, D)
        self.t_embedder = TimestepEmbedder(D)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D))
        self.y_embedder = CaptionEmbedder(config.caption_channels, D, config.model_max_length,
                                          config.class_dropout_prob)
        if config.micro_conditions:
            self.csize_embedder = SizeEmbedder(D // 3)  # (height, width) -> 2D/3
            self.ar_embedder = SizeEmbedder(D // 3)  # aspect ratio -> D/3
        # Positions are derived, never learned: a non-persistent buffer, rebuilt for other grids.
        self.register_buffer("pos_embed", self._pos_embed(self.base_size, self.base_size), persistent=False)
        self.blocks = nn.ModuleList(
            PixArtBlock(D, config.num_heads, config.mlp_ratio, config.attn_backend) for _ in range(config.depth)
        )
        self.final_layer = T2IFinalLayer(D, p, config.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """PixArt's init; the cross-attention output starts at zero so training starts from the DiT."""
        xavier_init_(self)
        embedders = [self.t_embedder.mlp[0], self.t_embedder.mlp[2], self.t_block[1]]
        if self.config.micro_conditions:
            embedders += [self.csize_embedder.mlp[0], self.csize_embedder.mlp[2]]
            embedders += [self.ar_embedder.mlp[0], self.ar_embedder.mlp[2]]
        for layer in embedders:
            nn.init.normal_(layer.weight, std=0.02)
        # The caption projection: PixArt's std 0.02 at XL's fan-ins (4096-d T5, width 1152), scaled by
        # sqrt(fan-in) elsewhere so that narrow text encoders still give captions a signal (a 32-d toy T5
        # at std 0.02 projects every caption to about the same 0.01-sized vector: no conditioning).
        for layer, reference in ((self.y_embedder.y_proj.fc1, 4096), (self.y_embedder.y_proj.fc2, 1152)):
            nn.init.normal_(layer.weight, std=0.02 * (reference / layer.in_features) ** 0.5)
        for block in self.blocks:
            nn.init.zeros_(block.cross_attn.proj.weight)
            nn.init.zeros_(block.cross_attn.proj.bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def set_grad_checkpointing(self, blocks: bool | int = True) -> None:
        """Checkpoint all blocks (True), none (False), or the first `blocks` of them."""
        self.checkpointed_blocks = checkpointed_count(self.blocks, blocks)

    def _pos_embed(self, grid_h: int, grid_w: int) -> torch.Tensor:
        pe = sincos_pos_embed(self.config.hidden_size, grid_h, grid_w, self.base_size, self.config.pe_interpolation)
        return pe[None]

    def pos_embed_for(self, grid_h: int, grid_w: int, like: torch.Tensor) -> torch.Tensor:
        if grid_h == grid_w == self.base_size:
            return self.pos_embed.to(like.dtype)
        return self._pos_embed(grid_h, grid_w).to(like.device, like.dtype)

    def timestep_condition(self, timestep: torch.Tensor, batch: int, data_info: dict | None) -> torch.Tensor:
        """The timestep embedding, plus the size and aspect-ratio embeddings for PixArtMS."""
        t = self.t_embedder(timestep)
        if not self.config.micro_conditions:
            return t
        if not data_info or "img_hw" not in data_info or "aspect_ratio" not in data_info:
            raise PixArtError("PixArtMS forward needs data_info with 'img_hw' and 'aspect_ratio'")
        hw, ratio = data_info["img_hw"].to(t.device), data_info["aspect_ratio"].to(t.device)
        if hw.reshape(-1, 2).shape[0] not in (1, batch) or ratio.numel() not in (1, batch):
            raise PixArtError(f"data_info: img_hw {tuple(hw.shape)} and aspect_ratio {tuple(ratio.shape)} "
                              f"must be (B, 2) and (B, 1) for batch {batch}, or one value for all")
        size = self.csize_embedder(hw.reshape(-1, 2), batch)
        ratio = self.ar_embedder(ratio.reshape(-1, 1), batch)
        return t + torch.cat([size, ratio], dim=1).to(t.dtype)

    def forward(self, x, timestep, y, mask=None, data_info=None, force_drop_ids=None) -> torch.Tensor:
        """x (B, C, H, W) latents, timestep (B,), y (B, L, caption_channels), mask (B, L) 1 = real token."""
        B, p = x.shape[0], self.config.patch_size
        h, w = x.shape[-2] // p, x.shape[-1] // p
        if y.dim() == 4:  # the official code's (B, 1, L, C)
            y = y.squeeze(1)
        if mask is None:
            mask = torch.ones(y.shape[:2], dtype=torch.bool, device=y.device)
        mask = mask.reshape(mask.shape[0], -1).bool()  # the official code's (B, 1, 1, L) too
        x = self.x_embedder(x)
        x = x + self.pos_embed_for(h, w, x)
        t = self.timestep_condition(timestep, B, data_info)
        t0 = self.t_block(t)
        y, mask = self.y_embedder(y.to(x.dtype), mask, self.training, force_drop_ids)
        for i, block in enumerate(self.blocks):
            if i < self.checkpointed_blocks and torch.is_grad_enabled():
                x = checkpoint(block, x, y, t0, mask, use_reentrant=False)
            else:
                x = block(x, y, t0, mask)
        x = self.final_layer(x, t)
        return unpatchify(x, h, w, p, self.config.out_channels)
