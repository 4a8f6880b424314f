"""`pixart data shapes`: the synthetic shapes world as webdataset shards (deterministic per seed)."""
from __future__ import annotations

from data_pipelines.shapes import ASPECTS, BACKGROUND_LEVELS, BACKGROUNDS, SIZES
from pixart.cli import positive_int, seed
from pixart.errors import PixArtError


def add_parser(sub) -> None:
    p = sub.add_parser(
        "shapes",
        help="synthetic shapes-world images as webdataset shards",
        description="Render 1-3 colored shapes on a 3x3 grid over plain, gradient or textured backgrounds, "
        "clean or damaged, at several aspect ratios, into shapes-NNNNNN.tar shards of KEY.png, KEY.json "
        "(the truth: objects, background, aesthetic, label) and KEY.txt (sparse, noisy alt-text). "
        "The same seed gives the same bytes; a rerun keeps finished shards and redoes the rest.",
    )
    p.add_argument("--out", required=True, help="output folder for the shards")
    p.add_argument("--count", type=int, required=True, help="number of images")
    p.add_argument("--seed", type=seed, default=0, help="dataset seed, 0 to 2**63 - 1 (default 0)")
    p.add_argument("--resolution", type=int, default=64,
                   help="about resolution**2 pixels per image, sides multiples of --side-multiple (default 64)")
    p.add_argument("--side-multiple", type=int, default=16, choices=(16, 24),
                   help="image sides are multiples of this: 24 makes every cell of the 3x3 grid whole 8 px tokens, "
                   "so objects sit on the token grid alike in every cell (default 16)")
    p.add_argument("--shard-size", type=int, default=1000, help="images per shard (default 1000)")
    p.add_argument("--damaged-fraction", type=float, default=0.5,
                   help="share of damaged, low-aesthetic images (default 0.5)")
    p.add_argument("--workers", type=positive_int, default=1, help="processes rendering shards in parallel (default 1)")
    p.add_argument("--max-objects", type=int, default=3, help="objects per image, 1 to this many (default 3)")
    p.add_argument("--sizes", default="small,large", help="object sizes drawn (default small,large)")
    p.add_argument("--aspects", default=",".join(ASPECTS), help=f"aspect ratios drawn (default {','.join(ASPECTS)})")
    p.add_argument("--backgrounds", default=",".join(BACKGROUNDS),
                   help=f"backgrounds drawn (default {','.join(BACKGROUNDS)})")
    levels = ",".join(f"{v:g}" for v in BACKGROUND_LEVELS)
    p.add_argument("--background-levels", default=levels, metavar="LO,HI",
                   help=f"brightness range (0-255) of the neutral backgrounds (default {levels})")
    p.add_argument("--holdout", type=int, default=0,
                   help="k > 0: never draw the held-out (shape, color, position) triples, 1 in k (default 0)")
    p.add_argument("--two-object-fraction", type=float, default=0.0, metavar="F",
                   help="F > 0: each image holds two objects with probability F, else one "
                   "(replaces --max-objects; default 0)")
    p.add_argument("--pair-holdout", type=int, default=0, metavar="K",
                   help="K > 0: no image holds a held-out pair of (shape, color) objects, about 1 in K (default 0)")
    p.set_defaults(run=run)


def run(args) -> None:
    from tqdm import tqdm

    from data_pipelines.shapes import check_args, write_shapes

    check_args(args.count, args.resolution, args.shard_size, args.side_multiple)
    if not 0 <= args.damaged_fraction <= 1:
        raise PixArtError(f"--damaged-fraction must be in [0, 1], got {args.damaged_fraction}")
    if not 1 <= args.max_objects <= 9:
        raise PixArtError(f"--max-objects must be in 1..9 (one per grid cell), got {args.max_objects}")
    if args.holdout < 0:
        raise PixArtError(f"--holdout must be >= 0, got {args.holdout}")
    if not 0 <= args.two_object_fraction <= 1:
        raise PixArtError(f"--two-object-fraction must be in [0, 1], got {args.two_object_fraction}")
    if args.pair_holdout < 0:
        raise PixArtError(f"--pair-holdout must be >= 0, got {args.pair_holdout}")
    sizes, aspects, backgrounds = (tuple(v.split(",")) for v in (args.sizes, args.aspects, args.backgrounds))
    for name, values, known in (("--sizes", sizes, SIZES), ("--aspects", aspects, tuple(ASPECTS)),
                                ("--backgrounds", backgrounds, BACKGROUNDS)):
        bad = [v for v in values if v not in known]
        if bad:
            raise PixArtError(f"{name}: unknown {bad[0]!r}; known: {', '.join(known)}")
    levels = _levels(args.background_levels)
    bars = []  # opened on the first progress, so an error in the folder check stays one line

    def progress(n):
        if not bars:
            bars.append(tqdm(total=args.count, unit="img", desc="shapes"))
        bars[0].update(n)

    try:
        shards = write_shapes(args.out, args.count, seed=args.seed, resolution=args.resolution,
                              side_multiple=args.side_multiple, shard_size=args.shard_size, workers=args.workers,
                              progress=progress,
                              damaged_fraction=args.damaged_fraction, max_objects=args.max_objects, sizes=sizes,
                              aspects=aspects, backgrounds=backgrounds, holdout=args.holdout,
                              background_levels=levels, two_object_fraction=args.two_object_fraction,
                              pair_holdout=args.pair_holdout)
    finally:
        for bar in bars:
            bar.close()
    print(f"wrote {args.out}: {args.count} images in {len(shards)} shards")


def _levels(text: str) -> tuple[float, float]:
    """"LO,HI" -> (lo, hi) with 0 <= lo <= hi <= 255."""
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise PixArtError(f"--background-levels: expected LO,HI (two numbers), got {text!r}") from None
    if not 0 <= lo <= hi <= 255:
        raise PixArtError(f"--background-levels: need 0 <= LO <= HI <= 255, got {text!r}")
    return lo, hi
