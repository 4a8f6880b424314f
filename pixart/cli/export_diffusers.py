"""`pixart export-diffusers`: a checkpoint folder -> a diffusers transformer or pipeline folder."""
from __future__ import annotations

import argparse

from pixart.errors import PixArtError


def add_parser(sub) -> None:
    p = sub.add_parser(
        "export-diffusers",
        help="checkpoint folder -> diffusers PixArtTransformer2DModel / PixArtAlphaPipeline folder",
        description="Write OUT/transformer, loadable with PixArtTransformer2DModel.from_pretrained(OUT, "
        "subfolder='transformer'). With --text-encoder, --tokenizer and --vae it writes a whole "
        "PixArtAlphaPipeline folder: a DPM-Solver++ scheduler, or for a one-step student (`pixart distill`'s "
        "checkpoint) a DDPM one and OUT/student.json, as the released PixArt-DMD ships. "
        "OUT/null_caption.safetensors holds the model's null caption, the unconditional input it was trained "
        "with; pass it as negative_prompt_embeds rather than the pipeline's default T5(\"\") (docs/export.md). "
        "A model imported from a folder without one has none to export.",
    )
    p.add_argument("ckpt", help="checkpoint folder (config.json + model.safetensors [+ ema.safetensors]), "
                   "or a run's RUN/checkpoints/latest; an official .pth needs `pixart import` first")
    p.add_argument("--out", required=True, help="output folder (replaced atomically)")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=None,
                   help="export the EMA weights (default: EMA when the checkpoint has them)")
    p.add_argument("--text-encoder", help="T5 encoder path or hub id, e.g. DeepFloyd/t5-v1_1-xxl")
    p.add_argument("--tokenizer", help="T5 tokenizer path or hub id (default: --text-encoder)")
    p.add_argument("--vae", help="AutoencoderKL path or hub id, e.g. stabilityai/sd-vae-ft-ema; 'none' for a "
                   "pixel-space model (the toy demo's): load it with from_pretrained(DIR, vae=None)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out folder")
    p.set_defaults(run=run)


def run(args) -> None:
    from pixart.checkpoint import FRESH_NULL_FILE, checkpoint_folder
    from pixart.export.diffusers import PipelineParts, export_checkpoint

    parts = None
    if args.text_encoder or args.vae or args.tokenizer:
        if not (args.text_encoder and args.vae):
            raise PixArtError("a pipeline export needs both --text-encoder and --vae (and optionally --tokenizer)")
        parts = PipelineParts(args.text_encoder, args.tokenizer or args.text_encoder,
                              None if args.vae.lower() == "none" else args.vae)
    _, ema, prediction = export_checkpoint(args.ckpt, args.out, parts, ema=args.ema, overwrite=args.overwrite)
    kind = "pipeline" if parts else "transformer"
    fresh = (checkpoint_folder(args.ckpt) / FRESH_NULL_FILE).is_file()
    print(f"wrote diffusers {kind} to {args.out} ({'EMA' if ema else 'model'} weights, {prediction}"
          f"{f'; no null caption: the import made one up ({FRESH_NULL_FILE})' if fresh else ''})")
