"""Our (= official PixArt) parameter names <-> diffusers' `PixArtTransformer2DModel` names.

One table, read in both directions, so export and import cannot drift apart.
Fused projections (self-attention qkv, cross-attention kv) are split on export
and concatenated on import.
"""
from __future__ import annotations

import torch

from pixart.errors import PixArtError

StateDict = dict[str, torch.Tensor]

RENAMES = [  # (ours, diffusers) prefixes for whole modules
    ("x_embedder.proj.", "pos_embed.proj."),
    ("t_embedder.mlp.0.", "adaln_single.emb.timestep_embedder.linear_1."),
    ("t_embedder.mlp.2.", "adaln_single.emb.timestep_embedder.linear_2."),
    ("csize_embedder.mlp.0.", "adaln_single.emb.resolution_embedder.linear_1."),
    ("csize_embedder.mlp.2.", "adaln_single.emb.resolution_embedder.linear_2."),
    ("ar_embedder.mlp.0.", "adaln_single.emb.aspect_ratio_embedder.linear_1."),
    ("ar_embedder.mlp.2.", "adaln_single.emb.aspect_ratio_embedder.linear_2."),
    ("t_block.1.", "adaln_single.linear."),
    ("y_embedder.y_proj.fc1.", "caption_projection.linear_1."),
    ("y_embedder.y_proj.fc2.", "caption_projection.linear_2."),
    ("final_layer.linear.", "proj_out."),
    ("final_layer.scale_shift_table", "scale_shift_table"),
]
BLOCK_RENAMES = [  # inside block i: blocks.i.<ours> <-> transformer_blocks.i.<diffusers>
    ("scale_shift_table", "scale_shift_table"),
    ("attn.proj.", "attn1.to_out.0."),
    ("cross_attn.q_linear.", "attn2.to_q."),
    ("cross_attn.proj.", "attn2.to_out.0."),
    ("mlp.fc1.", "ff.net.0.proj."),
    ("mlp.fc2.", "ff.net.2."),
]
BLOCK_SPLITS = [  # fused (ours) -> pieces (diffusers)
    ("attn.qkv.", ("attn1.to_q.", "attn1.to_k.", "attn1.to_v.")),
    ("cross_attn.kv_linear.", ("attn2.to_k.", "attn2.to_v.")),
]
NOT_EXPORTED = ("y_embedder.y_embedding",)  # the null caption: diffusers has no slot for it


def _rename(key: str, table, forward: bool) -> str | None:
    for ours, theirs in table:
        src, dst = (ours, theirs) if forward else (theirs, ours)
        if key.startswith(src):
            return dst + key[len(src):]
    return None


def to_diffusers(state: StateDict) -> StateDict:
    out: StateDict = {}
    for key, value in state.items():
        if key in NOT_EXPORTED:
            continue
        if key.startswith("blocks."):
            _, i, rest = key.split(".", 2)
            for fused, pieces in BLOCK_SPLITS:
                if rest.startswith(fused):
                    suffix = rest[len(fused):]
                    for piece, chunk in zip(pieces, value.chunk(len(pieces), dim=0), strict=True):
                        out[f"transformer_blocks.{i}.{piece}{suffix}"] = chunk.clone()
                    break
            else:
                new = _rename(rest, BLOCK_RENAMES, forward=True)
                if new is None:
                    raise PixArtError(f"export: no diffusers name for {key!r}")
                out[f"transformer_blocks.{i}.{new}"] = value
            continue
        new = _rename(key, RENAMES, forward=True)
        if new is None:
            raise PixArtError(f"export: no diffusers name for {key!r}")
        out[new] = value
    return out


def from_diffusers(state: StateDict) -> StateDict:
    out: StateDict = {}
    pending: dict[str, list] = {}
    for key, value in state.items():
        if key.startswith("transformer_blocks."):
            _, i, rest = key.split(".", 2)
            for fused, pieces in BLOCK_SPLITS:
                for n, piece in enumerate(pieces):
                    if rest.startswith(piece):
                        target = f"blocks.{i}.{fused}{rest[len(piece):]}"
                        pending.setdefault(target, [None] * len(pieces))[n] = value
                        break
                else:
                    continue
                break
            else:
                new = _rename(rest, BLOCK_RENAMES, forward=False)
                if new is None:
                    raise PixArtError(f"import: unexpected diffusers key {key!r}")
                out[f"blocks.{i}.{new}"] = value
            continue
        new = _rename(key, RENAMES, forward=False)
        if new is None:
            raise PixArtError(f"import: unexpected diffusers key {key!r}")
        out[new] = value
    for target, pieces in pending.items():
        if any(p is None for p in pieces):
            raise PixArtError(f"import: {target} is missing one of its split projections")
        out[target] = torch.cat(pieces, dim=0)
    return out
