"""Training loss: simple MSE plus, for learned sigma, the IDDPM variational-bound term (as DiT/PixArt)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from pixart.errors import PixArtError

from .schedule import NoiseSchedule, _at

PredictionType = Literal["epsilon", "v_prediction"]


@dataclass
class LossTerms:
    loss: Tensor  # (B,) = mse + vb
    mse: Tensor  # (B,)
    vb: Tensor  # (B,) in bits per dim; zeros without learned sigma


def _mean_flat(x: Tensor) -> Tensor:
    return x.flatten(1).mean(1)


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """log P(x) for data in [-1, 1] quantised to 256 bins of width 2/255; the edge bins take the tails.
    Uses the exact normal CDF where IDDPM uses a tanh approximation of it."""
    inv_std = torch.exp(-log_scale)
    cdf_plus = torch.special.ndtr(inv_std * (x - mean + 1 / 255))
    cdf_min = torch.special.ndtr(inv_std * (x - mean - 1 / 255))
    log = lambda p: torch.log(p.clamp(min=1e-12))  # noqa: E731
    return torch.where(x < -0.999, log(cdf_plus),
                       torch.where(x > 0.999, log(1 - cdf_min), log(cdf_plus - cdf_min)))


def min_snr_weight(schedule: NoiseSchedule, t: Tensor, gamma: float, prediction_type: PredictionType) -> Tensor:
    """Min-SNR-gamma (Hang et al., 2023): caps the weight of low-noise steps so that the conflicting
    objectives of different timesteps stop slowing convergence. In the target's own units: the x0-error
    weight min(SNR, gamma) becomes min(SNR, gamma) / SNR for epsilon and / (SNR + 1) for v."""
    a = schedule.alphas_cumprod.to(t.device)[t.long()]
    snr = a / (1 - a)
    capped = snr.clamp(max=gamma)
    return (capped / snr if prediction_type == "epsilon" else capped / (snr + 1)).float()


def diffusion_loss(model_output: Tensor, x0: Tensor, xt: Tensor, t: Tensor, noise: Tensor, schedule: NoiseSchedule,
                   learn_sigma: bool = True, prediction_type: PredictionType = "epsilon",
                   min_snr_gamma: float | None = None) -> LossTerms:
    """DiT's default loss (MSE + unscaled vb), the MSE optionally Min-SNR weighted. Computed in float32:
    the vb term takes logs of tiny variances."""
    model_output, x0, xt, noise = (a.float() for a in (model_output, x0, xt, noise))
    C = x0.shape[1]
    pred, var_values = (model_output[:, :C], model_output[:, C:]) if learn_sigma else (model_output, None)
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = schedule.v_target(x0, noise, t)
    else:
        raise PixArtError(f"unknown prediction_type {prediction_type!r}; choose 'epsilon' or 'v_prediction'")
    mse = _mean_flat((pred - target) ** 2)
    if min_snr_gamma is not None:
        mse = mse * min_snr_weight(schedule, t, min_snr_gamma, prediction_type)
    if var_values is None:
        return LossTerms(loss=mse, mse=mse, vb=torch.zeros_like(mse))

    # vb trains only the variance: the mean is frozen (detached) so the MSE alone drives eps, as in IDDPM.
    eps = pred.detach() if prediction_type == "epsilon" else schedule.eps_from_v(xt, t, pred.detach())
    min_log = schedule.posterior_log_variance_clipped
    max_log = torch.log(schedule.betas)
    frac = (var_values + 1) / 2
    model_log_var = frac * _at(max_log, t, xt) + (1 - frac) * _at(min_log, t, xt)
    model_mean, _ = schedule.posterior_mean_variance(schedule.predict_x0_from_eps(xt, t, eps), xt, t)
    true_mean, true_log_var = schedule.posterior_mean_variance(x0, xt, t)
    kl = _mean_flat(normal_kl(true_mean, true_log_var, model_mean, model_log_var)) / math.log(2.0)
    nll = -_mean_flat(discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var)) / math.log(2.0)
    vb = torch.where(t.to(kl.device) == 0, nll, kl)
    return LossTerms(loss=mse + vb, mse=mse, vb=vb)
