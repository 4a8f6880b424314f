"""EMA of the fp32 master weights, sharded exactly like them (see `master`).

Each rank averages only the fp32 pieces it owns, so the EMA costs no communication, holds
1/world of the model under ZeRO-3 (not a gathered copy) and never reads the empty
`param.data` of a partitioned parameter. It is gathered whole only to be saved.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .master import Fragment, gather, scatter_into


class EMA:
    def __init__(self, fragments: list[Fragment], decay: float):
        self.fragments, self.decay = fragments, decay
        self.shadow: list[Tensor | None] = [f.view.detach().clone() if f.view is not None else None for f in fragments]

    @torch.no_grad()
    def update(self) -> None:
        """shadow = decay * shadow + (1 - decay) * weights, as PixArt's and DiT's update_ema."""
        pairs = [(s, f.view) for s, f in zip(self.shadow, self.fragments) if s is not None]
        if pairs:
            shadow, weights = zip(*pairs)
            torch._foreach_lerp_(list(shadow), list(weights), 1.0 - self.decay)

    def full_state(self, to_rank0_only: bool = True) -> dict[str, Tensor]:
        """The whole EMA as fp32 tensors named like the model's parameters (a collective call)."""
        return gather(self.fragments, self.shadow, to_rank0_only)

    def load_full_state(self, state: dict[str, Tensor], source: str) -> None:
        scatter_into(self.fragments, self.shadow, state, source)
