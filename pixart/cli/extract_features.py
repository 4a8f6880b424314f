"""`pixart extract-features`: latents + T5 features of raw shards into sidecar shards with a manifest."""
from __future__ import annotations

from pixart.cli import positive_int


def add_parser(sub) -> None:
    p = sub.add_parser(
        "extract-features", help="cache autoencoder latents and T5 caption features as sidecar shards",
        description="Encode every sample of SHARDS once: images with the VAE (posterior mean and std kept) or "
        "the pixel autoencoder, captions with T5 (cleaned as PixArt does; valid tokens only). Writes "
        "DIR/<shard>.tar per input shard and DIR/manifest.json; a killed run resumes where it stopped. "
        "Shards are split over nodes by RANK/WORLD_SIZE and over --workers local processes. Exits 1 while a damaged "
        "shard is left for a rerun to retry.")
    p.add_argument("shards", nargs="+", help="raw shards: folder, glob, brace pattern or URL")
    p.add_argument("--out", required=True, help="feature cache folder")
    enc = p.add_mutually_exclusive_group(required=True)
    enc.add_argument("--vae", help="AutoencoderKL folder or hub id (e.g. stabilityai/sd-vae-ft-ema)")
    enc.add_argument("--pixel-autoencoder", action="store_true",
                     help="space-to-depth pixel autoencoder instead of a VAE (the toy demo); see --pixel-factor")
    p.add_argument("--pixel-factor", type=int, default=2, help="pixels per latent cell per side (default 2)")
    p.add_argument("--pixel-lowpass", type=int, metavar="K",
                   help="keep only each block's K x K lowest DCT frequencies per color: 3 K^2 channels (default: "
                        "all pixels, 3 F^2)")
    p.add_argument("--pixel-scale", type=float, default=1.0,
                   help="the pixel autoencoder's scaling factor, as a VAE's: model latents = pixels * scale, chosen "
                        "so they have about unit variance (default 1)")
    p.add_argument("--text-encoder", required=True, help="T5 encoder folder or hub id (with its tokenizer)")
    p.add_argument("--text-encoder-subfolder", help='e.g. "text_encoder" in a pipeline folder')
    p.add_argument("--tokenizer", help="tokenizer folder, when not beside the text encoder")
    p.add_argument("--vae-subfolder", help='e.g. "vae" in a pipeline folder')
    p.add_argument("--captions", default="txt",
                   help="comma-separated caption sources: txt (the raw alt-text) and captioner names whose "
                   "<shard>.<name>.jsonl sit next to the shards or in --captions-dir (default txt)")
    p.add_argument("--captions-dir", help="folder of sidecar caption jsonl files")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--resolution", type=positive_int, help="square side after resize + center crop (default 256)")
    size.add_argument("--buckets", help="aspect-bucket table name (e.g. ms512): each image to its nearest bucket")
    p.add_argument("--max-length", type=positive_int, default=120, help="T5 tokens (default 120)")
    p.add_argument("--batch-size", type=positive_int, default=16, help="images per encoder call (default 16)")
    p.add_argument("--workers", type=positive_int, default=1, help="local worker processes, split by shard (default 1)")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16",
                   help="T5 compute and stored text dtype (default bf16)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--overwrite", action="store_true", help="replace a cache made with other settings")
    p.add_argument("--accept-damaged", action="store_true",
                   help="keep the samples read from an input shard that broke off (truncated) and mark it done (the "
                   "damage is recorded); by default such a shard stays unfinished and a rerun retries it. A shard of "
                   "which nothing could be read (missing, empty, garbage) stays unfinished either way")
    p.set_defaults(run=run)


def run(args) -> int:
    from data_pipelines.features import FeatureConfig, extract_features
    from pixart.cli import pick_device

    cfg = FeatureConfig(
        text_encoder=args.text_encoder, vae=args.vae,
        pixel_autoencoder=args.pixel_factor if args.pixel_autoencoder else None, pixel_scale=args.pixel_scale,
        pixel_lowpass=args.pixel_lowpass,
        captions=tuple(s.strip() for s in args.captions.split(",") if s.strip()), captions_dir=args.captions_dir,
        resolution=args.resolution, buckets=args.buckets, batch_size=args.batch_size, workers=args.workers,
        dtype=args.dtype, max_length=args.max_length,
        device=pick_device(args.device),
        text_encoder_subfolder=args.text_encoder_subfolder, tokenizer=args.tokenizer,
        vae_subfolder=args.vae_subfolder, accept_damaged=args.accept_damaged)
    ex = extract_features(args.shards, args.out, cfg, overwrite=args.overwrite)
    print(ex.describe(args.out))
    return 1 if ex.damaged else 0  # shards left for a rerun: a pipeline must not go on as if the cache were whole
