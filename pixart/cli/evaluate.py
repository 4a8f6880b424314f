"""`pixart eval`: judge images against the scenes their prompts describe."""
from __future__ import annotations

import json


def add_parser(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="score images against their prompts' objects with the shapes-world judge",
        description="Read shards of images with KEY.json scene specs (the shapes world's metadata, or "
        "generated samples written the same way) and print per-attribute accuracy (color, shape, size, "
        "position, count, whole object), with the judge's own accuracy on fresh renders at the same "
        "resolution beside it, so every number comes with its error bar.",
    )
    p.add_argument("shards", nargs="+", help="SHARDS: folders, globs, brace patterns or URLs")
    p.add_argument("--out", help="also write the metrics to this JSON file (atomically)")
    p.add_argument("--limit", type=int, default=None, help="score at most this many images")
    p.set_defaults(run=run)


def run(args) -> None:
    from pixart.atomic import atomic_write
    from pixart.data.shards import resolve_shards
    from pixart.data.tars import TarDamage, decode_image, iter_samples
    from pixart.errors import PixArtError
    from pixart.eval.judge import ATTRIBUTES, Judge, describe

    if args.limit is not None and args.limit < 1:
        raise PixArtError(f"--limit {args.limit}: must be positive")
    images, specs, skipped = [], [], 0
    for url in resolve_shards(args.shards):
        if args.limit and len(specs) >= args.limit:
            break
        damage = TarDamage()
        for sample in iter_samples(url, damage):
            try:
                decoded, spec = decode_image(sample), json.loads(sample["json"])
            except (ValueError, KeyError):  # no image, undecodable, or no spec: counted, never fatal
                skipped += 1
                continue
            images.append(decoded)
            specs.append(spec)
            if args.limit and len(specs) >= args.limit:
                break
        if damage.error:
            print(f"eval: {url}: damaged: {damage.reason()}")
    if not specs:
        raise PixArtError(f"{' '.join(args.shards)}: no images with a KEY.json scene spec to judge")
    judge = Judge.load_or_train()
    scores = judge.score(images, specs)
    side = 16 * round((images[0].width * images[0].height) ** 0.5 / 16)  # the world's --resolution
    own = judge.self_accuracy(side)
    print(f"judged {scores['images']} images ({skipped} skipped); judge's own accuracy at {side} px in brackets")
    for attr in ATTRIBUTES:
        print(f"  {attr:9s} {scores[attr]:7.1%}   [{own[attr]:.1%}]")
    print("  " + describe(scores))
    if args.out:
        atomic_write(args.out, json.dumps({"scores": scores, "judge_self_accuracy": own, "resolution": side,
                                           "skipped": skipped}, indent=2))
