import math

import pytest
import torch
from tolerance import reordered, rounded
from torch.distributions import Normal, kl_divergence

from pixart.diffusion import NoiseSchedule, diffusion_loss

S = NoiseSchedule.linear()
B, C, H, W = 6, 4, 4, 4


def _batch(seed=0, t=(0, 0, 1, 37, 500, 999)):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(B, C, H, W, generator=g) * 2 - 1
    x0[0, 0, 0] = torch.tensor([-1.0, 1.0, -1.0, 1.0])  # exercise the edge bins of the decoder
    noise = torch.randn(B, C, H, W, generator=g)
    t = torch.tensor(t)
    out = torch.cat([noise + 0.3 * torch.randn(B, C, H, W, generator=g),
                     torch.rand(B, C, H, W, generator=g) * 2 - 1], 1)
    return x0, noise, t, S.q_sample(x0, t, noise), out


def _reference_vb(x0, xt, t, eps, v):
    """Independent IDDPM vb in float64, written from the definitions (bits per dim)."""
    x0, xt, eps, v = (a.double() for a in (x0, xt, eps, v))
    vbs = []
    for i, ti in enumerate(t.tolist()):
        ac = S.alphas_cumprod
        a, a_prev, beta = ac[ti], (ac[ti - 1] if ti > 0 else torch.tensor(1.0, dtype=torch.float64)), S.betas[ti]
        def post_mean(x_0, a=a, a_prev=a_prev, beta=beta, x_t=xt[i]):
            return (a_prev.sqrt() * beta * x_0 + (1 - beta).sqrt() * (1 - a_prev) * x_t) / (1 - a)

        post_var = lambda k, ac=ac: S.betas[k] * (1 - ac[k - 1]) / (1 - ac[k])  # noqa: E731, valid for k >= 1
        min_log = math.log(post_var(max(ti, 1)))
        frac = (v[i] + 1) / 2
        std_p = torch.exp(0.5 * (frac * math.log(beta) + (1 - frac) * min_log))
        x0_hat = (xt[i] - (1 - a).sqrt() * eps[i]) / a.sqrt()
        p = Normal(post_mean(x0_hat), std_p)
        if ti > 0:
            q = Normal(post_mean(x0[i]), post_var(ti).sqrt().expand_as(std_p))
            vbs.append(kl_divergence(q, p).mean() / math.log(2))
        else:
            x = x0[i]
            upper = torch.where(x > 0.999, torch.ones_like(x), p.cdf(x + 1 / 255))
            lower = torch.where(x < -0.999, torch.zeros_like(x), p.cdf(x - 1 / 255))
            vbs.append(-torch.log(upper - lower).mean() / math.log(2))
    return torch.stack(vbs)


def test_learned_sigma_loss_matches_reference():
    x0, noise, t, xt, out = _batch()
    terms = diffusion_loss(out, x0, xt, t, noise, S)
    mse_ref = ((out[:, :C] - noise) ** 2).mean((1, 2, 3))
    vb_ref = _reference_vb(x0, xt, t, out[:, :C], out[:, C:])
    assert terms.loss.shape == terms.mse.shape == terms.vb.shape == (B,)
    torch.testing.assert_close(terms.mse, mse_ref)
    torch.testing.assert_close(terms.vb.double(), vb_ref, **reordered(vb_ref))
    torch.testing.assert_close(terms.loss, terms.mse + terms.vb)
    assert (vb_ref > 0).all()


def test_vb_gradient_reaches_only_the_variance_channels():
    x0, noise, t, xt, out = _batch(seed=1)
    out.requires_grad_(True)
    terms = diffusion_loss(out, x0, xt, t, noise, S)
    (g_vb,) = torch.autograd.grad(terms.vb.sum(), out, retain_graph=True)
    assert torch.all(g_vb[:, :C] == 0) and (g_vb[:, C:].abs() > 0).float().mean() > 0.9
    (g_mse,) = torch.autograd.grad(terms.mse.sum(), out)
    assert torch.all(g_mse[:, C:] == 0) and (g_mse[:, :C].abs() > 0).all()


def test_perfect_predictions_and_plain_epsilon():
    x0, noise, t, xt, out = _batch(seed=2)
    out[:, :C] = noise
    eps_terms = diffusion_loss(out, x0, xt, t, noise, S)
    assert torch.all(eps_terms.mse == 0)

    v_out = torch.cat([S.v_target(x0, noise, t), out[:, C:]], 1)
    v_terms = diffusion_loss(v_out, x0, xt, t, noise, S, prediction_type="v_prediction")
    assert torch.all(v_terms.mse == 0)
    # vb uses eps recovered from v, so it matches the eps-parameterised vb with the same perfect eps.
    torch.testing.assert_close(v_terms.vb, eps_terms.vb, **reordered(eps_terms.vb))

    plain = diffusion_loss(out[:, :C] + 0.5, x0, xt, t, noise, S, learn_sigma=False)
    torch.testing.assert_close(plain.loss, torch.full((B,), 0.25))
    assert torch.all(plain.vb == 0)
    with pytest.raises(ValueError, match="prediction_type"):
        diffusion_loss(out, x0, xt, t, noise, S, prediction_type="sample")


def test_min_snr_weight_caps_low_noise_steps_in_x0_units():
    from pixart.diffusion.loss import min_snr_weight

    s = NoiseSchedule.linear()
    t = torch.tensor([0, 100, 500, 999])
    a = s.alphas_cumprod[t]
    snr = a / (1 - a)
    for pred, to_x0 in (("epsilon", snr), ("v_prediction", snr + 1)):
        w = min_snr_weight(s, t, 5.0, pred).double()
        # weight x (error in the target's units) == min(SNR, 5) x (error in x0 units)
        assert torch.allclose(w * to_x0, snr.clamp(max=5.0), rtol=rounded(), atol=0)  # w: float64, then float32
    x0, noise = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    xt = s.q_sample(x0, t, noise)
    out = torch.zeros(4, 3, 8, 8)
    plain = diffusion_loss(out, x0, xt, t, noise, s, learn_sigma=False)
    weighted = diffusion_loss(out, x0, xt, t, noise, s, learn_sigma=False, min_snr_gamma=5.0)
    assert torch.allclose(weighted.loss, plain.loss * min_snr_weight(s, t, 5.0, "epsilon"))
