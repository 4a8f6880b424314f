"""`pixart sample CKPT --prompt ...`: images from a checkpoint folder, as a PNG grid."""
from __future__ import annotations

import argparse

from pixart.cli import grid_columns, positive_int, seed


def add_parser(sub) -> None:
    p = sub.add_parser("sample", help="images from a checkpoint (PNG grid)", description=__doc__ + (
        " The text encoder and VAE are the ones the checkpoint was trained with (its encoders.json), "
        "unless given. One row per prompt (or class label), one column per seed. A distilled one-step student "
        "(its student.json) samples in one step from its start timestep; --steps, --cfg and --sampler are then "
        "unused."),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt", help="checkpoint folder (config.json + model.safetensors [+ ema.safetensors]), "
                   "or a run's RUN/checkpoints/latest")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--label", type=int, action="append", default=[], help="a class label, for a DiT (repeatable)")
    p.add_argument("--out", default="samples.png", help="output image, its format from the name (default samples.png)")
    p.add_argument("--steps", type=int, default=20, help="sampler steps (default 20)")
    p.add_argument("--cfg", type=float, default=4.5, help="classifier-free guidance scale (default 4.5)")
    p.add_argument("--sampler", choices=("dpm-solver++", "ddim", "ddpm"), default="dpm-solver++",
                   help="diffusers scheduler (default dpm-solver++, as PixArt's own sampling)")
    p.add_argument("--seed", type=seed, default=0,
                   help="seed of the whole grid's noise, drawn row by row: the same command writes the same image; "
                   "0 to 2**63 - 1 (default 0)")
    p.add_argument("--columns", type=grid_columns, default=1, help="images per prompt (default 1, at most 256)")
    p.add_argument("--batch", type=positive_int, default=8,
                   help="images sampled at once (default 8); lower it if memory runs out (the noise stays the same)")
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"),
                   help="LATENT height and width, not pixels: pixels / 8 with the SD VAE (64 64 is 512 x 512 px); "
                   "at most 4x the model's own size per side (default: the model's)")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=None,
                   help="the EMA weights (default: EMA when the checkpoint has them)")
    p.add_argument("--text-encoder", help="T5 folder or hub id (default: the checkpoint's encoders.json)")
    p.add_argument("--vae", help="AutoencoderKL folder or hub id, or pixel:F[:K] (default: encoders.json)")
    p.add_argument("--concept", action="append", default=[], metavar="FILE",
                   help="a Perfusion concept file (`pixart personalize`); prompts name it by its word (repeatable)")
    p.add_argument("--beta", type=float, help="concept gate bias (default: each file's, 0.7; lower = stronger)")
    p.add_argument("--tau", type=float, help="concept gate temperature (default: each file's, 0.15)")
    p.add_argument("--global-lock", action="store_true",
                   help="keys from the prompt with each concept's super-category word (Perfusion's global locking)")
    p.add_argument("--covariance", help="the base model's covariance file (default: the one beside CKPT)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.set_defaults(run=run)


def run(args) -> None:
    from pathlib import Path

    import torch

    from pixart.checkpoint import (
        EMA_FILE,
        ENCODERS_FILE,
        checkpoint_folder,
        load_encoders,
        load_model,
        load_prediction_type,
        load_student,
    )
    from pixart.cli import pick_device
    from pixart.errors import PixArtError
    from pixart.train.config import EncodersSection, ValidationSection, validated
    from pixart.train.encoders import load_autoencoder, load_text_encoder
    from pixart.train.validation import Validator

    ckpt = checkpoint_folder(args.ckpt)
    check_args(args)
    device = pick_device(args.device)
    ema = args.ema if args.ema is not None else (ckpt / EMA_FILE).is_file()
    model = load_model(ckpt, ema=ema)
    side = model.config.input_size
    if args.size and max(args.size) > 4 * side:
        raise PixArtError(f"--size {args.size[0]} {args.size[1]}: a latent size (pixels / 8 with the SD VAE); this "
                          f"model's is {side} ({side * 8} px with the SD VAE), give at most {4 * side} per side")
    if model.config.arch == "pixart" and args.label:
        raise PixArtError(f"--label: {ckpt} is a text-to-image PixArt model; give --prompt")
    if model.config.arch != "pixart" and args.prompt:
        raise PixArtError(f"--prompt: {ckpt} is a class-conditional DiT; give --label")
    bad = [n for n in args.label if not 0 <= n < model.config.num_classes]
    if bad:
        raise PixArtError(f"--label {bad[0]}: {ckpt} has classes 0 to {model.config.num_classes - 1}")
    enc = load_encoders(ckpt)
    text, vae = args.text_encoder or enc.get("text_encoder"), args.vae or enc.get("image_encoder")
    if vae is None or (model.config.arch == "pixart" and text is None):
        raise PixArtError(f"{ckpt}: no {ENCODERS_FILE} names the encoders; pass --text-encoder and --vae")
    encoders = validated(EncodersSection, {"text_encoder": text, "max_length": enc.get("max_length") or 120, "vae": vae,
                                           "dtype": "fp32" if device == "cpu" else enc.get("dtype", "bf16")},
                         str(ckpt / ENCODERS_FILE))  # fp32 on a CPU: bf16 crawls on AVX2 ones
    student = load_student(ckpt)
    v = validated(ValidationSection, {"prompts": args.prompt, "labels": args.label, "seed": args.seed,
                                      "steps": args.steps, "cfg": args.cfg, "sampler": args.sampler, "size": args.size,
                                      "one_step": student["start_timestep"] if student else None}, "pixart sample")
    encoder = load_text_encoder(encoders, None, device) if model.config.arch == "pixart" else None
    # the latents' scale is the training data's (encoders.json), whichever copy of the VAE decodes them
    decoder = load_autoencoder(encoders, None, device, scale=enc.get("scaling_factor"))
    model.config.check_encoders(encoder and encoder.model.config.d_model, decoder.latent_channels, text, vae)
    concepts = concept_setup(args, ckpt, model, encoder) if args.concept else []
    prediction = load_prediction_type(ckpt)
    validator = Validator(v, prediction, model.config, encoder, decoder, torch.device(device),
                          args.columns, args.batch, progress=True)
    if concepts:
        validator.prepare = concepts_context(args, concepts, ckpt, model, encoder)
    validator.grid(model.state_dict(), Path(args.out), scale=1)
    how = (f"one step from t={student['start_timestep']} (a distilled student)" if student
           else f"{args.sampler} {args.steps} steps, CFG {args.cfg}")
    if concepts:
        how += f", concepts {', '.join(c.name for c in concepts)}" + (" (global lock)" if args.global_lock else "")
    print(f"wrote {args.out}: {len(args.prompt) or len(args.label)} x {args.columns} images "
          f"({'EMA' if ema else 'model'} weights, {prediction}, {how})")


def check_args(args) -> None:
    """What the flags alone can get wrong, before a model loads."""
    import math
    from pathlib import Path

    from PIL import Image

    from pixart.cli import check_out_file
    from pixart.errors import PixArtError

    check_out_file(args.out, "samples.png", "image")
    if Path(args.out).suffix.lower() not in Image.registered_extensions():
        raise PixArtError(f"--out {args.out}: not an image file name (.png, .jpg, .webp, ...)")
    if not args.prompt and not args.label:
        raise PixArtError("give at least one --prompt (or --label for a class-conditional DiT)")
    for prompt in args.prompt:
        check_prompt(prompt)
    if not 1 <= args.steps <= 1000:
        raise PixArtError(f"--steps {args.steps}: give 1 to 1000 (the noise schedule's timesteps)")
    if not (math.isfinite(args.cfg) and args.cfg >= 0):
        raise PixArtError(f"--cfg {args.cfg}: give a finite scale >= 0 (1: no guidance)")
    if args.size and min(args.size) < 1:
        raise PixArtError(f"--size {args.size[0]} {args.size[1]}: latent sizes must be positive")
    if args.tau is not None and not (math.isfinite(args.tau) and args.tau > 0):
        raise PixArtError(f"--tau {args.tau}: the gate's temperature must be positive")
    if args.beta is not None and not math.isfinite(args.beta):
        raise PixArtError(f"--beta {args.beta}: must be a finite number")
    if (args.beta is not None or args.tau is not None or args.global_lock) and not args.concept:
        raise PixArtError("--beta, --tau and --global-lock set how --concept files apply; give a --concept")


def check_prompt(prompt: str) -> None:
    """A prompt the text encoder can read: bytes that are not UTF-8 reach Python as lone surrogates, which the
    caption cleaning cannot encode (a traceback after the model loaded). An empty one is drawn from no words at
    all, most likely not what was meant, so it is named."""
    from pixart.errors import PixArtError

    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError:
        try:
            shown = prompt.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        except UnicodeEncodeError:
            shown = ascii(prompt)[1:-1]
        raise PixArtError(f"--prompt '{shown}' is not valid UTF-8 text; give prompts in UTF-8") from None
    if not prompt.strip():
        print(f"warning: --prompt {prompt!r} is empty: its row is drawn from no words (a caption-less image)")


def concept_setup(args, ckpt, model, encoder) -> list:
    """Load the concept files, refuse them on another base model, and teach the text encoder their words."""
    from pixart.errors import PixArtError
    from pixart.personalize.concept import Concept, pixart_identity, pixart_shape
    from pixart.personalize.tokens import add_concept_token, set_embedding

    if encoder is None:
        raise PixArtError("--concept needs a PixArt checkpoint (a DiT has no text cross-attention)")
    concepts = [Concept.load(f) for f in args.concept]
    for i, c in enumerate(concepts):
        if c.name in (seen := [d.name for d in concepts[:i]]):
            raise PixArtError(f"--concept {args.concept[i]}: its word {c.name!r} is also "
                              f"{args.concept[seen.index(c.name)]}'s; one concept per word")
    identity, text_dim = pixart_identity(model), encoder.model.get_input_embeddings().weight.shape[1]
    for c in concepts:
        c.check_base(identity, str(ckpt), *pixart_shape(model), text_dim)
        set_embedding(encoder.model, add_concept_token(encoder.tokenizer, encoder.model, c.name), c.embedding)
    unused = [c.name for c in concepts if not any(_word(c.name).search(p) for p in args.prompt)]
    if unused:  # "zorbs" is not "zorb": such a prompt samples the base model, and looks like a weak concept
        print(f"warning: no --prompt uses the concept word {', '.join(map(repr, unused))} as a whole word; "
              "those concepts change nothing")
    return concepts


def _word(name: str):
    """The concept's word as the tokenizer finds it: whole (single_word), so "zorbs" or "zorb_1" is not it."""
    import re

    return re.compile(rf"(?<!\w){re.escape(name)}(?!\w)")


def concepts_context(args, concepts, ckpt, base, encoder):
    """What the validator samples in: each fresh model gets the concepts, and global locking's key captions."""
    import weakref
    from contextlib import nullcontext

    from pixart.personalize.apply import apply_concepts, concept_c_inv, global_lock
    from pixart.personalize.tokens import as_super

    c_inv = concept_c_inv(ckpt, base, args.covariance)
    super_y = None
    if args.global_lock:
        y, _ = encoder.encode([as_super(p, {c.name: c.super_word for c in concepts}) for p in args.prompt])
        super_y = y.float().repeat_interleave(args.columns, 0)

    applied = weakref.WeakSet()

    def prepare(model, rows: slice):
        """Per batch of images: the concepts go into the model once, global locking takes those images' captions."""
        if model not in applied:
            apply_concepts(model, concepts, c_inv, beta=args.beta, tau=args.tau, check=False)
            applied.add(model)
        return global_lock(model, super_y[rows]) if super_y is not None else nullcontext()

    return prepare
