"""Two-object prompts: held-out pairs in spread cells, phrased like training captions, scored cell by cell."""
import random

import numpy as np
import pytest

from data_pipelines.relabel.metadata import describe
from data_pipelines.shapes import (
    POSITIONS,
    SIZE_FRACTION,
    ShapesConfig,
    cell_box,
    draw_scene,
    held_out,
    held_out_pair,
    sample_scene,
)
from pixart.eval.judge import Judge
from pixart.eval.two_objects import (
    judge_pair,
    pair_prompt,
    score_two_objects,
    two_object_specs,
)


@pytest.fixture(scope="module")
def judge():
    return Judge.load_or_train()  # the machine's cache: trained once, then read


def draw(objects, side=64, seed=0):
    """A clean, plain-background image of hand-made objects (dicts with shape, color, position), each
    large and centred in its cell, drawn by the world's own renderer."""
    objs = []
    for o in objects:
        x0, y0, x1, y1 = cell_box(side, side, o["position"])
        r = SIZE_FRACTION["large"] * min(x1 - x0, y1 - y0) / 2
        objs.append({**o, "size": "large", "center": [(x0 + x1) / 2, (y0 + y1) / 2], "radius": r})
    meta = {"objects": objs, "width": side, "height": side, "quality": "clean", "background": "plain",
            "aesthetic": 1.0}
    return draw_scene(meta, np.random.default_rng(seed))


def obj(shape, color, position):
    return {"shape": shape, "color": color, "position": position, "size": "large"}


STAR, CIRCLE = obj("star", "red", "top left"), obj("circle", "blue", "bottom right")
PAIR = (STAR, CIRCLE)


def test_specs_are_the_held_out_pairs_in_distinct_spread_cells():
    specs = two_object_specs(8)
    assert len(specs) == 126 and specs == two_object_specs(8)
    kinds = {frozenset([(a["shape"], a["color"]), (b["shape"], b["color"])]) for a, b in specs}
    assert len(kinds) == 126
    for a, b in specs:
        assert held_out_pair((a["shape"], a["color"]), (b["shape"], b["color"]), 8)
        assert a["position"] != b["position"] and a["size"] == b["size"] == "large"
    assert {o["position"] for p in specs for o in p} == set(POSITIONS)
    assert len({(a["position"], b["position"]) for a, b in specs}) == 72  # every ordered pair of cells
    # beside a world that also holds out triples, no prompt includes one: each prompt tests one thing
    assert not any(held_out(o["shape"], o["color"], o["position"], 8) for p in two_object_specs(8, 8) for o in p)


def test_hand_made_images_score_as_expected(judge):
    right = draw([STAR, CIRCLE])
    swapped = draw([{**STAR, "color": "blue"}, {**CIRCLE, "color": "red"}])
    missing = draw([STAR])
    wrong_shape = draw([{**STAR, "shape": "square"}, CIRCLE])
    extra = draw([STAR, CIRCLE, obj("diamond", "green", "center")])
    expected = {  # both_right, both_right_with_shape, swapped, missing, extra
        "right": (right, (True, True, False, False, False)),
        "swapped": (swapped, (False, False, True, False, False)),
        "missing": (missing, (False, False, False, True, False)),
        "wrong shape": (wrong_shape, (True, False, False, False, False)),
        "extra": (extra, (True, True, False, False, True)),
    }
    for name, (image, want) in expected.items():
        v = judge_pair(judge.predict(image), PAIR)
        assert (v.both_right, v.both_right_with_shape, v.swapped, v.missing, v.extra) == want, name
    images = [image for image, _ in expected.values()]
    scores = score_two_objects(judge, images, [PAIR] * len(images))
    assert scores == {"both_right": 0.6, "both_right_with_shape": 0.4, "swapped": 0.2, "missing": 0.2,
                      "extra": 0.2, "prompts": 5}


def test_a_half_swap_counts_and_one_color_twice_never_swaps(judge):
    half = draw([{**STAR, "color": "blue"}, CIRCLE])  # the star took the circle's color: a binding failure
    assert judge_pair(judge.predict(half), PAIR).swapped
    same = ({**STAR, "color": "blue"}, CIRCLE)
    assert not judge_pair(judge.predict(half), same).swapped and judge_pair(judge.predict(half), same).both_right


def test_every_held_out_prompt_drawn_as_asked_is_both_right(judge):
    specs = two_object_specs(8)[::9]
    scores = score_two_objects(judge, [draw(list(p), seed=i) for i, p in enumerate(specs)], specs)
    assert scores["both_right"] == scores["both_right_with_shape"] == 1.0
    assert scores["swapped"] == scores["missing"] == scores["extra"] == 0.0 and scores["prompts"] == len(specs)


WORDS = {"top": ("top", "upper"), "bottom": ("bottom", "lower"), "center": ("center", "middle"),
         "left": ("left",), "right": ("right",)}


def names(caption, o):
    """The caption names the object's color, shape and every word of its position (in one of its forms)."""
    return (o["color"] in caption and o["shape"] in caption
            and all(any(w in caption for w in WORDS[part]) for part in o["position"].split()))


def test_captions_name_both_objects():
    """The training captioner (and the prompts, in its words) names both objects' color, shape and
    position; the two objects share no word, so each hit is that object's."""
    for seed in range(20):
        meta = {"objects": [STAR, CIRCLE], "width": 64, "height": 64, "background": "texture",
                "quality": "clean", "aesthetic": 1.0}
        caption = describe(meta, random.Random(seed))
        assert names(caption, STAR) and names(caption, CIRCLE), caption
    text = pair_prompt(PAIR, 64, 64)
    assert names(text, STAR) and names(text, CIRCLE) and text == pair_prompt(PAIR, 64, 64)
    rng = np.random.default_rng(0)
    cfg = ShapesConfig(resolution=32, sizes=("large",), two_object_fraction=1.0, pair_holdout=8)
    for seed in range(20):  # scenes of the two-object world: both objects named, whatever they are
        scene = sample_scene(rng, cfg)
        caption = describe(scene, random.Random(seed))
        assert len(scene["objects"]) == 2 and all(names(caption, o) for o in scene["objects"]), caption
