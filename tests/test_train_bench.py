"""`pixart bench`: the JSON it writes is consistent with itself, and bad input is one line."""
import copy
import json

import pytest
import torch
from tolerance import adam_steps, eps

from pixart.cli.main import main
from pixart.train.bench import MasterWeightAdamW


def test_bench_compares_with_diffusers_and_writes_consistent_numbers(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--resolution", "64", "--batch", "2", "--tokens", "12", "--iters", "2", "--warmup", "1",
                 "--device", "cpu", "--compare", "diffusers", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert list(r["results"]) == ["ours-padded", "+trim", "+fused-adamw", "diffusers"] and r["peak_tflops"] > 0
    assert r["config"]["precision"] == "fp32"  # a CPU's default
    assert r["flops_per_img"] > 0
    for s in r["results"].values():
        assert s["img_per_s"] == pytest.approx(2 / s["median_s"])
        assert s["tokens_per_s"] == pytest.approx(s["img_per_s"] * 16)  # (64 / 8 / 2)^2 tokens
        assert s["tflops"] == pytest.approx(r["flops_per_img"] * s["img_per_s"] / 1e12)
        assert s["mfu"] == pytest.approx(s["tflops"] / r["peak_tflops"])
    fastest = min(r["results"][k]["median_s"] for k in ("ours-padded", "+trim", "+fused-adamw"))
    assert r["ratio"] == pytest.approx(fastest / r["results"]["diffusers"]["median_s"])
    assert "ratio our fastest/diffusers" in capsys.readouterr().out


def test_bench_refuses_what_it_cannot_time(tmp_path, capsys):
    assert main(["bench", "--model", "DiT-S/2", "--out", str(tmp_path / "b.json")]) == 2
    assert "use a PixArt (not DiT or PixArtMS) model" in capsys.readouterr().err
    assert main(["bench", "--resolution", "60", "--out", str(tmp_path / "b.json")]) == 2
    assert not (tmp_path / "b.json").exists()


def test_out_is_checked_before_the_timing(tmp_path, capsys, monkeypatch):
    import pixart.train.bench as bench

    def no_work(*a, **k):
        raise AssertionError("the timing started before --out was checked")

    monkeypatch.setattr(bench, "run_bench", no_work)
    (tmp_path / "dir").mkdir()
    for out, said in ((f"{tmp_path}/bdir/", f"--out {tmp_path}/bdir/ is a folder; name the JSON file, e.g. "
                                            f"{tmp_path}/bdir/bench.json"),  # it wrote a FILE named bdir
                      (tmp_path / "dir", f"--out {tmp_path / 'dir'} is a folder"),
                      (tmp_path / "no" / "b.json", f"{tmp_path / 'no'} is not a folder this user can write in")):
        assert main(["bench", "--device", "cpu", "--out", str(out)]) == 2
        assert said in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir"]


def test_bf16_rows_add_master_weights(tmp_path):
    out = tmp_path / "bench.json"
    assert main(["bench", "--resolution", "32", "--tokens", "6", "--iters", "1", "--warmup", "0", "--device", "cpu",
                 "--precision", "bf16", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert list(r["results"]) == ["ours-padded", "+trim", "+fused-adamw", "+bf16-weights"]
    assert r["config"]["precision"] == "bf16"


def test_master_weight_adamw_steps_like_fp32_adamw():
    torch.manual_seed(0)
    ref = torch.nn.Linear(16, 16)
    model = copy.deepcopy(ref).to(torch.bfloat16)
    ours = MasterWeightAdamW(model.parameters(), lr=1e-2, weight_decay=0.03)
    plain = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.03)
    for _ in range(3):
        for p, q in zip(model.parameters(), ref.parameters(), strict=True):
            q.grad = torch.randn_like(q)
            p.grad = q.grad.to(torch.bfloat16)
        ours.step()
        plain.step()
        ours.zero_grad()
    for p, m, q in zip(model.parameters(), ours.master, ref.parameters(), strict=True):
        assert p.dtype == torch.bfloat16 and p.grad is None
        # fp32 masters: only the grads were rounded, but all of them, to bf16: a few eps(bf16) of each update
        torch.testing.assert_close(m, q, **adam_steps(1e-2, 3, fraction=16 * eps(torch.bfloat16)))
        assert torch.equal(p, m.to(torch.bfloat16))  # the model holds the masters, rounded
