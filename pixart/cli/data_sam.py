"""`pixart data sam`: SA-1B tars -> webdataset shards (resized JPEG + metadata json per image)."""
from __future__ import annotations

from pixart.cli import positive_int


def add_parser(sub) -> None:
    p = sub.add_parser(
        "sam", help="SA-1B tars -> webdataset shards",
        description="Read SA-1B-style tars (sa_N.jpg + sa_N.json, paired by name in any member order) and write "
        "DIR/sam-NNNNNN.tar shards with the image resized to --max-side (aspect kept) and its metadata; "
        "annotations keep boxes, areas, points and scores scaled from the json's image.width x image.height to "
        "the new size, masks only with --keep-masks. Broken images, unpaired members, jpgs whose aspect differs "
        "from their json's and damaged tars are skipped and listed in DIR/sam_report.json. A killed run, rerun with "
        "the same inputs and settings, goes on from its last finished shard; a finished one has nothing to do.")
    p.add_argument("src", nargs="+", help="SA-1B tars: files, folders, globs or brace patterns")
    p.add_argument("--out", required=True, help="output folder for the shards")
    p.add_argument("--max-side", type=positive_int, default=1024, help="longest side after resizing (default 1024)")
    p.add_argument("--shard-size", type=positive_int, default=1000, help="samples per output shard (default 1000)")
    p.add_argument("--keep-masks", action="store_true", help="keep the RLE masks (at the original resolution)")
    p.add_argument("--hold-mb", type=float, default=256,
                   help="memory for members of a streamed tar (pipe:, http) waiting for their pair; past it they "
                   "wait in a temp folder in --out (default 256)")
    p.add_argument("--overwrite", action="store_true", help="replace shards already in --out")
    p.set_defaults(run=run)


def run(args) -> None:
    from data_pipelines.sam import SamConfig, ingest

    cfg = SamConfig(max_side=args.max_side, shard_size=args.shard_size, keep_masks=args.keep_masks,
                    hold_mb=args.hold_mb)
    r = ingest(args.src, args.out, cfg, overwrite=args.overwrite)
    if r.nothing_to_do:
        print(f"nothing to do: {args.out} holds the {r.written} images in {len(r.shards)} shards that these inputs "
              "and settings make (--overwrite makes them again)")
        return
    damaged = f": {', '.join(d['source'] for d in r.damaged)}" if r.damaged else ""
    print(f"wrote {r.written} images in {len(r.shards)} shards to {args.out}; skipped {len(r.skipped)} "
          f"({r.unpaired} unpaired members), damaged tars {len(r.damaged)}{damaged} (see {args.out}/sam_report.json)")
