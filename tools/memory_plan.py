"""Predicted training memory of a PixArt model on one GPU, with and without activation checkpointing.

Activations are measured, on this machine: the bytes one block saves for backward (pixart.train.memory),
here on the CPU, whose flash attention also keeps O(N) per head as the GPU kernels do. States are counted:
weights, grads, fp32 masters, AdamW moments and the fp32 EMA. It is a prediction, not a GPU measurement:
allocator caching, kernel workspaces and fragmentation come on top (hence --usable).

    python tools/memory_plan.py --model PixArt-XL/2 --resolution 1024 --gpu-gb 141
    python tools/memory_plan.py --measure 16 --checkpoint 0    # on a GPU: one real step's peak beside it
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from pixart.encoders.loading import DTYPES  # noqa: E402
from pixart.models import build_model  # noqa: E402
from pixart.train.memory import GB, measure_block, peak_activation_bytes, state_bytes  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="PixArt-XL/2")
    p.add_argument("--resolution", type=int, default=1024, help="image side in pixels (latents are /8)")
    p.add_argument("--gpu-gb", type=float, default=141.0, help="the GPU's memory in GB (10^9 bytes)")
    p.add_argument("--usable", type=float, default=0.9, help="fraction of it the plan may use (default 0.9)")
    p.add_argument("--caption-tokens", type=int, default=120)
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--measure", type=int, metavar="BATCH",
                   help="on a CUDA device, also run one training step at this batch and print its peak memory")
    p.add_argument("--checkpoint", type=int, default=0, help="blocks checkpointed in the --measure step")
    args = p.parse_args()
    torch.set_num_threads(2)

    side = args.resolution // 8
    model = build_model(args.model, input_size=side)
    tokens = (side // model.config.patch_size) ** 2
    block, inp = measure_block(model, 1, tokens, args.caption_tokens, torch.device("cpu"), DTYPES[args.precision])
    params, depth = sum(p.numel() for p in model.parameters()), len(model.blocks)
    states = state_bytes(params, args.precision, zero_stage=1, world=1)
    budget = args.gpu_gb * GB * args.usable
    print(f"{args.model} at {args.resolution} px ({tokens} tokens, {args.caption_tokens} caption tokens), "
          f"{args.precision}, one GPU of {args.gpu_gb:.0f} GB, {args.usable:.0%} usable")
    print(f"states (weights, grads, fp32 masters, AdamW, EMA): {states / GB:.1f} GB for {params / 1e6:.0f}M params")
    print(f"one block saves {block / GB:.3f} GB per image (its input {inp / GB:.4f} GB), measured")
    for k in (0, depth - 1):
        per_image = peak_activation_bytes(depth, k, block, inp)
        name = f"{k} of {depth} blocks checkpointed" if k else "no checkpointing"
        batch = int((budget - states) // per_image)
        print(f"  {name:32s} {per_image / GB:7.3f} GB per image -> largest batch {batch} "
              f"({(states + batch * per_image) / GB:.1f} GB)")
    if args.measure:
        per_image = peak_activation_bytes(depth, args.checkpoint, block, inp)
        print(f"batch {args.measure}, {args.checkpoint} blocks checkpointed: predicted "
              f"{(states + args.measure * per_image) / GB:.1f} GB, measured {measure_step(args) / GB:.1f} GB "
              f"(torch.cuda.max_memory_allocated)")


def measure_step(args) -> float:
    """Peak bytes of one training step on the GPU, in the states' layout the plan counts: model weights
    and grads in the training dtype, fp32 masters and AdamW moments, an fp32 EMA copy."""
    from pixart.diffusion import NoiseSchedule, diffusion_loss
    from pixart.train.bench import MasterWeightAdamW

    device, dtype, side = torch.device("cuda"), DTYPES[args.precision], args.resolution // 8
    model = build_model(args.model, input_size=side).to(device, dtype).train()
    model.set_grad_checkpointing(args.checkpoint)
    opt = MasterWeightAdamW(model.parameters(), lr=1e-6) if dtype != torch.float32 \
        else torch.optim.AdamW(model.parameters(), lr=1e-6)
    ema = [p.detach().float().clone() for p in model.parameters()]  # noqa: F841  held, as the trainer's EMA
    B, C, L = args.measure, model.config.in_channels, args.caption_tokens
    x0 = torch.randn(B, C, side, side, device=device)
    noise, t, schedule = torch.randn_like(x0), torch.randint(0, 1000, (B,), device=device), NoiseSchedule.linear()
    xt = schedule.q_sample(x0, t, noise)
    y = torch.randn(B, L, model.config.caption_channels, device=device, dtype=dtype)
    mask = torch.ones(B, L, device=device, dtype=torch.long)
    torch.cuda.reset_peak_memory_stats(device)
    for _ in range(2):  # the second step has the optimizer's states allocated
        out = model(xt.to(dtype), t, y, mask)
        loss = diffusion_loss(out, x0, xt, t, noise, schedule, learn_sigma=model.config.learn_sigma).loss
        loss.mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device)


if __name__ == "__main__":
    main()
