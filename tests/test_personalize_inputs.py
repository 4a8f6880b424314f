"""`pixart personalize`: what a new user gets wrong, each found before anything is written and said in one line
naming the file, line or flag; and what it writes (a run's state, the concept file) is what a rerun expects."""
import json
import re
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from pixart.cli.main import main
from pixart.errors import PixArtError
from pixart.personalize.trainer import ConceptTrainer, PersonalizeConfig


def _cfg(root, tmp_path, **kw):
    base = dict(ckpt=str(root / "ckpt"), data=str(root / "images"), concept="zork", super_word="circle",
                out=str(tmp_path / "zork.safetensors"), captions=str(root / "captions.txt"), steps=2, batch=2,
                save_every=2)
    return PersonalizeConfig(**{**base, **kw})


def _quiet(*_):
    pass


def _ckpt_copy(root, tmp_path, name="ckpt"):
    """The tiny checkpoint without any covariance a test may have saved beside it."""
    ckpt = shutil.copytree(root / "ckpt", tmp_path / name,
                           ignore=shutil.ignore_patterns("perfusion-covariance-*"))
    return ckpt


def _one_error_line(capsys) -> str:
    """The error of the last command: one line (progress bars aside)."""
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "it/s]" not in line]
    assert len(err) == 1, err
    return err[0]


def test_a_checkpoint_without_encoders_json_takes_text_encoder_and_vae(tiny_concept_setup, tmp_path, capsys):
    """An imported official .pth or a bare diffusers transformer has no encoders.json: as `pixart sample`, the
    flags name the encoders (and would override it)."""
    root = tiny_concept_setup
    ckpt = _ckpt_copy(root, tmp_path)
    (ckpt / "encoders.json").unlink()
    argv = ["personalize", str(ckpt), "--data", str(root / "images"), "--concept", "zork", "--super", "circle",
            "--captions", str(root / "captions.txt"), "--out", str(tmp_path / "zork.safetensors"), "--steps", "1",
            "--batch", "2"]
    assert main(argv) == 2
    assert _one_error_line(capsys) == (f"pixart personalize: error: {ckpt}: no encoders.json names the text encoder "
                                       "and the VAE it was trained with; pass --text-encoder and --vae")
    assert main([*argv, "--text-encoder", str(root / "t5"), "--vae", "pixel:4"]) == 2  # 48 latent channels, not 12
    assert "VAE pixel:4 has 48 latent channels; the model takes in_channels=12" in _one_error_line(capsys)
    assert main([*argv, "--text-encoder", str(root / "t5"), "--vae", "pixel:2"]) == 0
    assert "wrote" in capsys.readouterr().out and (tmp_path / "zork.safetensors").is_file()


def test_a_caption_file_that_is_not_utf8_is_named(tiny_concept_setup, tmp_path):
    from pixart.personalize.data import read_concept_images

    images = shutil.copytree(tiny_concept_setup / "images", tmp_path / "images")
    (images / "1.txt").write_bytes(b"a photo of a zork \xff\xfe on the left")
    with pytest.raises(PixArtError, match=re.escape(f"{images / '1.txt'}: not UTF-8 text (byte 18)")):
        read_concept_images(str(images))


def test_a_bad_line_of_the_caption_corpus_is_named(tmp_path):
    from pixart.personalize.covariance import read_captions

    jsonl = tmp_path / "job.metadata.jsonl"
    jsonl.write_text('{"caption": "a red circle", "status": "ok"}\n\n{"caption": "a blue sq\n')
    with pytest.raises(PixArtError, match=re.escape(f"--captions {jsonl}:3: not a JSON line (Unterminated string")):
        read_captions(str(jsonl))
    jsonl.write_text('{"caption": "a red circle"}\n["a list"]\n')
    with pytest.raises(PixArtError, match=re.escape(f"--captions {jsonl}:2: not a JSON object")):
        read_captions(str(jsonl))
    text = tmp_path / "captions.txt"
    text.write_bytes(b"a red circle\na blue square\n\x89PNG\r\n\x1a\n\x00\x00")
    with pytest.raises(PixArtError, match=re.escape(f"--captions {text}:3: not UTF-8 text (byte 27)")):
        read_captions(str(text))


def test_a_damaged_state_file_is_named_with_what_to_do(tiny_concept_setup, tmp_path, capsys):
    root = tiny_concept_setup
    ConceptTrainer(_cfg(root, tmp_path)).train(log=_quiet)
    state = tmp_path / "zork.safetensors.run" / "state.safetensors"
    concept = (tmp_path / "zork.safetensors").read_bytes()
    data = state.read_bytes()
    expected = re.escape(f"{state}: not a readable run state (") + r".*\); delete it to start the run over, or pass " \
        "another --run-dir"
    for damaged in (data[:len(data) // 2], b"\x00" * 4):  # a copy cut short; a file cut in its header
        state.write_bytes(damaged)
        with pytest.raises(PixArtError, match=expected):
            ConceptTrainer(_cfg(root, tmp_path, steps=4)).train(log=_quiet)
        assert (tmp_path / "zork.safetensors").read_bytes() == concept
    capsys.readouterr()
    assert main(["personalize", str(root / "ckpt"), "--data", str(root / "images"), "--concept", "zork", "--super",
                 "circle", "--out", str(tmp_path / "zork.safetensors"), "--steps", "4", "--batch", "2"]) == 2
    assert _one_error_line(capsys).startswith(f"pixart personalize: error: {state}: not a readable run state")
    save_file({"x": torch.zeros(1)}, state)  # a safetensors file, but no run's state
    with pytest.raises(PixArtError, match=r"not a readable run state \(missing step, history, seconds"):
        ConceptTrainer(_cfg(root, tmp_path, steps=4)).train(log=_quiet)


def test_ema_given_as_the_default_resolves_to_resumes(tiny_concept_setup, tmp_path):
    """A run that used the EMA weights by default resumes with --ema given; --no-ema would be another run."""
    root = tiny_concept_setup
    ckpt = _ckpt_copy(root, tmp_path)
    shutil.copy(ckpt / "model.safetensors", ckpt / "ema.safetensors")
    ConceptTrainer(_cfg(root, tmp_path, ckpt=str(ckpt))).train(log=_quiet)  # EMA: the checkpoint has them
    lines = []
    ConceptTrainer(_cfg(root, tmp_path, ckpt=str(ckpt), ema=True, steps=4)).train(log=lines.append)
    assert any("resuming 'zork' from step 2" in line for line in lines)
    with pytest.raises(PixArtError, match="a run with --ema True, not False; resume it with the same settings"):
        ConceptTrainer(_cfg(root, tmp_path, ckpt=str(ckpt), ema=False, steps=4)).train(log=_quiet)
    # a run folder from before: it stored the flag as given, None for the default (here: EMA)
    state = tmp_path / "zork.safetensors.run" / "state.safetensors"
    with safe_open(state, framework="pt") as f:
        meta = f.metadata()
    settings = json.loads(meta["settings"])
    save_file(load_file(state), state, metadata={**meta, "settings": json.dumps({**settings, "ema": None})})
    ConceptTrainer(_cfg(root, tmp_path, ckpt=str(ckpt), ema=True, steps=6)).train(log=_quiet)
    save_file(load_file(state), state, metadata={**meta, "settings": json.dumps({**settings, "ema": None})})
    with pytest.raises(PixArtError, match="a run with --ema True, not False"):
        ConceptTrainer(_cfg(root, tmp_path, ckpt=str(ckpt), ema=False, steps=6)).train(log=_quiet)


def test_an_over_long_caption_is_named_before_anything_is_written(tiny_concept_setup, tmp_path):
    root = tiny_concept_setup
    ckpt = _ckpt_copy(root, tmp_path)
    images = shutil.copytree(root / "images", tmp_path / "images")
    (images / "1.txt").write_text("a photo of " + "a red blue green square " * 4 + "and a zork")
    with pytest.raises(PixArtError, match=re.escape(
            f"{images / '1.txt'}: the concept's word 'zork' falls past the text encoder's max_length (16 tokens); "
            "shorten the caption, or name 'zork' earlier in it")):
        ConceptTrainer(_cfg(root, tmp_path, ckpt=str(ckpt), data=str(images))).train(log=_quiet)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "images"]  # no run folder, no concept
    assert not list(ckpt.glob("perfusion-covariance-*"))  # nor a covariance


def test_a_covariance_flag_naming_no_file_says_so(tiny_concept_setup, tmp_path):
    with pytest.raises(PixArtError, match=re.escape(f"--covariance {tmp_path / 'nonexist.safetensors'}: no such file")):
        ConceptTrainer(_cfg(tiny_concept_setup, tmp_path, captions=None,
                            covariance=str(tmp_path / "nonexist.safetensors")))


def test_output_locations_are_checked_up_front_naming_the_flag(tiny_concept_setup, tmp_path, capsys):
    root = tiny_concept_setup
    (tmp_path / "afile").write_text("")
    with pytest.raises(PixArtError, match=re.escape(
            f"--out {tmp_path / 'afile' / 'x.safetensors'}: cannot write in {tmp_path / 'afile'} (Not a directory)")):
        ConceptTrainer(_cfg(root, tmp_path, out=str(tmp_path / "afile" / "x.safetensors")))
    with pytest.raises(PixArtError, match=re.escape(
            f"--run-dir {tmp_path / 'afile' / 'run'}: cannot write in {tmp_path / 'afile'} (Not a directory)")):
        ConceptTrainer(_cfg(root, tmp_path, run_dir=str(tmp_path / "afile" / "run")))
    (tmp_path / "folder.safetensors").mkdir()
    with pytest.raises(PixArtError, match="--out .*folder.safetensors is a folder; name the concept file"):
        ConceptTrainer(_cfg(root, tmp_path, out=str(tmp_path / "folder.safetensors")))
    assert main(["personalize", str(root / "ckpt"), "--data", str(root / "images"), "--concept", "zork", "--super",
                 "circle", "--out", "/proc/x.safetensors"]) == 2
    assert _one_error_line(capsys).startswith("pixart personalize: error: --out /proc/x.safetensors: cannot write in "
                                              "/proc (")
    # a folder to be made: its parents are, at the end
    ConceptTrainer(_cfg(root, tmp_path, out=str(tmp_path / "new" / "zork.safetensors"), steps=1)).train(log=_quiet)
    assert (tmp_path / "new" / "zork.safetensors").is_file()


def test_another_runs_folder_does_not_replace_a_concept_file(tiny_concept_setup, tmp_path):
    root = tiny_concept_setup
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    ConceptTrainer(_cfg(root, tmp_path, out=str(a), steps=1)).train(log=_quiet)
    ConceptTrainer(_cfg(root, tmp_path, out=str(b), steps=1)).train(log=_quiet)
    before = a.read_bytes()
    refused = f"--out {a} already exists and no run in {tmp_path / 'b.safetensors.run'} wrote it; pass --overwrite"
    with pytest.raises(PixArtError, match=re.escape(refused)):
        ConceptTrainer(_cfg(root, tmp_path, out=str(a), run_dir=str(tmp_path / "b.safetensors.run"), steps=1))
    assert a.read_bytes() == before
    # its own run folder, moved with it, still owns it: a rerun with more steps continues it
    shutil.move(tmp_path / "a.safetensors.run", tmp_path / "moved" / "a.safetensors.run")
    shutil.move(a, tmp_path / "moved" / "a.safetensors")
    lines = []
    ConceptTrainer(_cfg(root, tmp_path, out=str(tmp_path / "moved" / "a.safetensors"), steps=2)).train(log=lines.append)
    assert any("resuming 'zork' from step 1" in line for line in lines)
