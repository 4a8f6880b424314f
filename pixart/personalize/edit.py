"""The gated rank-one edit of a K/V projection (Perfusion's eq. 3), for one concept or several.

For an input token encoding e (after the caption projection), a concept with encoding i* and target o*:

    W'e = W(e - sim(e) i*) + sigmoid((sim(e) - beta) / tau) o*,   sim(e) = e^T C^-1 i* / (i*^T C^-1 i*)

With several concepts, e is projected off all of their i*s at once (an orthonormal basis of their span in the
C^-1 metric) and the gated terms are summed. The bias of the projection is kept as it is. The edit applies to the
captions that name a concept (one of their tokens opens its gate), so any other prompt is the base model's.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class GateSettings:
    beta: float = 0.75
    tau: float = 0.1


def c_inv_basis(i_stars: Tensor, c_inv: Tensor) -> Tensor:
    """(k, D) encodings -> (k, D) basis B of their span with B C^-1 B^T = I (Gram-Schmidt in the C^-1 metric)."""
    basis: list[Tensor] = []
    for v in i_stars.double():
        for b in basis:
            v = v - (b @ c_inv @ v) * b
        basis.append(v / (v @ c_inv @ v).sqrt())
    return torch.stack(basis)


class EditedProjection(nn.Module):
    """A frozen `Linear(D, n*D)` (PixArt's fused K/V: K rows first; or diffusers' to_k / to_v alone) with the
    concepts' edit applied to its output. The weights are never changed: beta and tau can change per call.

    `targets(weight)` -> (k, out) is each concept's o*, recomputed from the (frozen) weight so that locked keys
    stay W_K i_super and learned values are read live from their parameters while training.
    """

    def __init__(self, linear: nn.Linear, c_inv: Tensor, i_stars: Tensor, targets, gates: list[GateSettings],
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.linear, self.targets, self.gates, self.dtype = linear, targets, gates, dtype
        self.register_buffer("c_inv", c_inv.to(linear.weight.device, torch.float64), persistent=False)
        self.set_encodings(i_stars)

    def set_encodings(self, i_stars: Tensor) -> None:
        """(k, D) concept encodings: the gate's directions C^-1 i* / E and the projection basis."""
        c_inv = self.c_inv
        i_stars = i_stars.to(c_inv)
        m_i = i_stars @ c_inv  # (k, D): (C^-1 i*)^T
        self.sim_dirs = (m_i / (m_i * i_stars).sum(1, keepdim=True)).to(self.dtype)
        basis = c_inv_basis(i_stars, c_inv)
        self.proj_dirs, self.basis = (basis @ c_inv).to(self.dtype), basis.to(self.dtype)

    def forward(self, e: Tensor) -> Tensor:
        """e (B, L, D), one caption per row. A caption in which no token opens a concept's gate (sim > beta) gets
        the frozen projection exactly: a prompt without the concept draws what the base model draws."""
        w, b = self.linear.weight, self.linear.bias
        base = F.linear(e, w, b)
        x = e.to(self.dtype)  # fp32 whatever the model's dtype (fp64 in tests)
        sims = x @ self.sim_dirs.T  # (B, L, k)
        betas = sims.new_tensor([g.beta for g in self.gates])
        taus = sims.new_tensor([g.tau for g in self.gates])
        named = (sims > betas).flatten(1).any(dim=1)  # (B,): the caption names a concept
        if not bool(named.any()):
            return base
        e_perp = x - (x @ self.proj_dirs.T) @ self.basis
        gate = torch.sigmoid((sims - betas) / taus)
        edited = F.linear(e_perp.to(w.dtype), w, b) + (gate @ self.targets(w).to(x.dtype)).to(base.dtype)
        return torch.where(named.view(-1, *([1] * (e.dim() - 1))), edited, base)
