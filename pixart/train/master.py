"""The fp32 master weights as this rank holds them, and their gathering into whole tensors.

Under ZeRO the weights the optimizer updates are fp32 fragments spread over the ranks:

- ZeRO-3: each parameter is flattened, padded and cut into one equal partition per rank
  (`param.data` is empty outside forward/backward: the known trap for EMA and saving);
- ZeRO-1/2 and DeepSpeed's bf16 optimizer: the fp32 copy is one flat buffer per group, cut at
  rank boundaries, so a rank holds a contiguous piece of some parameters (`_hp_mapping`);
- stage 0 in fp32: every rank holds every parameter whole (rank 0 speaks for them).

`master_fragments` lists, per parameter, this rank's piece as a live view with its place in
the flattened parameter. `gather` turns per-fragment tensors (the weights themselves, or an
EMA shaped like them) into full tensors with one sum-reduction per parameter: each element has
exactly one owner, so the sum is exact. The EMA built on these views needs no communication.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn


@dataclass
class Fragment:
    name: str
    shape: torch.Size
    start: int  # offset in the flattened parameter
    view: Tensor | None  # live fp32 view of this rank's piece (1-D); None when this rank holds none
    owner: bool  # this rank's piece counts in a gather (False for replicas held by every rank)

    @property
    def numel(self) -> int:
        return self.shape.numel()


def _zero3(name: str, p: nn.Parameter, rank: int) -> Fragment:
    from deepspeed.utils import safe_get_local_fp32_param

    local = safe_get_local_fp32_param(p)
    part = p.ds_tensor.numel()
    start = rank * part
    count = max(0, min(part, p.ds_numel - start))
    view = local.view(-1)[:count] if count else None
    return Fragment(name, torch.Size(p.ds_shape), start, view, owner=count > 0)


def _mapped(name: str, p: nn.Parameter) -> Fragment:
    m = p._hp_mapping
    if m is None:
        return Fragment(name, p.shape, 0, None, owner=False)
    address = m.lp_fragment_address
    return Fragment(name, p.shape, address.start, m.get_hp_fragment().view(-1), owner=True)


def master_fragments(module: nn.Module) -> list[Fragment]:
    """This rank's fp32 master pieces of every trainable parameter, in `named_parameters` order."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    out = []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        if hasattr(p, "ds_id"):
            out.append(_zero3(name, p, rank))
        elif hasattr(p, "_hp_mapping"):
            out.append(_mapped(name, p))
        else:
            if p.dtype != torch.float32:
                raise RuntimeError(f"{name}: no fp32 master copy (precision {p.dtype} without ZeRO)")
            out.append(Fragment(name, p.shape, 0, p.data.view(-1), owner=rank == 0))
    return out


@torch.no_grad()
def gather(fragments: list[Fragment], pieces: list[Tensor | None], to_rank0_only: bool = False) -> dict[str, Tensor]:
    """Full fp32 tensors (on the CPU) from each rank's `pieces` (one per fragment, shaped like its view).
    Every rank must call it; with `to_rank0_only` other ranks get an empty dict."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    out = {}
    for frag, piece in zip(fragments, pieces, strict=True):
        device = piece.device if piece is not None else _device()
        full = torch.zeros(frag.numel, dtype=torch.float32, device=device)
        if frag.owner and piece is not None:
            full[frag.start:frag.start + piece.numel()] = piece
        if world > 1:
            dist.all_reduce(full)
        if not to_rank0_only or rank == 0:
            out[frag.name] = full.view(frag.shape).cpu()
    return out


@torch.no_grad()
def scatter_into(fragments: list[Fragment], pieces: list[Tensor | None], full: dict[str, Tensor], source: str) -> None:
    """Copy this rank's slice of each full tensor into `pieces` (the inverse of `gather`)."""
    for frag, piece in zip(fragments, pieces, strict=True):
        if piece is None:
            continue
        if frag.name not in full or full[frag.name].numel() != frag.numel:
            raise ValueError(f"{source}: no tensor {frag.name} of shape {tuple(frag.shape)}")
        piece.copy_(full[frag.name].reshape(-1)[frag.start:frag.start + piece.numel()])


@torch.no_grad()
def frozen_state(module: nn.Module) -> dict[str, Tensor]:
    """Buffers and frozen parameters (e.g. DiT's fixed pos_embed), whole, on the CPU. Every rank calls it."""
    import deepspeed

    frozen = [(n, p) for n, p in module.named_parameters() if not p.requires_grad]
    with deepspeed.zero.GatheredParameters([p for _, p in frozen], enabled=any(hasattr(p, "ds_id") for _, p in frozen)):
        out = {n: p.detach().float().cpu().clone() for n, p in frozen}
    persistent = set(module.state_dict())
    out.update({n: b.detach().cpu().clone() for n, b in module.named_buffers() if n in persistent})
    return out


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
