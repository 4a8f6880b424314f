"""`pixart sample CKPT --prompt ...`: images from a checkpoint folder, as a PNG grid."""
from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    p = sub.add_parser("sample", help="images from a checkpoint (PNG grid)", description=__doc__ + (
        " The text encoder and VAE are the ones the checkpoint was trained with (its encoders.json), "
        "unless given. One row per prompt (or class label), one column per seed. A distilled one-step student "
        "(its student.json) samples in one step from its start timestep; --steps, --cfg and --sampler are then "
        "unused."),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt", help="checkpoint folder (config.json + model.safetensors [+ ema.safetensors])")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--label", type=int, action="append", default=[], help="a class label, for a DiT (repeatable)")
    p.add_argument("--out", default="samples.png", help="output PNG (default samples.png)")
    p.add_argument("--steps", type=int, default=20, help="sampler steps (default 20)")
    p.add_argument("--cfg", type=float, default=4.5, help="classifier-free guidance scale (default 4.5)")
    p.add_argument("--sampler", choices=("dpm-solver++", "ddim", "ddpm"), default="dpm-solver++")
    p.add_argument("--seed", type=int, default=0, help="noise seed of the first column (default 0)")
    p.add_argument("--columns", type=int, default=1, help="images per prompt (default 1)")
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="latent size (default: the model's)")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=None,
                   help="the EMA weights (default: EMA when the checkpoint has them)")
    p.add_argument("--text-encoder", help="T5 folder or hub id (default: the checkpoint's encoders.json)")
    p.add_argument("--vae", help="AutoencoderKL folder or hub id, or pixel:F (default: encoders.json)")
    p.set_defaults(run=run)


def run(args) -> None:
    import json
    from pathlib import Path

    import torch

    from pixart.checkpoint import EMA_FILE, ENCODERS_FILE, load_model, load_prediction_type, load_student
    from pixart.errors import PixArtError
    from pixart.train.config import parse_config
    from pixart.train.encoders import load_autoencoder, load_text_encoder
    from pixart.train.validation import Validator

    ckpt = Path(args.ckpt)
    if not args.prompt and not args.label:
        raise PixArtError("give at least one --prompt (or --label for a class-conditional DiT)")
    if args.steps < 1 or args.columns < 1:
        raise PixArtError("--steps and --columns must be positive")
    ema = args.ema if args.ema is not None else (ckpt / EMA_FILE).is_file()
    model = load_model(ckpt, ema=ema)
    enc = json.loads((ckpt / ENCODERS_FILE).read_text()) if (ckpt / ENCODERS_FILE).is_file() else {}
    text, vae = args.text_encoder or enc.get("text_encoder"), args.vae or enc.get("image_encoder")
    if vae is None or (model.config.arch == "pixart" and text is None):
        raise PixArtError(f"{ckpt}: no {ENCODERS_FILE} names the encoders; pass --text-encoder and --vae")
    encoders = {"text_encoder": text, "max_length": enc.get("max_length") or 120, "dtype": "fp32", "vae": vae}
    student = load_student(ckpt)
    cfg = parse_config({"data": {"shards": "-"}, "encoders": encoders,
                        "diffusion": {"prediction": load_prediction_type(ckpt)},
                        "validation": {"prompts": args.prompt, "labels": args.label, "seed": args.seed,
                                       "steps": args.steps, "cfg": args.cfg, "sampler": args.sampler,
                                       "size": args.size,
                                       "one_step": student["start_timestep"] if student else None}}, "pixart sample")
    encoder = load_text_encoder(cfg, None) if model.config.arch == "pixart" else None
    decoder = load_autoencoder(cfg, None, scale=None if args.vae else enc.get("scaling_factor"))
    validator = Validator(cfg, model.config, encoder, decoder, torch.device("cpu"), args.columns)
    validator.grid(model.state_dict(), Path(args.out))
    how = (f"one step from t={student['start_timestep']} (a distilled student)" if student
           else f"{args.sampler} {args.steps} steps, CFG {args.cfg}")
    print(f"wrote {args.out}: {len(args.prompt) or len(args.label)} x {args.columns} images "
          f"({'EMA' if ema else 'model'} weights, {cfg.diffusion.prediction}, {how})")
