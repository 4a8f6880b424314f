"""Frozen T5 text encoder (PixArt-alpha: T5-v1.1-XXL, 120 tokens) loaded by path or hub id."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import transformers
from packaging.version import Version
from transformers import AutoConfig, AutoTokenizer, T5Config, T5EncoderModel

from ..errors import PixArtError
from .captions import clean_caption
from .loading import EncoderLoadError, check_source, load_error, local_config, not_t5, pipeline_part, resolve_dtype

__all__ = ["TextEncoderConfig", "TextEncoder", "clean_caption", "EncoderLoadError"]

# transformers >= 4.56 renamed from_pretrained(torch_dtype=) to dtype= (v5 warns on the old name).
_DTYPE_KW = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"


@dataclass
class TextEncoderConfig:
    """Where/how to load T5. `subfolder` serves full pipeline repos ("text_encoder"); the tokenizer
    defaults to the same place, or `tokenizer_path`/`tokenizer_subfolder` (e.g. "tokenizer"). A local
    pipeline folder (model_index.json) needs neither: its text_encoder/ and tokenizer/ are read."""
    path: str
    subfolder: str | None = None
    tokenizer_path: str | None = None
    tokenizer_subfolder: str | None = None
    max_length: int = 120
    dtype: str = "bf16"
    device: str = "cpu"
    clean: bool = True  # clean_caption before tokenizing, as PixArt's T5Embedder does; False: only lowercase, as
    # it and diffusers' PixArtAlphaPipeline do without cleaning
    local_files_only: bool = False  # True: never touch the network (offline clusters, tests)

    def __post_init__(self) -> None:
        if self.dtype == "fp16":
            raise PixArtError("T5 text encoder: dtype 'fp16' is refused because T5 activations overflow "
                             "in float16 (inf/NaN features); use 'bf16' or 'fp32'")
        resolve_dtype(self.dtype, ("bf16", "fp32"), "T5 text encoder")
        if self.max_length < 1:
            raise PixArtError(f"max_length must be positive, got {self.max_length}")


class TextEncoder:
    """Frozen T5 encoder + tokenizer; captions -> (features (B, L, D), mask (B, L))."""

    def __init__(self, config: TextEncoderConfig):
        self.config = c = config
        self.dtype = resolve_dtype(c.dtype, ("bf16", "fp32"), "T5 text encoder")
        src = check_source(c.path, "T5 text encoder")
        tok_src = check_source(c.tokenizer_path or c.path, "T5 tokenizer")
        sub = pipeline_part(src, c.subfolder, "text_encoder")
        if c.tokenizer_path or c.tokenizer_subfolder:
            tok_sub = pipeline_part(tok_src, c.tokenizer_subfolder, "tokenizer")
        else:
            tok_sub = c.subfolder or pipeline_part(src, None, "tokenizer")
        local = local_config(src, sub)
        if local is not None and "model_type" not in local:  # a diffusers folder (a VAE's), which AutoConfig rejects
            raise not_t5(src, local)
        try:
            cfg = AutoConfig.from_pretrained(src, subfolder=sub or "", local_files_only=c.local_files_only)
        except Exception as e:
            raise load_error("T5 text encoder", src, sub, e) from e
        if not isinstance(cfg, T5Config):
            raise not_t5(src, cfg.to_dict())
        try:
            self.model = T5EncoderModel.from_pretrained(
                src, config=cfg, subfolder=sub or "", local_files_only=c.local_files_only,
                **{_DTYPE_KW: self.dtype})
        except Exception as e:
            raise load_error("T5 text encoder", src, sub, e) from e
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(
                tok_src, subfolder=tok_sub or "", local_files_only=c.local_files_only)
        except Exception as e:
            raise load_error("T5 tokenizer", tok_src, tok_sub, e) from e
        self.tokenizer_source = (tok_src, tok_sub)
        self.model.to(c.device).eval().requires_grad_(False)

    def tokenizer_files(self) -> list[str]:
        """The tokenizer's own files, as its folder or hub repo holds them. An export copies these rather than the
        installed transformers' re-save: transformers 5 writes only tokenizer.json and a config that 4.x cannot
        read, where the hub's PixArt and T5 folders keep spiece.model, which every version reads."""
        from transformers.tokenization_utils_base import (
            ADDED_TOKENS_FILE,
            FULL_TOKENIZER_FILE,
            SPECIAL_TOKENS_MAP_FILE,
            TOKENIZER_CONFIG_FILE,
        )
        from transformers.utils import cached_file

        source, subfolder = self.tokenizer_source
        names = {TOKENIZER_CONFIG_FILE, SPECIAL_TOKENS_MAP_FILE, ADDED_TOKENS_FILE, FULL_TOKENIZER_FILE,
                 *type(self.tokenizer).vocab_files_names.values()}
        found = (cached_file(source, name, subfolder=subfolder or "", local_files_only=True,
                             _raise_exceptions_for_missing_entries=False,
                             _raise_exceptions_for_connection_errors=False) for name in sorted(names))
        return [path for path in found if path is not None]

    @property
    def dim(self) -> int:
        """Feature width D (4096 for T5-XXL): the DiT caption projection's input size."""
        return self.model.config.d_model

    def tokenize(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask), both (B, max_length): pad to max length, truncate, eos kept."""
        if isinstance(captions, str):
            captions = [captions]
        texts = [clean_caption(t) if self.config.clean else t.lower().strip() for t in captions]
        out = self.tokenizer(texts, max_length=self.config.max_length, padding="max_length",
                             truncation=True, add_special_tokens=True, return_tensors="pt")
        return out.input_ids, out.attention_mask.long()

    @torch.no_grad()
    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Features (B, L, D) in the configured dtype and mask (B, L) long, on the configured device."""
        ids, mask = self.tokenize(captions)
        ids, mask = ids.to(self.config.device), mask.to(self.config.device)
        feats = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        return feats.to(self.dtype), mask
