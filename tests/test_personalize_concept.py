"""The concept file: round trip, size for PixArt-XL/2 (shapes read off a meta-device model), base-model identity."""
import re

import pytest
import torch

from pixart.errors import PixArtError
from pixart.personalize.concept import Concept, model_identity


def _concept(depth=3, dim=8, text=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Concept("zork", "circle", torch.randn(depth, dim, generator=g), torch.randn(dim, generator=g),
                   torch.randn(dim, generator=g), torch.randn(text, generator=g), "sha256:0123456789abcdef",
                   beta=0.65, tau=0.2)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_round_trip(tmp_path, precision):
    c = _concept()
    size = c.save(tmp_path / "c.safetensors", precision)
    assert size == (tmp_path / "c.safetensors").stat().st_size
    back = Concept.load(tmp_path / "c.safetensors")
    assert (back.name, back.super_word, back.base_model, back.beta, back.tau) == \
        ("zork", "circle", c.base_model, 0.65, 0.2)
    for key in ("value_targets", "i_star", "i_super", "embedding"):
        want = getattr(c, key)
        got = getattr(back, key)
        if precision == "fp32":
            assert torch.equal(got, want)
        else:
            torch.testing.assert_close(got, want.half().float(), rtol=0, atol=0)
    assert not list(tmp_path.glob(".*"))  # no temp file left


def test_pixart_xl2_concept_is_at_most_100_kb(tmp_path):
    """PixArt-XL/2 (depth 28, width 1152) with T5-v1.1-XXL (d_model 4096): 38,656 numbers, fp16."""
    from pixart.models import model_from_config
    from pixart.models.config import ModelConfig

    with torch.device("meta"):
        xl = model_from_config(ModelConfig(arch="pixart"))  # the defaults are PixArt-XL/2's
    depth, hidden = len(xl.blocks), xl.config.hidden_size
    assert (depth, hidden, xl.config.caption_channels) == (28, 1152, 4096)
    concept = _concept(depth, hidden, xl.config.caption_channels)
    size = concept.save(tmp_path / "xl.safetensors")
    assert 77_312 < size <= 100_000  # the tensors alone are 77,312 B; the rest is the header
    assert concept.save(tmp_path / "xl32.safetensors", "fp32") > 100_000  # why the file is stored in fp16


def test_unreadable_or_foreign_files_are_refused(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(PixArtError, match="bad.safetensors: not a readable concept file"):
        Concept.load(bad)
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, tmp_path / "other.safetensors")
    with pytest.raises(PixArtError, match=r"other\.safetensors: not a pixart-perfusion-1 concept file \(format None, "
                                          r"missing value_targets, i_star, i_super, embedding\)$"):
        Concept.load(tmp_path / "other.safetensors")
    c = _concept()
    tensors = {k: getattr(c, k) for k in ("value_targets", "i_star", "i_super", "embedding")}
    save_file(tensors, tmp_path / "bare.safetensors")
    with pytest.raises(PixArtError, match=r"bare\.safetensors: not a pixart-perfusion-1 concept file \(format None\)$"):
        Concept.load(tmp_path / "bare.safetensors")  # its tensors, no metadata


def test_damaged_concept_and_covariance_files_are_one_line(tmp_path):
    """A gate that is not a number was a ValueError, a NaN embedding an all-black image, a singular or
    ill-shaped covariance torch's LinAlgError."""
    from safetensors.torch import load_file, save_file

    from pixart.personalize.covariance import read_c_inv

    good = tmp_path / "c.safetensors"
    _concept().save(good, "fp32")
    tensors, meta = load_file(good), _concept().metadata()
    for change, shown in (({"beta": "high"}, r"metadata ValueError: could not convert string to float: 'high'"),
                          ({"tau": "nan"}, r"tau not finite"),
                          ({"embedding": float("nan")}, r"embedding not finite")):
        t = {k: (torch.full_like(v, change[k]) if k in change else v) for k, v in tensors.items()}
        save_file(t, tmp_path / "bad.safetensors", metadata={k: change.get(k, v) for k, v in meta.items()})
        with pytest.raises(PixArtError, match=rf"bad\.safetensors: a damaged concept file \({shown}\)"):
            Concept.load(tmp_path / "bad.safetensors")
    for c, shown in ((torch.zeros(4, 4), r"C cannot be inverted"), (torch.ones(4, 3), r"C of shape \[4, 3\]"),
                     (torch.full((2, 2), float("nan")), r"C of shape \[2, 2\], square and finite expected")):
        save_file({"C": c}, tmp_path / "cov.safetensors", metadata={"base_model": "sha256:ab"})
        with pytest.raises(PixArtError, match=rf"cov\.safetensors: a damaged covariance file \({shown}"):
            read_c_inv(tmp_path / "cov.safetensors", "sha256:ab")


def test_identity_sees_the_weights_it_depends_on_up_to_bf16():
    w = [torch.randn(4, 4), torch.randn(8, 4)]
    same = model_identity(w[:1], w[1:])
    assert model_identity([w[0].bfloat16().float()], w[1:]) == same
    changed = w[1].clone()
    changed[0, 0] += 0.1
    assert model_identity(w[:1], [changed]) != same
    with pytest.raises(PixArtError, match="trained on base model .* but other.pt is"):
        _concept().check_base(same, "other.pt", 3, 8)


@pytest.mark.parametrize("model, bad", [((4, 8, 16), "value_targets has shape (3, 8), but m needs (4, 8)"),
                                        ((3, 16, 16), "value_targets has shape (3, 8), but m needs (3, 16)"),
                                        ((3, 8, 32), "embedding has shape (16,), but m needs (32,)")])
def test_a_concept_that_does_not_fit_the_model_is_one_line(model, bad):
    """A file claiming this base model whose tensors do not fit it (damaged, or read with a text encoder of another
    width) is refused, not applied to some blocks or failing inside the tokenizer's embedding table."""
    c = _concept()
    c.check_base(c.base_model, "m", 3, 8, 16)
    c.check_base(c.base_model, "m", 3, 8)  # no text encoder to check against
    with pytest.raises(PixArtError, match=rf"^concept 'zork': {re.escape(bad)}$"):
        c.check_base(c.base_model, "m", *model)
