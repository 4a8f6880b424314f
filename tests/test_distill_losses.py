"""DMD's losses against hand computations: the DM gradient (DMD2's tianweiy/DMD2 main/sd_guidance.py
`compute_distribution_matching_loss`: grad = (p_real - p_fake) / mean|p_real| with p = x - x0; loss
0.5 * MSE(x, stopgrad(x - grad))), the GAN head's non-saturating softplus losses (sd_guidance.py
`compute_generator_clean_cls_loss` / `compute_guidance_clean_cls_loss`), and the regression loss."""
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import perturb_
from tolerance import reordered

from pixart.diffusion import NoiseSchedule
from pixart.distill import losses
from pixart.distill.networks import FakeScore, GanHead
from pixart.models import build_model


def test_dm_gradient_by_hand():
    x = torch.tensor([[[[1.0, -2.0]]], [[[0.5, 0.5]]]])  # (2, 1, 1, 2)
    real = torch.tensor([[[[0.0, -1.0]]], [[[0.0, 1.0]]]])
    fake = torch.tensor([[[[2.0, -1.0]]], [[[1.0, 0.0]]]])
    # sample 0: |x - real| = (1, 1), mean 1 -> grad (2, 0); sample 1: |x - real| = (0.5, 0.5), mean 0.5 -> (2, -2)
    expected = torch.tensor([[[[2.0, 0.0]]], [[[2.0, -2.0]]]])
    assert torch.equal(losses.dm_gradient(x, real, fake), expected)
    # DMD2's form: p_real = x - x0_real, p_fake = x - x0_fake, (p_real - p_fake) / mean|p_real|
    p_real, p_fake = x - real, x - fake
    assert torch.equal(losses.dm_gradient(x, real, fake), (p_real - p_fake) / p_real.abs().mean((1, 2, 3), True))


def test_dm_loss_hands_grad_over_n_to_the_sample_and_chains_into_the_generator():
    torch.manual_seed(0)
    gen = torch.nn.Linear(4, 4)
    z = torch.randn(3, 4)
    x = gen(z).view(3, 1, 2, 2)
    real, fake = torch.randn(3, 1, 2, 2), torch.randn(3, 1, 2, 2)
    loss = losses.dm_loss(x, real, fake)
    grad = losses.dm_gradient(x.detach(), real, fake)
    assert loss.item() == pytest.approx(0.5 * grad.pow(2).mean().item(), rel=1e-6)
    loss.backward()
    # by hand: dL/dx = grad / N, then through the linear layer: dL/dW = (grad / N)^T z
    g = (grad / x.numel()).view(3, 4)
    torch.testing.assert_close(gen.weight.grad, g.T @ z, **reordered(g.T @ z))
    torch.testing.assert_close(gen.bias.grad, g.sum(0), **reordered(g.sum(0)))


def test_dm_gradient_is_zero_when_the_scores_agree_and_finite_when_x_is_the_real_x0():
    x = torch.randn(2, 3, 4, 4)
    same = torch.randn(2, 3, 4, 4)
    assert torch.equal(losses.dm_gradient(x, same, same), torch.zeros_like(x))
    assert torch.isfinite(losses.dm_gradient(x, x, same)).all()  # 0 / 0 -> 0, as DMD2's nan_to_num


def test_dm_step_on_a_tiny_model_matches_the_formula_through_x0():
    """The trainer's DM recipe on a tiny PixArt: x0 from eps at the student's t, teacher and fake x0 at t_dm."""
    torch.manual_seed(0)
    S = NoiseSchedule.linear()
    arch = dict(input_size=4, in_channels=4, depth=2, hidden_size=32, num_heads=2, caption_channels=8)
    student, teacher = (perturb_(build_model("PixArt-S/2", **arch), seed=s) for s in (0, 1))
    z, y = torch.randn(2, 4, 4, 4), torch.randn(2, 5, 8)
    t0 = torch.full((2,), 400)
    x = S.predict_x0(z, t0, student(z, t0, y)[:, :4], "epsilon")
    t, n = torch.tensor([100, 900]), torch.randn(2, 4, 4, 4)
    xt = S.q_sample(x.detach(), t, n)
    with torch.no_grad():
        x0_real = S.predict_x0(xt, t, teacher(xt, t, y)[:, :4], "epsilon")
        x0_fake = S.predict_x0(xt, t, student(xt, t, y)[:, :4], "epsilon")
    losses.dm_loss(x, x0_real, x0_fake).backward()
    # by hand: alpha-bar at 400, x0 = (z - sqrt(1 - a) eps) / sqrt(a), so dx0/deps = -sqrt(1/a - 1)
    a = S.alphas_cumprod[400].item()
    g = (x0_fake - x0_real) / (x.detach() - x0_real).abs().mean((1, 2, 3), True) / x.numel()
    eps_grad = -math.sqrt(1 / a - 1) * g
    out = student(z, t0, y)
    hand = torch.autograd.grad(out[:, :4], student.final_layer.linear.weight, eps_grad)[0]
    ours = student.final_layer.linear.weight.grad
    torch.testing.assert_close(ours, hand, **reordered(hand))


def test_gan_losses_are_the_softplus_forms():
    real, fake = torch.tensor([2.0, -1.0]), torch.tensor([0.5, -3.0])
    sp = lambda v: math.log1p(math.exp(v))  # noqa: E731
    assert losses.generator_gan_loss(fake).item() == pytest.approx((sp(-0.5) + sp(3.0)) / 2)
    d = (sp(0.5) + sp(-3.0)) / 2 + (sp(-2.0) + sp(1.0)) / 2
    assert losses.discriminator_gan_loss(real, fake).item() == pytest.approx(d)
    # non-saturating: the generator's gradient stays large where the discriminator is confident (logit -3)
    f = fake.clone().requires_grad_()
    losses.generator_gan_loss(f).backward()
    assert f.grad[1].item() == pytest.approx(-torch.sigmoid(torch.tensor(3.0)).item() / 2)


def test_gan_head_reads_the_middle_block_and_gradients_reach_the_input_only_when_frozen():
    torch.manual_seed(0)
    model = perturb_(build_model("PixArt-S/2", input_size=4, in_channels=4, depth=4, hidden_size=32, num_heads=2,
                                 caption_channels=8))
    fake = FakeScore(model, gan=True)
    x, t, y = torch.randn(3, 4, 4, 4, requires_grad=True), torch.tensor([1, 500, 999]), torch.randn(3, 5, 8)
    seen = {}
    model.blocks[1].register_forward_hook(lambda m, a, out: seen.setdefault("mid", out))
    out, logits = fake(x, t, y, gan=True)
    assert logits.shape == (3,) and torch.equal(out, model(x, t, y))
    torch.testing.assert_close(logits, fake.head(seen["mid"]), rtol=0, atol=0)
    assert torch.equal(fake(x, t, y), model(x, t, y))  # without gan: the plain forward, no head
    fake.requires_grad_(False)
    losses.generator_gan_loss(fake(x, t, y, gan=True)[1]).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in fake.parameters())


def test_gan_head_is_a_mean_of_token_logits():
    head = GanHead(8)
    tokens = torch.randn(2, 5, 8)
    per_token = head.mlp(head.norm(tokens))[..., 0]
    torch.testing.assert_close(head(tokens), per_token.mean(1), **reordered(per_token))


def test_regression_mse_and_lpips_on_decoded_images():
    a, b = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    assert losses.regression_loss(a, b, "mse").item() == pytest.approx(F.mse_loss(a, b).item())
    seen = []
    metric = lambda p, q: (seen.append((p, q)) or (p - q).abs().mean((1, 2, 3)))  # noqa: E731
    decode = lambda v: 3 * v  # noqa: E731
    out = losses.regression_loss(a, b, "lpips", metric, decode)
    assert out.item() == pytest.approx(((3 * a).clamp(-1, 1) - (3 * b).clamp(-1, 1)).abs().mean().item(), rel=1e-6)
    assert seen[0][0].max() <= 1 and seen[0][0].min() >= -1  # images in LPIPS's [-1, 1]
