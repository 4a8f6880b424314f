"""Activation checkpointing chosen by memory: checkpoint the fewest blocks whose activations still fit.

A block's activations are measured, not modelled: the bytes autograd saves for backward while one block
runs forward on the training device, in the training dtype, at the run's largest batch shape, so the
count follows whatever attention kernel that device picks (flash kernels save O(N), math ones O(N^2)).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from pixart.errors import PixArtError

GB = 1e9  # decimal, as GPU memory is quoted (141 GB)


def saved_bytes(fn, *args, exclude=()) -> int:
    """Bytes of the tensors autograd saves for backward while `fn(*args)` runs. Each storage counts once
    and whole (a saved view keeps its storage alive); `exclude` (the parameters) are not activations."""
    seen = {p.untyped_storage().data_ptr() for p in exclude}
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return total


def peak_activation_bytes(depth: int, checkpointed: int, block_bytes: int, input_bytes: int) -> int:
    """Activation peak with the first `checkpointed` of `depth` blocks checkpointed (fewer than all):
    backward frees the other blocks' activations first, then rebuilds one checkpointed block at a time
    from its kept input, so the peak is at the start: the other blocks plus the kept inputs."""
    return (depth - checkpointed) * block_bytes + checkpointed * input_bytes


def blocks_to_checkpoint(depth: int, block_bytes: int, input_bytes: int, budget_bytes: float) -> int:
    """The fewest of `depth` blocks to checkpoint so that activations fit in `budget_bytes`; at most
    depth - 1 (checkpointing the last block too would only keep one more input)."""
    for k in range(depth):
        need = peak_activation_bytes(depth, k, block_bytes, input_bytes)
        if need <= budget_bytes:
            return k
    raise PixArtError(f"model.grad_checkpointing auto: activations need at least {need / GB:.2f} GB "
                      f"({depth - 1} of {depth} blocks checkpointed), over the {budget_bytes / GB:.2f} GB "
                      f"budget; lower data.batch_size or the resolution")


@dataclass
class CheckpointPlan:
    blocks: int  # how many blocks to checkpoint, from the first
    depth: int
    block_bytes: int  # saved activations of one block, not checkpointed
    input_bytes: int  # what a checkpointed block keeps: its input
    budget_bytes: float

    def describe(self) -> str:
        return (f"activation checkpointing: {self.blocks} of {self.depth} blocks (a block saves "
                f"{self.block_bytes / GB:.3f} GB, its input {self.input_bytes / GB:.3f} GB; "
                f"budget {self.budget_bytes / GB:.2f} GB)")


def measure_block(model, batch: int, tokens: int, caption_tokens: int, device: torch.device,
                  dtype: torch.dtype) -> tuple[int, int]:
    """(saved bytes of one block's forward, bytes of its input) at this batch shape."""
    block = copy.deepcopy(model.blocks[0]).to(device, dtype)
    D = model.config.hidden_size
    x = torch.randn(batch, tokens, D, device=device, dtype=dtype, requires_grad=True)
    if model.config.arch == "pixart":
        y = torch.randn(batch, caption_tokens, D, device=device, dtype=dtype)
        args = (x, y, torch.randn(batch, 6 * D, device=device, dtype=dtype),
                torch.ones(batch, caption_tokens, dtype=torch.bool, device=device))
    else:
        args = (x, torch.randn(batch, D, device=device, dtype=dtype))
    return saved_bytes(block, *args, exclude=list(block.parameters())), x.nbytes


def state_bytes(params: int, precision: str, zero_stage: int, world: int) -> float:
    """Weights, grads, optimizer states and the fp32 EMA per rank, as DeepSpeed's ZeRO shards them."""
    low = precision in ("bf16", "fp16")
    weights, grads = (2, 2) if low else (4, 4)
    optim = (4 if low else 0) + 8  # fp32 master weights (mixed precision) + AdamW's two moments
    ema = 4
    shard = lambda b, stage: b / world if zero_stage >= stage else b  # noqa: E731
    return params * (shard(weights, 3) + shard(grads, 2) + shard(optim, 1) + shard(ema, 3))


def free_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil

    return psutil.virtual_memory().available


def plan_checkpointing(model, *, batch: int, tokens: int, caption_tokens: int, device: torch.device,
                       dtype: torch.dtype, budget_bytes: float) -> CheckpointPlan:
    block, inp = measure_block(model, batch, tokens, caption_tokens, device, dtype)
    depth = len(model.blocks)
    return CheckpointPlan(blocks_to_checkpoint(depth, block, inp, budget_bytes), depth, block, inp, budget_bytes)
