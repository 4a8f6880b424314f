"""Training-step time of our PixArt against diffusers' PixArtTransformer2DModel, side by side.

Both models hold the same weights (ours exported), get the same inputs, and are
timed in alternation in one process (forward + backward), so machine noise hits
both alike. Prints each median and the ratio ours / diffusers (< 1: ours is faster).

    python tools/bench_step.py                      # PixArt-S/2, 256 px, batch 2, CPU
    python tools/bench_step.py --model PixArt-B/2 --batch 4 --iters 20
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from pixart.export.diffusers import to_diffusers_transformer
from pixart.models import build_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="PixArt-S/2")
    ap.add_argument("--resolution", type=int, default=256, help="image side in pixels (latent = /8)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=120, help="caption length (a third of it is padding)")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    side = args.resolution // 8
    ours = build_model(args.model, input_size=side, class_dropout_prob=0.0).train()
    theirs = to_diffusers_transformer(ours).train()
    x = torch.randn(args.batch, 4, side, side)
    t = torch.randint(0, 1000, (args.batch,))
    y = torch.randn(args.batch, args.tokens, ours.config.caption_channels)
    mask = torch.ones(args.batch, args.tokens)
    mask[:, 2 * args.tokens // 3:] = 0
    if ours.config.micro_conditions:
        raise SystemExit("bench_step: use a PixArt (not PixArtMS) model")

    def step_ours():
        ours(x, t, y, mask).float().square().mean().backward()

    def step_theirs():
        out = theirs(x, encoder_hidden_states=y, timestep=t, encoder_attention_mask=mask, return_dict=False)[0]
        out.float().square().mean().backward()

    times = {"ours": [], "diffusers": []}
    for i in range(args.warmup + args.iters):
        for name, fn, model in (("ours", step_ours, ours), ("diffusers", step_theirs, theirs)):
            model.zero_grad(set_to_none=True)
            start = time.perf_counter()
            fn()
            if i >= args.warmup:
                times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{args.model} {args.resolution}px batch {args.batch}, {args.tokens} caption tokens, "
          f"{args.threads} threads, {args.iters} alternating iterations (forward + backward)")
    for name, value in med.items():
        print(f"  {name:10s} median {value * 1000:8.1f} ms   (min {min(times[name]) * 1000:.1f} ms)")
    print(f"  ratio ours/diffusers: {med['ours'] / med['diffusers']:.3f}")


if __name__ == "__main__":
    main()
