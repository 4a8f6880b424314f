"""`torch.compile` per transformer block, the unit every step repeats depth times.

Blocks are compiled in place (`nn.Module.compile`), so parameter names and checkpoints do not change,
and with dynamic shapes, so one graph serves every aspect bucket (token count) and every caption
length the loader's trimming produces: changing bucket never recompiles. All blocks share one
forward, so depth costs no extra compiles either.
"""
from __future__ import annotations

from torch import nn


def compile_blocks(model: nn.Module, backend: str = "inductor") -> int:
    """Compile each of `model.blocks` in place; returns how many were wrapped."""
    for block in model.blocks:
        block.compile(backend=backend, dynamic=True)
    return len(model.blocks)
