"""Frozen image autoencoder (PixArt-alpha: stabilityai/sd-vae-ft-ema, diffusers AutoencoderKL)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL

from .loading import EncoderLoadError, check_source, load_error, not_vae, pipeline_part, resolve_dtype

__all__ = ["VAEConfig", "LatentDist", "ImageAutoencoder", "EncoderLoadError"]


@dataclass
class VAEConfig:
    """Where/how to load the VAE. `scale_factor=None` reads `vae.config.scaling_factor` (0.18215 for SD)."""
    path: str
    subfolder: str | None = None  # "vae" for full pipeline repos (a local pipeline folder needs none)
    dtype: str = "fp32"
    device: str = "cpu"
    scale_factor: float | None = None
    local_files_only: bool = False

    def __post_init__(self) -> None:
        resolve_dtype(self.dtype, ("fp32", "bf16", "fp16"), "VAE")


def sample_latents(mean: torch.Tensor, std: torch.Tensor, shift: float, scale: float,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """z = mean + std * noise, mapped to model space: (z - shift) * scale."""
    noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype,
                        device=generator.device if generator is not None else mean.device)
    return (mean + std * noise.to(mean.device) - shift) * scale


@dataclass
class LatentDist:
    """Posterior N(mean, std^2), unscaled, (B, C, h, w) each. PixArt caches both, not one sample,
    so every epoch can draw fresh latents = mean + std * noise."""
    mean: torch.Tensor
    std: torch.Tensor


class ImageAutoencoder:
    """Frozen AutoencoderKL: images in [-1, 1] <-> scaled latents the diffusion model sees."""

    def __init__(self, config: VAEConfig):
        self.config = c = config
        self.dtype = resolve_dtype(c.dtype, ("fp32", "bf16", "fp16"), "VAE")
        src = check_source(c.path, "VAE")
        sub = pipeline_part(src, c.subfolder, "vae")
        try:
            cfg = dict(AutoencoderKL.load_config(src, subfolder=sub, local_files_only=c.local_files_only))
        except Exception as e:
            raise load_error("VAE", src, sub, e) from e
        if cfg.get("_class_name") != "AutoencoderKL":  # a T5's folder, another diffusers model
            raise not_vae(src, cfg)
        try:
            # diffusers accepts torch_dtype in every version (dtype= only in recent ones).
            self.vae = AutoencoderKL.from_pretrained(
                src, subfolder=sub, local_files_only=c.local_files_only, torch_dtype=self.dtype)
        except Exception as e:
            raise load_error("VAE", src, sub, e) from e
        self.vae.to(c.device).eval().requires_grad_(False)
        vc = self.vae.config
        self.scale_factor = float(c.scale_factor if c.scale_factor is not None else vc.scaling_factor)
        self.shift_factor = float(getattr(vc, "shift_factor", None) or 0.0)  # 0 for SD VAEs

    @property
    def latent_channels(self) -> int:
        return self.vae.config.latent_channels

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent cell per side: 2**(blocks-1), i.e. 8 for the SD VAE."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> LatentDist:
        """Images (B, 3, H, W) in [-1, 1] -> unscaled posterior; fp32 so cached stats lose nothing."""
        post = self.vae.encode(images.to(self.config.device, self.dtype)).latent_dist
        return LatentDist(mean=post.mean.float(), std=post.std.float())

    def sample_latents(self, mean: torch.Tensor, std: torch.Tensor,
                       generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw z = mean + std * noise and map to model space: (z - shift) * scale."""
        return sample_latents(mean, std, self.shift_factor, self.scale_factor, generator)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, C, h, w) -> images (B, 3, H, W) in [-1, 1], fp32."""
        z = latents / self.scale_factor + self.shift_factor
        images = self.vae.decode(z.to(self.config.device, self.dtype)).sample
        return images.float().clamp(-1, 1)
