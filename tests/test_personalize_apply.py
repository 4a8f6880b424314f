"""Concepts at run time: our sampler and diffusers (PixArtTransformer2DModel, PixArtAlphaPipeline) agree; a prompt
without the concept is the base model's; another base model is refused; `pixart sample --concept` end to end."""
import re
import shutil

import pytest
import torch
from safetensors.torch import save_file

from pixart.cli.main import main
from pixart.errors import PixArtError


@pytest.fixture(scope="module")
def trained(tiny_concept_setup, tmp_path_factory):
    """The tiny setup with a trained concept (a few steps, fp32) and the checkpoint exported to diffusers."""
    from pixart.export.diffusers import PipelineParts, export_checkpoint
    from pixart.personalize.trainer import ConceptTrainer, PersonalizeConfig

    out = tmp_path_factory.mktemp("trained")
    cfg = PersonalizeConfig(str(tiny_concept_setup / "ckpt"), str(tiny_concept_setup / "images"), "zork", "circle",
                            str(out / "zork.safetensors"), captions=str(tiny_concept_setup / "captions.txt"), steps=6,
                            batch=2, precision="fp32", lr_value=0.1, lr_embedding=0.05)
    ConceptTrainer(cfg).train(log=lambda *_: None)
    t5 = str(tiny_concept_setup / "t5")
    export_checkpoint(tiny_concept_setup / "ckpt", out / "export", PipelineParts(t5, t5, None))
    return tiny_concept_setup, out


def _ours(root):
    from pixart.checkpoint import load_model
    from pixart.encoders.text import TextEncoder, TextEncoderConfig

    model = load_model(root / "ckpt").eval()
    text = TextEncoder(TextEncoderConfig(str(root / "t5"), max_length=16, dtype="fp32"))
    return model, text


def _apply(model, text, root, concept_file, **kw):
    from pixart.personalize.apply import apply_concepts, concept_c_inv
    from pixart.personalize.concept import Concept

    return apply_concepts(model, [Concept.load(concept_file)], concept_c_inv(root / "ckpt", model), text, **kw)


PROMPTS = ["a photo of a zork on the left", "a red circle in the top right"]


def test_a_prompt_without_the_concept_is_the_base_models(trained):
    root, out = trained
    model, text = _ours(root)
    x, t = torch.randn(2, 12, 8, 8), torch.tensor([100, 700])
    with torch.no_grad():
        y, mask = text.encode(PROMPTS)
        base = model(x, t, y, mask)
        _apply(model, text, root, out / "zork.safetensors")
        y2, mask2 = text.encode(PROMPTS)
        edited = model(x, t, y2, mask2)
    assert torch.equal(y2[1], y[1]) and torch.equal(edited[1], base[1])  # no concept: bitwise the base model
    assert (edited[0] - base[0]).abs().max() > 1e-3  # the concept's prompt is changed


def test_the_concept_word_is_one_dedicated_token(trained):
    root, out = trained
    model, text = _ours(root)
    _apply(model, text, root, out / "zork.safetensors")
    ids, _ = text.tokenize(["a photo of a zork on the left"])
    plain, _ = text.tokenize(["a photo of a circle on the left"])
    token = text.tokenizer.convert_tokens_to_ids("zork")
    assert token >= 3 and (ids == token).sum() == 1
    assert torch.equal(ids[ids != token], plain[plain != text.tokenizer.convert_tokens_to_ids("\u2581circle")])


def test_diffusers_applies_the_same_edit(trained):
    from diffusers import PixArtAlphaPipeline, PixArtTransformer2DModel

    from pixart.personalize import diffusers as pd
    from pixart.personalize.concept import pixart_identity
    from pixart.personalize.covariance import covariance_path

    root, out = trained
    model, text = _ours(root)
    _apply(model, text, root, out / "zork.safetensors", beta=0.6, tau=0.15)
    cov = covariance_path(root / "ckpt", pixart_identity(model))
    transformer = PixArtTransformer2DModel.from_pretrained(out / "export" / "transformer").eval()
    pd.apply_concepts(transformer, [out / "zork.safetensors"], cov, beta=0.6, tau=0.15)
    x, t = torch.randn(2, 12, 8, 8), torch.tensor([10, 900])
    with torch.no_grad():
        y, mask = text.encode(PROMPTS)
        ours = model(x, t, y, mask)
        theirs = transformer(x, encoder_hidden_states=y, encoder_attention_mask=mask, timestep=t,
                             added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
    assert (ours - theirs).abs().max() <= 1e-5
    # the pipeline: one call teaches its tokenizer and T5 the word, and edits its transformer
    pipe = PixArtAlphaPipeline.from_pretrained(out / "export", vae=None)
    pd.apply_concepts(pipe, [out / "zork.safetensors"], out / "export" / cov.name)  # the export ships its copy
    embeds, pmask, _, _ = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False, clean_caption=True,
                                             max_sequence_length=16)
    torch.testing.assert_close(embeds, y, rtol=0, atol=1e-5)
    assert torch.equal(pmask.long(), mask)


def test_another_base_model_is_refused(trained):
    from diffusers import PixArtTransformer2DModel

    from pixart.personalize import diffusers as pd

    root, out = trained
    model, text = _ours(root)
    with torch.no_grad():
        model.blocks[0].cross_attn.kv_linear.weight.mul_(1.1)
    from pixart.personalize.apply import apply_concepts
    from pixart.personalize.concept import Concept

    with pytest.raises(PixArtError, match="concept 'zork' was trained on base model sha256:"):
        apply_concepts(model, [Concept.load(out / "zork.safetensors")], torch.eye(32), text)
    transformer = PixArtTransformer2DModel.from_pretrained(out / "export" / "transformer")
    with torch.no_grad():
        transformer.caption_projection.linear_1.weight.add_(0.01)
    with pytest.raises(PixArtError, match="but PixArtTransformer2DModel is sha256:"):
        pd.apply_concepts(transformer, [out / "zork.safetensors"], root / "ckpt" / "unused.safetensors")


def test_cli_personalize_then_sample(trained, tmp_path, capsys):
    root, out = trained
    concept = tmp_path / "cli.safetensors"
    assert main(["personalize", str(root / "ckpt"), "--data", str(root / "images"), "--concept", "zork", "--super",
                 "circle", "--out", str(concept), "--steps", "2", "--batch", "2"]) == 0
    assert "bytes (fp16)" in capsys.readouterr().out
    png = tmp_path / "s.png"
    for extra in ([], ["--global-lock", "--beta", "0.6"]):
        assert main(["sample", str(root / "ckpt"), "--concept", str(concept), "--prompt", PROMPTS[0], "--prompt",
                     PROMPTS[1], "--steps", "2", "--out", str(png), *extra]) == 0
        assert "concepts zork" in capsys.readouterr().out and png.stat().st_size > 0
    twice = shutil.copy(concept, tmp_path / "twice.safetensors")  # two files of one word: which one is meant?
    assert main(["sample", str(root / "ckpt"), "--concept", str(concept), "--concept", str(twice), "--prompt",
                 PROMPTS[0], "--out", str(png)]) == 2
    assert f"--concept {twice}: its word 'zork' is also {concept}'s" in capsys.readouterr().err
    assert main(["sample", str(root / "ckpt"), "--global-lock", "--prompt", PROMPTS[0], "--out", str(png)]) == 2
    assert "give a --concept" in capsys.readouterr().err
    other = tmp_path / "other"
    shutil.copytree(root / "ckpt", other)
    from safetensors.torch import load_file, save_file

    weights = load_file(other / "model.safetensors")
    weights["blocks.0.cross_attn.kv_linear.weight"] *= 1.5
    save_file(weights, other / "model.safetensors")
    assert main(["sample", str(other), "--concept", str(concept), "--prompt", PROMPTS[0], "--out", str(png)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "Loading weights" not in line]
    assert len(err) == 1 and err[0].startswith("pixart sample: error: concept 'zork' was trained on base model")


def test_global_lock_takes_the_keys_from_the_super_prompt(trained):
    from pixart.personalize.apply import global_lock

    root, out = trained
    model, text = _ours(root)
    edits = _apply(model, text, root, out / "zork.safetensors", beta=0.6)
    x, t = torch.randn(1, 12, 8, 8), torch.tensor([300])
    y, mask = text.encode([PROMPTS[0]])
    y_super, _ = text.encode(["a photo of a circle on the left"])
    with torch.no_grad():
        local = model(x, t, y, mask)
        with global_lock(model, y):  # keys from the same prompt: nothing changes
            same = model(x, t, y, mask)
        with global_lock(model, y_super):
            model(x, t, y, mask)
            keys = edits[0].key_input
            glob = model(x, t, y, mask)
    assert torch.equal(same, local) and not torch.equal(glob, local)
    torch.testing.assert_close(keys, model.y_embedder.y_proj(y_super))
    assert all(e.key_input is None for e in edits)  # the lock ends with its block


def test_a_covariance_of_another_base_model_is_refused(trained, tmp_path, capsys):
    """C is the base model's own: another model's would edit in the wrong metric, silently. Refused as a concept
    of another model is, naming both models, by personalize, sample and diffusers alike."""
    from diffusers import PixArtTransformer2DModel

    from pixart.personalize import diffusers as pd
    from pixart.personalize.apply import concept_c_inv
    from pixart.personalize.concept import pixart_identity
    from pixart.personalize.trainer import ConceptTrainer, PersonalizeConfig

    root, out = trained
    model, _ = _ours(root)
    identity = pixart_identity(model)
    other = tmp_path / "other.safetensors"
    save_file({"C": torch.eye(32, dtype=torch.float64)}, other, metadata={"base_model": "sha256:0123456789abcdef"})
    refused = re.escape(f"{other}: a covariance of base model sha256:0123456789abcdef, but ") + "{} is " + \
        re.escape(f"{identity}: use the covariance file of this base model")
    with pytest.raises(PixArtError, match=refused.format(re.escape(str(root / "ckpt")))):
        concept_c_inv(root / "ckpt", model, other)
    transformer = PixArtTransformer2DModel.from_pretrained(out / "export" / "transformer")
    with pytest.raises(PixArtError, match=refused.format("PixArtTransformer2DModel")):
        pd.apply_concepts(transformer, [out / "zork.safetensors"], other)
    with pytest.raises(PixArtError, match=refused.format("this model")):
        ConceptTrainer(PersonalizeConfig(str(root / "ckpt"), str(root / "images"), "zork", "circle",
                                         str(tmp_path / "c.safetensors"), covariance=str(other)))
    assert main(["sample", str(root / "ckpt"), "--concept", str(out / "zork.safetensors"), "--covariance", str(other),
                 "--prompt", PROMPTS[0], "--steps", "1", "--out", str(tmp_path / "s.png")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "Loading weights" not in line]
    assert len(err) == 1 and "a covariance of base model sha256:0123456789abcdef" in err[0]
    save_file({"C": torch.eye(32, dtype=torch.float64)}, other)  # no base_model recorded: cannot be checked
    with pytest.raises(PixArtError, match=r"a covariance of base model unknown \(no base_model in its metadata\)"):
        concept_c_inv(root / "ckpt", model, other)
