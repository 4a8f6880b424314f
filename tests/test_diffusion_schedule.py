import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from tolerance import conditioned, rounded

from pixart.diffusion import NoiseSchedule

S = NoiseSchedule.linear()


def test_betas_match_iddpm_and_diffusers():
    # IDDPM: np.linspace(scale * 1e-4, scale * 0.02, T) in float64, scale = 1000 / T = 1.
    np.testing.assert_array_equal(S.betas.numpy(), np.linspace(1e-4, 0.02, 1000, dtype=np.float64))
    assert S.betas.dtype == S.alphas_cumprod.dtype == torch.float64
    d = DDPMScheduler(**S.to_diffusers_config())
    # diffusers builds the table in float32, a product of 1000 roundings: measured max relative difference 3.6e-7.
    torch.testing.assert_close(d.alphas_cumprod.double(), S.alphas_cumprod, rtol=rounded(roundings=1000), atol=0)
    assert S.to_diffusers_config() == dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                                           beta_schedule="linear")


def test_q_sample_matches_diffusers_add_noise_and_statistics():
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(8, 4, 4, 4, generator=g), torch.randn(8, 4, 4, 4, generator=g)
    t = torch.tensor([0, 1, 10, 100, 500, 900, 998, 999])
    d = DDPMScheduler(**S.to_diffusers_config())
    # diffusers' float32 1 - alphas_cumprod loses digits at small t: measured max difference 3.0e-6 (t = 1).
    a = S.alphas_cumprod[t].view(-1, 1, 1, 1)  # d sqrt(1 - a) = da / (2 sqrt(1 - a)), da ~ eps a
    tol = conditioned(noise.abs() * a / (2 * (1 - a).sqrt()) + x0.abs())
    torch.testing.assert_close(S.q_sample(x0, t, noise), d.add_noise(x0, noise, t), **tol)

    # x0 = 1 everywhere at t = 300: x_t ~ N(sqrt(a), 1 - a); 2**18 draws give ~0.002 standard error.
    t = torch.full((64,), 300)
    xt = S.q_sample(torch.ones(64, 4, 32, 32), t, torch.randn(64, 4, 32, 32, generator=g))
    a = S.alphas_cumprod[300].item()
    assert abs(xt.mean().item() - a**0.5) < 0.01 and abs(xt.var().item() - (1 - a)) < 0.01


def test_posterior_against_gaussian_conditioning():
    """q(x_{t-1}|x_t,x_0) ∝ N(x_{t-1}; sqrt(a_{t-1}) x_0, 1-a_{t-1}) N(x_t; sqrt(alpha_t) x_{t-1}, beta_t)."""
    g = torch.Generator().manual_seed(1)
    t = torch.tensor([1, 2, 50, 400, 999])
    x0, xt = torch.randn(5, 3, 2, 2, dtype=torch.float64, generator=g), torch.randn(5, 3, 2, 2, dtype=torch.float64,
                                                                                       generator=g)
    a_prev, beta = S.alphas_cumprod[t - 1].view(-1, 1, 1, 1), S.betas[t].view(-1, 1, 1, 1)
    precision = 1 / (1 - a_prev) + (1 - beta) / beta
    mean_ref = (a_prev.sqrt() * x0 / (1 - a_prev) + (1 - beta).sqrt() * xt / beta) / precision
    mean, log_var = S.posterior_mean_variance(x0, xt, t)
    torch.testing.assert_close(mean, mean_ref)
    torch.testing.assert_close(log_var, torch.log(1 / precision))
    # t = 0: the posterior is a point mass (mean x0); the log variance is clipped to that of t = 1.
    mean0, log_var0 = S.posterior_mean_variance(x0, xt, torch.zeros(5, dtype=torch.long))
    torch.testing.assert_close(mean0, x0)
    assert torch.all(log_var0 == S.posterior_log_variance_clipped[1])


def test_x0_and_v_parameterisations_invert_q_sample():
    g = torch.Generator().manual_seed(2)
    x0, noise = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    xt = S.q_sample(x0, t, noise)
    a = S.alphas_cumprod[t].view(-1, 1, 1, 1)  # x0 = x_t / sqrt(a) - sqrt(1 / a - 1) eps: two terms of ~|x_t| / sqrt(a)
    tol = conditioned(xt.abs() * a.rsqrt() + noise.abs() * (1 / a - 1).sqrt())
    torch.testing.assert_close(S.predict_x0_from_eps(xt, t, noise), x0, **tol)
    v = S.v_target(x0, noise, t)
    torch.testing.assert_close(S.eps_from_v(xt, t, v), noise, **conditioned(xt.abs() + v.abs()))
    a = S.alphas_cumprod[t].float().view(-1, 1, 1, 1)  # float32 1 - a cancels at t = 0, as in diffusers
    tol = conditioned(x0.abs() * a / (2 * (1 - a).sqrt()) + noise.abs())
    torch.testing.assert_close(v, a.sqrt() * noise - (1 - a).sqrt() * x0, **tol)


def test_timestep_sampling_uniform_is_randint_and_logit_normal_favours_the_middle():
    def draw(kind, n=20000):
        return torch.cat([S.sample_timestep(torch.Generator().manual_seed(i), kind) for i in range(n)])

    g = torch.Generator().manual_seed(7)
    assert S.sample_timestep(g, "uniform").item() == torch.randint(0, 1000, (1,),
                                                                   generator=torch.Generator().manual_seed(7)).item()
    uniform, logit = draw("uniform"), draw("logit_normal")
    assert logit.dtype == torch.long and 0 <= int(logit.min()) and int(logit.max()) <= 999
    # P(250 <= t < 750): 0.5 uniform; P(|N(0,1)| < logit(0.75) = 1.0986) = 0.728 logit-normal. 20k draws: se 0.003.
    middle = lambda t: ((t >= 250) & (t < 750)).float().mean().item()  # noqa: E731
    assert abs(middle(uniform) - 0.5) < 0.015 and abs(middle(logit) - 0.728) < 0.015
    assert torch.equal(draw("logit_normal", 50), logit[:50])  # a function of the generator alone
    with pytest.raises(ValueError, match="unknown timestep sampling 'cosine'"):
        S.sample_timestep(g, "cosine")
