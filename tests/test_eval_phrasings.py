"""Held-out phrasings: deterministic, naming the object, and worded as no training caption (dense or short) is."""
import random
import re

import numpy as np
import pytest

from data_pipelines.relabel.metadata import describe, describe_short
from data_pipelines.shapes import COLORS, POSITIONS, SHAPES, SIZES, ShapesConfig, sample_scene
from pixart.eval.phrasings import KINDS, phrasings

SPECS = [{"shape": s, "color": c, "position": p, "size": z} for s in SHAPES for c in COLORS for p in POSITIONS
         for z in SIZES]
SEEDS = range(6)
SHAPE, COLOR = "|".join(SHAPES), "|".join(COLORS)
MARKS = {  # what makes each kind held out: every phrasing of the kind has it, no training caption does
    "bare": rf"\b({COLOR}) ({SHAPE}) (top|bottom|upper|lower|left|right|center|middle)\b",
    "tags": rf"\b({SHAPE}), ({COLOR})\b",
    "position_first": r"\b(has|there's)\b",
    "imperative": r"\b(draw|put|paint|sketch|add)\b",
    "request": r"\?|\b(you|please|i'd)\b",
    "extra_words": r"\b(simple|just|only|nothing)\b",
    "synonyms": r"\b(top|bottom|upper|lower|middle)-|-(centre|middle|hand)\b|\bcentre\b",
}


@pytest.fixture(scope="module")
def training():
    """Dense and short captions of every one-object spec under many seeds, and of many mixed scenes."""
    out = []
    for i, spec in enumerate(SPECS):
        for seed in range(12):
            meta = {"objects": [spec], "background": ("plain", "gradient", "texture")[(i + seed) % 3],
                    "quality": "clean", "aesthetic": 1.0, "width": 64, "height": (48, 64, 96)[seed % 3]}
            out += [write(meta, random.Random(seed * 7919 + i)) for write in (describe, describe_short)]
    rng = np.random.default_rng(0)
    for i in range(3000):
        meta = sample_scene(rng, ShapesConfig(resolution=64))
        out += [describe(meta, random.Random(i)), describe_short(meta, random.Random(i))]
    return [t.lower() for t in out]


def _norm(text: str) -> str:
    """Case, spacing and a closing period do not make a prompt new (punctuation inside does: "a, b" is not "a b")."""
    return " ".join(text.lower().split()).rstrip(".")


def test_kinds_are_many_and_deterministic():
    assert len(KINDS) >= 6
    spec = SPECS[0]
    for kind in KINDS:
        text = phrasings(spec, kind, seed=3)
        assert text == phrasings(spec, kind, seed=3) and spec["color"] in text and spec["shape"] in text
        assert len({phrasings(spec, kind, s) for s in range(20)}) > 1, kind  # the seed varies the wording
    with pytest.raises(ValueError, match="unknown phrasing kind"):
        phrasings(spec, "poem")


def _template(text: str) -> str:
    """A short caption with its words abstracted: "a big red circle at the upper left" -> "a Z C S at the V H"."""
    for pattern, tag in ((COLOR, "C"), (SHAPE, "S"), ("small|little|large|big", "Z"), ("top|bottom|upper|lower", "V"),
                         ("left|right", "H"), ("center|middle", "M"), ("an", "a")):
        text = re.sub(rf"\b({pattern})\b", tag, text)
    return text


def test_the_training_corpus_reaches_every_short_template():
    """The held-out checks below mean something only if the corpus holds all the short captioner's wordings:
    (size or not) x (4 forms, 6 for a corner whose preposition is "in" or "at") x 4 kinds of cell = 36."""
    one = {_template(describe_short({"objects": [spec]}, random.Random(seed * 7919 + i)))
           for i, spec in enumerate(SPECS) for seed in range(12)}
    assert len(one) == 36, sorted(one)


def test_no_phrasing_is_a_training_caption(training):
    seen = {_norm(t) for t in training}
    same = [p for spec in SPECS for kind in KINDS for seed in SEEDS if _norm(p := phrasings(spec, kind, seed)) in seen]
    assert same == []


@pytest.mark.parametrize("kind", list(KINDS))
def test_each_kind_has_a_mark_no_training_caption_has(kind, training):
    mark = re.compile(MARKS[kind])
    unmarked = [p for spec in SPECS for seed in SEEDS if not mark.search((p := phrasings(spec, kind, seed)).lower())]
    assert unmarked == []
    assert [t for t in training if mark.search(t)] == []
