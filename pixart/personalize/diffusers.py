"""Concepts in diffusers: one call edits a `PixArtTransformer2DModel` (every block's `attn2.to_k` / `attn2.to_v`)
and, given a `PixArtAlphaPipeline`, teaches its tokenizer and T5 the concepts' words, so `pipe(prompt)` just works.
The outputs equal our sampler's: the same edit on the same projected caption tokens."""
from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import nn

from .concept import Concept, model_identity
from .covariance import read_c_inv
from .edit import EditedProjection, GateSettings
from .tokens import add_concept_token, set_embedding


class DiffusersProjection(EditedProjection):
    """An edited `to_k` (locked: W_K i_super) or `to_v` (this block's learned targets)."""

    def __init__(self, linear: nn.Linear, block: int, kind: str, c_inv, concepts: Sequence[Concept], gates):
        self.block, self.kind, self.concepts = block, kind, list(concepts)
        super().__init__(linear, c_inv, torch.stack([c.i_star for c in concepts]), self._targets, gates)

    def _targets(self, weight):
        if self.kind == "key":
            return torch.stack([c.i_super for c in self.concepts]).to(weight) @ weight.T
        return torch.stack([c.value_targets[self.block] for c in self.concepts]).to(weight)


def _unwrap(module: nn.Module) -> nn.Module:
    return module.linear if isinstance(module, DiffusersProjection) else module


def diffusers_identity(transformer) -> str:
    proj = transformer.caption_projection
    kv = [torch.cat([_unwrap(b.attn2.to_k).weight, _unwrap(b.attn2.to_v).weight])
          for b in transformer.transformer_blocks]
    return model_identity([proj.linear_1.weight, proj.linear_2.weight], kv)


def apply_concepts(target, concepts: Sequence[str | os.PathLike | Concept], covariance: str | os.PathLike,
                   beta: float | None = None, tau: float | None = None):
    """Apply concept files to a PixArtAlphaPipeline (transformer, tokenizer and text encoder) or to a bare
    PixArtTransformer2DModel; `covariance` is the base model's C file (beside its checkpoint). Concepts and a
    covariance of another base model are refused. Returns `target`."""
    transformer = getattr(target, "transformer", target)
    concepts = [c if isinstance(c, Concept) else Concept.load(c) for c in concepts]
    identity, blocks = diffusers_identity(transformer), transformer.transformer_blocks
    encoder = getattr(target, "text_encoder", None)
    text_dim = encoder.get_input_embeddings().weight.shape[1] if encoder is not None else None
    for c in concepts:
        c.check_base(identity, type(transformer).__name__, len(blocks), _unwrap(blocks[0].attn2.to_k).in_features,
                     text_dim)
    c_inv = read_c_inv(covariance, identity, type(transformer).__name__)
    gates = [GateSettings(c.beta if beta is None else beta, c.tau if tau is None else tau) for c in concepts]
    for j, block in enumerate(transformer.transformer_blocks):
        attn = block.attn2
        attn.to_k = DiffusersProjection(_unwrap(attn.to_k), j, "key", c_inv, concepts, gates)
        attn.to_v = DiffusersProjection(_unwrap(attn.to_v), j, "value", c_inv, concepts, gates)
    if getattr(target, "tokenizer", None) is not None and getattr(target, "text_encoder", None) is not None:
        for c in concepts:
            set_embedding(target.text_encoder, add_concept_token(target.tokenizer, target.text_encoder, c.name),
                          c.embedding)
    return target
