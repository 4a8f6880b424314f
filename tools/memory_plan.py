"""Predicted training memory of a PixArt model on one GPU, with and without activation checkpointing.

Activations are measured, on this machine: the bytes one block saves for backward (pixart.train.memory),
here on the CPU, whose flash attention also keeps O(N) per head as the GPU kernels do. States are counted:
weights, grads, fp32 masters, AdamW moments and the fp32 EMA. It is a prediction, not a GPU measurement:
allocator caching, kernel workspaces and fragmentation come on top (hence --usable).

    python tools/memory_plan.py --model PixArt-XL/2 --resolution 1024 --gpu-gb 141
    python tools/memory_plan.py --measure 16 --checkpoint 0    # on a GPU: one real step's peak beside it
    python tools/memory_plan.py --dmd --resolution 512 --world 8 --gpu-gb 80   # DMD's three networks per GPU
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from pixart.cli import positive_int  # noqa: E402
from pixart.encoders.loading import DTYPES  # noqa: E402
from pixart.errors import PixArtError  # noqa: E402
from pixart.models import build_model  # noqa: E402
from pixart.train.memory import GB, measure_block, peak_activation_bytes, state_bytes  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="PixArt-XL/2")
    p.add_argument("--resolution", type=positive_int, default=1024, help="image side in pixels (latents are /8)")
    p.add_argument("--gpu-gb", type=float, default=141.0, help="the GPU's memory in GB (10^9 bytes)")
    p.add_argument("--usable", type=float, default=0.9, help="fraction of it the plan may use (default 0.9)")
    p.add_argument("--caption-tokens", type=positive_int, default=120)
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--measure", type=positive_int, metavar="BATCH",
                   help="on a CUDA device, also run one training step at this batch and print its peak memory")
    p.add_argument("--checkpoint", type=int, default=0, help="blocks checkpointed in the --measure step")
    p.add_argument("--dmd", action="store_true", help="pixart distill's three networks instead of one stage")
    p.add_argument("--world", type=positive_int, default=1, help="GPUs the trainable states shard over (--dmd)")
    p.add_argument("--zero", type=int, choices=(0, 1, 2, 3), default=2, help="ZeRO stage (--dmd, default 2)")
    args = p.parse_args()
    if not args.gpu_gb > 0 or not 0 < args.usable <= 1:
        p.error("--gpu-gb must be positive and --usable in (0, 1]")
    if not 0 <= args.checkpoint:
        p.error(f"argument --checkpoint: {args.checkpoint} is negative")
    torch.set_num_threads(2)

    side = args.resolution // 8
    try:
        model = build_model(args.model, input_size=side)
    except PixArtError as e:  # a --resolution the patch size does not divide, or an unknown --model
        p.error(f"--model {args.model} at --resolution {args.resolution}: {e}")
    tokens = (side // model.config.patch_size) ** 2
    block, inp = measure_block(model, 1, tokens, args.caption_tokens, torch.device("cpu"), DTYPES[args.precision])
    params, depth = sum(p.numel() for p in model.parameters()), len(model.blocks)
    if args.dmd:
        return dmd_plan(args, params, depth, block, inp)
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


def dmd_states(params: int, precision: str, zero: int, world: int) -> float:
    """Generator (with its EMA) and fake score as a stage's states each (the fake has no EMA), plus the
    frozen teacher in the training dtype, unsharded."""
    one = state_bytes(params, precision, zero, world)
    ema = params * 4 / (world if zero >= 3 else 1)
    return 2 * one - ema + params * DTYPES[precision].itemsize


def dmd_plan(args, params: int, depth: int, block: int, inp: int) -> None:
    """Per GPU: the states, and the activations of the larger turn (the generator's backward and the fake
    score's are sequential; the teacher's and the fake score's no-grad forwards keep nothing)."""
    states = dmd_states(params, args.precision, args.zero, args.world)
    budget = args.gpu_gb * GB * args.usable
    print(f"pixart distill, {args.model} at {args.resolution} px, {args.precision}, ZeRO-{args.zero} over "
          f"{args.world} GPU(s) of {args.gpu_gb:.0f} GB, {args.usable:.0%} usable")
    print(f"states: generator + fake score (weights, grads, fp32 masters, AdamW; EMA of the generator) + frozen "
          f"teacher = {states / GB:.1f} GB per GPU")
    for k in (0, depth - 1):
        per_image = peak_activation_bytes(depth, k, block, inp)
        name = f"{k} of {depth} blocks checkpointed" if k else "no checkpointing"
        batch = int((budget - states) // per_image)
        print(f"  {name:32s} {per_image / GB:7.3f} GB per image -> largest batch per GPU {batch} "
              f"({(states + batch * per_image) / GB:.1f} GB); the GAN's fake turn takes 3x its batch")
    if args.measure:
        per_image = peak_activation_bytes(depth, args.checkpoint, block, inp)
        one_gpu = dmd_states(params, args.precision, 0, 1)
        print(f"one GPU, batch {args.measure}, {args.checkpoint} blocks checkpointed: predicted "
              f"{(one_gpu + args.measure * per_image) / GB:.1f} GB, measured {measure_dmd_step(args) / GB:.1f} GB")


def measure_dmd_step(args) -> float:
    """Peak bytes of two DMD steps on one GPU (no sharding): the generator's turn (DM with the teacher at CFG
    and the fake score, no grad) and the fake score's denoising turn, each network with fp32 masters."""
    from pixart.diffusion import NoiseSchedule, classifier_free_guidance, diffusion_loss
    from pixart.distill.losses import dm_loss
    from pixart.train.bench import MasterWeightAdamW

    device, dtype, side = torch.device("cuda"), DTYPES[args.precision], args.resolution // 8
    nets = [build_model(args.model, input_size=side).to(device, dtype) for _ in range(3)]
    teacher, generator, fake = nets
    teacher.requires_grad_(False).eval()
    for net in (generator, fake):
        net.set_grad_checkpointing(args.checkpoint)
    opts = [MasterWeightAdamW(net.parameters(), lr=1e-6) for net in (generator, fake)]
    ema = [p.detach().float().clone() for p in generator.parameters()]  # noqa: F841  held, as the EMA
    B, C, L, S = args.measure, generator.config.in_channels, args.caption_tokens, NoiseSchedule.linear()
    y = torch.randn(B, L, generator.config.caption_channels, device=device, dtype=dtype)
    mask = torch.ones(B, L, device=device, dtype=torch.long)
    t0 = torch.full((B,), 400, device=device)
    torch.cuda.reset_peak_memory_stats(device)
    for _ in range(2):
        z = torch.randn(B, C, side, side, device=device)
        x = S.predict_x0(z, t0, generator(z.to(dtype), t0, y, mask)[:, :C].float(), "epsilon")
        t, n = torch.randint(1, 999, (B,), device=device), torch.randn_like(x)
        xt = S.q_sample(x.detach(), t, n)
        with torch.no_grad():
            real = classifier_free_guidance(teacher, xt.to(dtype), t, y, mask, teacher.y_embedder.y_embedding, 3.0)
            x0_fake = fake(xt.to(dtype), t, y, mask)[:, :C]
        dm_loss(x, S.predict_x0(xt, t, real.float(), "epsilon"), S.predict_x0(xt, t, x0_fake.float(),
                                                                              "epsilon")).backward()
        opts[0].step()
        opts[0].zero_grad()
        xt = S.q_sample(x.detach(), t, n)
        out = fake(xt.to(dtype), t, y, mask)
        diffusion_loss(out, x.detach(), xt, t, n, S).loss.mean().backward()
        opts[1].step()
        opts[1].zero_grad()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device)


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
