"""Tiny stand-ins for T5 and the SD VAE, built from the real classes and saved with
`save_pretrained`, so tests and the toy demo go through exactly the production loading code."""
from __future__ import annotations

import math
import os
import re
from collections import Counter
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

from .captions import clean_caption

__all__ = ["english_words", "make_tiny_t5", "make_tiny_vae", "sentinel_tokens", "TINY_VAE_DOWNSAMPLE",
           "TINY_T5_SENTINELS"]

TINY_VAE_DOWNSAMPLE = 2  # 2 down blocks -> H/2 x W/2 latents (the SD VAE uses 4 blocks -> 8x)
TINY_T5_SENTINELS = 32  # T5 has 100 <extra_id_N>; a 64-token span-corruption input uses 3, a 120-token one 6

_CORPUS = [
    "a photo of a cat sitting on a red chair", "an astronaut riding a horse on the moon",
    "a watercolor painting of a small house by the lake", "two dogs playing in the snow at night",
    "a close up of a bowl of fruit on a wooden table", "the city skyline at sunset, digital art",
    "a portrait of an old man with a grey beard", "green hills under a blue sky with white clouds",
]


def sentinel_tokens(n: int) -> list[str]:
    """T5's span-corruption sentinels `<extra_id_0>` ... `<extra_id_{n-1}>`, in that order."""
    return [f"<extra_id_{i}>" for i in range(n)]


def english_words() -> list[str]:
    """Everyday English words, most frequent first (`english_words.txt`: from a public frequency list)."""
    lines = Path(__file__).with_name("english_words.txt").read_text(encoding="utf-8").splitlines()
    return [w for w in lines if w and not w.startswith("#")]


def _tiny_tokenizer(corpus: list[str] = (), vocab_size: int = 128,
                    sentinels: int = TINY_T5_SENTINELS) -> PreTrainedTokenizerFast:
    """Unigram + metaspace like T5's sentencepiece: <pad>=0, </s>=1, <unk>=2, eos appended. The pieces are
    the corpus's most frequent words, whole, scored by frequency, then everyday English words
    (`english_words`, 4,000 of them) while `vocab_size` allows, then single characters to spell the rest: as in T5's 32k
    vocabulary, a domain's words ("red", "left") and a user's ("can you make") are one piece each. (Unigram
    *training* on a few hundred sentences splits them into fragments: "re" + "d".) The words are counted
    as the text encoder sees them, after `clean_caption`, which lowercases as PixArt's T5Embedder and
    diffusers' pipeline do: a sentence's first word is no other piece than the same word anywhere else.
    Deterministic.

    `vocab_size` counts these pieces; the `sentinels` come on top, as T5's 100 extra ids come on top of
    its 32,000 pieces, and in T5's order: the vocabulary's last id is `<extra_id_0>`, the one before it
    `<extra_id_1>`, and so on. They are special tokens (never split, dropped by skip_special_tokens)."""
    words = Counter(w for line in list(_CORPUS) + list(corpus) for w in re.findall(r"[a-z]+", clean_caption(line)))
    chars = sorted(set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,:;!?'-&()") | {"\u2581"})
    budget = max(0, vocab_size - 3 - len(chars))
    top = sorted(words.items(), key=lambda wc: (-wc[1], wc[0]))[:budget]
    total = sum(words.values()) + 1
    pieces = [("\u2581" + w, math.log(c / total)) for w, c in top]
    floor = min((score for _, score in pieces), default=0.0) - 5.0  # a character costs more than any word
    known = {w for w, _ in top}
    pieces += [("\u2581" + w, floor + 1.0) for w in english_words() if w not in known][:budget - len(top)]
    extra = sentinel_tokens(sentinels)
    tok = Tokenizer(models.Unigram([("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + pieces
                                   + [(c, floor) for c in chars] + [(t, 0.0) for t in reversed(extra)], unk_id=2))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
    # (transformers 5 stores additional_special_tokens as `extra_special_tokens`; the ids are the same.)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>", model_max_length=512, additional_special_tokens=extra)


def make_tiny_t5(out_dir: str | os.PathLike, d_model: int = 32, seed: int = 0, num_layers: int = 2,
                 num_heads: int = 4, corpus: list[str] = (), vocab_size: int = 128,
                 sentinels: int = TINY_T5_SENTINELS) -> Path:
    """Save a tiny T5-v1.1-style encoder (gated-gelu, untied) and its tokenizer into `out_dir`: `vocab_size`
    word and character pieces plus `sentinels` `<extra_id_N>` tokens at the end, for span-corruption
    pretraining (`pixart.encoders.pretrain`). The weights are random until pretrained."""
    out = Path(out_dir)
    tokenizer = _tiny_tokenizer(corpus, vocab_size, sentinels)
    cfg = T5Config(vocab_size=len(tokenizer), d_model=d_model, d_kv=d_model // num_heads, d_ff=2 * d_model,
                   num_layers=num_layers, num_heads=num_heads, relative_attention_num_buckets=8,
                   relative_attention_max_distance=32, feed_forward_proj="gated-gelu",
                   tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = T5EncoderModel(cfg)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def make_tiny_vae(out_dir: str | os.PathLike, seed: int = 0, scaling_factor: float = 0.18215) -> Path:
    """Save a tiny AutoencoderKL (3 -> 4 latent channels, TINY_VAE_DOWNSAMPLE x) into `out_dir`."""
    out = Path(out_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
            layers_per_block=1, norm_num_groups=4, sample_size=32, scaling_factor=scaling_factor)
    vae.save_pretrained(out)
    return out
