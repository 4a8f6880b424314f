"""The discrete IDDPM noise schedule: q(x_t | x_0) and the posterior q(x_{t-1} | x_t, x_0)."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor


def _at(a: Tensor, t: Tensor, x: Tensor) -> Tensor:
    """Gather a[t] (float64) and cast to x's dtype, shaped (B, 1, ..., 1) to broadcast over x."""
    return a.to(x.device)[t.long()].to(x.dtype).view(-1, *([1] * (x.ndim - 1)))


@dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """Variance-preserving schedule. Tables stay float64 (as IDDPM) since 1 - alphas_cumprod near t=0
    and the posterior log-variances lose digits in float32; they are cast only when gathered."""

    betas: Tensor  # (T,) float64
    beta_start: float
    beta_end: float
    alphas_cumprod: Tensor = field(init=False)
    alphas_cumprod_prev: Tensor = field(init=False)
    posterior_log_variance_clipped: Tensor = field(init=False)

    @classmethod
    def linear(cls, num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> NoiseSchedule:
        # numpy's linspace, bit-identical to IDDPM's table (torch.linspace differs in the last ulp).
        betas = np.linspace(beta_start, beta_end, num_steps, dtype=np.float64)
        return cls(torch.from_numpy(betas), beta_start, beta_end)

    def __post_init__(self) -> None:
        ac = torch.cumprod(1.0 - self.betas, dim=0)
        ac_prev = torch.cat([ac.new_ones(1), ac[:-1]])
        var = self.betas * (1.0 - ac_prev) / (1.0 - ac)
        # var[0] is 0; IDDPM replaces it by var[1] so the log stays finite.
        log_var = torch.log(torch.cat([var[1:2], var[1:]]))
        for name, value in [("alphas_cumprod", ac), ("alphas_cumprod_prev", ac_prev),
                            ("posterior_log_variance_clipped", log_var)]:
            object.__setattr__(self, name, value)

    @property
    def num_steps(self) -> int:
        return self.betas.shape[0]

    def sample_timestep(self, generator: torch.Generator, kind: str = "uniform") -> Tensor:
        """One training timestep, shape (1,). "uniform" is DDPM's and PixArt's; "logit_normal" draws
        t / T = sigmoid(N(0, 1)) (SD3's), putting the steps where layout is decided, away from both ends."""
        if kind == "uniform":
            return torch.randint(0, self.num_steps, (1,), generator=generator)
        if kind == "logit_normal":
            u = torch.sigmoid(torch.randn(1, generator=generator, dtype=torch.float64))
            return (u * self.num_steps).long().clamp_(0, self.num_steps - 1)
        raise ValueError(f"unknown timestep sampling {kind!r}: use 'uniform' or 'logit_normal'")

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps."""
        return _at(self.alphas_cumprod.sqrt(), t, x0) * x0 + _at((1 - self.alphas_cumprod).sqrt(), t, x0) * noise

    def predict_x0_from_eps(self, xt: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        return _at(self.alphas_cumprod.rsqrt(), t, xt) * xt - _at((1 / self.alphas_cumprod - 1).sqrt(), t, xt) * eps

    def v_target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """v = sqrt(a_t) eps - sqrt(1 - a_t) x_0 (Salimans & Ho, 2022)."""
        return _at(self.alphas_cumprod.sqrt(), t, x0) * noise - _at((1 - self.alphas_cumprod).sqrt(), t, x0) * x0

    def eps_from_v(self, xt: Tensor, t: Tensor, v: Tensor) -> Tensor:
        return _at(self.alphas_cumprod.sqrt(), t, xt) * v + _at((1 - self.alphas_cumprod).sqrt(), t, xt) * xt

    def predict_x0(self, xt: Tensor, t: Tensor, pred: Tensor, prediction_type: str) -> Tensor:
        """x_0 from a model's prediction in its own parameterisation (eps, or v: x_0 = sqrt(a_t) x_t - sqrt(1 - a_t) v),
        what diffusers' schedulers return as `pred_original_sample`."""
        if prediction_type == "epsilon":
            return self.predict_x0_from_eps(xt, t, pred)
        if prediction_type == "v_prediction":
            return _at(self.alphas_cumprod.sqrt(), t, xt) * xt - _at((1 - self.alphas_cumprod).sqrt(), t, xt) * pred
        raise ValueError(f"unknown prediction_type {prediction_type!r}; choose 'epsilon' or 'v_prediction'")

    def posterior_mean_variance(self, x0: Tensor, xt: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        ac, ac_prev = self.alphas_cumprod, self.alphas_cumprod_prev
        coef_x0 = self.betas * ac_prev.sqrt() / (1 - ac)
        coef_xt = (1 - ac_prev) * (1 - self.betas).sqrt() / (1 - ac)
        mean = _at(coef_x0, t, xt) * x0 + _at(coef_xt, t, xt) * xt
        return mean, _at(self.posterior_log_variance_clipped, t, xt)

    def to_diffusers_config(self) -> dict:
        """Kwargs for diffusers schedulers so sampling and exports see the training schedule."""
        return dict(num_train_timesteps=self.num_steps, beta_start=self.beta_start,
                    beta_end=self.beta_end, beta_schedule="linear")
