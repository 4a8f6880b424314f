"""Held-out prompts: shapes-world combinations the training data never showed, and their scores.

A world written with `holdout=k` never draws an object whose (shape, color, position) is
`held_out(..., k)`; every pair of the three still occurs. Prompting exactly those triples asks the
model to compose what it learned separately, which memorising captions cannot do. The prompts
are dense captions of a clean one-object scene, phrased by the same metadata captioner as the
training captions (PixArt's setting: train and prompt in the captioner's language).
"""
from __future__ import annotations

import random

import numpy as np

from data_pipelines.relabel.metadata import describe
from data_pipelines.shapes import COLORS, POSITIONS, SHAPES, cell_box, held_out
from pixart.data.loader_samples import stable_seed


def heldout_specs(every: int, size: str = "large") -> list[dict]:
    """The held-out objects, one per triple, in a fixed order."""
    return [{"shape": s, "color": c, "position": p, "size": size}
            for s in SHAPES for c in COLORS for p in POSITIONS if held_out(s, c, p, every)]


def seen_specs(every: int, n: int, seed: int = 0, size: str = "large") -> list[dict]:
    """n distinct (shape, color, position) triples the training data does show, drawn by `seed`: prompts to
    choose sampler settings on, so that the held-out prompts stay unseen by every choice."""
    seen = [{"shape": s, "color": c, "position": p, "size": size}
            for s in SHAPES for c in COLORS for p in POSITIONS if not held_out(s, c, p, every)]
    return random.Random(seed).sample(seen, min(n, len(seen)))


def prompt_for(spec: dict, width: int, height: int, seed: int = 0, worded_as: dict | None = None) -> str:
    """A dense caption of a clean, plain-background scene holding just `spec`. `worded_as`: the spec whose wording
    (template and word choices) to use, so that two captions differ only in the words that name the object."""
    meta = {"objects": [spec], "background": "plain", "quality": "clean", "aesthetic": 1.0,
            "width": width, "height": height}
    like = worded_as or spec
    return describe(meta, random.Random(stable_seed(seed, like["shape"], like["color"], like["position"])))


def spread(specs: list[dict], n: int) -> list[dict]:
    """n specs evenly spaced through the list (all when n >= len)."""
    if n >= len(specs):
        return list(specs)
    return [specs[round(i * (len(specs) - 1) / max(n - 1, 1))] for i in range(n)]


def far_cells(position: str) -> list[str]:
    """The grid cells that neither hold nor touch `position`'s cell; for the center, which every cell touches, the
    four corners."""
    r, c = divmod(POSITIONS.index(position), 3)
    far = [p for i, p in enumerate(POSITIONS) if max(abs(i // 3 - r), abs(i % 3 - c)) >= 2]
    return far or ["top left", "top right", "bottom left", "bottom right"]


def background_noise(images, specs: list[dict]) -> float:
    """How far a plain background is from flat: the median over the images of the pixels' standard deviation
    (0-255, the mean of the three channels) in `far_cells` of the prompted object. A plain render is 0, the
    world's gradients about 3 and its textures about 14 (medians)."""
    noise = []
    for image, spec in zip(images, specs, strict=True):
        pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
        boxes = [cell_box(image.width, image.height, cell) for cell in far_cells(spec["position"])]
        background = np.concatenate([pixels[y0:y1, x0:x1].reshape(-1, 3) for x0, y0, x1, y1 in boxes])
        noise.append(float(background.std(axis=0).mean()))
    return float(np.median(noise))


def score_heldout(judge, images, specs: list[dict]) -> dict:
    """The judge's per-attribute accuracies of one-object prompts, with `position` made strict: the
    image holds exactly one object and it is in the prompted cell (the judge's own position rule, a
    detection in that cell, is `position_any`: noise with colored specks everywhere passes it). `background`:
    `background_noise`, the prompts asking for a plain one."""
    from pixart.eval.judge import match

    scores = judge.score(images, [[s] for s in specs])
    strict = []
    for found, spec, image in zip(judge.predict(list(images)), specs, images, strict=True):
        hits = match(found, [spec], image.width, image.height)
        strict.append(bool(hits["position"] and hits["position"][0] and hits["count"][0]))
    return {"color": scores["color"], "position": sum(strict) / len(strict), "shape": scores["shape"],
            "position_any": scores["position"], "count": scores["count"], "object": scores["object"],
            "background": background_noise(images, specs), "prompts": len(specs), "judged": scores["judged"]}

