"""Pixel-space "autoencoder" for the toy demo: space-to-depth, exactly invertible, no weights.

It lets the whole pipeline (feature cache, training, sampling) run without a VAE: a
(3, H, W) image in [-1, 1] becomes (3 f^2, H/f, W/f) latents with std 0, and `decode`
undoes it bit for bit. Same surface as `ImageAutoencoder`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import PixArtError
from .vae import LatentDist, sample_latents

__all__ = ["PixelAutoencoder"]


class PixelAutoencoder:
    """PixelUnshuffle by `factor`; `scale_factor` 1 and `shift_factor` 0 keep model space == pixels."""

    def __init__(self, factor: int = 2, device: str = "cpu", scale_factor: float = 1.0):
        if factor < 1:
            raise PixArtError(f"pixel autoencoder: factor must be >= 1, got {factor}")
        self.factor, self.device = int(factor), device
        self.scale_factor, self.shift_factor = float(scale_factor), 0.0

    @property
    def latent_channels(self) -> int:
        return 3 * self.factor ** 2

    @property
    def downsample_factor(self) -> int:
        return self.factor

    @property
    def id(self) -> str:
        """What a feature manifest records as the image encoder."""
        return f"pixel:{self.factor}"

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> LatentDist:
        """Images (B, 3, H, W) in [-1, 1], H and W divisible by the factor -> (B, 3f^2, H/f, W/f), std 0."""
        h, w = images.shape[-2:]
        if h % self.factor or w % self.factor:
            raise PixArtError(f"pixel autoencoder: image {h}x{w} is not divisible by factor {self.factor}")
        mean = F.pixel_unshuffle(images.to(self.device, torch.float32), self.factor)
        return LatentDist(mean=mean, std=torch.zeros_like(mean))

    def sample_latents(self, mean: torch.Tensor, std: torch.Tensor,
                       generator: torch.Generator | None = None) -> torch.Tensor:
        """z = mean + std * noise in model space (std is 0 here, so z == mean * scale)."""
        return sample_latents(mean, std, self.shift_factor, self.scale_factor, generator)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Model-space latents (B, 3f^2, h, w) -> images (B, 3, h f, w f) in [-1, 1], fp32."""
        z = latents.to(self.device, torch.float32) / self.scale_factor + self.shift_factor
        return F.pixel_shuffle(z, self.factor).clamp(-1, 1)
