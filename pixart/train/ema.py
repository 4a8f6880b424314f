"""EMA of the fp32 master weights, sharded exactly like them (see `master`).

Each rank averages only the fp32 pieces it owns, so the EMA costs no communication, holds
1/world of the model under ZeRO-3 (not a gathered copy) and never reads the empty
`param.data` of a partitioned parameter. It is gathered whole only to be saved.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .master import Fragment, scatter_into


class EMA:
    def __init__(self, fragments: list[Fragment], decay: float, warmup: bool = False):
        self.fragments, self.decay, self.warmup = fragments, decay, warmup
        self.shadow: list[Tensor | None] = [f.view.detach().clone() if f.view is not None else None for f in fragments]

    def decay_at(self, step: int) -> float:
        """The decay after `step` updates: fixed (PixArt), or with warmup min(decay, (1 + step) / (10 + step)),
        so that a short run's EMA is not dominated by its init (zero-initialised output layers)."""
        return min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, step: int) -> None:
        """shadow = decay * shadow + (1 - decay) * weights, as PixArt's and DiT's update_ema."""
        pairs = [(s, f.view) for s, f in zip(self.shadow, self.fragments, strict=True) if s is not None]
        if pairs:
            shadow, weights = zip(*pairs, strict=True)
            torch._foreach_lerp_(list(shadow), list(weights), 1.0 - self.decay_at(step))

    def load_full_state(self, state: dict[str, Tensor], source: str) -> None:
        scatter_into(self.fragments, self.shadow, state, source)
