"""`pixart demo` end to end at smoke scale: every stage runs and every promised output is there."""
import json

import pytest
from PIL import Image

from pixart.checkpoint import load_config
from pixart.cli.main import main
from pixart.train.config import load_train_config


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--out", str(out), "--scale", "0.01"]) == 0
    return out


def test_demo_writes_metrics_grids_curves_and_stage_configs(demo):
    m = json.loads((demo / "report" / "metrics.json").read_text())
    for k in ("color", "position", "shape", "position_any", "count"):
        assert 0.0 <= m["heldout"][k] <= 1.0
    assert m["heldout"]["prompts"] == 9 and m["resolution"] == 64
    assert set(m["judge_self_accuracy"]) == {"color", "position", "shape"}
    assert list(m["checkpoints"]) == ["stage1", "reparam", "stage2", "stage3"]
    for png in ("heldout", "stage1", "stage2", "stage3", "loss"):
        assert Image.open(demo / "report" / f"{png}.png").size[0] > 0
    assert Image.open(demo / "report" / "heldout.png").size == (9 * 64 * 2, 64 * 2)
    assert load_config(m["checkpoints"]["stage1"]).arch == "dit"
    stage2_arch, stage3_arch = (load_config(m["checkpoints"][s]) for s in ("stage2", "stage3"))
    assert stage3_arch.input_size == 32  # 64 px over the pixel factor 2
    # Twice the tokens per side, the same position coordinates across the image (PixArt's pe_interpolation).
    span = [a.input_size / a.patch_size / a.pe_interpolation for a in (stage2_arch, stage3_arch)]
    assert span == [4.0, 4.0]
    assert json.loads((demo / "export" / "transformer" / "config.json").read_text())["interpolation_scale"] == 2
    stage2 = load_train_config(demo / "configs" / "stage2.yaml")
    assert stage2.model.init == m["checkpoints"]["reparam"]
    assert load_train_config(demo / "configs" / "stage3.yaml").model.init == m["checkpoints"]["stage2"]


def test_demo_export_loads_in_diffusers_with_the_training_objective(demo):
    from diffusers import PixArtAlphaPipeline

    pipe = PixArtAlphaPipeline.from_pretrained(demo / "export", vae=None)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.transformer.config.sample_size == 32


def test_demo_rerun_skips_finished_work(demo, capsys):
    before = {p: p.stat().st_mtime_ns for p in (demo / "runs").rglob("model.safetensors")}
    assert main(["demo", "--out", str(demo), "--scale", "0.01"]) == 0
    assert {p: p.stat().st_mtime_ns for p in (demo / "runs").rglob("model.safetensors")} == before
