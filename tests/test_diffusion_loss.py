import math

import numpy as np
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


def _dit_training_losses(out, x0, noise, t, cdf):
    """facebookresearch/DiT, diffusion/gaussian_diffusion.py: GaussianDiffusion.training_losses for
    ModelMeanType.EPSILON, ModelVarType.LEARNED_RANGE, LossType.MSE (PixArt's diffusion/model/gaussian_diffusion.py
    is the same with snr=False), with diffusion_utils.py's normal_kl and discretized_gaussian_log_likelihood,
    followed step by step: float64 numpy tables read into float32 (`_extract_into_tensor`), the mean detached
    for the vb term (`frozen_out`), `loss = mse + vb`. `cdf` is DiT's `approx_standard_normal_cdf` or the exact one."""
    betas = np.linspace(0.0001, 0.02, 1000, dtype=np.float64)  # get_named_beta_schedule("linear", 1000)
    ac = np.cumprod(1.0 - betas)
    ac_prev = np.append(1.0, ac[:-1])
    post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
    post_log_var = np.log(np.append(post_var[1], post_var[1:]))  # posterior_log_variance_clipped
    coef1, coef2 = betas * np.sqrt(ac_prev) / (1.0 - ac), (1.0 - ac_prev) * np.sqrt(1.0 - betas) / (1.0 - ac)

    def take(arr):  # _extract_into_tensor
        return torch.from_numpy(arr)[t].float()[:, None, None, None].expand_as(x0)

    xt = take(np.sqrt(ac)) * x0 + take(np.sqrt(1.0 - ac)) * noise  # q_sample
    eps, v = out[:, :C].detach(), out[:, C:]
    frac = (v + 1) / 2
    log_var = frac * take(np.log(betas)) + (1 - frac) * take(post_log_var)
    x0_pred = take(np.sqrt(1.0 / ac)) * xt - take(np.sqrt(1.0 / ac - 1)) * eps
    mean = take(coef1) * x0_pred + take(coef2) * xt
    true_mean = take(coef1) * x0 + take(coef2) * xt
    kl = 0.5 * (-1.0 + log_var - take(post_log_var) + torch.exp(take(post_log_var) - log_var)
                + (true_mean - mean) ** 2 * torch.exp(-log_var))
    centered, inv_std = x0 - mean, torch.exp(-0.5 * log_var)
    cdf_plus, cdf_min = cdf(inv_std * (centered + 1 / 255)), cdf(inv_std * (centered - 1 / 255))
    log_probs = torch.where(x0 < -0.999, torch.log(cdf_plus.clamp(min=1e-12)),
                            torch.where(x0 > 0.999, torch.log((1.0 - cdf_min).clamp(min=1e-12)),
                                        torch.log((cdf_plus - cdf_min).clamp(min=1e-12))))
    vb = torch.where(t == 0, -log_probs.mean((1, 2, 3)), kl.mean((1, 2, 3))) / np.log(2.0)
    return xt, ((noise - out[:, :C]) ** 2).mean((1, 2, 3)), vb


def test_learned_sigma_loss_is_dits():
    """Outside truth for the loss every stage trains with: DiT's own code (above). Identical wherever DiT's math
    is ours; at t = 0, where we take the exact normal CDF for DiT's tanh approximation of it, identical with the
    exact one swapped into DiT's code, and within the approximation's error of DiT's own."""
    g = torch.Generator().manual_seed(3)
    t = torch.cat([torch.tensor([0, 0, 0, 0, 1, 2, 5, 999]), torch.randint(0, 1000, (24,), generator=g)])
    x0 = torch.randint(0, 256, (32, C, H, W), generator=g).float() / 127.5 - 1  # pixels: the decoder's edge bins
    noise = torch.randn(32, C, H, W, generator=g)
    out = torch.cat([noise + 0.2 * torch.randn(32, C, H, W, generator=g), torch.rand(32, C, H, W, generator=g) * 2 - 1],
                    1)
    ours = diffusion_loss(out, x0, S.q_sample(x0, t, noise), t, noise, S)
    xt, mse, vb = _dit_training_losses(out, x0, noise, t, lambda z: torch.special.ndtr(z.double()).float())
    torch.testing.assert_close(S.q_sample(x0, t, noise), xt, **reordered(xt))
    torch.testing.assert_close(ours.mse, mse, **reordered(mse))
    torch.testing.assert_close(ours.vb, vb, **reordered(vb))
    torch.testing.assert_close(ours.loss, mse + vb, **reordered(vb))
    tanh_cdf = lambda z: 0.5 * (1.0 + torch.tanh(np.sqrt(2.0 / np.pi) * (z + 0.044715 * z ** 3)))  # noqa: E731
    _, _, dits = _dit_training_losses(out, x0, noise, t, tanh_cdf)
    torch.testing.assert_close(ours.vb[t == 0], dits[t == 0], rtol=1e-3, atol=0)
    assert not torch.equal(ours.vb[t == 0], dits[t == 0])  # the approximation is there, and is all that differs
