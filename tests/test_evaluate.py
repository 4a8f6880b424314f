import json

import pytest

from pixart.cli.main import main


def test_eval_scores_shards_and_prints_the_judges_own_accuracy(tmp_path, capsys):
    assert main(["data", "shapes", "--out", str(tmp_path / "s"), "--count", "40", "--resolution", "64",
                 "--shard-size", "8"]) == 0
    # a corrupt sample among good ones is counted, not fatal
    (tmp_path / "s" / "junk.tar").write_bytes(b"not a tar at all" * 40)
    assert main(["eval", str(tmp_path / "s"), "--out", str(tmp_path / "m.json")]) == 0
    out = capsys.readouterr().out
    assert "judged 40 images" in out and "judge's own accuracy at 64 px" in out
    assert f"eval: {tmp_path / 's' / 'junk.tar'}: damaged: nothing could be read (ReadError: " in out
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["resolution"] == 64
    assert metrics["scores"]["images"] == 40 and metrics["scores"]["object"] >= 0.98  # real renders: the truth
    assert set(metrics["judge_self_accuracy"]) >= {"color", "shape", "position", "count"}
    assert main(["eval", str(tmp_path / "s"), "--limit", "10"]) == 0  # across shards of 8
    assert "judged 10 images" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="2"):
        main(["eval", str(tmp_path / "s"), "--limit", "0"])
    assert "pixart eval: error: argument --limit: 0 is not a positive integer" in capsys.readouterr().err


def test_eval_without_specs_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "x.tar").write_bytes(b"")
    assert main(["eval", str(tmp_path / "e")]) == 2
    said = capsys.readouterr()
    assert "no images with a KEY.json scene spec" in said.err
    assert f"eval: {tmp_path / 'e' / 'x.tar'}: damaged: nothing could be read (ReadError: " in said.out


def shard(path, samples):
    """A tar of (key, image or None, spec as a Python value or raw bytes) samples."""
    import io

    from conftest import write_tar

    members = []
    for key, image, spec in samples:
        if image is not None:
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            members.append((f"{key}.png", buf.getvalue()))
        members.append((f"{key}.json", spec if isinstance(spec, bytes) else json.dumps(spec).encode()))
    return write_tar(path, members)


def renders(n, resolution, seed=0):
    import numpy as np

    from data_pipelines.shapes import ShapesConfig, render_scene

    return [render_scene(np.random.default_rng([seed, i]), ShapesConfig(resolution=resolution)) for i in range(n)]


def strict_json(path):
    """json.loads, refusing NaN and Infinity as every strict reader does."""
    def refuse(c):
        raise ValueError(f"{path}: {c} is not JSON")
    return json.loads(path.read_text(), parse_constant=refuse)


def test_samples_the_judge_cannot_score_are_skipped_counted_and_explained(tmp_path, capsys):
    good = renders(6, 64)
    ultraviolet = {**good[0][1], "objects": [{**good[0][1]["objects"][0], "color": "ultraviolet"}]}
    grey = {**good[1][1], "objects": [{**good[1][1]["objects"][0], "color": "grey"}]}
    (tmp_path / "s").mkdir()
    shard(tmp_path / "s" / "a.tar", [(f"{i:03d}", im, spec) for i, (im, spec) in enumerate(good)] + [
        ("sa1b", good[0][0], {"image": {"width": 64}, "annotations": []}),  # SA-1B's JSON: KeyError 'objects'
        ("foo", good[0][0], {"foo": 1}),
        ("uv", good[0][0], ultraviolet), ("grey", good[1][0], grey),  # these scored 0 silently
        ("bad", good[0][0], b"{not json"), ("noimg", None, good[0][1])])
    assert main(["eval", str(tmp_path / "s"), "--out", str(tmp_path / "m.json")]) == 0
    out = capsys.readouterr().out
    assert "judged 6 images (6 skipped)" in out
    foreign = 'KEY.json has no "objects" list (not a shapes-world scene spec)'
    assert f"skipped 2: {foreign} (first: {tmp_path}/s/a.tar sa1b)" in out
    known = "known: red, orange, yellow, green, cyan, blue, purple, pink"
    assert f"skipped 1: unknown color 'ultraviolet' ({known}) (first: {tmp_path}/s/a.tar uv)" in out
    assert f"skipped 1: unknown color 'grey' ({known})" in out
    assert "skipped 1: KEY.json is not valid JSON" in out and "skipped 1: no image" in out
    metrics = strict_json(tmp_path / "m.json")
    assert metrics["skipped"] == 6 and metrics["scores"]["images"] == 6 and metrics["scores"]["object"] >= 0.95
    assert metrics["skipped_reasons"]['KEY.json has no "objects" list (not a shapes-world scene spec)'] == 2
    # nothing scorable: one line naming the input and why
    (tmp_path / "t").mkdir()
    shard(tmp_path / "t" / "b.tar", [("sa1b", good[0][0], {"annotations": []})])
    assert main(["eval", str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f'pixart eval: error: {tmp_path / "t"}: no images with a KEY.json scene spec to judge (1 samples '
                   f'skipped, most for: KEY.json has no "objects" list (not a shapes-world scene spec); '
                   f'e.g. {tmp_path}/t/b.tar sa1b)']


def test_mixed_sizes_are_judged_per_resolution_and_the_json_is_valid(tmp_path, capsys):
    small, mid, big = renders(1, 16), renders(3, 32, seed=1), renders(3, 64, seed=2)
    no_position = [(im, {**spec, "objects": [{k: v for k, v in o.items() if k != "position"}
                                             for o in spec["objects"]]}) for im, spec in big]
    (tmp_path / "s").mkdir()
    shard(tmp_path / "s" / "a.tar", [(f"{i:03d}", im, spec) for i, (im, spec) in enumerate(small + mid + no_position)])
    assert main(["eval", str(tmp_path / "s"), "--out", str(tmp_path / "m.json")]) == 0
    out = capsys.readouterr().out
    assert "nan" not in out.lower()  # a 16 px first image printed [nan%] and wrote NaN
    assert "judged 6 images (1 skipped); judge's own accuracy at 32 px (3 images), 64 px (3 images) in brackets" in out
    assert "skipped 1: image smaller than 32 px, the judge's minimum" in out
    assert "at 32 px: object" in out and "at 64 px: object" in out
    metrics = strict_json(tmp_path / "m.json")
    assert metrics["resolution"] is None and metrics["judge_self_accuracy"] is None  # two resolutions: see below
    assert sorted(metrics["by_resolution"]) == ["32", "64"]
    assert metrics["by_resolution"]["64"]["images"] == 3
    assert metrics["by_resolution"]["64"]["scores"]["position"] is None  # no prompt gave one: null, not NaN
    assert metrics["by_resolution"]["32"]["judge_self_accuracy"]["color"] >= 0.95


def test_out_is_checked_before_the_judging(tmp_path, capsys, monkeypatch):
    from pixart.eval import judge

    assert main(["data", "shapes", "--out", str(tmp_path / "s"), "--count", "4", "--resolution", "32"]) == 0
    capsys.readouterr()

    def no_work(*a, **k):
        raise AssertionError("the judging started before --out was checked")

    monkeypatch.setattr(judge.Judge, "load_or_train", no_work)
    (tmp_path / "dir").mkdir()
    for out, said in ((tmp_path / "dir", f"--out {tmp_path / 'dir'} is a folder; name the JSON file"),
                      (f"{tmp_path}/new/", f"--out {tmp_path}/new/ is a folder"),
                      (tmp_path / "no" / "m.json", f"{tmp_path / 'no'} is not a folder this user can write in")):
        assert main(["eval", str(tmp_path / "s"), "--out", str(out)]) == 2
        assert said in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
