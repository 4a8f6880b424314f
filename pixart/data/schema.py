"""The feature-shard sample: what `extract-features` writes and the loader reads.

A feature shard is a webdataset tar beside (never inside) the raw shard, same name,
one sample per raw sample keyed by the same `__key__`:

    KEY.features.safetensors   tensors, no pickle:
        latent_mean, latent_std    (C, h, w)  fp32, the VAE posterior, unscaled (or the pixel
                                              autoencoder's code); latent_std is left out when it
                                              is all zero (the pixel autoencoder: 1/2 the latent bytes)
        text.<source>              (n, D)     text-encoder features of caption <source>, valid tokens
                                              only (n = mask.sum()), in the manifest's dtype (bf16 default)
    KEY.json                   {"width", "height": the source image's size (PixArt's img_hw),
                                "target_hw": [h, w] the resized/cropped size that was encoded,
                                "captions": {<source>: raw text before cleaning}, ...raw metadata}

A sample whose caption <source> is missing has no `text.<source>`. The cache's settings
(encoders, dtype, resolution or bucket table) are in `DIR/manifest.json` (pixart.data.manifest).

Caption sources are names such as "txt" (the raw alt-text) or a captioner's name
("metadata", "llava"); the loader picks one by name or draws from a mix.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

FEATURES_EXT = "features.safetensors"
TEXT_PREFIX = "text."


@dataclass
class FeatureSample:
    key: str
    latent_mean: torch.Tensor
    latent_std: torch.Tensor | None  # None or all zero: not stored; read back as zeros
    text: dict[str, torch.Tensor]  # source -> (n, D)
    meta: dict = field(default_factory=dict)

    def to_wds(self) -> dict:
        tensors = {"latent_mean": self.latent_mean}
        if self.latent_std is not None and self.latent_std.any():  # an all-zero std carries no information
            tensors["latent_std"] = self.latent_std
        tensors.update({TEXT_PREFIX + k: v for k, v in self.text.items()})
        tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        return {"__key__": self.key, FEATURES_EXT: save_tensors(tensors), "json": json.dumps(self.meta).encode()}

    @classmethod
    def from_wds(cls, sample: dict) -> FeatureSample:
        tensors = load_tensors(sample[FEATURES_EXT])
        text = {k[len(TEXT_PREFIX):]: v for k, v in tensors.items() if k.startswith(TEXT_PREFIX)}
        meta = json.loads(sample["json"]) if "json" in sample else {}
        mean = tensors["latent_mean"]
        std = tensors["latent_std"] if "latent_std" in tensors else torch.zeros_like(mean)
        return cls(sample["__key__"], mean, std, text, meta)
