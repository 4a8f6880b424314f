"""`pixart eval`: judge images against the scenes their prompts describe."""
from __future__ import annotations

import json

from pixart.cli import positive_int


def add_parser(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="score images against their prompts' objects with the shapes-world judge",
        description="Read shards of images with KEY.json scene specs (the shapes world's metadata, or "
        "generated samples written the same way) and print per-attribute accuracy (color, shape, size, "
        "position, count, whole object), with the judge's own accuracy on fresh renders at the same "
        "resolution beside it, so every number comes with its error bar (per resolution when sizes are mixed). "
        "Samples the judge cannot score (no image, no or foreign JSON, an attribute value the shapes world lacks, "
        "images under 32 px) are skipped, counted and their reasons printed; accuracies of nothing are n/a (null "
        "in --out).",
    )
    p.add_argument("shards", nargs="+", help="SHARDS: folders, globs, brace patterns or URLs")
    p.add_argument("--out", help="also write the metrics to this JSON file (atomically; checked before the work)")
    p.add_argument("--limit", type=positive_int, default=None, help="score at most this many images (default: all)")
    p.set_defaults(run=run)


def run(args) -> None:
    from collections import Counter

    from pixart.atomic import atomic_write
    from pixart.cli import check_out_file
    from pixart.data.shards import resolve_shards
    from pixart.data.tars import TarDamage, iter_samples
    from pixart.errors import PixArtError
    from pixart.eval.judge import ATTRIBUTES, Judge, describe, percent

    if args.out:
        check_out_file(args.out, "metrics.json", "JSON")  # now, not after the judging
    images, specs, skipped, first = [], [], Counter(), {}
    for url in resolve_shards(args.shards):
        if args.limit and len(specs) >= args.limit:
            break
        damage = TarDamage()
        for sample in iter_samples(url, damage):
            try:
                image, spec = judgeable(sample)
            except ValueError as e:  # counted and explained, never fatal
                skipped[str(e)] += 1
                first.setdefault(str(e), f"{url} {sample.get('__key__', '?')}")
                continue
            images.append(image)
            specs.append(spec)
            if args.limit and len(specs) >= args.limit:
                break
        if damage.error:
            print(f"eval: {url}: damaged: {damage.reason()}")
    n_skipped = sum(skipped.values())
    if not specs:
        why = "".join(f" ({n_skipped} samples skipped, most for: {r}; e.g. {first[r]})"
                      for r, _ in skipped.most_common(1))
        raise PixArtError(f"{' '.join(args.shards)}: no images with a KEY.json scene spec to judge{why}")
    judge = Judge.load_or_train()
    scores = judge.score(images, specs)
    groups = {}  # mixed sizes: each resolution has its own error bar, so its own scores
    for image, spec in zip(images, specs, strict=True):
        groups.setdefault(world_side(image), ([], []))[0].append(image)
        groups[world_side(image)][1].append(spec)
    sides = sorted(groups)
    own = {side: judge.self_accuracy(side) for side in sides}
    by_side = {side: judge.score(*groups[side]) if len(sides) > 1 else scores for side in sides}
    at = ", ".join(f"{side} px" + (f" ({len(groups[side][0])} images)" if len(sides) > 1 else "") for side in sides)
    print(f"judged {scores['images']} images ({n_skipped} skipped); judge's own accuracy at {at} in brackets")
    for attr in ATTRIBUTES:
        print(f"  {attr:9s} {percent(scores[attr]):>7s}   [{', '.join(percent(o[attr]) for o in own.values())}]")
    print("  " + describe(scores))
    if len(sides) > 1:
        for side in own:
            print(f"  at {side} px: " + describe(by_side[side]))
    for reason, n in skipped.most_common():
        print(f"  skipped {n}: {reason} (first: {first[reason]})")
    if args.out:
        single = next(iter(own)) if len(own) == 1 else None
        metrics = {"scores": scores, "resolution": single, "judge_self_accuracy": own.get(single),
                   "by_resolution": {str(side): {"images": len(groups[side][0]), "scores": by_side[side],
                                                 "judge_self_accuracy": own[side]} for side in own},
                   "skipped": n_skipped, "skipped_reasons": dict(skipped.most_common())}
        atomic_write(args.out, json.dumps(no_nan(metrics), indent=2, allow_nan=False))


def judgeable(sample: dict):
    """(image, scene spec) of a sample, or ValueError saying why the judge cannot score it."""
    from pixart.data.tars import decode_image
    from pixart.eval.judge import MIN_RESOLUTION, spec_problem

    image = decode_image(sample)  # ValueError: no image, or a broken one
    if "json" not in sample:
        raise ValueError("no KEY.json scene spec")
    try:
        spec = json.loads(sample["json"])
    except ValueError:
        raise ValueError("KEY.json is not valid JSON") from None
    if world_side(image) < MIN_RESOLUTION:  # no object is big enough to judge, nor does the judge know the scale
        raise ValueError(f"image smaller than {MIN_RESOLUTION} px, the judge's minimum")
    problem = spec_problem(spec)
    if problem:
        raise ValueError(problem)
    return image, spec


def world_side(image) -> int:
    """The shapes world's --resolution of an image: its area's side, to 16 px (aspect ratios keep the area)."""
    return 16 * round((image.width * image.height) ** 0.5 / 16)


def no_nan(obj):
    """Accuracies of nothing (NaN) as null: JSON has no NaN, and readers choke on it."""
    if isinstance(obj, float) and obj != obj:
        return None
    if isinstance(obj, dict):
        return {k: no_nan(v) for k, v in obj.items()}
    return obj
