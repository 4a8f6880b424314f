import argparse

import pytest
import torch

from pixart.checkpoint import (
    DIFFUSION_FILE,
    checkpoint_folder,
    load_config,
    load_encoders,
    load_model,
    load_prediction_type,
    read_safetensors,
    read_state_dict,
    safetensors_bytes,
    save_checkpoint,
    unwrap_state_dict,
)
from pixart.errors import PixArtError
from pixart.models import build_model


def test_save_and_load_round_trip_with_ema(tmp_path):
    model = build_model("PixArt-S/2", depth=1, input_size=8, caption_channels=16)
    ema = {k: v + 1 for k, v in model.state_dict().items()}
    save_checkpoint(tmp_path / "ck", model.config, model.state_dict(), ema)
    names = sorted(p.name for p in (tmp_path / "ck").iterdir())
    assert names == ["config.json", "ema.safetensors", "model.safetensors"]
    assert load_config(tmp_path / "ck") == model.config
    for ema_flag, expected in ((False, model.state_dict()), (True, ema)):
        loaded = load_model(tmp_path / "ck", ema=ema_flag).state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in expected.items())
    # no temp folders are left behind, and a second save replaces the first whole
    save_checkpoint(tmp_path / "ck", model.config, model.state_dict(), overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    assert not (tmp_path / "ck" / "ema.safetensors").exists()


def test_a_failed_save_leaves_the_old_checkpoint(tmp_path):
    model = build_model("PixArt-S/2", depth=1, input_size=8, caption_channels=16)
    save_checkpoint(tmp_path / "ck", model.config, model.state_dict())
    with pytest.raises(AttributeError):
        save_checkpoint(tmp_path / "ck", model.config, {"bad": "not a tensor"}, overwrite=True)
    assert load_model(tmp_path / "ck") is not None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_truncated_files_are_one_line_errors(tmp_path):
    model = build_model("PixArt-S/2", depth=1, input_size=8, caption_channels=16)
    save_checkpoint(tmp_path / "ck", model.config, model.state_dict())
    st = tmp_path / "ck" / "model.safetensors"
    st.write_bytes(st.read_bytes()[:1000])
    with pytest.raises(PixArtError, match=r"model\.safetensors: not a readable checkpoint"):
        load_model(tmp_path / "ck")
    pt = tmp_path / "x.pt"
    torch.save(model.state_dict(), pt)
    pt.write_bytes(pt.read_bytes()[:5000])
    with pytest.raises(PixArtError, match=r"x\.pt: not a readable checkpoint") as e:
        read_state_dict(pt)
    assert "\n" not in str(e.value)


def test_small_safetensors_files_are_read_whole_or_named_in_one_line(tmp_path):
    """The concept, covariance, run-state and DMD pairs files all come through read_safetensors."""
    from safetensors.torch import save_file

    from pixart.distill.pairs import PAIRS_FILE, load_pairs
    from pixart.personalize.concept import Concept
    from pixart.personalize.covariance import read_c_inv

    good = tmp_path / "good.safetensors"
    save_file({"C": torch.eye(2)}, good, metadata={"base_model": "sha256:ab"})
    meta, tensors = read_safetensors(good, "covariance file")
    assert meta == {"base_model": "sha256:ab"} and torch.equal(tensors["C"], torch.eye(2))
    assert torch.equal(read_c_inv(good, "sha256:ab"), torch.eye(2, dtype=torch.float64))
    with pytest.raises(PixArtError, match=r"^.*nothing\.safetensors: no such concept file$"):
        Concept.load(tmp_path / "nothing.safetensors")
    cut = tmp_path / PAIRS_FILE
    cut.write_bytes(good.read_bytes()[:40])  # a copy cut short
    with pytest.raises(PixArtError, match=r"pairs\.safetensors: not a readable pairs file \(.*\); delete it to "
                                          r"draw the pairs again$") as e:
        load_pairs(tmp_path)
    assert "\n" not in str(e.value)
    save_file({"X": torch.eye(2)}, good)
    with pytest.raises(PixArtError, match=r"good\.safetensors: not a covariance file \(no tensor C\)"):
        read_c_inv(good, "sha256:ab")


def test_small_files_are_the_same_bytes_on_every_write(tmp_path):
    """safetensors writes metadata in a random order (a Rust HashMap): a rerun's concept file differed in bytes."""
    from safetensors.torch import save

    tensors = {"value": torch.arange(6.0).reshape(2, 3), "embedding": torch.ones(4, dtype=torch.float16)}
    meta = {"name": "zorb", "super": "bowl", "base_model": "sha256:ab", "beta": "0.7", "tau": "0.15", "é": "ü"}
    assert len({save(tensors, metadata=meta) for _ in range(8)}) > 1  # what the library alone does
    blobs = {safetensors_bytes(tensors, dict(reversed(meta.items()))) for _ in range(8)} | {
        safetensors_bytes(tensors, meta)}
    assert len(blobs) == 1
    path = tmp_path / "c.safetensors"
    path.write_bytes(blobs.pop())
    got_meta, got = read_safetensors(path, "concept file")  # safetensors itself reads it back whole
    assert got_meta == meta and all(torch.equal(got[k], tensors[k]) for k in tensors)


def test_pickles_with_code_are_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"model": Evil()}, path)
    with pytest.raises(PixArtError, match="evil.pt: not a readable checkpoint") as e:
        read_state_dict(path)
    assert "\n" not in str(e.value) and "weights_only" not in str(e.value)  # never advise unpickling it
    assert "holds objects other than tensors" in str(e.value) and "print" in str(e.value)


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
    wrong = r"does not fit the model: missing keys: blocks\.1\..*wrong shapes: y_embedder"
    with pytest.raises(PixArtError, match=wrong):
        load_model(tmp_path / "ck")


def test_missing_or_bad_config(tmp_path):
    with pytest.raises(PixArtError, match="not a checkpoint folder"):
        load_config(tmp_path)
    with pytest.raises(PixArtError, match="nope: not a checkpoint folder [(]no such folder[)]"):
        load_config(tmp_path / "nope")
    (tmp_path / "model_index.json").write_text('{"_class_name": "PixArtAlphaPipeline"}')  # diffusers' pipeline
    with pytest.raises(PixArtError, match="it is a diffusers folder: bring it in with `pixart import"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text('{"_class_name": "PixArtTransformer2DModel"}')  # its transformer/
    with pytest.raises(PixArtError, match="a diffusers PixArtTransformer2DModel folder, not a checkpoint folder"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text('{"arch": "pixart", "depht": 2}')
    with pytest.raises(PixArtError, match="unknown key 'depht'"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text('{"arch": "pixart", "depth": "6"}')  # a hand edit
    with pytest.raises(PixArtError, match=r"config.json: depth must be an integer, got '6'"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")  # was an AttributeError from .items()
    with pytest.raises(PixArtError, match=r"config.json: not a model config \(a JSON list, not an object\)$"):
        load_config(tmp_path)


def test_a_runs_latest_pointer_resolves_to_the_step_it_names(tmp_path):
    model = build_model("PixArt-S/2", depth=1, input_size=8, caption_channels=16)
    save_checkpoint(tmp_path / "checkpoints" / "step-000004", model.config, model.state_dict())
    latest = tmp_path / "checkpoints" / "latest"
    latest.write_text("step-000004")  # what the trainer writes
    assert checkpoint_folder(latest) == tmp_path / "checkpoints" / "step-000004"
    assert load_config(checkpoint_folder(latest)) == model.config
    loaded = load_model(latest).state_dict()  # the Python API takes the pointer as the CLI does
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())
    assert checkpoint_folder(tmp_path / "checkpoints" / "step-000004") == tmp_path / "checkpoints" / "step-000004"
    with pytest.raises(PixArtError, match=r"\(no config.json\); it is a run folder: pass .*checkpoints/latest"):
        load_model(tmp_path)  # the run folder itself
    weights = tmp_path / "checkpoints" / "step-000004" / "model.safetensors"
    with pytest.raises(PixArtError, match=r"model.safetensors: a file, not a checkpoint folder; pass the folder"):
        load_model(weights)  # a file inside it, as a tab completion gives
    latest.write_text("step-000009")
    with pytest.raises(PixArtError, match="latest: names 'step-000009', which is not a checkpoint folder"):
        checkpoint_folder(latest)


def test_corrupt_records_are_one_line_errors_naming_the_file(tmp_path):
    model = build_model("PixArt-S/2", depth=1, input_size=8, caption_channels=16)
    save_checkpoint(tmp_path / "ck", model.config, model.state_dict(), extra={"encoders.json": "garbage"})
    with pytest.raises(PixArtError, match=r"encoders\.json: not readable JSON") as e:
        load_encoders(tmp_path / "ck")
    assert "\n" not in str(e.value)
    assert load_encoders(tmp_path) == {}  # no record: the caller asks for the encoders
    assert load_prediction_type(tmp_path / "ck") == "epsilon"  # no record: DiT's and PixArt's objective
    for record, said in (("{}", "got None"), ('{"prediction_type": "sample"}', "got 'sample'"), ("[1]", "got None")):
        (tmp_path / "ck" / DIFFUSION_FILE).write_text(record)
        with pytest.raises(PixArtError, match=rf'diffusion\.json: prediction_type must be "epsilon" or '
                                              rf'"v_prediction", {said}$'):
            load_prediction_type(tmp_path / "ck")


def test_existing_outputs_are_replaced_only_when_asked(tmp_path):
    model = build_model("PixArt-S/2", depth=1, input_size=8, caption_channels=16)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "precious.txt").write_text("keep me")
    with pytest.raises(PixArtError, match="already exists and is not empty; pass --overwrite"):
        save_checkpoint(tmp_path / "mine", model.config, model.state_dict())
    assert (tmp_path / "mine" / "precious.txt").read_text() == "keep me"
    with pytest.raises(PixArtError, match="would overwrite the input"):
        save_checkpoint(tmp_path / "mine", model.config, model.state_dict(), overwrite=True,
                        sources=(tmp_path / "mine" / "precious.txt",))
    assert (tmp_path / "mine" / "precious.txt").exists()
    (tmp_path / "empty").mkdir()
    save_checkpoint(tmp_path / "empty", model.config, model.state_dict())  # an empty folder is fine


def test_a_replace_killed_half_way_is_undone_by_the_next_call(tmp_path):
    model = build_model("PixArt-S/2", depth=1, input_size=8, caption_channels=16)
    save_checkpoint(tmp_path / "ck", model.config, model.state_dict())
    (tmp_path / "ck").rename(tmp_path / ".ck.old")  # killed between parking the old and moving in the new
    with pytest.raises(PixArtError, match="already exists"):
        save_checkpoint(tmp_path / "ck", model.config, model.state_dict())
    assert load_model(tmp_path / "ck") is not None and not (tmp_path / ".ck.old").exists()


def test_a_killed_writers_half_folder_is_removed_by_the_next_call(tmp_path):
    import os
    import socket

    model = build_model("PixArt-S/2", depth=1, input_size=8, caption_channels=16)
    host = socket.gethostname()
    dead = tmp_path / f".ck.tmp-{host}-999999999-abc"  # no process has that pid
    live = tmp_path / f".ck.tmp-{host}-{os.getppid()}-abc"  # a writer that is still running: not ours to remove
    elsewhere = tmp_path / ".ck.tmp-another-host-999999999-abc"  # its pid means nothing here
    for folder in (dead, live, elsewhere):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"half")
    save_checkpoint(tmp_path / "ck", model.config, model.state_dict())
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["ck", live.name, elsewhere.name])


def test_outputs_get_the_usual_permissions(tmp_path):
    import os
    import stat

    model = build_model("PixArt-S/2", depth=1, input_size=8, caption_channels=16)
    old = os.umask(0o022)
    try:
        save_checkpoint(tmp_path / "ck", model.config, model.state_dict())
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "ck").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "ck" / "model.safetensors").stat().st_mode) == 0o644
