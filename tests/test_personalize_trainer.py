"""`pixart personalize` on a tiny checkpoint: what trains, what stays frozen, resume, and bad input."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from pixart.errors import PixArtError
from pixart.personalize.trainer import ConceptTrainer, PersonalizeConfig


def _cfg(root, tmp_path, **kw):
    base = dict(ckpt=str(root / "ckpt"), data=str(root / "images"), concept="zork", super_word="circle",
                out=str(tmp_path / "zork.safetensors"), captions=str(root / "captions.txt"), steps=4, batch=2,
                save_every=2)
    return PersonalizeConfig(**{**base, **kw})


def test_only_the_concept_trains_and_everything_else_stays_bitwise(tiny_concept_setup, tmp_path):
    trainer = ConceptTrainer(_cfg(tiny_concept_setup, tmp_path))
    model_before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    t5_before = {k: v.clone() for k, v in trainer.text.model.state_dict().items()}
    init = trainer.initial_state()
    concept, facts = trainer.train(log=lambda *_: None)
    assert all(torch.equal(v, model_before[k]) for k, v in trainer.model.state_dict().items())
    assert trainer.model.blocks[0].cross_attn.kv_linear.__class__.__name__ == "Linear"  # the edit is removed
    assert all(torch.equal(v, t5_before[k]) for k, v in trainer.text.model.state_dict().items())
    assert not any(p.requires_grad for p in trainer.model.parameters())
    # the concept's own parameters moved, and its keys stay locked to the super word's encoding
    assert not torch.allclose(concept.value_targets, init["value_targets"], atol=1e-3)
    assert not torch.allclose(concept.embedding, init["embedding"], atol=1e-4)
    torch.testing.assert_close(concept.i_super, init["i_super"].half().float(), rtol=0, atol=0)
    assert facts["bytes"] == (tmp_path / "zork.safetensors").stat().st_size
    assert (tmp_path / "zork.safetensors.run" / "loss.png").is_file()
    # Perfusion's init: the embedding starts as the super word's row
    assert torch.equal(init["embedding"], trainer.text.model.get_input_embeddings().weight[trainer.super_id])


def test_a_rerun_resumes_bitwise(tiny_concept_setup, tmp_path):
    root = tiny_concept_setup
    whole = tmp_path / "whole"
    ConceptTrainer(_cfg(root, whole, steps=4)).train(log=lambda *_: None)
    split = tmp_path / "split"
    ConceptTrainer(_cfg(root, split, steps=2)).train(log=lambda *_: None)  # stopped after step 2 ...
    lines = []
    ConceptTrainer(_cfg(root, split, steps=4)).train(log=lines.append)  # ... rerun to 4
    assert any("resuming 'zork' from step 2" in line for line in lines)
    a = load_file(whole / "zork.safetensors.run" / "state.safetensors")
    b = load_file(split / "zork.safetensors.run" / "state.safetensors")
    assert a.keys() == b.keys() and any(k.startswith("adam.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # a rerun with other settings would not be the run it resumes: refused, naming the flag
    with pytest.raises(PixArtError, match=r"a run with --lr-value 0.03, not 0.1; resume it with the same settings"):
        ConceptTrainer(_cfg(root, split, steps=6, lr_value=0.1)).train(log=lambda *_: None)
    other = tmp_path / "other-images"
    shutil.copytree(root / "images", other)
    next(p for p in sorted(other.rglob("*")) if p.is_file()).unlink()  # one image fewer
    with pytest.raises(PixArtError, match="a run on other --data images"):
        ConceptTrainer(_cfg(root, split, steps=6, data=str(other))).train(log=lambda *_: None)
    # a run on another device draws other noise: it would not be the run it resumes
    from safetensors import safe_open
    from safetensors.torch import save_file

    state = split / "zork.safetensors.run" / "state.safetensors"
    with safe_open(state, framework="pt") as f:
        meta = f.metadata()
    settings = json.loads(meta["settings"])
    assert settings["device"] == "cpu"
    save_file(load_file(state), state, metadata={**meta, "settings": json.dumps({**settings, "device": "cuda"})})
    with pytest.raises(PixArtError, match="a run with --device cuda, not cpu"):
        ConceptTrainer(_cfg(root, split, steps=6)).train(log=lambda *_: None)
    save_file(load_file(state), state, metadata=meta)
    # fewer steps than the run holds would write its later state under a smaller --steps: refused
    with pytest.raises(PixArtError, match=r"--steps 3: .*state.safetensors is already at step 4; give --steps 4"):
        ConceptTrainer(_cfg(root, split, steps=3)).train(log=lambda *_: None)


def test_a_concept_file_no_run_of_its_wrote_is_not_replaced_silently(tiny_concept_setup, tmp_path):
    out = tmp_path / "zork.safetensors"
    out.write_bytes(b"someone else's concept")
    with pytest.raises(PixArtError, match="--out .*zork.safetensors already exists and no run in .* wrote it; pass "
                                          "--overwrite"):
        ConceptTrainer(_cfg(tiny_concept_setup, tmp_path, steps=1))
    assert out.read_bytes() == b"someone else's concept"
    ConceptTrainer(_cfg(tiny_concept_setup, tmp_path, steps=1, overwrite=True)).train(log=lambda *_: None)
    ConceptTrainer(_cfg(tiny_concept_setup, tmp_path, steps=1)).train(log=lambda *_: None)  # its own run: a rerun


def test_the_covariance_is_saved_beside_the_checkpoint_and_reused(tiny_concept_setup, tmp_path, capsys):
    root = tmp_path / "root"
    shutil.copytree(tiny_concept_setup, root)
    ConceptTrainer(_cfg(root, tmp_path, steps=1))
    saved = list((root / "ckpt").glob("perfusion-covariance-*.safetensors"))
    assert len(saved) == 1
    c = load_file(saved[0])["C"]
    assert c.shape == (32, 32) and torch.allclose(c, c.T)
    assert torch.linalg.eigvalsh(c).min() > 0  # an uncentered second moment of enough tokens: positive definite
    capsys.readouterr()
    ConceptTrainer(_cfg(root, tmp_path, steps=1, captions=str(tmp_path / "other.txt")))
    assert f"covariance: reusing {saved[0]}; --captions {tmp_path / 'other.txt'} not read" in capsys.readouterr().out
    ConceptTrainer(_cfg(root, tmp_path, steps=1, captions=None))  # no corpus needed any more
    (root / "ckpt" / saved[0].name).unlink()
    with pytest.raises(PixArtError, match="no covariance for this base model yet; pass --captions"):
        ConceptTrainer(_cfg(root, tmp_path, steps=1, captions=None))


def test_bad_input_gives_one_line_each(tiny_concept_setup, tmp_path):
    root = tiny_concept_setup
    (tmp_path / "empty").mkdir()
    with pytest.raises(PixArtError, match="--data .*empty: no images found"):
        ConceptTrainer(_cfg(root, tmp_path, data=str(tmp_path / "empty")))
    with pytest.raises(PixArtError, match=r"--super 'zebracircle': the tokenizer splits it into \d+ pieces"):
        ConceptTrainer(_cfg(root, tmp_path, super_word="zebracircle"))
    images = tmp_path / "images"
    shutil.copytree(root / "images", images)
    (images / "masks" / "1.png").write_bytes(b"garbage")
    with pytest.raises(PixArtError, match=r"masks/1.png: cannot read mask"):
        ConceptTrainer(_cfg(root, tmp_path, data=str(images)))
    with pytest.raises(PixArtError, match="--out .*: a concept file ends in .safetensors"):
        _cfg(root, tmp_path, out=str(tmp_path / "c.pt"))
    with pytest.raises(PixArtError, match="--concept .circle. is already a word of the tokenizer"):
        ConceptTrainer(_cfg(root, tmp_path, concept="circle"))
    with pytest.raises(PixArtError, match="--lr-value must be positive and finite, got -1"):
        _cfg(root, tmp_path, lr_value=-1)
    with pytest.raises(PixArtError, match="--lr-embedding must be positive and finite, got inf"):
        _cfg(root, tmp_path, lr_embedding=float("inf"))  # was taken, and its NaN loss blamed --lr-value


def test_the_caption_corpus_reads_one_captioners_files_by_glob(tmp_path):
    """A relabeling job's folder holds each captioner's `<shard>.<captioner>.jsonl`; C must come from the one the
    model was trained on, so `DIR/*.metadata.jsonl` reads only those (the folder reads all)."""
    import json

    from pixart.personalize.covariance import read_captions

    for captioner, caption in (("metadata", "a dense caption of a red circle"), ("metadata-short", "red circle")):
        rows = [{"__key__": "k0", "caption": caption, "status": "ok"},
                {"__key__": "k1", "caption": "", "status": "failed"}]
        (tmp_path / f"shapes-000000.{captioner}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert read_captions(str(tmp_path / "*.metadata.jsonl")) == ["a dense caption of a red circle"]
    assert sorted(read_captions(str(tmp_path))) == ["a dense caption of a red circle", "red circle"]
    with pytest.raises(PixArtError, match=r"--captions .*\*.llava.jsonl: no such file or folder"):
        read_captions(str(tmp_path / "*.llava.jsonl"))


def test_a_caption_that_does_not_name_the_concept_is_replaced_and_said(tiny_concept_setup, tmp_path, capsys):
    images = tmp_path / "images"
    shutil.copytree(tiny_concept_setup / "images", images)
    (images / "1.txt").write_text("a photo of a circle in the center")  # the user forgot the concept's word
    trainer = ConceptTrainer(_cfg(tiny_concept_setup, tmp_path, data=str(images), steps=1))
    assert "personalize: 1 of 3 captions do not name 'zork'; a template that does replaces each" in \
        capsys.readouterr().out
    assert sum("zork" in c for c in trainer.captions) == 3
