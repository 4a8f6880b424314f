"""DMD's losses as plain functions of tensors, so each is tested against a hand computation.

Distribution matching (DMD, Yin et al. 2024, eq. 7-8; DMD2's code): the generator's sample x is noised
to x_t; the real score (frozen teacher, with CFG) and the fake score (trained on the generator's samples)
each predict x0. Their difference is the gradient of the KL between the two distributions, normalised
per sample by mean|x - x0_real|; the loss 0.5 * MSE(x, stopgrad(x - grad)) hands exactly grad / N to x.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def dm_gradient(x: Tensor, x0_real: Tensor, x0_fake: Tensor) -> Tensor:
    """(x0_fake - x0_real) / mean|x - x0_real| per sample; NaNs (a zero normaliser) become 0, as DMD2's."""
    dims = tuple(range(1, x.ndim))
    grad = (x0_fake - x0_real) / (x - x0_real).abs().mean(dim=dims, keepdim=True)
    return torch.nan_to_num(grad)


def dm_loss(x: Tensor, x0_real: Tensor, x0_fake: Tensor) -> Tensor:
    """0.5 * mean((x - stopgrad(x - grad))^2): its gradient with respect to x is grad / x.numel()."""
    grad = dm_gradient(x.detach().float(), x0_real.float(), x0_fake.float())
    x = x.float()
    return 0.5 * F.mse_loss(x, (x - grad).detach())


def generator_gan_loss(fake_logits: Tensor) -> Tensor:
    """Non-saturating generator loss: softplus(-D(fake))."""
    return F.softplus(-fake_logits.float()).mean()


def discriminator_gan_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """softplus(D(fake)) + softplus(-D(real)): the logistic loss with real = 1."""
    return F.softplus(fake_logits.float()).mean() + F.softplus(-real_logits.float()).mean()


def regression_loss(student: Tensor, teacher: Tensor, kind: str = "mse", lpips=None, decode=None) -> Tensor:
    """DMD1's regression to the teacher's sample of the same noise: MSE on latents, or LPIPS on decoded images
    (`decode` maps latents to [-1, 1] images; `lpips` is the frozen metric)."""
    if kind == "mse":
        return F.mse_loss(student.float(), teacher.float())
    images = decode(student).float().clamp(-1, 1), decode(teacher).float().clamp(-1, 1)
    return lpips(*images).mean()
