"""Classifier-free guidance: one forward pass on a doubled batch (conditional, then null caption)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _pad_tokens(y: Tensor, mask: Tensor, length: int) -> tuple[Tensor, Tensor]:
    """Right-pad captions with zero tokens that the mask (0) tells the model to ignore."""
    extra = length - y.shape[1]
    return F.pad(y, (0, 0, 0, extra)), F.pad(mask, (0, extra))


def classifier_free_guidance(model, x: Tensor, t: Tensor, y: Tensor, mask: Tensor | None, null_y: Tensor,
                             scale: float, data_info: dict[str, Tensor] | None = None, *,
                             keep_rest: bool = False) -> Tensor:
    """Guided eps = uncond + scale * (cond - uncond) over the first C = x.shape[1] channels.

    null_y is the learned null caption, (L', Cap) or (1|B, L', Cap); its tokens are all real (mask 1).
    keep_rest appends the conditional branch's remaining output channels (the learned variance),
    which is what DiT's forward_with_cfg hands to an ancestral sampler.
    """
    B, C = x.shape[:2]
    mask = torch.ones(y.shape[:2], device=y.device, dtype=torch.long) if mask is None else mask
    if scale == 1.0:  # guidance is the identity: skip the unconditional half
        out = model(x, t, y, mask=mask, data_info=data_info)
        return out if keep_rest else out[:, :C]
    null_y = (null_y if null_y.ndim == 3 else null_y[None]).to(y).expand(B, -1, -1)
    null_mask = torch.ones(null_y.shape[:2], device=mask.device, dtype=mask.dtype)
    L = max(y.shape[1], null_y.shape[1])
    y, mask = _pad_tokens(y, mask, L)
    null_y, null_mask = _pad_tokens(null_y, null_mask, L)
    info = None if data_info is None else {k: torch.cat([v, v]) for k, v in data_info.items()}
    out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null_y]),
                mask=torch.cat([mask, null_mask]), data_info=info)
    cond, uncond = out.chunk(2)
    eps = uncond[:, :C] + scale * (cond[:, :C] - uncond[:, :C])
    return torch.cat([eps, cond[:, C:]], dim=1) if keep_rest else eps
