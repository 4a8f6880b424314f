"""Concepts applied to a PixArt model at run time: every block's `cross_attn.kv_linear` becomes the edited
projection, and the text encoder learns each concept's word. Nothing is baked into the weights."""
from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from .concept import Concept, pixart_identity, pixart_shape
from .edit import EditedProjection, GateSettings
from .tokens import add_concept_token, set_embedding


class LockedKV(nn.Module):
    """One block's edited K/V projection. The key targets are locked (W_K i_super); the value targets are
    this block's row of each concept's `value_targets`. With `key_input` set (global key-locking), the keys are
    computed from the prompt written with the super-category word instead."""

    def __init__(self, linear: nn.Linear, block: int, c_inv: Tensor, concepts: Sequence[Concept],
                 gates: list[GateSettings]):
        super().__init__()
        self.block, self.concepts, self.dim = block, list(concepts), linear.out_features // 2
        self.edit = EditedProjection(linear, c_inv, torch.stack([c.i_star for c in concepts]), self.targets, gates)
        self.key_input: Tensor | None = None

    @property
    def linear(self) -> nn.Linear:
        return self.edit.linear

    def targets(self, weight: Tensor) -> Tensor:
        keys = torch.stack([c.i_super for c in self.concepts]).to(weight) @ weight[:self.dim].T
        values = torch.stack([c.value_targets[self.block] for c in self.concepts]).to(weight)
        return torch.cat([keys, values], dim=1)

    def forward(self, cond: Tensor) -> Tensor:
        out = self.edit(cond)
        if self.key_input is None:
            return out
        return torch.cat([self.edit(self.key_input)[..., :self.dim], out[..., self.dim:]], dim=-1)


def apply_concepts(model: nn.Module, concepts: Sequence[Concept], c_inv: Tensor, text_encoder=None,
                   beta: float | None = None, tau: float | None = None, check: bool = True) -> list[LockedKV]:
    """Edit every block of `model` (in place) with `concepts`; teach `text_encoder` their words. `beta`/`tau`
    override each concept's defaults. Refuses concepts trained on another base model."""
    remove_concepts(model)
    if check:
        identity = pixart_identity(model)
        text_dim = text_encoder.model.get_input_embeddings().weight.shape[1] if text_encoder is not None else None
        for c in concepts:
            c.check_base(identity, "this model", *pixart_shape(model), text_dim)
    gates = [GateSettings(c.beta if beta is None else beta, c.tau if tau is None else tau) for c in concepts]
    edits = []
    for j, block in enumerate(model.blocks):
        edit = LockedKV(block.cross_attn.kv_linear, j, c_inv, concepts, gates)
        block.cross_attn.kv_linear = edit
        edits.append(edit)
    if text_encoder is not None:
        for c in concepts:
            set_embedding(text_encoder.model, add_concept_token(text_encoder.tokenizer, text_encoder.model, c.name),
                          c.embedding)
    return edits


def remove_concepts(model: nn.Module) -> None:
    for block in model.blocks:
        if isinstance(block.cross_attn.kv_linear, LockedKV):
            block.cross_attn.kv_linear = block.cross_attn.kv_linear.linear


@contextmanager
def global_lock(model: nn.Module, super_y: Tensor):
    """Global key-locking for the calls inside: the keys of the first len(super_y) captions of each forward (the
    conditional half of a CFG batch) come from `super_y`, the same prompts' T5 features with each concept's word
    replaced by its super-category word; the rest (the null caption) are unchanged."""
    edits = [b.cross_attn.kv_linear for b in model.blocks if isinstance(b.cross_attn.kv_linear, LockedKV)]

    def hook(_module, args):
        y = args[0]
        keys = y.clone()
        n = super_y.shape[0]
        keys[:n, :super_y.shape[1]] = super_y.to(y)
        keys[:n, super_y.shape[1]:] = 0
        projected = model.y_embedder.y_proj(keys)
        for edit in edits:
            edit.key_input = projected

    handle = model.y_embedder.register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()
        for edit in edits:
            edit.key_input = None


def concept_c_inv(ckpt, model: nn.Module, covariance=None) -> Tensor:
    """C^-1 of this base model: `covariance`, or the file `pixart personalize` saved beside the checkpoint;
    refused when it records another base model."""
    from pixart.errors import PixArtError

    from .covariance import covariance_path, read_c_inv

    identity = pixart_identity(model)
    path = covariance or covariance_path(ckpt, identity)
    if not covariance and not path.is_file():
        raise PixArtError(f"{ckpt}: no {path.name} beside it (the base model's covariance, written by "
                          "`pixart personalize`); pass --covariance")
    return read_c_inv(path, identity, str(ckpt))
