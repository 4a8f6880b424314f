"""Building blocks shared by DiT and PixArt.

Module and parameter names follow facebookresearch/DiT and the official
PixArt-alpha code, so their checkpoints load with `strict=True`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pixart.errors import PixArtError


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


def gelu_tanh() -> nn.Module:
    return nn.GELU(approximate="tanh")


class Mlp(nn.Module):
    """Linear -> GELU (tanh) -> Linear, with timm's `Mlp` parameter names (fc1, fc2) that DiT's and PixArt's
    checkpoints use. Ours rather than timm's: importing timm pulls in torchvision, ~1.5 s per process."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int | None = None):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = gelu_tanh()
        self.fc2 = nn.Linear(hidden_features, out_features or in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def attention(q, k, v, mask: torch.Tensor | None = None, backend: str = "sdpa") -> torch.Tensor:
    """Multi-head attention on (B, N, heads, head_dim) tensors; `mask` (B, L) is True for keys to keep."""
    if backend == "xformers":
        import xformers.ops as xops

        bias = None
        if mask is not None:  # xformers wants an additive bias of shape (B, heads, N, L)
            bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf"))
            bias = bias[:, None, None, :].expand(q.shape[0], q.shape[2], q.shape[1], k.shape[1])
        return xops.memory_efficient_attention(q, k, v, attn_bias=bias)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    attn_mask = None if mask is None else mask[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask).transpose(1, 2)


def check_attn_backend(backend: str) -> None:
    """xformers is optional: asking for it without it installed is an error, never a silent fallback."""
    if backend == "xformers":
        try:
            import xformers.ops  # noqa: F401
        except ImportError as e:
            raise PixArtError("attn_backend='xformers' but xformers is not installed: "
                              "pip install -e '.[xformers]' in the pixart checkout") from e


class Attention(nn.Module):
    """Self-attention with one fused qkv projection (DiT's `attn.qkv`, `attn.proj`)."""

    def __init__(self, dim: int, num_heads: int, backend: str = "sdpa"):
        super().__init__()
        self.num_heads, self.backend = num_heads, backend
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, C // self.num_heads).unbind(2)
        return self.proj(attention(q, k, v, backend=self.backend).reshape(B, N, C))


class CrossAttention(nn.Module):
    """Image tokens attend to caption tokens; padded caption tokens are masked out."""

    def __init__(self, dim: int, num_heads: int, backend: str = "sdpa"):
        super().__init__()
        self.num_heads, self.backend = num_heads, backend
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(dim, dim * 2)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        B, N, C = x.shape
        head_dim = C // self.num_heads
        q = self.q_linear(x).view(B, N, self.num_heads, head_dim)
        k, v = self.kv_linear(cond).view(B, -1, 2, self.num_heads, head_dim).unbind(2)
        if mask is None:
            return self.proj(attention(q, k, v, None, self.backend).reshape(B, N, C))
        # A caption with no tokens adds nothing. Softmax over zero keys is NaN in some CUDA
        # kernels, so such rows attend to everything and their result is then zeroed.
        empty = ~mask.any(dim=1)
        out = self.proj(attention(q, k, v, mask | empty[:, None], self.backend).reshape(B, N, C))
        return out.masked_fill(empty[:, None, None], 0)


class PatchEmbed(nn.Module):
    """Latent (B, C, H, W) -> tokens (B, H/p * W/p, D), for any H and W divisible by p."""

    def __init__(self, patch_size: int, in_channels: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


def checkpointed_count(blocks: nn.ModuleList, setting: bool | int) -> int:
    """How many leading blocks `set_grad_checkpointing(setting)` means: all (True), none (False) or N."""
    k = len(blocks) if setting is True else int(setting)
    if not 0 <= k <= len(blocks):
        raise ValueError(f"grad_checkpointing: {k} blocks, but the model has {len(blocks)}")
    return k


def xavier_init_(model: nn.Module) -> None:
    """DiT's base init: xavier-uniform linears with zero bias, and patch convs like linears."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.xavier_uniform_(m.weight.view(m.weight.shape[0], -1))
            nn.init.zeros_(m.bias)


def unpatchify(x: torch.Tensor, grid_h: int, grid_w: int, patch: int, channels: int) -> torch.Tensor:
    """Tokens (B, h*w, p*p*C) -> image (B, C, h*p, w*p)."""
    x = x.reshape(x.shape[0], grid_h, grid_w, patch, patch, channels)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], channels, grid_h * patch, grid_w * patch)


def sincos_pos_embed(dim: int, grid_h: int, grid_w: int, base_size: int, scale: float = 1.0) -> torch.Tensor:
    """2-D sin-cos positions, (h*w, dim), as DiT and PixArt compute them (float64, then float32).

    Coordinates are `arange(G) / (G / base_size) / scale`: a grid larger than the one
    the model was trained on spans the same range, which is PixArt's rule for new
    resolutions. With G == base_size and scale 1 this is DiT's table.
    """
    if dim % 4:
        raise PixArtError(f"positional embedding: dim {dim} must be divisible by 4")
    ys = torch.arange(grid_h, dtype=torch.float64) / (grid_h / base_size) / scale
    xs = torch.arange(grid_w, dtype=torch.float64) / (grid_w / base_size) / scale
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))

    def one_axis(pos: torch.Tensor) -> torch.Tensor:
        out = pos.reshape(-1, 1) * omega
        return torch.cat([out.sin(), out.cos()], dim=1)

    # DiT puts the column (w) coordinate in the first half of the channels.
    return torch.cat([one_axis(gx), one_axis(gy)], dim=1).float()


class TimestepEmbedder(nn.Module):
    """Scalar (B,) -> (B, D): a 256-d sinusoid (cos first) then Linear-SiLU-Linear."""

    def __init__(self, dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    @staticmethod
    def sinusoid(t: torch.Tensor, dim: int, max_period: float = 10000) -> torch.Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.sinusoid(t, self.freq_dim).to(self.mlp[0].weight.dtype))


class SizeEmbedder(TimestepEmbedder):
    """PixArtMS micro-condition: each of k scalars embedded like a timestep, concatenated: (B, k) -> (B, k*D)."""

    def forward(self, s: torch.Tensor, batch: int) -> torch.Tensor:
        """s is (B, k), or (1, k) shared by the batch."""
        if s.shape[0] != batch:
            s = s.expand(batch, -1)
        return super().forward(s.reshape(-1)).reshape(batch, -1)


class LabelEmbedder(nn.Module):
    """DiT's class embedding; index `num_classes` is the null class used for CFG."""

    def __init__(self, num_classes: int, dim: int, dropout_prob: float):
        super().__init__()
        self.num_classes, self.dropout_prob = num_classes, dropout_prob
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), dim)

    def forward(self, labels: torch.Tensor, train: bool, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if force_drop_ids is not None:
            labels = torch.where(force_drop_ids.bool(), self.num_classes, labels)
        elif train and self.dropout_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            labels = torch.where(drop, self.num_classes, labels)
        return self.embedding_table(labels)


class CaptionEmbedder(nn.Module):
    """Projects text-encoder tokens to the model width; owns the null caption used for CFG.

    The null caption is a fixed random (L, C) buffer as in PixArt. A dropped caption is
    replaced by the whole null caption with every token valid, so the unconditional
    branch never depends on how long the dropped caption was.
    """

    def __init__(self, caption_channels: int, dim: int, max_length: int, dropout_prob: float):
        super().__init__()
        self.dropout_prob = dropout_prob
        self.y_proj = Mlp(caption_channels, dim, dim)
        self.register_buffer("y_embedding", torch.randn(max_length, caption_channels) / caption_channels**0.5)

    def drop(self, y, mask, drop_ids: torch.Tensor):
        drop_ids = drop_ids.bool()
        if not drop_ids.any():  # keep trimmed captions short: padding to the null length costs attention
            return y, mask
        null_len = self.y_embedding.shape[0]
        if y.shape[1] < null_len:  # pad short (trimmed) captions so the null caption fits
            y = F.pad(y, (0, 0, 0, null_len - y.shape[1]))
            mask = F.pad(mask, (0, null_len - mask.shape[1]), value=False)
        null_y = F.pad(self.y_embedding, (0, 0, 0, y.shape[1] - null_len)).to(y.dtype)
        null_mask = torch.arange(y.shape[1], device=y.device) < null_len
        y = torch.where(drop_ids[:, None, None], null_y, y)
        mask = torch.where(drop_ids[:, None], null_mask, mask)
        return y, mask

    def forward(self, y, mask, train: bool, force_drop_ids: torch.Tensor | None = None):
        if force_drop_ids is not None:
            y, mask = self.drop(y, mask, force_drop_ids)
        elif train and self.dropout_prob > 0:
            y, mask = self.drop(y, mask, torch.rand(y.shape[0], device=y.device) < self.dropout_prob)
        return self.y_proj(y), mask
