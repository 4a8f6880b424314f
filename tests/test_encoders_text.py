"""TextEncoder on a tiny T5 saved locally: the same loading path as T5-v1.1-XXL."""
import json

import pytest
import torch
from tolerance import lower_precision
from transformers import AutoTokenizer, T5EncoderModel

from pixart.encoders import EncoderLoadError, TextEncoder, TextEncoderConfig, clean_caption, make_tiny_t5
from pixart.encoders.tiny import english_words

D = 32
CAPS = ["a cat sitting on a red chair", "An astronaut riding a horse on the moon, digital art", ""]


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    return make_tiny_t5(tmp_path_factory.mktemp("t5"), d_model=D, seed=0)


@pytest.fixture(scope="module")
def enc32(t5_dir):
    return TextEncoder(TextEncoderConfig(str(t5_dir), dtype="fp32"))


def test_tiny_t5_loads_with_plain_transformers(t5_dir):
    model, tok = T5EncoderModel.from_pretrained(t5_dir), AutoTokenizer.from_pretrained(t5_dir)
    assert model.config.d_model == D and tok.pad_token_id == 0 and tok.eos_token_id == 1
    assert tok("a cat").input_ids[-1] == 1  # eos appended, like T5
    assert tok.unk_token_id not in tok("a zebra quiz, 42 x's!").input_ids  # whole alphabet covered


def test_tiny_tokenizer_keeps_corpus_words_whole(tmp_path):
    corpus = ["a red star in the top left corner", "a blue circle on the right side"]
    tok = AutoTokenizer.from_pretrained(make_tiny_t5(tmp_path / "t5", d_model=D, corpus=corpus, vocab_size=256))
    assert tok.tokenize("a red star on the left") == ["\u2581a", "\u2581red", "\u2581star", "\u2581on", "\u2581the",
                                                      "\u2581left"]
    assert len(tok.tokenize("zebra")) > 1  # an unseen word is spelled out, never <unk>
    text = "A zebra, 42 x's!"
    assert tok.decode(tok(text).input_ids, skip_special_tokens=True) == text


def test_tiny_tokenizer_fills_its_vocabulary_with_everyday_english(tmp_path):
    """Beyond the corpus's words, a larger vocabulary keeps a user's everyday words whole, as T5's 32k pieces
    do (the list: pyspellchecker's OpenSubtitles frequencies, pixart/encoders/english_words.txt)."""
    corpus = ["a red star in the top left corner"]
    tok = AutoTokenizer.from_pretrained(make_tiny_t5(tmp_path / "t5", d_model=D, corpus=corpus, vocab_size=4096))
    assert english_words()[:5] == ["the", "you", "i", "to", "a"]  # the list's most frequent words
    assert tok.tokenize("can you make a picture with nothing more, please") == [
        "\u2581can", "\u2581you", "\u2581make", "\u2581a", "\u2581picture", "\u2581with", "\u2581nothing",
        "\u2581more", ",", "\u2581please"]
    assert len(tok.tokenize("zebra")) > 1  # rarer than the list's 4,000: still spelled out
    assert tok.convert_tokens_to_ids("<extra_id_0>") == len(tok) - 1  # T5's sentinels stay last
    assert T5EncoderModel.from_pretrained(tmp_path / "t5").config.vocab_size == len(tok)


def test_tiny_tokenizer_counts_words_as_the_encoder_sees_them(tmp_path):
    """PixArt lowercases every caption before T5 (diffusers' PixArtAlphaPipeline._text_preprocessing: `text.lower()`
    without clean_caption, `_clean_caption` with it; TextEncoder's clean_caption the same): a word that starts a
    sentence must be the same piece as the word anywhere else, not a capitalized piece nothing ever reaches."""
    corpus = ["Style: a clean render. It shows a red star.", "It looks like a photo. Style: noisy."]
    folder = make_tiny_t5(tmp_path / "t5", d_model=D, corpus=corpus, vocab_size=256)
    tok, enc = AutoTokenizer.from_pretrained(folder), TextEncoder(TextEncoderConfig(str(folder), dtype="fp32"))
    ids, mask = enc.tokenize(corpus)
    seen = [tok.convert_ids_to_tokens(row[m.bool()].tolist()) for row, m in zip(ids, mask, strict=True)]
    assert seen[1] == ["\u2581it", "\u2581looks", "\u2581like", "\u2581a", "\u2581photo", ".", "\u2581style", ":",
                       "\u2581noisy", ".", "</s>"]
    assert "\u2581Style" not in tok.get_vocab()


def test_without_cleaning_captions_are_still_lowercased(t5_dir):
    """diffusers' PixArtAlphaPipeline._text_preprocessing with clean_caption=False: `text.lower().strip()`."""
    raw = TextEncoder(TextEncoderConfig(str(t5_dir), dtype="fp32", clean=False))
    assert torch.equal(raw.tokenize(["  A Cat ON a RED chair "])[0], raw.tokenize(["a cat on a red chair"])[0])
    assert not torch.equal(raw.tokenize(["a cat, &amp; a chair"])[0], raw.tokenize(["a cat, & a chair"])[0])


def test_tiny_t5_is_deterministic(t5_dir, tmp_path):
    other = make_tiny_t5(tmp_path / "again", d_model=D, seed=0)
    a, b = T5EncoderModel.from_pretrained(t5_dir), T5EncoderModel.from_pretrained(other)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert json.loads((t5_dir / "tokenizer.json").read_text())["model"] == \
        json.loads((other / "tokenizer.json").read_text())["model"]


def test_encode_shapes_mask_and_padding(enc32):
    feats, mask = enc32.encode(CAPS)
    assert feats.shape == (3, 120, D) and feats.dtype == torch.float32
    assert mask.shape == (3, 120) and mask.dtype == torch.long
    lengths = [len(enc32.tokenizer(clean_caption(c)).input_ids) for c in CAPS]
    assert mask.sum(1).tolist() == lengths and lengths[2] == 1  # "" -> just </s>
    ids, _ = enc32.tokenize(CAPS)
    for row, n in zip(ids, lengths, strict=True):
        assert row[n - 1] == 1 and (row[n:] == 0).all()  # eos then pad id 0
    assert mask[0, : lengths[0]].all() and not mask[0, lengths[0]:].any()


@pytest.mark.parametrize("clean", [True, False])
def test_features_and_mask_are_diffusers_pixart_pipelines(t5_dir, clean):
    """What the transformer reads at training time must be what diffusers' PixArtAlphaPipeline.encode_prompt
    (diffusers/pipelines/pixart_alpha/pipeline_pixart_alpha.py: max_sequence_length 120, its negative prompt "")
    gives it at sampling time, cleaned or not, for a caption past 120 tokens, markup and a URL too."""
    from diffusers import PixArtAlphaPipeline

    pipe = PixArtAlphaPipeline(tokenizer=AutoTokenizer.from_pretrained(t5_dir), vae=None, transformer=None,
                               text_encoder=T5EncoderModel.from_pretrained(t5_dir), scheduler=None)
    captions = [*CAPS, "A RED chair, https://example.com/a.png <b>bold</b> &amp; more" + " words" * 150]
    feats, mask = TextEncoder(TextEncoderConfig(str(t5_dir), dtype="fp32", clean=clean)).encode(captions)
    theirs, their_mask, negative, negative_mask = pipe.encode_prompt(
        captions, negative_prompt="", device="cpu", clean_caption=clean, max_sequence_length=120)
    assert torch.equal(mask, their_mask.long()) and mask[-1].all()
    torch.testing.assert_close(feats, theirs)
    null, null_mask = TextEncoder(TextEncoderConfig(str(t5_dir), dtype="fp32", clean=clean)).encode([""])
    torch.testing.assert_close(null.expand_as(negative), negative)
    assert torch.equal(null_mask.expand_as(negative_mask), negative_mask.long())


def test_truncation_keeps_eos(t5_dir):
    enc = TextEncoder(TextEncoderConfig(str(t5_dir), dtype="fp32", max_length=8))
    ids, mask = enc.tokenize(["a photo of a cat sitting on a red chair by the lake at night"])
    assert ids.shape == (1, 8) and mask.sum() == 8 and ids[0, -1] == 1


def test_bf16_close_to_fp32(t5_dir, enc32):
    enc16 = TextEncoder(TextEncoderConfig(str(t5_dir), dtype="bf16"))
    f16, m16 = enc16.encode(CAPS)
    f32, m32 = enc32.encode(CAPS)
    assert f16.dtype == torch.bfloat16 and torch.equal(m16, m32)
    torch.testing.assert_close(f16.float(), f32, **lower_precision(f32))


def test_empty_caption_is_the_eos_token_alone(enc32):
    """diffusers' PixArtAlphaPipeline encodes the negative prompt "" to one valid token, T5's </s>."""
    feats, mask = enc32.encode([""])
    assert feats.shape == (1, 120, D) and mask.sum() == 1
    assert enc32.tokenize([""])[0][0, 0].item() == enc32.tokenizer.eos_token_id


def test_fp16_refused():
    with pytest.raises(ValueError, match="fp16"):
        TextEncoderConfig("whatever", dtype="fp16")
    with pytest.raises(ValueError, match="dtype"):
        TextEncoderConfig("whatever", dtype="int8")


@pytest.mark.parametrize("make", [lambda p: p / "does" / "not" / "exist", lambda p: "./no/such/dir"])
def test_missing_path_one_line_error(tmp_path, make):
    path = str(make(tmp_path))
    with pytest.raises(EncoderLoadError) as ei:
        TextEncoder(TextEncoderConfig(path))
    assert path in str(ei.value) and "\n" not in str(ei.value)


def test_dir_without_config_and_offline_hub_id(tmp_path):
    with pytest.raises(EncoderLoadError, match="config.json|failed to load") as ei:
        TextEncoder(TextEncoderConfig(str(tmp_path)))
    assert str(tmp_path) in str(ei.value) and "\n" not in str(ei.value)
    with pytest.raises(EncoderLoadError, match="no-such-org/no-such-t5"):
        TextEncoder(TextEncoderConfig("no-such-org/no-such-t5", local_files_only=True))


def test_wrong_model_type_rejected(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(EncoderLoadError, match="bert"):
        TextEncoder(TextEncoderConfig(str(tmp_path)))


def test_a_vae_folder_is_not_a_t5_encoder(tmp_path):
    from pixart.encoders import make_tiny_vae

    vae = make_tiny_vae(tmp_path / "vae")  # a diffusers config: _class_name, no model_type
    with pytest.raises(EncoderLoadError, match=rf"^T5 text encoder: '{vae}' is not a T5 encoder \(its config has "
                                               r"_class_name 'AutoencoderKL', not model_type 't5'\)$"):
        TextEncoder(TextEncoderConfig(str(vae)))


def test_pipeline_layout_with_subfolders(tmp_path, t5_dir):
    make_tiny_t5(tmp_path / "text_encoder", d_model=D)
    AutoTokenizer.from_pretrained(t5_dir).save_pretrained(tmp_path / "tokenizer")
    enc = TextEncoder(TextEncoderConfig(str(tmp_path), subfolder="text_encoder",
                                        tokenizer_subfolder="tokenizer", dtype="fp32"))
    assert enc.dim == D and enc.encode(["a cat"])[0].shape == (1, 120, D)


# PixArt-alpha's clean_caption (diffusion/model/t5.py, T5Embedder.text_preprocessing runs it twice on every
# caption; diffusers' PixArtAlphaPipeline._clean_caption is the same code): each case one of its rules.
@pytest.mark.parametrize("raw, want", [
    ("A photo of a CAT", "a photo of a cat"),  # lowercased
    ("A%20red%20car", "a red car"),  # url-unquoted first
    ("shop at example.com/sale today", "shop at today"),  # urls
    ("A <b>Red</b> cat", "a red cat"),  # markup, by BeautifulSoup
    ("photo by @john_doe   on\n\tunsplash", "photo by on unsplash"),  # @handles; whitespace runs
    ("\u201cquoted\u201d -- text...", '"quoted" - text'),  # quotes and dashes unified, ellipses
    ("a photo of a cat (black and white) on a sofa", "a photo of a cat black and white on a sofa"),  # bad punctuation
    ("salt & pepper | a dog/cat", "salt pepper a dog cat"),
    ("red,blue and green balls", "red, blue and green balls"),  # a space after a comma
    ("close-up of a blue-eyed, long-haired, well-groomed, snow-white cat",  # more than 3 hyphens: all spaces
     "close up of a blue eyed, long haired, well groomed, snow white cat"),
    ("a close-up of a red car", "a close-up of a red car"),  # 3 or fewer: kept
    ("product jc6640 free shipping", "product"),  # product codes and shop spam
    ("img_001.JPG 1920x1080 a   view", "a view"),  # file names and sizes
    ("Style: noisy, with JPEG artifacts.", "style: noisy, with artifacts."),  # image-format words
    ("'a cat on a mat'", "a cat on a mat"),  # wrapping quotes
    ("it's a dog's life", "it's a dog's life"),
])
def test_clean_caption(raw, want):
    assert clean_caption(raw) == want


def test_encode_applies_cleaning(enc32):
    a, _ = enc32.encode(["A CAT <i>on</i> a chair http://x.com/y"])
    b, _ = enc32.encode(["a cat on a chair"])
    torch.testing.assert_close(a, b)
