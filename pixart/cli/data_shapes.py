"""`pixart data shapes`: the synthetic shapes world as webdataset shards (deterministic per seed)."""
from __future__ import annotations


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
    p.add_argument("--seed", type=int, default=0, help="dataset seed (default 0)")
    p.add_argument("--resolution", type=int, default=64,
                   help="about resolution**2 pixels per image, sides multiples of 16 (default 64)")
    p.add_argument("--shard-size", type=int, default=1000, help="images per shard (default 1000)")
    p.add_argument("--damaged-fraction", type=float, default=0.5, help="share of damaged, low-aesthetic images")
    p.add_argument("--workers", type=int, default=1, help="processes rendering shards in parallel")
    p.set_defaults(run=run)


def run(args) -> None:
    from tqdm import tqdm

    from data_pipelines.shapes import check_args, write_shapes
    from pixart.errors import PixArtError

    check_args(args.count, args.resolution, args.shard_size)
    if not 0 <= args.damaged_fraction <= 1:
        raise PixArtError(f"--damaged-fraction must be in [0, 1], got {args.damaged_fraction}")
    bars = []  # opened on the first progress, so an error in the folder check stays one line

    def progress(n):
        if not bars:
            bars.append(tqdm(total=args.count, unit="img", desc="shapes"))
        bars[0].update(n)

    try:
        shards = write_shapes(args.out, args.count, seed=args.seed, resolution=args.resolution,
                              shard_size=args.shard_size, workers=args.workers, progress=progress,
                              damaged_fraction=args.damaged_fraction)
    finally:
        for bar in bars:
            bar.close()
    print(f"wrote {args.out}: {args.count} images in {len(shards)} shards")
