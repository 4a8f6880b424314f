"""Span-corruption pretraining of the tiny T5 (pixart.encoders.pretrain): T5's noise mask and input/target
pairs against the paper and by hand, the tokenizer's sentinels, and a short run that loads back through
the T5-XXL loader."""
import itertools
import json
import shutil
from collections import Counter

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, T5EncoderModel

from pixart.encoders import TextEncoder, TextEncoderConfig, make_tiny_t5
from pixart.encoders.pretrain import (
    corrupt,
    pretrain_t5,
    random_spans_noise_mask,
    raw_length_for,
    sentinel_ids,
    spans_to_sentinels,
)
from pixart.errors import PixArtError

D = 32
COLORS, SHAPES = ("red", "green", "blue", "yellow"), ("circle", "square", "star", "triangle")
PLACES = ("top left", "top right", "bottom left", "bottom right", "center")


def captions(start: int, n: int) -> list[str]:
    """A small caption language: "a small red star in the top left, on a plain background"."""
    rng = np.random.default_rng(start)
    out = []
    for _ in range(n):
        c, s, p = rng.choice(COLORS), rng.choice(SHAPES), rng.choice(PLACES)
        size = rng.choice(["small", "large"])
        out.append(f"a {size} {c} {s} in the {p}, on a plain background" if rng.random() < 0.5
                   else f"on a plain background, a {c} {s} ({size}) in the {p} of the image")
    return out


def runs(mask: np.ndarray) -> list[tuple[bool, int]]:
    return [(bool(k), len(list(g))) for k, g in itertools.groupby(mask)]


def restore(inputs, targets, sentinels, eos=1) -> list[int]:
    """The original tokens from an (input, target) pair: the input's pieces between sentinels, each followed
    by what the target writes after the same sentinel."""
    def split(seq):  # {sentinel or None (the head): the tokens after it}
        out, key = {None: []}, None
        for t in list(seq)[:-1]:  # drop </s>
            if t in sentinels:
                key = t
                out[key] = []
            else:
                out[key].append(int(t))
        assert seq[-1] == eos
        return out
    kept, dropped = split(inputs), split(targets)
    tokens = kept[None] + dropped[None]
    for s in (t for t in inputs if t in sentinels):
        tokens += dropped[s] + kept[s]
    return tokens


# --- the noise mask -------------------------------------------------------------------------------------

@pytest.mark.parametrize("length, noise, spans", [
    (2, 1, 1), (5, 1, 1), (10, 2, 1), (20, 3, 1), (40, 6, 2), (70, 10, 3), (100, 15, 5), (568, 85, 28)])
def test_mask_density_and_span_count(length, noise, spans):
    """T5: round(length * 0.15) noise tokens (at least 1, at most length - 1) in round(noise / 3) spans (at
    least 1), alternating non-noise/noise, beginning with non-noise (so ending with noise). By hand."""
    rng = np.random.default_rng(0)
    for _ in range(50):
        mask = random_spans_noise_mask(length, rng)
        assert mask.shape == (length,) and mask.dtype == bool and mask.sum() == noise
        r = runs(mask)
        assert [k for k, _ in r] == [False, True] * spans


def test_mask_of_one_token_is_cut_from_two():
    """T5 treats length 1 as 2 (one kept, one noise) and cuts the mask back: nothing is masked."""
    assert random_spans_noise_mask(1, np.random.default_rng(0)).tolist() == [False]


def test_all_masks_equally_likely():
    """'Subject to the above restrictions, all masks are equally likely': length 10, density 0.3, mean span
    1.5 -> 3 noise tokens in 2 spans, 7 kept in 2 spans: 2 x 6 = 12 masks, each 1/12."""
    rng = np.random.default_rng(1)
    seen = Counter(tuple(random_spans_noise_mask(10, rng, 0.3, 1.5)) for _ in range(6000))
    assert len(seen) == 12 and min(seen.values()) > 400 and max(seen.values()) < 600


def test_mask_is_deterministic_per_generator():
    a = [random_spans_noise_mask(70, np.random.default_rng(5)) for _ in range(2)]
    assert np.array_equal(*a)


@pytest.mark.parametrize("input_length, want", [(64, (70, 14)), (512, (568, 114)), (128, (141, 29))])
def test_chunk_lengths_as_t5(input_length, want):
    """random_spans_helper: the longest chunk whose corrupted form (with </s>) is input_length long.
    512 -> 568 tokens and 114-token targets, the numbers of T5's C4 pretraining; by hand, 64 -> 70 (10 noise
    in 3 spans: 60 + 3 + 1 = 64 in, 10 + 3 + 1 = 14 out; 71 would give 11 in 4: 65) and 128 -> 141 (21 in 7:
    120 + 7 + 1 = 128, 21 + 7 + 1 = 29; 142 would keep 21 in 7: 129)."""
    assert raw_length_for(input_length) == want
    raw, target = want
    rng = np.random.default_rng(0)
    i, t = corrupt(np.arange(100, 100 + raw), random_spans_noise_mask(raw, rng), [99, 98, 97, 96] * 10, 1)
    assert len(i) == input_length and len(t) == target


# --- the input/target pair ------------------------------------------------------------------------------

def test_paper_example():
    """Raffel et al. 2020, Figure 2: "Thank you for inviting me to your party last week ." with "for inviting"
    and "last" dropped -> inputs "Thank you <X> me to your party <Y> week .", targets
    "<X> for inviting <Y> last <Z>"."""
    words = "Thank you for inviting me to your party last week .".split()
    vocab = {w: i + 10 for i, w in enumerate(words)} | {"<X>": 99, "<Y>": 98, "<Z>": 97, "</s>": 1}
    names = {v: k for k, v in vocab.items()}
    tokens = np.array([vocab[w] for w in words])
    mask = np.array([w in ("for", "inviting", "last") for w in words])
    inputs, targets = corrupt(tokens, mask, [99, 98, 97], eos_id=1)
    assert [names[t] for t in inputs] == "Thank you <X> me to your party <Y> week . </s>".split()
    assert [names[t] for t in targets] == "<X> for inviting <Y> last <Z> </s>".split()


def test_hand_example_ending_in_noise():
    """The masks T5 draws end in noise: tokens 1..10 with [3, 4] and [9, 10] dropped."""
    tokens = np.arange(11, 21)
    mask = np.array([0, 0, 1, 1, 0, 0, 0, 0, 1, 1], bool)
    inputs, targets = corrupt(tokens, mask, [99, 98, 97], eos_id=1)
    assert inputs.tolist() == [11, 12, 99, 15, 16, 17, 18, 98, 1]
    assert targets.tolist() == [99, 13, 14, 98, 19, 20, 1]
    assert spans_to_sentinels(tokens, mask, [99, 98]).tolist() == [11, 12, 99, 15, 16, 17, 18, 98]


def test_too_many_spans_refused():
    with pytest.raises(PixArtError, match="sentinels"):
        spans_to_sentinels(np.arange(6), np.array([1, 0, 1, 0, 1, 0], bool), [99, 98])


def test_input_and_target_interleave_back_to_the_tokens():
    rng = np.random.default_rng(2)
    sentinels = list(range(999, 900, -1))
    for length in (2, 3, 7, 30, 70, 200):
        for _ in range(20):
            tokens = rng.integers(3, 500, length)
            mask = random_spans_noise_mask(length, rng)
            inputs, targets = corrupt(tokens, mask, sentinels, eos_id=1)
            assert len(inputs) + len(targets) == length + len(runs(mask)) + 2  # a sentinel per run, 2 </s>
            assert restore(inputs, targets, sentinels) == tokens.tolist()
            n = len([r for r in runs(mask) if r[0]])  # noise spans: sentinels 0..n-1, in order, in the input
            assert [t for t in inputs if t in sentinels] == sentinels[:n]
            assert [t for t in targets if t in sentinels] == sentinels[:n]


# --- the tokenizer --------------------------------------------------------------------------------------

def test_tokenizer_has_t5_sentinels_at_the_end(tmp_path):
    corpus = captions(0, 50)
    tok = AutoTokenizer.from_pretrained(make_tiny_t5(tmp_path / "t5", d_model=D, corpus=corpus, vocab_size=256))
    n = len(tok)
    assert tok.convert_tokens_to_ids("<extra_id_0>") == n - 1  # as T5: extra_id_0 = 32099, the last id
    assert tok.convert_tokens_to_ids("<extra_id_31>") == n - 32
    assert sentinel_ids(tok) == list(range(n - 1, n - 33, -1))
    special = getattr(tok, "additional_special_tokens", None) or tok.extra_special_tokens  # transformers 4 / 5
    assert [str(t) for t in special] == [f"<extra_id_{i}>" for i in range(32)]
    assert tok("<extra_id_0>").input_ids == [n - 1, 1]  # one token, never spelled out
    assert tok.decode([tok.convert_tokens_to_ids("\u2581red"), n - 1, 1], skip_special_tokens=True) == "red"
    for caption in corpus[:10]:  # the corpus's words stay whole pieces
        words = caption.replace(",", "").replace("(", "").replace(")", "").split()
        assert all(tok.tokenize(w) == ["\u2581" + w] for w in words), caption
    assert T5EncoderModel.from_pretrained(tmp_path / "t5").config.vocab_size == n


def test_sentinels_only_append(tmp_path):
    """The word and character pieces keep their ids; the sentinels come after them."""
    corpus = captions(0, 50)
    a = AutoTokenizer.from_pretrained(make_tiny_t5(tmp_path / "a", corpus=corpus, vocab_size=256, sentinels=0))
    b = AutoTokenizer.from_pretrained(make_tiny_t5(tmp_path / "b", corpus=corpus, vocab_size=256))
    assert len(b) == len(a) + 32 and a.get_vocab().items() <= b.get_vocab().items()
    assert sentinel_ids(a) == []


# --- pretraining ----------------------------------------------------------------------------------------

def embed(folder, texts=("a small red star in the top left", "a blue circle in the center")):
    enc = TextEncoder(TextEncoderConfig(str(folder), dtype="fp32", max_length=16, local_files_only=True))
    return enc.encode(list(texts))[0]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """An untrained tiny T5 (kept as `raw`) and the same one after 40 steps of span corruption."""
    root = tmp_path_factory.mktemp("pretrain")
    corpus = captions(0, 300)
    raw = make_tiny_t5(root / "raw", d_model=D, seed=0, corpus=corpus, vocab_size=256)
    shutil.copytree(raw, root / "t5")
    report = pretrain_t5(root / "t5", corpus, steps=40, batch_size=16, lr=1e-2, seed=0, heldout=captions(1, 60),
                         progress=False)
    return root, corpus, report


def test_pretraining_lowers_the_loss(pretrained):
    _, _, report = pretrained
    assert len(report.losses) == report.steps == 40 and all(np.isfinite(report.losses))
    assert 4.5 < report.first_loss < 7.0  # about ln(vocab): O(1) logits at the start
    assert report.last_loss < 0.6 * report.first_loss
    assert report.heldout_after < 0.7 * report.heldout_before  # captions it never saw
    assert report.input_length == 64 and report.target_length == 14 and report.seconds > 0


def test_pretrained_folder_loads_like_t5_xxl(pretrained):
    root, _, report = pretrained
    before, after = embed(root / "raw"), embed(root / "t5")
    assert after.shape == before.shape == (2, 16, D) and torch.isfinite(after).all()
    assert not torch.allclose(before, after, atol=1e-3)
    for name in ("tokenizer.json", "tokenizer_config.json"):  # the tokenizer is the same files
        assert (root / "raw" / name).read_bytes() == (root / "t5" / name).read_bytes()
    meta = json.loads((root / "t5" / "pretrain.json").read_text())
    assert meta["steps"] == 40 and meta["noise_density"] == 0.15 and meta["mean_noise_span_length"] == 3.0
    assert sorted(p.name for p in root.iterdir()) == ["raw", "t5"]  # no temp folder left behind
    assert report.folder == str(root / "t5")


def test_pretraining_is_deterministic(pretrained, tmp_path):
    root, corpus, _ = pretrained
    again = pretrain_t5(root / "raw", corpus, steps=40, batch_size=16, lr=1e-2, seed=0, heldout=captions(1, 60),
                        out=tmp_path / "again", progress=False)
    other = pretrain_t5(root / "raw", corpus, steps=40, batch_size=16, lr=1e-2, seed=1, out=tmp_path / "other",
                        progress=False)
    torch.testing.assert_close(embed(tmp_path / "again"), embed(root / "t5"), rtol=0, atol=0)
    assert not torch.allclose(embed(tmp_path / "other"), embed(root / "t5"), atol=1e-3)
    assert again.losses == pretrained[2].losses and other.losses != again.losses
    a, b = (T5EncoderModel.from_pretrained(p).state_dict() for p in (root / "raw", tmp_path / "again"))
    assert a.keys() == b.keys()  # an ordinary T5 encoder folder: the same keys, no decoder


def test_refuses_tokenizer_without_sentinels_and_tiny_corpus(tmp_path):
    plain = make_tiny_t5(tmp_path / "plain", d_model=D, corpus=captions(0, 20), sentinels=0)
    with pytest.raises(PixArtError, match="sentinel"):
        pretrain_t5(plain, captions(0, 20), steps=1, batch_size=2, progress=False)
    t5 = make_tiny_t5(tmp_path / "t5", d_model=D, corpus=captions(0, 20))
    with pytest.raises(PixArtError, match="too few"):
        pretrain_t5(t5, ["a red star"], steps=1, batch_size=2, progress=False)
    assert not (t5 / "pretrain.json").exists()
