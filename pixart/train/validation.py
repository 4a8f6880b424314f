"""Validation grids: fixed prompts (or class labels) and seeds, sampled from the gathered weights.

Rank 0 samples with a plain fp32 copy of the model, so validation never runs through ZeRO's
partitioned forward nor holds the training activations' memory. One row per prompt, one column
per seed offset; the same noise every time, so grids from successive steps compare.
"""
from __future__ import annotations

import io
from contextlib import nullcontext
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor, nn

from pixart.atomic import atomic_write
from pixart.checkpoint import load_into
from pixart.diffusion import NoiseSchedule
from pixart.diffusion.sampler import sample, sample_one_step
from pixart.models import ModelConfig, model_from_config

from .config import ValidationSection


class _LabelsAsCaptions(nn.Module):
    """Lets the shared CFG sampler drive a class-conditional DiT: labels ride in a (B, 1, 1) 'caption'."""

    def __init__(self, dit: nn.Module):
        super().__init__()
        self.dit = dit

    def forward(self, x, t, y, mask=None, data_info=None):
        return self.dit(x, t, y[:, 0, 0].long())


class Validator:
    def __init__(self, v: ValidationSection, prediction: str, model_config: ModelConfig, text_encoder, autoencoder,
                 device: torch.device, columns: int = 2, batch: int | None = None, progress: bool = False):
        """`batch`: images sampled at once (default all), so a large grid needs no memory for all of it; the noise
        is drawn for the whole grid first, so the images do not depend on it. `progress`: a bar over each batch's
        sampler steps (`pixart sample`; the training loop stays quiet)."""
        self.v, self.prediction, self.model_config, self.autoencoder = v, prediction, model_config, autoencoder
        self.device = device
        self.columns, self.progress = columns, progress
        if model_config.arch == "dit":
            labels = v.labels or list(range(min(4, model_config.num_classes)))
            self.rows = len(labels)
            self.y = torch.tensor(labels, dtype=torch.float32).repeat_interleave(columns)[:, None, None]
            self.mask = None
        else:
            prompts = v.prompts or [""]
            self.rows = len(prompts)
            y, mask = text_encoder.encode(prompts)
            self.y = y.float().cpu().repeat_interleave(columns, 0)
            self.mask = mask.cpu().repeat_interleave(columns, 0)
        h, w = v.size or (model_config.input_size, model_config.input_size)
        g = torch.Generator().manual_seed(v.seed)
        self.noise = torch.randn(self.rows * columns, model_config.in_channels, h, w, generator=g)
        self.data_info = size_info((h, w), autoencoder, self.noise.shape[0])
        self.batch = batch or self.noise.shape[0]
        self.prepare = None  # (model, rows: slice) -> context manager to sample those images in (e.g. concepts)

    @torch.no_grad()
    def images(self, state: dict[str, Tensor]) -> Tensor:
        """Images (N, 3, H, W) in [-1, 1] from a full state dict (model or EMA weights)."""
        model = load_into(model_from_config(self.model_config), state, "validation weights").to(self.device).eval()
        if self.model_config.arch == "dit":
            model, null = _LabelsAsCaptions(model), torch.full((1, 1), float(self.model_config.num_classes))
        else:
            null = model.y_embedder.y_embedding
        images = []
        for lo in range(0, self.noise.shape[0], self.batch):
            rows = slice(lo, lo + self.batch)
            with self.prepare(model, rows) if self.prepare else nullcontext():
                images.append(self._sample(model, null, rows))
        return torch.cat(images)

    def _sample(self, model, null, rows: slice) -> Tensor:
        v, dev = self.v, self.device
        noise, y = self.noise[rows].to(dev), self.y[rows].to(dev)
        info = {k: t[rows].to(dev) for k, t in self.data_info.items()}
        mask = None if self.mask is None else self.mask[rows].to(dev)
        if v.one_step:
            latents = sample_one_step(model, noise, y, mask, timestep=v.one_step, schedule=NoiseSchedule.linear(),
                                      prediction_type=self.prediction, data_info=info)
        else:
            latents = sample(model, noise, y, mask, null.to(dev), sampler=v.sampler, steps=v.steps, cfg_scale=v.cfg,
                             schedule=NoiseSchedule.linear(), data_info=info,
                             prediction_type=self.prediction, progress=self.progress)
        return self.autoencoder.decode(latents.float()).cpu()

    def grid(self, state: dict[str, Tensor], out: Path, scale: int = 2) -> Path:
        """Write the grid PNG atomically (temp file, then rename)."""
        save_grid(self.images(state), self.columns, out, scale)
        return out


def size_info(latent_hw: tuple[int, int], decoder, n: int) -> dict[str, Tensor]:
    """PixArtMS's micro-conditions for n images of latent size (h, w): pixel size and aspect ratio."""
    h, w = latent_hw
    ds = getattr(decoder, "downsample_factor", 8)
    return {"img_hw": torch.tensor([[h * ds, w * ds]], dtype=torch.float32).expand(n, 2),
            "aspect_ratio": torch.tensor([[h / w]], dtype=torch.float32).expand(n, 1)}


def sample_prompts(model, prompts: list[str], text_encoder, decoder, latent_hw: tuple[int, int], *,
                   prediction_type: str, steps: int = 20, cfg: float = 4.0, sampler: str = "ddim", seed: int = 0,
                   batch: int = 27) -> list:
    """PIL images for `prompts` from a PixArt model with the repo's sampler (the model's null caption
    as the unconditional branch); one noise stream per call, so equal seeds compare models fairly."""
    model = model.eval()
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(len(prompts), model.config.in_channels, *latent_hw, generator=g)
    images = []
    for lo in range(0, len(prompts), batch):
        y, mask = text_encoder.encode(prompts[lo:lo + batch])
        latents = sample(model, noise[lo:lo + batch], y.float(), mask, model.y_embedder.y_embedding, sampler=sampler,
                         steps=steps, cfg_scale=cfg, schedule=NoiseSchedule.linear(), prediction_type=prediction_type,
                         data_info=size_info(latent_hw, decoder, len(y)))
        images += to_pil(decoder.decode(latents))
    return images


def to_pil(images: Tensor) -> list[Image.Image]:
    arr = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in arr]


def save_grid(images: Tensor | list[Image.Image], columns: int, out: Path, scale: int = 1) -> None:
    pil = to_pil(images) if isinstance(images, Tensor) else images
    w, h = pil[0].size
    rows = -(-len(pil) // columns)
    grid = Image.new("RGB", (columns * w, rows * h), (255, 255, 255))
    for i, im in enumerate(pil):
        grid.paste(im, ((i % columns) * w, (i // columns) * h))
    if scale != 1:
        grid = grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)
    out.parent.mkdir(parents=True, exist_ok=True)
    data = io.BytesIO()
    grid.save(data, format=Image.registered_extensions().get(out.suffix.lower(), "PNG"))  # x.jpg is a JPEG
    atomic_write(out, data.getvalue())
