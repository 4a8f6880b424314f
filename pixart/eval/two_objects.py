"""Two-object prompts: pairs of objects the training data never showed together, and their scores.

PixArt's claim is text-image alignment from dense captions, and the hard part of alignment is
binding: "a red star on the left and a blue circle on the right" must not come out as a blue star
and a red circle. A world written with `pair_holdout=k` never shows a `held_out_pair(..., k)` in
one scene, though each object occurs with most other partners; prompting exactly those pairs asks
the model to bind attributes it learned separately. The judge reads each prompted cell:

- `both_right`: each prompted cell holds an object of its prompted color (color and position, the
  attributes the judge reads analytically); `both_right_with_shape` also needs both shapes right;
- `swapped`: a prompted cell shows the other object's color (the two colors differ), the binding
  failure itself;
- `missing`: at least one prompted cell is empty; `extra`: objects outside the two cells.

Prompts are large objects, judgeable at 32 px and up: a smaller object would count as missing.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, fields

from data_pipelines.relabel.metadata import describe
from data_pipelines.shapes import COLORS, POSITIONS, SHAPES, held_out, held_out_pair
from pixart.data.loader_samples import stable_seed

Pair = tuple[dict, dict]  # two objects: shape, color, position, size
KINDS = [(s, c) for s in SHAPES for c in COLORS]  # every (shape, color) object
CELL_PAIRS = [(p, q) for p in POSITIONS for q in POSITIONS if p != q]  # 72 ordered pairs of distinct cells
CELL_STRIDE = 29  # coprime to 72: consecutive prompts land far apart; 72 in a row use every cell pair


def held_out_pairs(every: int) -> list[tuple[tuple[str, str], tuple[str, str]]]:
    """The held-out unordered pairs of (shape, color), in a fixed order."""
    return [(a, b) for i, a in enumerate(KINDS) for b in KINDS[i:] if held_out_pair(a, b, every)]


def _place(a: tuple[str, str], b: tuple[str, str], start: int, holdout: int, size: str) -> Pair:
    """a and b in the first cell pair from `start` on where neither is a held-out (shape, color,
    position) triple of a world written with `holdout`: each prompt tests one thing."""
    for k in range(len(CELL_PAIRS)):
        cells = CELL_PAIRS[(start + k) % len(CELL_PAIRS)]
        if not any(held_out(s, c, p, holdout) for (s, c), p in zip((a, b), cells, strict=True)):
            return tuple({"shape": s, "color": c, "position": p, "size": size}
                         for (s, c), p in zip((a, b), cells, strict=True))
    raise ValueError(f"no two cells hold {a} and {b} outside the held-out triples")


def two_object_specs(every: int, holdout: int = 0, size: str = "large") -> list[Pair]:
    """One prompt per held-out pair, its two objects in two distinct cells spread over the grid."""
    return [_place(a, b, k * CELL_STRIDE, holdout, size) for k, (a, b) in enumerate(held_out_pairs(every))]


def pair_prompt(pair: Pair, width: int, height: int, seed: int = 0) -> str:
    """A dense caption of a clean, plain-background scene holding just the two objects, in the
    training captioner's words."""
    meta = {"objects": list(pair), "background": "plain", "quality": "clean", "aesthetic": 1.0,
            "width": width, "height": height}
    key = [o[k] for o in pair for k in ("shape", "color", "position")]
    return describe(meta, random.Random(stable_seed(seed, *key)))


@dataclass(frozen=True)
class PairVerdict:
    """What the judge saw in one image against its two prompted objects (see the module doc)."""
    both_right: bool
    both_right_with_shape: bool
    swapped: bool
    missing: bool
    extra: bool


def judge_pair(found: list[dict], pair: Pair) -> PairVerdict:
    """One image's detections (the judge finds at most one object per cell) against its two objects."""
    a, b = pair
    by_cell = {d["position"]: d for d in found}
    da, db = by_cell.get(a["position"]), by_cell.get(b["position"])
    missing = da is None or db is None
    colors = not missing and da["color"] == a["color"] and db["color"] == b["color"]
    shapes = colors and da["shape"] == a["shape"] and db["shape"] == b["shape"]
    swapped = a["color"] != b["color"] and ((da is not None and da["color"] == b["color"])
                                            or (db is not None and db["color"] == a["color"]))
    extra = any(d["position"] not in (a["position"], b["position"]) for d in found)
    return PairVerdict(colors, shapes, swapped, missing, extra)


def score_two_objects(judge, images, spec_pairs: list[Pair]) -> dict:
    """The share of images with each verdict (`both_right`, `both_right_with_shape`, `swapped`, `missing`,
    `extra`), and `prompts`, the number of images."""
    images = list(images)
    verdicts = [judge_pair(found, pair) for found, pair in zip(judge.predict(images), spec_pairs, strict=True)]
    out = {f.name: sum(getattr(v, f.name) for v in verdicts) / len(verdicts) if verdicts else float("nan")
           for f in fields(PairVerdict)}
    out["prompts"] = len(verdicts)
    return out

