"""How close each init of the shared adaLN-single MLP keeps PixArt's modulation to DiT's.

For every init (`mean`, `block0`, `zero`) it converts the DiT, then measures over all
1000 timesteps the relative error of the blocks' modulation vectors and of the final
layer's (shift, scale) against DiT's null-class ones, and the relative error of the
whole model's output on random latents at a few timesteps.

    python tools/reparam_error.py --dit DiT-XL-2-256x256.pt     # the real checkpoint
    python tools/reparam_error.py                               # a DiT-S/4 trained here for --steps

Without --dit a small class-conditional DiT is trained for a few hundred steps on a toy
dataset (each class a blob at its own place), so the blocks' adaLN weights are learned
and correlated as in a real DiT rather than zero (DiT's init) or independent noise.
"""
from __future__ import annotations

import argparse

import torch

from pixart.checkpoint import load_into, read_state_dict, unwrap_state_dict
from pixart.diffusion import NoiseSchedule, diffusion_loss
from pixart.models import DiT, build_model
from pixart.models.reparam import GLOBAL_INITS, dit_to_pixart, infer_dit_config, modulation_error


def toy_batch(batch: int, num_classes: int, side: int, gen: torch.Generator):
    labels = torch.randint(0, num_classes, (batch,), generator=gen)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, side), torch.linspace(-1, 1, side), indexing="ij")
    angle = labels.float() / num_classes * 6.283
    cy, cx = 0.5 * angle.sin(), 0.5 * angle.cos()
    blob = torch.exp(-((yy - cy[:, None, None]) ** 2 + (xx - cx[:, None, None]) ** 2) / 0.1)
    per_class = 1 + labels.float()[:, None, None, None] / num_classes
    channel_gain = torch.linspace(-1, 1, 4)[None, :, None, None] * per_class
    return blob[:, None] * channel_gain + 0.05 * torch.randn(batch, 4, side, side, generator=gen), labels


def train_toy_dit(steps: int, seed: int) -> DiT:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    dit = build_model("DiT-S/4", input_size=16, num_classes=10).train()
    schedule = NoiseSchedule.linear()
    opt = torch.optim.AdamW(dit.parameters(), lr=3e-4, weight_decay=0)
    for step in range(steps):
        x0, labels = toy_batch(32, 10, 16, gen)
        t = torch.randint(0, 1000, (32,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        xt = schedule.q_sample(x0, t, noise)
        loss = diffusion_loss(dit(xt, t, labels), x0, xt, t, noise, schedule).loss.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"  toy DiT step {step:4d} loss {loss.item():.4f}")
    return dit.eval()


@torch.no_grad()
def output_error(dit: DiT, pixart, t: int, seed: int = 0) -> float:
    gen = torch.Generator().manual_seed(seed)
    cfg = dit.config
    x = torch.randn(4, cfg.in_channels, cfg.input_size, cfg.input_size, generator=gen)
    ts = torch.full((4,), t)
    ref = dit(x, ts, torch.full((4,), cfg.num_classes))
    out = pixart(x, ts, torch.randn(4, 8, pixart.config.caption_channels, generator=gen))
    return ((out - ref).norm() / ref.norm()).item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dit", help="a DiT checkpoint (.pt/.pth/.safetensors); default: train a toy DiT-S/4")
    ap.add_argument("--num-heads", type=int)
    ap.add_argument("--steps", type=int, default=400, help="toy DiT training steps")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(2)
    if args.dit:
        state = unwrap_state_dict(read_state_dict(args.dit), args.dit)
        dit = load_into(DiT(infer_dit_config(state, args.num_heads)), state, args.dit).eval()
        source = args.dit
    else:
        dit = train_toy_dit(args.steps, args.seed)
        source = f"toy DiT-S/4 trained {args.steps} steps"
    probe_t = (0, 250, 500, 750, 999)
    print(f"\nsource: {source}; relative errors against DiT's null-class modulation / output")
    print(f"{'init':8s} {'blocks@500':>11s} {'blocks mean':>12s} {'blocks max':>11s} {'final mean':>11s} "
          + " ".join(f"{'out@' + str(t):>9s}" for t in probe_t))
    for init in GLOBAL_INITS:
        pixart = dit_to_pixart(dit, global_init=init, caption_channels=64).eval()
        blocks, final = modulation_error(dit, pixart, torch.arange(1000))
        outs = [output_error(dit, pixart, t) for t in probe_t]
        print(f"{init:8s} {blocks[500]:11.2e} {blocks.mean():12.4f} {blocks.max():11.4f} {final.mean():11.4f} "
              + " ".join(f"{e:9.4f}" for e in outs))


if __name__ == "__main__":
    main()
