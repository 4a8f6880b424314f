"""DMD on a 2-D toy with an exact teacher: which of the papers' claims hold?

The target is a mixture of 8 Gaussians on a circle. The teacher's x0 prediction E[x0 | x_t] is exact (the
mixture noised by PixArt's linear schedule has closed-form posteriors), so every difference between the
variants below comes from the distillation, not from a teacher's errors. The generator is a small MLP from
2-D noise to a sample; the fake score is an MLP denoiser initialised by training it on the target (the
teacher's stand-in: DMD initialises it from the teacher), then trained online on the generator's samples.
The losses are pixart.distill.losses, the same functions `pixart distill` uses.

Variants (as the papers' figures and ablations):
  real-only       the real score alone: grad = x - x0_real (DMD Fig. 3a: collapses onto modes)
  dm              distribution matching, one fake update per generator update
  dm+ttur         distribution matching, 5 fake updates per generator update (DMD2)
  dm+regression   distribution matching + regression onto the teacher's ODE samples of the same noise (DMD)
  dm+gan          distribution matching + a GAN head on the fake score's middle features (DMD2)

    python tools/dmd_toy.py --out dmd_toy     # a table, dmd_toy/samples.png and dmd_toy/results.json
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from pixart.cli import positive_int  # noqa: E402
from pixart.diffusion import NoiseSchedule  # noqa: E402
from pixart.distill import losses  # noqa: E402

MODES, RADIUS, SIGMA = 8, 2.0, 0.1
VARIANTS = ("real-only", "dm", "dm+ttur", "dm+regression", "dm+gan")
S = NoiseSchedule.linear()
A = S.alphas_cumprod.float()


def means() -> torch.Tensor:
    angle = torch.arange(MODES) * 2 * math.pi / MODES
    return RADIUS * torch.stack([angle.cos(), angle.sin()], 1)


def target(n: int, g: torch.Generator) -> torch.Tensor:
    k = torch.randint(0, MODES, (n,), generator=g)
    return means()[k] + SIGMA * torch.randn(n, 2, generator=g)


def teacher_x0(xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """E[x0 | x_t] for the mixture: component k's marginal is N(a mu_k, (a^2 s^2 + 1 - a^2) I)."""
    a = A[t].sqrt()[:, None, None]  # (B, 1, 1)
    var = a ** 2 * SIGMA ** 2 + 1 - a ** 2
    mu = means()[None]  # (1, K, 2)
    logw = -((xt[:, None] - a * mu) ** 2).sum(-1) / (2 * var[..., 0])
    w = logw.softmax(1)[..., None]  # (B, K, 1)
    post = mu + (a * SIGMA ** 2 / var) * (xt[:, None] - a * mu)
    return (w * post).sum(1)


def embed(t: torch.Tensor) -> torch.Tensor:
    f = torch.exp(-math.log(1000) * torch.arange(8) / 8)
    arg = t[:, None].float() * f[None]
    return torch.cat([arg.cos(), arg.sin()], 1)


class Denoiser(nn.Module):
    """x0 prediction from (x_t, t); `features` is the middle layer the GAN head reads."""

    def __init__(self, width: int = 128):
        super().__init__()
        self.inp = nn.Sequential(nn.Linear(2 + 16, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU())
        self.out = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 2))
        self.head = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 1))

    def forward(self, xt, t, gan: bool = False):
        h = self.inp(torch.cat([xt, embed(t)], 1))
        x0 = self.out(h)
        return (x0, self.head(h)[:, 0]) if gan else x0


def generator() -> nn.Module:
    return nn.Sequential(nn.Linear(2, 128), nn.SiLU(), nn.Linear(128, 128), nn.SiLU(), nn.Linear(128, 2))


def noised(x, g, lo=0, hi=999):
    t = torch.randint(lo, hi + 1, (x.shape[0],), generator=g)
    n = torch.randn(x.shape, generator=g)
    a = A[t].sqrt()[:, None]
    return a * x + (1 - a ** 2).sqrt() * n, t


def denoise_loss(model, x, g):
    xt, t = noised(x, g)
    return F.mse_loss(model(xt, t), x)  # x0-MSE (equivalent to eps-MSE up to a weight per t)


def ode_sample(z: torch.Tensor, steps: int = 100) -> torch.Tensor:
    """The teacher's deterministic sampler (DDIM) from pure noise z, with the exact x0."""
    ts = torch.linspace(999, 0, steps).round().long()
    x = z
    for i, t in enumerate(ts):
        x0 = teacher_x0(x, t.expand(len(x)))
        if i == len(ts) - 1:
            return x0
        a, a_next = A[t], A[ts[i + 1]]
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        x = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps
    return x


def distill(variant: str, steps: int, batch: int, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    fake = Denoiser()
    opt_f = torch.optim.Adam(fake.parameters(), lr=1e-3)
    for _ in range(1000):  # the teacher's stand-in: the fake score starts as a denoiser of the target
        loss = denoise_loss(fake, target(batch, g), g)
        opt_f.zero_grad()
        loss.backward()
        opt_f.step()
    gen = generator()
    opt_g = torch.optim.Adam(gen.parameters(), lr=1e-3)
    ratio = 5 if variant == "dm+ttur" else 1
    pairs = None
    if variant == "dm+regression":
        z = torch.randn(4096, 2, generator=g)
        pairs = (z, ode_sample(z))
    for _ in range(steps):
        if pairs is not None:
            idx = torch.randint(0, len(pairs[0]), (batch,), generator=g)
            z = pairs[0][idx]
        else:
            z = torch.randn(batch, 2, generator=g)
        x = gen(z)
        xt, t = noised(x.detach(), g, 20, 980)
        with torch.no_grad():
            x0_real = teacher_x0(xt, t)
            x0_fake = x.detach() if variant == "real-only" else fake(xt, t)
        loss = losses.dm_loss(x[:, :, None, None], x0_real[:, :, None, None], x0_fake[:, :, None, None])
        if pairs is not None:
            loss = loss + 0.25 * losses.regression_loss(x, pairs[1][idx])
        if variant == "dm+gan":
            fake.requires_grad_(False)
            xg, tg = noised(x, g)
            loss = loss + 1e-2 * losses.generator_gan_loss(fake(xg, tg, gan=True)[1])
            fake.requires_grad_(True)
        opt_g.zero_grad()
        loss.backward()
        opt_g.step()
        for turn in range(ratio):
            xs = x.detach() if turn == 0 else gen(torch.randn(batch, 2, generator=g)).detach()
            loss_f = denoise_loss(fake, xs, g)
            if variant == "dm+gan":
                (xf, tf), (xr, tr) = noised(xs, g), noised(target(batch, g), g)
                _, logits = fake(torch.cat([xf, xr]), torch.cat([tf, tr]), gan=True)
                loss_f = loss_f + 1e-1 * losses.discriminator_gan_loss(logits[batch:], logits[:batch])
            opt_f.zero_grad()
            loss_f.backward()
            opt_f.step()
    with torch.no_grad():
        return gen(torch.randn(5000, 2, generator=g))


def modes_covered(x: torch.Tensor, share: float = 0.02) -> tuple[int, float]:
    """Modes holding at least `share` of the samples within 4 sigma, and the fraction of samples near any mode."""
    d = torch.cdist(x, means())
    near = d.min(1).values < 4 * SIGMA
    counts = torch.bincount(d.argmin(1)[near], minlength=MODES)
    return int((counts >= share * len(x)).sum()), near.float().mean().item()


def sliced_wasserstein(x: torch.Tensor, y: torch.Tensor, projections: int = 128, seed: int = 0) -> float:
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(projections, 2, generator=g)
    theta = theta / theta.norm(dim=1, keepdim=True)
    px, py = (x @ theta.T).sort(0).values, (y @ theta.T).sort(0).values
    return ((px - py) ** 2).mean().sqrt().item()


def plot(results: dict[str, torch.Tensor], reference: torch.Tensor, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = {"target": reference, **results}
    fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels), 2.8), dpi=100)
    for ax, (name, x) in zip(axes, panels.items(), strict=True):
        ax.scatter(x[:2000, 0], x[:2000, 1], s=1, alpha=0.4)
        ax.scatter(*means().T, s=12, c="red", marker="x")
        ax.set_title(name, fontsize=9)
        ax.set_xlim(-3, 3)
        ax.set_ylim(-3, 3)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="dmd_toy", help="folder for samples.png and results.json")
    p.add_argument("--steps", type=positive_int, default=3000,
                   help="generator updates per variant (default 3000, as the README's table)")
    p.add_argument("--batch", type=positive_int, default=256)
    p.add_argument("--seeds", type=positive_int, default=5, help="runs per variant (default 5, as the README's table)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    args = p.parse_args()
    torch.set_num_threads(2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    reference = target(5000, torch.Generator().manual_seed(123))
    rows, shown = {}, {}
    print(f"{'variant':15s} {'modes (of 8)':>14s} {'near a mode':>12s} {'sliced W2':>10s} {'seconds':>8s}")
    for variant in args.variants:
        runs = []
        for seed in range(args.seeds):
            start = time.time()
            x = distill(variant, args.steps, args.batch, seed)
            covered, near = modes_covered(x)
            runs.append({"modes": covered, "near": near, "sw2": sliced_wasserstein(x, reference),
                         "seconds": time.time() - start})
            shown.setdefault(variant, x)
        rows[variant] = runs
        mean = {k: sum(r[k] for r in runs) / len(runs) for k in runs[0]}
        modes = "/".join(str(r["modes"]) for r in runs)
        print(f"{variant:15s} {modes:>14s} {mean['near']:12.2f} {mean['sw2']:10.3f} {mean['seconds']:8.1f}")
    plot(shown, reference, out / "samples.png")
    (out / "results.json").write_text(json.dumps({"steps": args.steps, "batch": args.batch, "runs": rows}, indent=2))
    print(f"wrote {out / 'samples.png'} and {out / 'results.json'} (modes: one number per seed)")


if __name__ == "__main__":
    main()
