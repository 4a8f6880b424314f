"""`pixart bench`: the training step's throughput, ours against diffusers' transformer, side by side."""
from __future__ import annotations

import argparse

from pixart.cli import non_negative_int, positive_int


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="training-step throughput (img/s, TFLOP/s, MFU), ours vs diffusers",
                       description=__doc__ + " One step is forward, diffusion loss, backward and AdamW on "
                       "feature-shaped inputs. Each row adds one optimization: ours-padded (all caption tokens, "
                       "torch's default AdamW: the plain path), +trim (captions trimmed to the batch's longest, "
                       "as the loader does), +fused-adamw (as the trainer steps), +bf16-weights (bf16 runs: the model "
                       "in bf16 with fp32 masters, as DeepSpeed's bf16 trains; earlier rows autocast), +compile "
                       "(--compile). With --compare diffusers the same weights and inputs in "
                       "PixArtTransformer2DModel, padded as its pipelines pad, with the default AdamW and autocast "
                       "(an accelerate loop), are timed in alternation in this process. MFU counts "
                       "useful FLOPs (no padding) against a matmul peak measured in the same run and precision.",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="PixArt-S/2", help="a PixArt model name (default PixArt-S/2)")
    p.add_argument("--resolution", type=int, default=256, help="image side in pixels; latents are /8 (default 256)")
    p.add_argument("--batch", type=positive_int, default=2, help="images per step (default 2)")
    p.add_argument("--tokens", type=positive_int, default=120, help="caption tokens, a third padding (default 120)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    p.add_argument("--compare", choices=("diffusers",), default=None, help="also time diffusers' model")
    p.add_argument("--compile", action="store_true",
                   help="also time ours with torch.compile'd blocks (compiling is in the warm-up steps)")
    p.add_argument("--precision", choices=("bf16", "fp32"), default=None,
                   help="every row's precision (default: bf16 on a GPU, fp32 on a CPU)")
    p.add_argument("--iters", type=positive_int, default=10, help="timed steps per model (default 10)")
    p.add_argument("--warmup", type=non_negative_int, default=3, help="untimed steps first (default 3)")
    p.add_argument("--out", default="bench.json", help="JSON results file, written atomically (default bench.json)")
    p.set_defaults(run=run)


def run(args) -> None:
    import json
    from dataclasses import asdict

    from pixart.atomic import atomic_write
    from pixart.cli import check_out_file, pick_device
    from pixart.errors import PixArtError
    from pixart.train.bench import BenchConfig, run_bench, table

    check_out_file(args.out, "bench.json", "JSON")  # now, not after minutes of timing
    device = pick_device(args.device)
    if args.resolution % 16 or args.resolution < 16:
        raise PixArtError(f"--resolution must be a positive multiple of 16 (16, 32, 48, ...), got {args.resolution}")
    try:
        result = run_bench(BenchConfig(args.model, args.resolution, args.batch, args.tokens, device, args.compare,
                                       compile=args.compile, precision=args.precision, iters=args.iters,
                                       warmup=args.warmup))
    except ValueError as e:
        raise PixArtError(str(e)) from None
    print(table(result))
    atomic_write(args.out, json.dumps(asdict(result), indent=2))
    print(f"wrote {args.out}")
