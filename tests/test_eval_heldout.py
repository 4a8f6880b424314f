"""Held-out prompts: the triples the world never draws, phrased like training captions, scored strictly."""
import numpy as np

from data_pipelines.shapes import POSITIONS, ShapesConfig, held_out, render_scene, sample_scene
from pixart.eval.heldout import heldout_specs, prompt_for, score_heldout, seen_specs, spread
from pixart.eval.judge import Judge


def test_heldout_specs_are_exactly_the_worlds_missing_triples():
    specs = heldout_specs(8)
    assert len(specs) == 54 and all(held_out(s["shape"], s["color"], s["position"], 8) for s in specs)
    cfg = ShapesConfig(resolution=32, max_objects=1, sizes=("large",), holdout=8)
    rng = np.random.default_rng(0)
    drawn = {(o["shape"], o["color"], o["position"]) for _ in range(3000) for o in sample_scene(rng, cfg)["objects"]}
    assert not drawn & {(s["shape"], s["color"], s["position"]) for s in specs}
    pairs = {(c, p) for _, c, p in drawn}
    assert len(pairs) == 72  # every color-position pair still occurs in training


def test_seen_specs_are_distinct_training_triples_fixed_by_seed():
    specs = seen_specs(8, 54, seed=1)
    triples = {(s["shape"], s["color"], s["position"]) for s in specs}
    assert len(triples) == 54 and not any(held_out(*t, 8) for t in triples)
    assert specs == seen_specs(8, 54, seed=1) and specs != seen_specs(8, 54, seed=2)
    assert len(seen_specs(8, 10_000)) == 6 * 8 * 9 - len(heldout_specs(8))  # all of them, never more


def test_prompts_name_the_object_and_are_stable():
    spec = {"shape": "star", "color": "red", "position": "top left", "size": "large"}
    text = prompt_for(spec, 64, 64)
    assert "red" in text and "star" in text and prompt_for(spec, 64, 64) == text
    assert spread(list(range(10)), 3) == [0, 4, 9] and spread([1, 2], 5) == [1, 2]


def test_a_prompt_worded_as_another_differs_only_in_the_object_words():
    spec = {"shape": "star", "color": "orange", "position": "top", "size": "large"}
    text = prompt_for(spec, 64, 64).split()
    for key, value in (("shape", "circle"), ("color", "red")):
        other = prompt_for({**spec, key: value}, 64, 64, worded_as=spec).split()
        changed = [(a, b) for a, b in zip(text, other, strict=True) if a != b]
        # the word itself, and its article where "an orange" becomes "a red"
        assert changed in ([(spec[key] + ",", value + ",")], [(spec[key], value)], [("an", "a"), (spec[key], value)])
    assert prompt_for({**spec, "shape": "circle"}, 64, 64) != prompt_for({**spec, "shape": "circle"}, 64, 64,
                                                                         worded_as=spec)


def test_strict_position_needs_exactly_the_prompted_object():
    judge = Judge.load_or_train()
    rng = np.random.default_rng(1)
    cfg = ShapesConfig(resolution=64, max_objects=1, sizes=("large",), aspects=("1:1",), damaged_fraction=0.0)
    image, scene = render_scene(rng, cfg)
    spec = {k: scene["objects"][0][k] for k in ("shape", "color", "position", "size")}
    assert score_heldout(judge, [image], [spec])["position"] == 1.0
    two = ShapesConfig(resolution=64, max_objects=3, sizes=("large",), aspects=("1:1",), damaged_fraction=0.0)
    while True:  # a scene with two or more objects: the prompted one is there, but not alone
        image, scene = render_scene(rng, two)
        if len(scene["objects"]) >= 2:
            break
    spec = {k: scene["objects"][0][k] for k in ("shape", "color", "position", "size")}
    s = score_heldout(judge, [image], [spec])
    assert s["position_any"] == 1.0 and s["position"] == 0.0


def test_background_noise_is_zero_on_the_worlds_plain_renders_and_the_added_noise_on_noisy_ones():
    """The world's renderer is the reference for a plain background: flat, so 0. Gaussian noise of std 6 added to
    it reads as 6; the world's gradients and textures, which a prompt for a plain background should not get,
    read higher, textures the most."""
    from PIL import Image

    from pixart.eval.heldout import background_noise, far_cells

    assert far_cells("top left") == ["top right", "right", "bottom left", "bottom", "bottom right"]
    assert far_cells("top") == ["bottom left", "bottom", "bottom right"]
    assert far_cells("center") == ["top left", "top right", "bottom left", "bottom right"]

    def renders(background: str, aspect: str = "1:1", count: int = 12) -> tuple[list, list[dict]]:
        cfg = ShapesConfig(resolution=64, max_objects=1, damaged_fraction=0.0, aspects=(aspect,),
                           backgrounds=(background,), sizes=("large",), background_levels=(104.0, 152.0))
        drawn = [render_scene(seed, cfg) for seed in range(count)]
        return [image for image, _ in drawn], [scene["objects"][0] for _, scene in drawn]

    for aspect in ("1:1", "16:9", "3:4"):  # every image alone, an object in each of the 9 cells
        plain, specs = renders("plain", aspect, 60)
        assert {s["position"] for s in specs} == set(POSITIONS)
        assert all(background_noise([image], [spec]) == 0.0 for image, spec in zip(plain, specs, strict=True))
    plain, specs = renders("plain")
    rng = np.random.default_rng(0)
    noisy = [Image.fromarray(np.clip(np.asarray(im, dtype=np.float32) + rng.normal(0, 6, (64, 64, 3)), 0, 255)
                             .round().astype(np.uint8)) for im in plain]
    assert abs(background_noise(noisy, specs) - 6.0) < 0.3
    gradient = background_noise(*renders("gradient", count=100))
    texture = background_noise(*renders("texture", count=100))
    assert 1.0 < gradient < 5.0 < 10.0 < texture
