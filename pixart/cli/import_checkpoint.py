"""`pixart import`: a diffusers PixArt folder or an official PixArt-alpha .pth -> our checkpoint folder."""
from __future__ import annotations

from pathlib import Path

from pixart.cli import positive_int, timestep


def add_parser(sub) -> None:
    p = sub.add_parser(
        "import",
        help="diffusers PixArt folder or official PixArt-alpha .pth -> checkpoint folder",
        description="Bring foreign PixArt weights into our checkpoint format (config.json + model.safetensors). "
        "A folder is read as a diffusers PixArtTransformer2DModel (or a pipeline folder holding transformer/); "
        "a file as an official PixArt-alpha checkpoint such as PixArt-XL-2-1024-MS.pth.",
    )
    p.add_argument("src", help="diffusers folder, or official .pth/.safetensors file")
    p.add_argument("--out", required=True, help="output checkpoint folder")
    p.add_argument("--num-heads", type=positive_int, help="attention heads of an official file (default: by width)")
    p.add_argument("--input-size", type=positive_int,
                   help="latent side (32: 256 px, 64: 512 px, 128: 1024 px) of an official file without pos_embed, "
                   "which is refused without it (default: the file's pos_embed says)")
    p.add_argument("--prediction-type", choices=("epsilon", "v_prediction"),
                   help="what the model predicts (default: a diffusers folder's scheduler says; an official file: "
                   "epsilon, as PixArt-alpha)")
    p.add_argument("--start-timestep", type=timestep, metavar="T",
                   help="the model is a one-step distilled student that maps pure noise labelled t=T to an image "
                   "(PixArt-Alpha-DMD-XL-2-512x512: 400), so `pixart sample` draws it in one step (default: the "
                   "folder's student.json, which our exports of a student write; else a multi-step model)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out folder")
    p.set_defaults(run=run)


def run(args) -> None:
    import json

    from pixart.atomic import check_out_dir
    from pixart.checkpoint import DIFFUSION_FILE, ENCODERS_FILE, FRESH_NULL_FILE, STUDENT_FILE, save_checkpoint
    from pixart.export.diffusers import (
        NULL_CAPTION_FILE,
        import_diffusers,
        import_encoders,
        import_sampling,
        pipeline_root,
    )
    from pixart.export.official import import_official
    from pixart.personalize.covariance import COVARIANCE_GLOB

    check_out_dir(args.out, args.overwrite, (args.src,))
    student, encoders, notes, extra, files = None, {}, [], {}, ()
    if Path(args.src).is_dir():
        prediction, student = import_sampling(args.src)
        model = import_diffusers(args.src)
        encoders = import_encoders(args.src)
        files = tuple(sorted(pipeline_root(args.src).glob(COVARIANCE_GLOB)))  # what the export copied, back
        if not (pipeline_root(args.src) / NULL_CAPTION_FILE).is_file():  # import_diffusers warned
            notes.append("null caption freshly initialised")
            extra[FRESH_NULL_FILE] = json.dumps({"source": str(args.src), "null_caption": (
                "freshly initialised: the source had none; the model was not trained with it, so an export leaves "
                "it out")}, indent=2)
    else:
        (model, took), prediction = import_official(args.src, args.num_heads, args.input_size), "epsilon"
        notes.append(f"{took} (EMA) weights" if "ema" in took else f"{took or 'bare state dict'} weights")
    prediction = args.prediction_type or prediction
    if args.start_timestep is not None:
        student = {**(student or {}), "start_timestep": args.start_timestep}
    extra[DIFFUSION_FILE] = json.dumps({"prediction_type": prediction}, indent=2)
    if student is not None:
        extra[STUDENT_FILE] = json.dumps(student, indent=2)
        notes.append("one-step student")
    if encoders:
        extra[ENCODERS_FILE] = json.dumps(encoders, indent=2)
    save_checkpoint(args.out, model.config, model.state_dict(), extra=extra, overwrite=args.overwrite,
                    sources=(args.src,), files=files)
    print(f"wrote {args.out} ({', '.join([prediction, *notes])})")
