"""`pixart bench`: the JSON it writes is consistent with itself, and bad input is one line."""
import json

import pytest

from pixart.cli.main import main


def test_bench_compares_with_diffusers_and_writes_consistent_numbers(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--resolution", "64", "--batch", "2", "--tokens", "12", "--iters", "2", "--warmup", "1",
                 "--device", "cpu", "--compare", "diffusers", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert set(r["results"]) == {"ours-padded", "ours", "diffusers"} and r["peak_tflops"] > 0
    assert r["flops_per_img"] > 0
    for s in r["results"].values():
        assert s["img_per_s"] == pytest.approx(2 / s["median_s"])
        assert s["tokens_per_s"] == pytest.approx(s["img_per_s"] * 16)  # (64 / 8 / 2)^2 tokens
        assert s["tflops"] == pytest.approx(r["flops_per_img"] * s["img_per_s"] / 1e12)
        assert s["mfu"] == pytest.approx(s["tflops"] / r["peak_tflops"])
    fastest = min(r["results"][k]["median_s"] for k in ("ours-padded", "ours"))
    assert r["ratio"] == pytest.approx(fastest / r["results"]["diffusers"]["median_s"])
    assert "ratio our fastest/diffusers" in capsys.readouterr().out


def test_bench_refuses_what_it_cannot_time(tmp_path, capsys):
    assert main(["bench", "--model", "DiT-S/2", "--out", str(tmp_path / "b.json")]) == 2
    assert "use a PixArt (not DiT or PixArtMS) model" in capsys.readouterr().err
    assert main(["bench", "--resolution", "60", "--out", str(tmp_path / "b.json")]) == 2
    assert not (tmp_path / "b.json").exists()
