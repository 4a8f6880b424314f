"""What a captioner is, and the registry of the ones `pixart relabel --captioner NAME` knows.

A captioner turns a batch of samples into captions. Samples are dicts with
`__key__`, `image` (a PIL RGB image, decoded and resized in the job's worker
processes), `json` (the sample's metadata dict, or None) and `txt` (its alt-text,
or None). Each caption is written next to the model id and the prompt that made it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from pixart.errors import PixArtError

PIXART_PROMPT = "Describe this image and its style in a very detailed manner"  # PixArt-alpha's LLaVA prompt


@dataclass
class CaptionerConfig:
    name: str
    model: str | None = None  # local path or hub id (VLMs)
    prompt: str = PIXART_PROMPT
    device: str = "cpu"
    dtype: str = "bf16"
    max_new_tokens: int = 160
    seed: int = 0
    backend: str = "transformers"  # or "vllm" where installed


class Captioner(Protocol):
    name: str
    model_id: str
    prompt: str

    def caption(self, samples: list[dict]) -> list[str]: ...


def build_captioner(config: CaptionerConfig) -> Captioner:
    """The captioner named in `config`, loaded; one clear error for an unknown name or a missing model."""
    if config.name == "metadata":
        from data_pipelines.relabel.metadata import MetadataCaptioner

        return MetadataCaptioner(config)
    if config.name in VLM_NAMES:
        from data_pipelines.relabel.vlm import load_vlm_captioner

        return load_vlm_captioner(config)
    raise PixArtError(f"unknown captioner {config.name!r}; choose from metadata, {', '.join(VLM_NAMES)}")


VLM_NAMES = ("llava", "llava-next", "qwen2-vl", "qwen2.5-vl", "blip2")
