"""Stage configs: inheritance, --set, and one-line errors naming the key."""
import pytest
import yaml

from pixart.cli.main import main
from pixart.errors import PixArtError
from pixart.train.config import TrainConfig
from pixart.train.engine import deepspeed_config


def write(path, data):
    path.write_text(yaml.safe_dump(data))
    return path


def test_inheritance_merges_sections_and_set_overrides(tmp_path):
    write(tmp_path / "base.yaml", {"data": {"shards": "feats/", "batch_size": 8},
                                   "optim": {"lr": 2e-5, "warmup_steps": 1000}})
    (tmp_path / "sub").mkdir()
    child = write(tmp_path / "sub" / "stage.yaml", {"base": "../base.yaml", "stage": "s2", "optim": {"lr": 1e-4}})
    cfg = TrainConfig.load(child, ["data.batch_size=16", "deepspeed.zero_stage=3", "validation.prompts=[a, b]"])
    assert cfg.stage == "s2" and cfg.optim.lr == 1e-4 and cfg.optim.warmup_steps == 1000
    assert cfg.data.shards == "feats/" and cfg.data.batch_size == 16
    assert cfg.deepspeed.zero_stage == 3 and cfg.validation.prompts == ["a", "b"]
    again = tmp_path / "resolved.yaml"
    again.write_text(cfg.resolved_yaml())
    assert TrainConfig.load(again) == cfg  # the run folder's config.yaml reruns the stage alone


def test_pixart_defaults_are_the_papers():
    from pixart.train.config import OptimSection

    o = OptimSection()
    assert (o.lr, o.weight_decay, o.eps, o.grad_clip, o.warmup_steps) == (2e-5, 0.03, 1e-10, 0.01, 1000)


@pytest.mark.parametrize("data, sets, message", [
    ({"data": {"shards": "x"}, "optim": {"lrr": 1}}, [], "optim.lrr: unknown key"),
    ({"data": {"shards": "x", "batch_size": "eight"}}, [], "data.batch_size: Input should be a valid integer"),
    ({"data": {"shards": "x"}}, ["deepspeed.zero_stage=4"], "deepspeed.zero_stage: Input should be 0, 1, 2 or 3"),
    ({"data": {"shards": "x"}}, ["deepspeed.precision=fp8"], "deepspeed.precision: Input should be"),
    ({}, [], "data: Field required"),
    ({"data": {"shards": "x"}}, ["deepspeed.zero_stage=0"], "needs zero_stage >= 1"),
    ({"data": {"shards": "x"}}, ["optim.lr=-1"], "optim.lr: Input should be greater than 0"),
    ({"data": {"shards": "x"}}, ["optim"], "--set 'optim': expected key=value"),
    ({"data": {"shards": "x"}}, ["diffusion.timesteps=cosine"],
     "diffusion.timesteps: Input should be 'uniform' or 'logit_normal'"),
    ({"data": {"shards": "x"}, "stage": "s1"}, ["stage.x=1"], "--set stage.x: stage is not a section"),
    ({"data": {"shards": "x"}}, ["model.arch.depth=abc"], "model.arch: depth must be an integer, got 'abc'"),
    ({"data": {"shards": "x"}}, ["model.arch.bogus=1"], "model.arch: unknown key 'bogus'"),
    ({"data": {"shards": "x"}}, ["model.grad_checkpointing=2.5"],
     "model.grad_checkpointing: expected true, false, a number of blocks or 'auto', got 2.5"),
    ({"data": {"shards": "x"}}, ["validation.steps=2000"], "validation.steps: Input should be less than or equal"),
    ({"data": {"shards": "x"}}, ["validation.cfg=nan"], "validation.cfg: Input should be a finite number"),
])
def test_bad_configs_are_one_line_naming_the_key(tmp_path, data, sets, message):
    path = write(tmp_path / "c.yaml", data)
    with pytest.raises(PixArtError) as e:
        TrainConfig.load(path, sets)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_circular_base_and_missing_file(tmp_path):
    write(tmp_path / "a.yaml", {"base": "b.yaml"})
    write(tmp_path / "b.yaml", {"base": "a.yaml"})
    with pytest.raises(PixArtError, match="circular base"):
        TrainConfig.load(tmp_path / "a.yaml")
    with pytest.raises(PixArtError, match="no such config file"):
        TrainConfig.load(tmp_path / "nope.yaml")
    with pytest.raises(PixArtError, match=r": a folder, not a config file; pass a YAML file"):
        TrainConfig.load(tmp_path)
    (tmp_path / "bad.yaml").write_text("stage: s\ndata: [unclosed")
    with pytest.raises(PixArtError, match=r"bad.yaml: invalid YAML \(.*line 2"):
        TrainConfig.load(tmp_path / "bad.yaml")
    (tmp_path / "utf16.yaml").write_bytes(b"\xff\xfestage: s\n")  # a UTF-16 byte order mark, saved by an editor
    with pytest.raises(PixArtError, match="utf16.yaml: not readable as UTF-8 text"):
        TrainConfig.load(tmp_path / "utf16.yaml")


def test_cli_bad_config_exits_2_with_one_line(tmp_path, capsys):
    path = write(tmp_path / "c.yaml", {"data": {"shards": "x"}, "trian": {}})
    assert main(["train", str(path), "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"pixart train: error: {path}: trian: unknown key"
    assert not (tmp_path / "run").exists()


def test_deepspeed_json_sets_the_batch_and_keeps_the_users_other_keys(tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text('{"zero_optimization": {"overlap_comm": true, "stage": 0}, "fp16": {"loss_scale_window": 500}, '
                  '"bf16": {"immediate_grad_update": true, "enabled": true}}')
    path = write(tmp_path / "c.yaml", {"data": {"shards": "x", "batch_size": 6},
                                       "optim": {"grad_accum": 2, "grad_clip": 0.01},
                                       "deepspeed": {"zero_stage": 2, "precision": "fp16", "config": str(ds)}})
    out = deepspeed_config(TrainConfig.load(path), world_size=8)
    assert out["train_batch_size"] == 6 * 2 * 8 and out["gradient_accumulation_steps"] == 2
    assert out["zero_optimization"] == {"overlap_comm": True, "stage": 2}
    assert out["fp16"] == {"loss_scale_window": 500, "enabled": True}
    assert out["bf16"] == {"immediate_grad_update": True, "enabled": False}  # the stage config says which precision
    assert out["gradient_clipping"] == 0.01
