"""`torch.compile` per transformer block, the unit every step repeats depth times.

Each block's `forward` is compiled in place, so parameter names and checkpoints do not change. Module
hooks stay outside the graph: ZeRO-3 gathers a block's parameters in hooks on the block (see
`engine.build_engine`), and traced hooks would recompile per block. Shapes are dynamic, so one graph
serves every aspect bucket (token count) and every caption length the loader's trimming produces:
changing bucket never recompiles. All blocks share one forward, so depth costs no extra compiles either.
"""
from __future__ import annotations

import torch
from torch import nn


def compile_blocks(model: nn.Module, backend: str = "inductor") -> int:
    """Compile each of `model.blocks`' forward in place; returns how many were wrapped."""
    for block in model.blocks:
        block.forward = torch.compile(block.forward, backend=backend, dynamic=True)
    return len(model.blocks)
