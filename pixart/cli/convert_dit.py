"""`pixart convert-dit`: a facebookresearch/DiT checkpoint -> a reparameterized PixArt checkpoint folder."""
from __future__ import annotations

from pixart.cli import positive_int, seed, train_timestep


def add_parser(sub) -> None:
    p = sub.add_parser(
        "convert-dit",
        help="DiT checkpoint -> reparameterized PixArt checkpoint folder",
        description="Fold a class-conditional DiT into PixArt's adaLN-single form (PixArt-alpha section 2.3). "
        "At the reference timestep the result reproduces the DiT's null-class output for any caption. "
        "The architecture is read from the tensor shapes. Accepts a raw state dict, DiT's {'model', 'ema'} "
        "training checkpoints (EMA weights are used) or a .safetensors file.",
    )
    p.add_argument("src", help="DiT checkpoint (.pt, .pth or .safetensors), e.g. DiT-XL-2-256x256.pt, or a "
                   "checkpoint folder of a class-conditional stage (its EMA weights are used)")
    p.add_argument("--out", required=True, help="output checkpoint folder (config.json + model.safetensors)")
    p.add_argument("--num-heads", type=positive_int, default=None,
                   help="attention heads (default: DiT's for S/B/L/XL widths)")
    p.add_argument("--global-init", choices=("mean", "block0", "zero"), default="mean",
                   help="init of the shared t_block: mean of the blocks' adaLN MLPs (default, least error over t), "
                   "block 0's, or zero")
    p.add_argument("--num-classes", type=positive_int, default=None,
                   help="classes of the DiT (default: a DiT training checkpoint's args.num_classes, else the rows of "
                   "its class table minus the null class, as the released DiTs, trained with label dropout, have)")
    p.add_argument("--t-ref", type=train_timestep, default=500,
                   help="timestep at which the modulation is exact, 0 to 999 (default 500)")
    p.add_argument("--caption-channels", type=positive_int, default=4096,
                   help="text-encoder width (default 4096, T5-XXL's)")
    p.add_argument("--max-length", type=positive_int, default=120, help="caption tokens (default 120, PixArt-alpha's)")
    p.add_argument("--seed", type=seed, default=0,
                   help="seed for the new cross-attention and caption layers, 0 to 2**63 - 1 (default 0)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out folder")
    p.set_defaults(run=run)


def run(args) -> None:
    from pixart.export.dit import ReparamConfig, convert_dit

    cfg = ReparamConfig(global_init=args.global_init, t_ref=args.t_ref, caption_channels=args.caption_channels,
                        max_length=args.max_length, seed=args.seed)
    pixart, provenance = convert_dit(args.src, args.out, cfg, num_heads=args.num_heads,
                                     num_classes=args.num_classes, overwrite=args.overwrite)
    c = pixart.config
    classes, said = provenance["dit_classes"], provenance["dit_classes_from"]
    print(f"wrote {args.out}: {c.depth} blocks, width {c.hidden_size}, {c.num_heads} heads; {classes} DiT classes "
          f"({said})")
