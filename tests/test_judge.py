"""The judge: near-perfect on fresh renders at the demo's resolutions, strict matching, cached once."""
import numpy as np
import pytest
import torch

from data_pipelines.shapes import ShapesConfig, draw_scene, render_scene
from pixart.eval.judge import ATTRIBUTES, VERSION, Judge, JudgeTrainConfig, describe, judgeable, match, spec_problem


@pytest.fixture(scope="module")
def judge():
    return Judge.load_or_train()  # the machine's cache: trained once (about 20 s), then read


@pytest.mark.parametrize("resolution", [32, 64, 128])
@pytest.mark.parametrize("damaged", [0.0, 1.0])
def test_self_accuracy_on_fresh_renders(judge, resolution, damaged):
    acc = judge.self_accuracy(resolution, n=150, seed=7, damaged_fraction=damaged)
    assert acc["objects"] > 100 and acc["judged"] == acc["objects"] <= acc["prompted"]
    assert acc["judged_fraction"] == acc["judged"] / acc["prompted"]
    if resolution == 128:
        assert acc["judged_fraction"] == 1.0  # every object is at least 8 px at 128 px
    for attr in ATTRIBUTES:
        assert acc[attr] >= 0.98, (attr, acc)


def scene(objects, width=64, height=64, quality="clean", background="plain"):
    """A hand-made scene: objects as (shape, color, size, position, (cx, cy), radius)."""
    objs = [{"shape": s, "color": c, "size": z, "position": p, "center": list(xy), "radius": r}
            for s, c, z, p, xy, r in objects]
    return {"objects": objs, "width": width, "height": height, "quality": quality, "background": background,
            "aesthetic": 1.0 if quality == "clean" else 0.3}


def test_predict_reads_a_hand_made_scene(judge):
    spec = scene([("star", "red", "large", "top left", (10.5, 10.5), 8.5),
                  ("cross", "blue", "small", "bottom right", (53, 53), 4.8),
                  ("triangle", "yellow", "large", "center", (32, 32), 8.5)])
    image = draw_scene(spec, np.random.default_rng(0))
    found = judge.predict(image)
    got = {(d["shape"], d["color"], d["size"], d["position"]) for d in found}
    assert got == {("star", "red", "large", "top left"), ("cross", "blue", "small", "bottom right"),
                   ("triangle", "yellow", "large", "center")}
    tensor = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255  # a decoded sample
    assert judge.predict([tensor]) == [found]
    assert judge.predict(draw_scene(scene([]), np.random.default_rng(1))) == []


def test_score_is_low_for_the_wrong_images(judge):
    scenes = [render_scene(np.random.default_rng([99, i]), ShapesConfig(resolution=64)) for i in range(40)]
    images, specs = zip(*scenes, strict=True)
    right, wrong = judge.score(images, list(specs)), judge.score(images[1:] + images[:1], list(specs))
    assert right["object"] >= 0.95 and wrong["object"] < 0.3 and wrong["count"] < 0.7


def det(shape, color, position, size="large"):
    return {"shape": shape, "color": color, "position": position, "size": size}


def test_matching_rules():
    found = [det("circle", "red", "top left"), det("square", "blue", "center", "small")]
    # all right
    h = match(found, [det("circle", "red", "top left"), det("square", "blue", "center", "small")], 64, 64)
    assert all(all(v) for v in h.values())
    # right shape and position, wrong color: color and object fail, the rest holds
    h = match(found, [det("circle", "green", "top left")], 64, 64)
    assert h["position"] == [True] and h["shape"] == [True] and h["color"] == [False] and h["object"] == [False]
    assert h["count"] == [False]  # two found, one asked for
    # nothing in the asked cell: every attribute of that object fails
    h = match(found, [det("circle", "red", "bottom"), det("square", "blue", "center", "small")], 64, 64)
    assert h["position"] == [False, True] and h["color"] == [False, True] and h["object"] == [False, True]
    # a prompt without a position matches anywhere; one without a shape scores no shape
    h = match(found, [{"color": "blue", "shape": "square"}, {"color": "red", "position": "top left"}], 64, 64)
    assert h["object"] == [True, True] and h["shape"] == [True] and h["position"] == [True]
    # the object must be one detection: blue circle is not "a blue thing + a circle elsewhere"
    assert match(found, [{"color": "blue", "shape": "circle"}], 64, 64)["object"] == [False]
    # a small object at 32 px is too small to judge: not scored, its cell ignored in the count
    h = match([det("circle", "red", "top left"), det("star", "red", "bottom", "small")],
              [det("circle", "red", "top left"), det("square", "blue", "bottom", "small")], 32, 32)
    assert h["object"] == [True] and h["count"] == [True]
    assert not judgeable({"size": "small"}, 32, 32) and judgeable({"size": "large"}, 32, 32)


def test_cache_is_written_once_and_reused(tmp_path, monkeypatch):
    cfg = JudgeTrainConfig(scenes=30, epochs=1)
    first = Judge.load_or_train(tmp_path, cfg)
    path = Judge.cache_path(tmp_path, cfg)
    assert [p.name for p in tmp_path.iterdir()] == [path.name] and path.name.startswith("judge-")
    assert Judge.cache_path(tmp_path).name == f"judge-{VERSION}.safetensors"

    def no_training(*a, **k):
        raise AssertionError("retrained although cached")

    monkeypatch.setattr(Judge, "train", classmethod(no_training))
    again = Judge.load_or_train(tmp_path, cfg)
    for a, b in zip(first.net.state_dict().values(), again.net.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    monkeypatch.undo()
    path.write_bytes(b"garbage")  # a corrupt cache is replaced, not trusted
    Judge.load_or_train(tmp_path, cfg)
    assert Judge.load(path) is not None


def test_training_is_deterministic():
    cfg = JudgeTrainConfig(scenes=30, epochs=1)
    a, b = Judge.train(cfg).net.state_dict(), Judge.train(cfg).net.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_score_says_how_many_objects_were_judged(judge):
    """At 32 px small objects are too small to judge: the accuracy covers only the large ones."""
    scenes = [render_scene(np.random.default_rng([5, i]), ShapesConfig(resolution=32)) for i in range(30)]
    images, specs = zip(*scenes, strict=True)
    acc = judge.score(images, list(specs))
    prompted = sum(len(s["objects"]) for s in specs)
    judged = sum(judgeable(o, s["width"], s["height"]) for s in specs for o in s["objects"])
    assert (acc["prompted"], acc["judged"], acc["objects"]) == (prompted, judged, judged) and 0 < judged < prompted
    assert acc["judged_fraction"] == pytest.approx(judged / prompted)
    line = describe(acc)
    assert line.startswith(f"object {acc['object']:.1%} of {judged} judged objects")
    assert f"of {prompted} prompted" in line
    assert f"{prompted - judged} too small to judge" in line


def test_spec_problem_names_what_the_judge_cannot_score():
    assert spec_problem({"objects": [{"color": "red", "shape": "star"}]}) is None and spec_problem([]) is None
    assert spec_problem({"foo": 1}) == 'KEY.json has no "objects" list (not a shapes-world scene spec)'
    assert spec_problem({"objects": [{"size": "huge"}]}) == "unknown size 'huge' (known: small, large)"
    assert spec_problem({"objects": [3]}) == 'KEY.json "objects" holds something other than JSON objects'
    nothing = {"object": float("nan"), "judged": 0, "prompted": 0, "judged_fraction": float("nan")}
    assert describe(nothing) == "object n/a of 0 judged objects (n/a of 0 prompted; 0 too small to judge)"
