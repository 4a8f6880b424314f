"""Pixel-space "autoencoder" for the toy demo: space-to-depth, optionally low-passed, no learned weights.

It lets the whole pipeline (feature cache, training, sampling) run without a VAE. A (3, H, W) image in
[-1, 1] becomes (3 f^2, H/f, W/f) latents, and `decode` undoes it bit for bit. With `lowpass=k` each f x f
block keeps only its k x k lowest 2-D DCT-II frequencies per color (JPEG's transform, orthonormal): 3 k^2
channels. A token then holds fewer numbers than the model's width, as a VAE's do, and `decode` drops what
the model puts outside that subspace (with 8 x 8 px tokens of 192 raw numbers, a width-128 model could not
represent, so not remove, the noise in a third of them: the samples stayed grainy). Same surface as
`ImageAutoencoder`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import PixArtError
from .vae import LatentDist, sample_latents

__all__ = ["PixelAutoencoder"]


def dct_matrix(n: int) -> torch.Tensor:
    """The orthonormal DCT-II matrix: row u is frequency u over samples 0..n-1 (scipy.fft.dct(norm="ortho"))."""
    k = torch.arange(n, dtype=torch.float64)
    m = torch.cos(math.pi * (2 * k[None] + 1) * k[:, None] / (2 * n)) * math.sqrt(2 / n)
    m[0] /= math.sqrt(2)
    return m


def lowpass_basis(factor: int, lowpass: int) -> torch.Tensor:
    """(3 k^2, 3 f^2) orthonormal rows over pixel_unshuffle's channels (c f^2 + i f + j): for each kept
    frequency pair (u, v), lowest u + v first, the three colors' 2-D DCT basis functions."""
    d = dct_matrix(factor)
    pairs = sorted(((u, v) for u in range(lowpass) for v in range(lowpass)), key=lambda p: (p[0] + p[1], p))
    colors = torch.eye(3, dtype=torch.float64)
    return torch.cat([torch.kron(colors, torch.outer(d[u], d[v]).flatten()[None]) for u, v in pairs]).float()


class PixelAutoencoder:
    """PixelUnshuffle by `factor`, then with `lowpass` the kept DCT coefficients; `scale_factor` 1 and
    `shift_factor` 0 keep model space == pixels (or their DCT coefficients)."""

    def __init__(self, factor: int = 2, device: str = "cpu", scale_factor: float = 1.0, lowpass: int | None = None):
        if factor < 1:
            raise PixArtError(f"pixel autoencoder: factor must be >= 1, got {factor}")
        if lowpass is not None and not 1 <= lowpass <= factor:
            raise PixArtError(f"pixel autoencoder: lowpass must be in 1..{factor} (the factor), got {lowpass}")
        self.factor, self.device, self.lowpass = int(factor), device, lowpass
        self.scale_factor, self.shift_factor = float(scale_factor), 0.0
        self.basis = lowpass_basis(self.factor, lowpass).to(device) if lowpass else None

    @classmethod
    def from_id(cls, source: str, device: str = "cpu", scale_factor: float = 1.0) -> PixelAutoencoder:
        """From its `id`, `pixel:F` or `pixel:F:K`, as a feature manifest records it."""
        parts = source.split(":")
        try:
            factor, lowpass = int(parts[1]), (int(parts[2]) if len(parts) == 3 else None)
        except (IndexError, ValueError):
            factor = None
        if factor is None or len(parts) > 3:
            raise PixArtError(f"{source!r}: a pixel autoencoder is 'pixel:F' or 'pixel:F:K' (integers)")
        return cls(factor, device, scale_factor, lowpass)

    @property
    def latent_channels(self) -> int:
        return 3 * (self.lowpass or self.factor) ** 2

    @property
    def downsample_factor(self) -> int:
        return self.factor

    @property
    def id(self) -> str:
        """What a feature manifest records as the image encoder."""
        return f"pixel:{self.factor}" + (f":{self.lowpass}" if self.lowpass else "")

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> LatentDist:
        """Images (B, 3, H, W) in [-1, 1], H and W divisible by the factor -> (B, C, H/f, W/f), std 0."""
        h, w = images.shape[-2:]
        if h % self.factor or w % self.factor:
            raise PixArtError(f"pixel autoencoder: image {h}x{w} is not divisible by factor {self.factor}")
        mean = F.pixel_unshuffle(images.to(self.device, torch.float32), self.factor)
        if self.basis is not None:
            mean = torch.einsum("kd,bdhw->bkhw", self.basis, mean)
        return LatentDist(mean=mean, std=torch.zeros_like(mean))

    def sample_latents(self, mean: torch.Tensor, std: torch.Tensor,
                       generator: torch.Generator | None = None) -> torch.Tensor:
        """z = mean + std * noise in model space (std is 0 here, so z == mean * scale)."""
        return sample_latents(mean, std, self.shift_factor, self.scale_factor, generator)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Model-space latents (B, C, h, w) -> images (B, 3, h f, w f) in [-1, 1], fp32."""
        z = latents.to(self.device, torch.float32) / self.scale_factor + self.shift_factor
        if self.basis is not None:
            z = torch.einsum("kd,bkhw->bdhw", self.basis, z)
        return F.pixel_shuffle(z, self.factor).clamp(-1, 1)
