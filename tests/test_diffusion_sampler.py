"""Samplers against an analytic model: for data x0 ~ N(mu, s^2) per dimension the optimal eps is known,
    eps*(x_t, t) = sqrt(1-a_t) (x_t - sqrt(a_t) mu) / (a_t s^2 + 1 - a_t),
and the probability-flow ODE maps x_T = z to mu + s (z - sqrt(a_T) mu) / sqrt(a_T s^2 + 1 - a_T) ≈ mu + s z."""
import pytest
import torch
from tolerance import reordered, rounded
from torch import nn

from pixart.diffusion import NoiseSchedule, classifier_free_guidance, make_scheduler, sample

S = NoiseSchedule.linear()
MU, STD = 0.3, 0.8
CAP = 8


class GaussianModel(nn.Module):
    """Exact eps (or v) for Gaussian data, ignoring the caption; `var` adds a constant learned-sigma channel."""

    def __init__(self, var: float | None = None, v_prediction: bool = False):
        super().__init__()
        self.var, self.v_prediction, self.batches = var, v_prediction, []

    def forward(self, x, t, y, mask=None, data_info=None):
        self.batches.append(x.shape[0])
        a = S.alphas_cumprod[t].float().view(-1, 1, 1, 1)
        eps = (1 - a).sqrt() * (x - a.sqrt() * MU) / (a * STD**2 + 1 - a)
        if self.v_prediction:  # v = sqrt(a) eps - sqrt(1-a) x0, with x0 = (x - sqrt(1-a) eps) / sqrt(a)
            eps = a.sqrt() * eps - (1 - a).sqrt() * (x - (1 - a).sqrt() * eps) / a.sqrt()
        return eps if self.var is None else torch.cat([eps, torch.full_like(eps, self.var)], 1)


def _run(model, z, **kw):
    y, null_y = torch.randn(z.shape[0], 3, CAP), torch.zeros(5, CAP)
    return sample(model, z, y, None, null_y, schedule=S, **kw)


def _ode_error(x, z):
    a = S.alphas_cumprod[-1].float()
    return (x - (MU + STD * (z - a.sqrt() * MU) / (a * STD**2 + 1 - a).sqrt())).abs()


Z = torch.randn(1024, 4, 2, 2, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("v_prediction", [False, True])
def test_dpm_solver_follows_the_probability_flow(v_prediction):
    # Measured (eps and v alike): max 0.025, mean 0.0046 over 16k values with |z| up to 4.
    x = _run(GaussianModel(var=0.0, v_prediction=v_prediction), Z, sampler="dpm-solver++", steps=20, cfg_scale=4.5,
             prediction_type="v_prediction" if v_prediction else "epsilon")
    err = _ode_error(x, Z)
    assert err.max() < 0.04 and err.mean() < 0.008
    assert (x - (MU + STD * Z)).abs().max() < 0.04


def test_ddim_follows_the_probability_flow_at_first_order():
    # DDIM is first order: measured max 0.14 / mean 0.026 at 50 steps, halving to 0.071 / 0.013 at 100.
    e50 = _ode_error(_run(GaussianModel(), Z, sampler="ddim", steps=50, cfg_scale=4.5), Z)
    e100 = _ode_error(_run(GaussianModel(), Z, sampler="ddim", steps=100, cfg_scale=1.0), Z)
    assert e50.max() < 0.2 and e50.mean() < 0.035
    assert 0.4 < e100.mean() / e50.mean() < 0.6


def test_ddpm_learned_sigma_uses_the_variance_channels():
    z = torch.randn(2048, 4, 2, 2, generator=torch.Generator().manual_seed(1))

    def run(model):
        return _run(model, z, sampler="ddpm", steps=50, cfg_scale=1.0, generator=torch.Generator().manual_seed(2))

    # v = -1 selects the posterior variance, i.e. exactly what variance_type="fixed_small" adds.
    learned, fixed_small = run(GaussianModel(var=-1.0)), run(GaussianModel())
    torch.testing.assert_close(learned, fixed_small, **reordered(fixed_small))
    # v = +1 selects beta_t, which for Gaussian data gives the right marginal with few steps (measured over
    # 32k values and 4 seeds: mean 0.295-0.307, std 0.804-0.811); the posterior variance (v = -1) gives std 0.73.
    x = run(GaussianModel(var=1.0))
    assert abs(x.mean() - MU) < 0.02 and abs(x.std() - STD) < 0.02


def test_cfg_scale_one_skips_the_unconditional_pass():
    for scale, batches in [(1.0, [8, 8]), (4.5, [16, 16])]:
        model = GaussianModel()
        _run(model, Z[:8], sampler="dpm-solver++", steps=2, cfg_scale=scale)
        assert model.batches == batches


class CaptionModel(nn.Module):
    """Output = masked mean of the caption's first feature, plus a variance channel; records its inputs."""

    def forward(self, x, t, y, mask=None, data_info=None):
        self.seen = (x, t, y, mask, data_info)
        m = mask.to(y.dtype)
        mean = (y[..., 0] * m).sum(1) / m.sum(1)
        eps = mean.view(-1, 1, 1, 1).expand_as(x)
        return torch.cat([eps, torch.full_like(x, 7.0)], 1)


@pytest.mark.parametrize("null_len", [3, 5, 2])
def test_cfg_combines_cond_and_uncond_and_pads_tokens(null_len):
    g = torch.Generator().manual_seed(3)
    B, L = 2, 3
    x, t = torch.randn(B, 4, 2, 2, generator=g), torch.tensor([10, 20])
    y, null_y = torch.randn(B, L, CAP, generator=g), torch.randn(null_len, CAP, generator=g)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    info = dict(img_hw=torch.tensor([[256.0, 256.0], [512.0, 256.0]]), aspect_ratio=torch.tensor([[1.0], [2.0]]))
    model = CaptionModel()
    out = classifier_free_guidance(model, x, t, y, mask, null_y, 3.0, info)

    cond = (y[..., 0] * mask).sum(1) / mask.sum(1)
    uncond = null_y[:, 0].mean().expand(B)
    torch.testing.assert_close(out, (uncond + 3.0 * (cond - uncond)).view(B, 1, 1, 1).expand_as(x))
    xs, ts, ys, masks, infos = model.seen
    Lmax = max(L, null_len)
    assert ys.shape == (2 * B, Lmax, CAP) and masks.shape == (2 * B, Lmax)
    assert masks[:B, :L].equal(mask) and not masks[:B, L:].any() and not ys[:B, L:].any()
    assert masks[B:, :null_len].all() and not masks[B:, null_len:].any() and not ys[B:, null_len:].any()
    assert ys[B:, :null_len].equal(null_y.expand(B, -1, -1)) and xs.equal(torch.cat([x, x]))
    assert ts.tolist() == [10, 20, 10, 20] and infos["aspect_ratio"].flatten().tolist() == [1.0, 2.0, 1.0, 2.0]
    full = classifier_free_guidance(model, x, t, y, mask, null_y, 3.0, info, keep_rest=True)
    assert full.shape == (B, 8, 2, 2) and full[:, :4].equal(out) and torch.all(full[:, 4:] == 7.0)


def test_make_scheduler_shares_the_schedule_and_rejects_unknown_names():
    for name in ["dpm-solver++", "ddim", "ddpm"]:
        sch = make_scheduler(name, S, "v_prediction")
        assert sch.config.prediction_type == "v_prediction" and sch.config.beta_schedule == "linear"
        torch.testing.assert_close(sch.alphas_cumprod.double(), S.alphas_cumprod, rtol=rounded(roundings=1000), atol=0)
    with pytest.raises(ValueError, match=r"'euler'.*dpm-solver\+\+, ddim, ddpm"):
        make_scheduler("euler", S)
    with pytest.raises(ValueError, match="unknown sampler"):
        _run(GaussianModel(), Z[:2], sampler="euler")
