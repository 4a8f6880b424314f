"""`pixart data score-aesthetic`: per-shard aesthetic scores as sidecars, and the kept fraction at a threshold."""
from __future__ import annotations

from pixart.cli import pick_device, positive_int


def add_parser(sub) -> None:
    p = sub.add_parser(
        "score-aesthetic",
        help="aesthetic scores of shard samples as sidecar files",
        description="Write DIR/<shard>.aesthetic.jsonl (one {\"__key__\", \"score\"} per sample) for every shard "
        "and DIR/aesthetic-summary.json, and report the fraction kept at --threshold. Samples that cannot be "
        "scored are skipped and counted by reason. A rerun skips the shards an earlier run finished with the same "
        "input and scorer (a killed job resumes; a new --threshold is counted without scoring again). "
        "Scorers: 'shapes' reads the shapes world's metadata; 'laion' is "
        "LAION's improved aesthetic predictor (CLIP image embedding -> MLP). Exits 1 while a damaged shard is left "
        "for a rerun to retry.",
    )
    p.add_argument("shards", nargs="+", help="SHARDS: folder, glob, brace pattern or webdataset URL")
    p.add_argument("--out", required=True, help="folder for the sidecar files")
    p.add_argument("--scorer", choices=("shapes", "laion"), default="shapes",
                   help="shapes: read the shapes world's metadata; laion: LAION's predictor (default shapes)")
    p.add_argument("--model", help="laion: CLIP model folder (CLIPVisionModelWithProjection + CLIPImageProcessor)")
    p.add_argument("--head", help="laion: MLP head weights (default: MODEL/aesthetic_head.safetensors; "
                   "a .pth state dict is read with weights_only)")
    p.add_argument("--threshold", type=float, default=None,
                   help="keep samples scoring at least this (default 0.5 for shapes, 5.0 for laion)")
    p.add_argument("--batch-size", type=positive_int, default=32, help="images scored at once (default 32)")
    p.add_argument("--device", default="cpu", help="laion: torch device of the CLIP model (default cpu)")
    p.set_defaults(run=run)


def run(args) -> int:
    import math

    from tqdm import tqdm

    from data_pipelines.aesthetic import DEFAULT_THRESHOLD, LaionScorer, ShapesScorer, score_shards
    from pixart.atomic import check_out_folder
    from pixart.data.shards import check_unique_names, resolve_shards
    from pixart.errors import PixArtError

    shards = resolve_shards(args.shards)
    check_unique_names(shards)  # before loading any model
    check_out_folder(args.out)
    if args.threshold is not None and not math.isfinite(args.threshold):
        raise PixArtError(f"--threshold {args.threshold}: give a finite score")
    if args.scorer == "laion":
        if not args.model:
            raise PixArtError("--scorer laion needs --model PATH (a CLIP model folder)")
        scorer = LaionScorer(args.model, args.head, device=pick_device(args.device))
    else:
        scorer = ShapesScorer()
    threshold = DEFAULT_THRESHOLD[args.scorer] if args.threshold is None else args.threshold
    with tqdm(unit="img", desc="score-aesthetic") as bar:
        s = score_shards(shards, args.out, scorer, threshold, batch_size=args.batch_size, progress=bar.update)
    broken = [r for r in s.shards if r.error]
    why = " (" + "; ".join(f"{n}: {reason}" for reason, n in s.reasons.most_common()) + ")" if s.skipped else ""
    earlier = f" ({s.reused} of them by an earlier run)" if s.reused else ""
    print(f"{s.samples} samples scored in {len(s.shards)} shards{earlier}, {s.skipped} skipped{why}; "
          f"kept {s.kept} ({s.kept_fraction:.1%}) at {args.scorer} >= {threshold}" +
          (f"; {len(broken)} shards damaged: {', '.join(r.name for r in broken)}; rerun to retry" if broken else ""))
    return 1 if broken else 0  # shards left for a rerun
