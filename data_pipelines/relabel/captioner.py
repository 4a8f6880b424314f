"""What a captioner is, and the registry of the ones `pixart relabel --captioner NAME` knows.

A captioner turns a batch of samples into captions. Samples are dicts with
`__key__`, `image` (a PIL RGB image, decoded and resized in the job's worker
processes), `json` (the sample's metadata dict, or None) and `txt` (its alt-text,
or None). Each caption is written next to the model id and the prompt that made it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from pixart.errors import PixArtError

PIXART_PROMPT = "Describe this image and its style in a very detailed manner"  # PixArt-alpha's LLaVA prompt
QWEN_NAMES = ("qwen2-vl", "qwen2.5-vl")
QWEN_MAX_PIXELS = 1024 * 28 * 28
"""Default pixel bound of Qwen2-VL/2.5-VL images: at most 1024 visual tokens (a token is 28x28 px, 14 px
patches merged 2x2; the Qwen2-VL docs' low-memory setting). Checkpoints ship 12,845,056 (16,384 tokens)."""


@dataclass
class CaptionerConfig:
    name: str
    model: str | None = None  # local path or hub id (VLMs)
    prompt: str | None = None  # None: PIXART_PROMPT; "": no prompt, the image alone
    device: str = "cpu"
    dtype: str = "bf16"
    max_new_tokens: int = 160
    seed: int = 0
    backend: str = "transformers"  # or "vllm" where installed
    image_size: int | None = None  # longest image side before the processor; None: the checkpoint's own, 0: as decoded
    min_pixels: int | None = None  # Qwen2-VL/2.5-VL resize bounds; None: the checkpoint's minimum
    max_pixels: int | None = None  # ...; None: QWEN_MAX_PIXELS

    def __post_init__(self):
        """Bad sizes fail here, before any model loads, naming the flag that set them."""
        if self.name in METADATA_NAMES:  # they read the sample's metadata, never a model, a prompt or the image
            for flag, value in (("--model", self.model), ("--prompt", self.prompt), ("--image-size", self.image_size)):
                if value is not None:
                    raise PixArtError(f"{flag} applies to VLM and custom captioners, not {self.name}")
        if self.max_new_tokens < 1:
            raise PixArtError(f"--max-new-tokens {self.max_new_tokens}: must be positive")
        if self.image_size is not None and self.image_size < 0:
            raise PixArtError(f"--image-size {self.image_size}: use a positive number of pixels, or 0 for full size")
        for flag, value in (("--min-pixels", self.min_pixels), ("--max-pixels", self.max_pixels)):
            if value is None:
                continue
            if value < 1:
                raise PixArtError(f"{flag} {value}: must be positive")
            if self.name in (*METADATA_NAMES, *VLM_NAMES) and self.name not in QWEN_NAMES:
                raise PixArtError(f"{flag} applies to {' and '.join(QWEN_NAMES)} only, not {self.name}")
        low, high = self.min_pixels, self.max_pixels or QWEN_MAX_PIXELS
        if low is not None and low > high:
            raise PixArtError(f"--min-pixels {low} is above --max-pixels {high}")

    def settings(self) -> dict:
        """What shapes the captions, as a job records it so that a rerun into its output cannot mix others: a
        local model as its absolute path, a hub id as given. Not how they are computed (device, dtype, batch
        size, workers, backend): dtype's default follows the device, and a GPU job may resume on a CPU node.
        The metadata captioners read only the seed."""
        if self.name in METADATA_NAMES:
            return {"captioner": self.name, "seed": self.seed}
        model = model_name(self.model)
        prompt = PIXART_PROMPT if self.prompt is None and self.name in VLM_NAMES else self.prompt
        return {"captioner": self.name, "model": model, "prompt": prompt, "max_new_tokens": self.max_new_tokens,
                "image_size": self.image_size, "seed": self.seed, "min_pixels": self.min_pixels,
                "max_pixels": self.max_pixels}


def model_name(model):
    """A model as records and caption lines name it: a local path absolute (the same from any folder), a hub id
    (or anything else) as given."""
    if isinstance(model, str) and model and Path(model).exists():
        return str(Path(model).resolve())
    return model


class Captioner(Protocol):
    model_id: str
    prompt: str

    def caption(self, samples: list[dict]) -> list[str]: ...


def build_captioner(config: CaptionerConfig) -> Captioner:
    """The captioner named in `config`, loaded; one clear error for an unknown name or a missing model."""
    if config.name in METADATA_NAMES:
        from data_pipelines.relabel.metadata import MetadataCaptioner, ShortCaptioner

        return (MetadataCaptioner if config.name == "metadata" else ShortCaptioner)(config)
    if config.name in VLM_NAMES:
        from data_pipelines.relabel.vlm import load_vlm_captioner

        return load_vlm_captioner(config)
    raise PixArtError(f"unknown captioner {config.name!r}; choose from {', '.join(METADATA_NAMES + VLM_NAMES)}")


METADATA_NAMES = ("metadata", "metadata-short")  # the shapes world's truth: dense, and as users write
VLM_NAMES = ("llava", "llava-next", "qwen2-vl", "qwen2.5-vl", "blip2")
