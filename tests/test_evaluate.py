import json

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
    assert main(["eval", str(tmp_path / "s"), "--limit", "0"]) == 2
    assert "--limit 0: must be positive" in capsys.readouterr().err


def test_eval_without_specs_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "x.tar").write_bytes(b"")
    assert main(["eval", str(tmp_path / "e")]) == 2
    said = capsys.readouterr()
    assert "no images with a KEY.json scene spec" in said.err
    assert f"eval: {tmp_path / 'e' / 'x.tar'}: damaged: nothing could be read (ReadError: " in said.out
