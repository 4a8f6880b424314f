import argparse

import pytest
import torch

from pixart.checkpoint import load_config, load_model, read_state_dict, save_checkpoint, unwrap_state_dict
from pixart.errors import PixArtError
from pixart.models import build_model


def test_save_and_load_round_trip_with_ema(tmp_path):
    model = build_model("PixArt-S/2", depth=1, input_size=8, caption_channels=16)
    ema = {k: v + 1 for k, v in model.state_dict().items()}
    save_checkpoint(tmp_path / "ck", model.config, model.state_dict(), ema)
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["config.json", "ema.safetensors", "model.safetensors"]
    assert load_config(tmp_path / "ck") == model.config
    for ema_flag, expected in ((False, model.state_dict()), (True, ema)):
        loaded = load_model(tmp_path / "ck", ema=ema_flag).state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in expected.items())
    # no temp folders are left behind, and a second save replaces the first whole
    save_checkpoint(tmp_path / "ck", model.config, model.state_dict())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    assert not (tmp_path / "ck" / "ema.safetensors").exists()


def test_a_failed_save_leaves_the_old_checkpoint(tmp_path):
    model = build_model("PixArt-S/2", depth=1, input_size=8, caption_channels=16)
    save_checkpoint(tmp_path / "ck", model.config, model.state_dict())
    with pytest.raises(AttributeError):
        save_checkpoint(tmp_path / "ck", model.config, {"bad": "not a tensor"})
    assert load_model(tmp_path / "ck") is not None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_truncated_files_are_one_line_errors(tmp_path):
    model = build_model("PixArt-S/2", depth=1, input_size=8, caption_channels=16)
    save_checkpoint(tmp_path / "ck", model.config, model.state_dict())
    st = tmp_path / "ck" / "model.safetensors"
    st.write_bytes(st.read_bytes()[:1000])
    with pytest.raises(PixArtError, match=r"model\.safetensors: cannot read checkpoint"):
        load_model(tmp_path / "ck")
    pt = tmp_path / "x.pt"
    torch.save(model.state_dict(), pt)
    pt.write_bytes(pt.read_bytes()[:5000])
    with pytest.raises(PixArtError, match=r"x\.pt: cannot read checkpoint") as e:
        read_state_dict(pt)
    assert "\n" not in str(e.value)


def test_pickles_with_code_are_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"model": Evil()}, path)
    with pytest.raises(PixArtError, match="evil.pt: cannot read checkpoint"):
        read_state_dict(path)


def test_official_layouts_unwrap(tmp_path):
    sd = {"w": torch.ones(2)}
    path = tmp_path / "train.pt"  # DiT's train.py layout, with its argparse.Namespace
    torch.save({"model": {"w": torch.zeros(2)}, "ema": sd, "opt": {}, "args": argparse.Namespace(lr=1e-4)}, path)
    assert torch.equal(unwrap_state_dict(read_state_dict(path), "x")["w"], sd["w"])
    assert torch.equal(unwrap_state_dict({"state_dict": {"module.w": sd["w"]}}, "x")["w"], sd["w"])
    with pytest.raises(PixArtError, match="no tensors"):
        unwrap_state_dict({"a": 1}, "x")


def test_wrong_model_state_dict_names_what_does_not_fit(tmp_path):
    a = build_model("PixArt-S/2", depth=2, input_size=8, caption_channels=16)
    b = build_model("PixArt-S/2", depth=1, input_size=8, caption_channels=8)
    save_checkpoint(tmp_path / "ck", a.config, b.state_dict())
    with pytest.raises(PixArtError, match=r"does not fit the model: missing keys: blocks\.1\..*wrong shapes: y_embedder"):
        load_model(tmp_path / "ck")


def test_missing_or_bad_config(tmp_path):
    with pytest.raises(PixArtError, match="not a checkpoint folder"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text('{"arch": "pixart", "depht": 2}')
    with pytest.raises(PixArtError, match="unknown key 'depht'"):
        load_config(tmp_path)
