"""Held-out phrasings: one-object prompts worded as users write them, in ways no training caption is.

Issue 19: a model that scores well on prompts in its captioners' own language may follow their
templates more than their words. Each kind below words a spec (shape, color, position, size) in
a way that neither `metadata` nor `metadata-short` ever writes, keeping the world's own color and
shape words (what the judge scores), so a drop from `prompt_for`'s score measures the wording
alone. tests/test_eval_phrasings.py checks that each kind's mark never occurs in training captions.
"""
from __future__ import annotations

import random

from data_pipelines.relabel.metadata import SIZE_WORDS, UPPER, article, short_place, short_where
from pixart.data.loader_samples import stable_seed


def _thing(rng: random.Random, spec: dict) -> str:
    """"red circle", sometimes "large red circle"."""
    size = f"{rng.choice(SIZE_WORDS[spec['size']])} " if rng.random() < 0.3 else ""
    return f"{size}{spec['color']} {spec['shape']}"


def _spot(position: str) -> str:
    """The cell as a noun: "top left corner", "top edge", "left side", "center"."""
    if " " in position:
        return f"{position} corner"
    return {"top": "top edge", "bottom": "bottom edge", "left": "left side", "right": "right side"}.get(
        position, position)


def _synonym(rng: random.Random, position: str) -> str:
    """The cell in words the captioners never use: hyphenated cells and British "centre"."""
    parts = position.split()
    if position == "center":
        return rng.choice(("in the centre", "in the dead centre", "right in the centre"))
    if len(parts) == 2:
        v, h = parts
        return f"in the {rng.choice((f'{v}-{h}', f'{UPPER[v]}-{h}'))} corner"
    if position in UPPER:
        return rng.choice((f"at the {position}-centre", f"in the {UPPER[position]}-middle"))
    return rng.choice((f"on the {position}-hand side", f"at the middle-{position}"))


def bare(rng: random.Random, spec: dict) -> str:
    """No article, preposition or punctuation: "red circle top left"."""
    return f"{_thing(rng, spec)} {short_place(rng, spec['position'])}"


def tags(rng: random.Random, spec: dict) -> str:
    """A tag list, shape first: "circle, red, top left, large"."""
    words = [spec["shape"], spec["color"], short_place(rng, spec["position"])]
    return ", ".join(words + ([spec["size"]] if rng.random() < 0.5 else []))


def position_first(rng: random.Random, spec: dict) -> str:
    """The cell as the subject: "the top left corner has a red circle"."""
    thing, spot = article(_thing(rng, spec)), _spot(spec["position"])
    return rng.choice((f"the {spot} has {thing}", f"in the {spot} there's {thing}"))


def imperative(rng: random.Random, spec: dict) -> str:
    """An order: "draw a red circle in the top left"."""
    verb = rng.choice(("draw", "put", "paint", "sketch", "add"))
    return f"{verb} {article(_thing(rng, spec))} {short_where(rng, spec['position'])}"


def request(rng: random.Random, spec: dict) -> str:
    """A question or a polite request: "can you make a picture with a red circle in the top left?"."""
    what = f"{article(_thing(rng, spec))} {short_where(rng, spec['position'])}"
    return rng.choice((f"can you make a picture with {what}?", f"could you show me {what}?",
                       f"I'd like an image of {what}, please", f"please generate {what}"))


def extra_words(rng: random.Random, spec: dict) -> str:
    """Filler words around the object: "a simple red circle placed in the top left of the image, nothing else"."""
    thing, where = _thing(rng, spec), short_where(rng, spec["position"])
    return rng.choice((f"a simple {thing} placed {where} of the image, nothing else",
                       f"just one {thing}, sitting {where}, on its own",
                       f"only a single {thing} {where} and nothing more"))


def synonyms(rng: random.Random, spec: dict) -> str:
    """Other words for the cell: "a red circle in the upper-left corner", "red circle, dead centre"."""
    thing, where = _thing(rng, spec), _synonym(rng, spec["position"])
    return rng.choice((f"{article(thing)} {where}", f"{thing} {where}"))


KINDS = {f.__name__: f for f in (bare, tags, position_first, imperative, request, extra_words, synonyms)}


def phrasings(spec: dict, kind: str, seed: int = 0) -> str:
    """`spec` worded the `kind` way; the same (spec, kind, seed) always gives the same prompt."""
    if kind not in KINDS:
        raise ValueError(f"unknown phrasing kind {kind!r}; choose from {', '.join(KINDS)}")
    rng = random.Random(stable_seed(seed, kind, spec["shape"], spec["color"], spec["position"], spec["size"]))
    return KINDS[kind](rng, spec)
