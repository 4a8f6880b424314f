"""The shapes world: deterministic real shards, truthful metadata, sparse alt-text, resumable writes."""
import hashlib
import io
import json
import tarfile

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from data_pipelines.shapes import (
    ASPECTS,
    BACKGROUNDS,
    COLORS,
    NUM_CLASSES,
    PALETTE,
    POSITIONS,
    SHAPES,
    SIZES,
    ShapesConfig,
    cell_box,
    class_label,
    held_out_pair,
    render_scene,
    sample_scene,
    write_shapes,
)
from pixart.errors import PixArtError


def read(folder):
    urls = sorted(str(p) for p in folder.glob("shapes-*.tar"))
    return list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    write_shapes(out, 300, seed=3, resolution=64, shard_size=128)
    return out


def test_same_seed_same_bytes_other_seed_differs(tmp_path, shards):
    write_shapes(tmp_path / "a", 300, seed=3, resolution=64, shard_size=128, workers=2)
    write_shapes(tmp_path / "b", 40, seed=4, resolution=64, shard_size=128)
    names = sorted(p.name for p in shards.glob("*.tar"))
    assert names == ["shapes-000000.tar", "shapes-000001.tar", "shapes-000002.tar"]
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (shards / name).read_bytes()
    other = [s["png"] for s in read(tmp_path / "b")]
    first = [s["png"] for s in read(shards)][: len(other)]  # the first 40 of seed 3 against all 40 of seed 4
    assert all(a != b for a, b in zip(other, first, strict=True))


def test_shards_are_plain_tars_of_png_json_txt(shards):
    with tarfile.open(shards / "shapes-000002.tar") as tar:
        members = tar.getmembers()
    assert len(members) == 3 * (300 - 256)
    assert {m.name.split(".", 1)[1] for m in members} == {"png", "json", "txt"}
    assert all(m.mtime == 0 and m.uid == 0 for m in members)


def test_metadata_tells_the_truth(shards):
    samples = read(shards)
    assert len(samples) == 300 and len({s["__key__"] for s in samples}) == 300
    aspects = set()
    for s in samples:
        meta, img = json.loads(s["json"]), Image.open(io.BytesIO(s["png"]))
        assert img.mode == "RGB" and img.size == (meta["width"], meta["height"])
        assert meta["width"] % 16 == 0 and meta["height"] % 16 == 0
        assert 0.7 * 64 ** 2 <= meta["width"] * meta["height"] <= 1.6 * 64 ** 2
        aspects.add((meta["width"], meta["height"]))
        assert meta["background"] in BACKGROUNDS and 0 <= meta["aesthetic"] <= 1
        assert (meta["quality"] == "clean") == (meta["aesthetic"] == 1.0)
        assert 1 <= len(meta["objects"]) <= 3
        assert len({o["position"] for o in meta["objects"]}) == len(meta["objects"])
        assert meta["label"] == class_label(meta["objects"]) and 0 <= meta["label"] < NUM_CLASSES
        for o in meta["objects"]:
            assert set(o) == {"shape", "color", "size", "position", "bbox"}
            assert o["shape"] in SHAPES and o["color"] in COLORS and o["size"] in SIZES
            x0, y0, x1, y1 = o["bbox"]
            assert all(isinstance(v, int) for v in o["bbox"])
            assert 0 <= x0 < x1 <= meta["width"] and 0 <= y0 < y1 <= meta["height"]
            cx0, cy0, cx1, cy1 = cell_box(meta["width"], meta["height"], o["position"])
            assert cx0 <= x0 and cy0 <= y0 and x1 <= cx1 and y1 <= cy1  # inside its own cell
            if meta["quality"] == "clean":  # the object is really there, in its color
                pixel = np.asarray(img)[(y0 + y1) // 2, (x0 + x1) // 2].astype(int)
                assert COLORS[np.abs(np.array([PALETTE[c] for c in COLORS]) - pixel).sum(1).argmin()] == o["color"]
    assert len(aspects) >= 3


def test_the_world_covers_every_attribute():
    metas = [render_scene(i)[1] for i in range(400)]
    objects = [o for m in metas for o in m["objects"]]
    assert {o["shape"] for o in objects} == set(SHAPES) and len(SHAPES) >= 6
    assert {o["color"] for o in objects} == set(COLORS) and len(COLORS) >= 8
    assert {o["position"] for o in objects} == set(POSITIONS)
    assert {m["background"] for m in metas} == set(BACKGROUNDS)
    assert len({(m["width"], m["height"]) for m in metas}) == 3  # 64x64, 80x48, 48x80: 16-px steps are coarse
    big = {render_scene(i, ShapesConfig(resolution=128))[0].size for i in range(60)}
    assert big == {(128, 128), (144, 112), (112, 144), (176, 96), (96, 176)} and len(ASPECTS) == 5
    assert 0.35 < np.mean([m["quality"] == "damaged" for m in metas]) < 0.65


def test_alt_text_is_sparse_and_noisy(shards):
    texts = [s["txt"].decode() for s in read(shards)]
    assert all(texts) and np.mean([len(t.split()) for t in texts]) < 3
    metas = [json.loads(s["json"]) for s in read(shards)]
    pairs = list(zip(texts, metas, strict=True))
    informative = [any(o["color"] in t or o["shape"] in t for o in m["objects"]) for t, m in pairs]
    assert 0.2 < np.mean(informative) < 0.6  # sometimes one true attribute, mostly nothing useful
    assert not any(all(o["color"] in t and o["shape"] in t for o in m["objects"]) for t, m in pairs)


def test_rerun_resumes_only_missing_shards(tmp_path):
    out = tmp_path / "s"
    write_shapes(out, 30, seed=1, shard_size=10)
    first = (out / "shapes-000000.tar").stat().st_mtime_ns
    (out / "shapes-000002.tar").unlink()  # as if killed before its rename
    (out / ".shapes-000002.tar.tmp-999").write_bytes(b"half")
    done = []
    write_shapes(out, 30, seed=1, shard_size=10, progress=done.append)
    assert sum(done) == 30 and (out / "shapes-000000.tar").stat().st_mtime_ns == first
    assert sorted(p.name for p in out.iterdir()) == ["shapes-000000.tar", "shapes-000001.tar", "shapes-000002.tar",
                                                     "shapes.json"]
    with pytest.raises(PixArtError, match="different shapes dataset"):
        write_shapes(out, 30, seed=2, shard_size=10)


def test_sizes_config_and_resolution_scaling():
    img, meta = render_scene(np.random.default_rng(0), ShapesConfig(resolution=128, sizes=("large",), aspects=("1:1",)))
    assert img.size == (128, 128) and all(o["size"] == "large" for o in meta["objects"])


def test_side_multiple_24_puts_every_cell_on_the_8px_token_grid(tmp_path):
    """The demo's stage-3 world (72 px, sides multiples of 24): each cell of the 3x3 grid is whole 8 px tokens in
    every aspect ratio, each image is exactly a bucket of the "72/24" table (feature extraction never resamples
    it), and every cell's center has one offset within its token; in a square image a large object sits within a
    pixel of it (a long cell lets it slide along). At the default multiple of 16, a 64 px image's cells are
    21.3 px: three offsets per axis."""
    from pixart.data.buckets import bucket_spec, nearest_bucket, table_for

    table = table_for(*bucket_spec("72/24"))
    cfg = ShapesConfig(resolution=72, side_multiple=24, max_objects=1, sizes=("large",))
    sizes = set()
    for seed in range(100):
        meta = sample_scene(np.random.default_rng([5, seed]), cfg)
        w, h = meta["width"], meta["height"]
        sizes.add((w, h))
        assert nearest_bucket(h, w, table)[1] == (h, w)
        boxes = [cell_box(w, h, p) for p in POSITIONS]
        assert all(v % 8 == 0 for box in boxes for v in box), (w, h)
        # every cell's center at one offset within its token; in square cells the object within a pixel of it
        assert len({((x0 + x1) / 2 % 8, (y0 + y1) / 2 % 8) for x0, y0, x1, y1 in boxes}) == 1
        (o,) = meta["objects"]
        x0, y0, x1, y1 = cell_box(w, h, o["position"])
        if w == h:
            assert abs(o["center"][0] - (x0 + x1) / 2) <= 1 and abs(o["center"][1] - (y0 + y1) / 2) <= 1
    assert sizes == {(72, 72), (96, 48), (48, 96)}
    assert {(x0 + x1) / 2 % 8 for x0, _, x1, _ in (cell_box(64, 64, p) for p in POSITIONS)} == {2.5, 0.0, 5.5}
    with pytest.raises(PixArtError, match="--side-multiple must be 16 or 24, got 20"):
        write_shapes(tmp_path / "bad", 3, resolution=80, side_multiple=20)
    assert not (tmp_path / "bad").exists()
    with pytest.raises(ValueError, match="resolution 72 is not a multiple of side_multiple 16"):
        ShapesConfig(resolution=72)  # image_size would round its sides to 64 px, silently


def test_background_levels_bound_the_background_and_keep_the_default_world():
    """A narrow range draws every background inside it; the default range renders the same bytes as before
    the option existed (the same draws, mapped): the judge's cached world and old shards stay valid."""
    narrow = ShapesConfig(resolution=32, sizes=("large",), backgrounds=("plain",), background_levels=(100, 140))
    for seed in range(20):
        img, meta = render_scene(seed, narrow)
        corner = np.asarray(img, dtype=np.float32)[0, 0]  # objects keep a margin: the corner is background
        assert 100 - 12 <= corner.mean() <= 140 + 12, (seed, corner)  # +-12 is the neutral tint per channel
    default, explicit = render_scene(3)[0], render_scene(3, ShapesConfig(background_levels=(20.0, 235.0)))[0]
    assert default.tobytes() == explicit.tobytes()
    old = np.random.default_rng(7).uniform(20, 235)  # what the background drew before the option
    assert 20 + 215 * np.random.default_rng(7).uniform(0, 1) == old


def world_digest(cfg, n=200):
    """Every scene's metadata and the generator's state after it (what the pixels are drawn from)."""
    h = hashlib.sha256()
    for i in range(n):
        rng = np.random.default_rng([11, i])
        h.update(json.dumps(sample_scene(rng, cfg), sort_keys=True).encode() + rng.bytes(8))
    return h.hexdigest()


def test_two_object_options_off_keep_the_default_world(tmp_path):
    """Digests of the world before the two-object options existed (commit 8da9614): the same draws, so
    the same bytes, and `shapes.json` is unchanged, so folders written before still resume."""
    assert world_digest(ShapesConfig()) == "59fe02e73e935ee70196a4e22b33fe918a94f8511edd9d65e5c408dd8df85b9a"
    assert world_digest(ShapesConfig(holdout=7)) == "9a1e81eb2ca3ec79942fdc4a46b063835d0b37b52c2f4fad983c50bc06dab36d"
    write_shapes(tmp_path / "off", 2, resolution=32)
    write_shapes(tmp_path / "on", 2, resolution=32, two_object_fraction=0.5, pair_holdout=8)
    off, on = (json.loads((tmp_path / d / "shapes.json").read_text())["config"] for d in ("off", "on"))
    assert "two_object_fraction" not in off and "pair_holdout" not in off and "side_multiple" not in off
    write_shapes(tmp_path / "aligned", 2, resolution=48, side_multiple=24)
    assert json.loads((tmp_path / "aligned" / "shapes.json").read_text())["config"]["side_multiple"] == 24
    assert on["two_object_fraction"] == 0.5 and on["pair_holdout"] == 8


def test_held_out_pairs_leave_every_object_many_partners():
    kinds = [(s, c) for s in SHAPES for c in COLORS]
    pairs = [(a, b) for i, a in enumerate(kinds) for b in kinds[i:]]
    held = [(a, b) for a, b in pairs if held_out_pair(a, b, 8)]
    assert len(pairs) == 1176 and len(held) == 126  # of 1008 pairs of two colors: about 1 in 8
    assert all(held_out_pair(b, a, 8) for a, b in held) and not any(held_out_pair(a, b, 0) for a, b in pairs)
    assert not any(a[1] == b[1] for a, b in held)  # one color twice is never held out: no swap would show
    for a in kinds:
        partners = [b for b in kinds if not held_out_pair(a, b, 8)]
        assert len(partners) >= 42
        assert {c for _, c in partners} == set(COLORS) and {s for s, _ in partners} == set(SHAPES)


def test_two_object_fraction_draws_two_objects_and_no_held_out_pair():
    cfg = ShapesConfig(resolution=32, sizes=("large",), two_object_fraction=0.3, pair_holdout=8)
    rng = np.random.default_rng(0)
    scenes = [sample_scene(rng, cfg) for _ in range(2000)]
    counts = [len(s["objects"]) for s in scenes]
    assert set(counts) == {1, 2} and abs(np.mean([n == 2 for n in counts]) - 0.3) < 0.04
    pairs = [s["objects"] for s in scenes if len(s["objects"]) == 2]
    assert all(a["position"] != b["position"] for a, b in pairs)
    assert not any(held_out_pair((a["shape"], a["color"]), (b["shape"], b["color"]), 8) for a, b in pairs)
    in_pairs = {(o["shape"], o["color"]) for p in pairs for o in p}
    assert len(in_pairs) == len(SHAPES) * len(COLORS)  # every object still occurs beside another
    assert {len(s["objects"]) for s in (sample_scene(rng, ShapesConfig(two_object_fraction=1.0)) for _ in range(50))} \
        == {2}


def run_cli(*argv):
    """`pixart data shapes ...` in-process, through the real entry point."""
    from pixart.cli.main import main

    return main(["data", "shapes", *map(str, argv)])


def test_cli_writes_shards_and_rejects_bad_args(tmp_path, capsys):
    assert run_cli("--out", tmp_path / "o", "--count", 5, "--resolution", 32) == 0
    assert len(read(tmp_path / "o")) == 5
    assert run_cli("--out", tmp_path / "two", "--count", 20, "--resolution", 32, "--two-object-fraction", 1,
                   "--pair-holdout", 8) == 0
    assert {len(json.loads(s["json"])["objects"]) for s in read(tmp_path / "two")} == {2}
    for bad, message in ((["--count", 0], "--count must be at least 1"),
                         (["--count", 3, "--resolution", 40], "--resolution must be a multiple of 16"),
                         (["--count", 3, "--resolution", 64, "--side-multiple", 24],
                          "--resolution must be a multiple of 24 and at least 32, got 64"),
                         (["--count", 3, "--background-levels", "200,100"], "--background-levels: need 0 <= LO"),
                         (["--count", 3, "--background-levels", "gray"], "--background-levels: expected LO,HI"),
                         (["--count", 3, "--two-object-fraction", 1.5], "--two-object-fraction must be in [0, 1]"),
                         (["--count", 3, "--pair-holdout", -1], "--pair-holdout must be >= 0")):
        capsys.readouterr()
        assert run_cli("--out", tmp_path / "bad", *bad) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err
        assert not (tmp_path / "bad").exists()
