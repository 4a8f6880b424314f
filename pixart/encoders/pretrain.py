"""Span-corruption pretraining of a (tiny) T5 encoder on a caption corpus: T5's own objective.

T5 (Raffel et al. 2020, §3.1.4) drops 15 % of the tokens in spans of mean length 3, replaces each
dropped span by one sentinel `<extra_id_k>` in the input, and trains an encoder-decoder to write the
sentinels followed by the spans they replaced:

    tokens   the big red star in the top left corner </s> a small ...
    input    the big <extra_id_0> in the top left <extra_id_1> small ... </s>
    target   <extra_id_0> red star <extra_id_1> corner </s> a </s>

As in T5 (`t5.data.preprocessors.span_corruption`) captions are tokenized with their `</s>`,
concatenated and cut into chunks that come out at `input_length` tokens after corruption, so no
padding is needed; the masks are drawn afresh for every batch. The decoder and its untied output
layer are built here, small and fresh, and thrown away: only the encoder goes back into the folder,
which stays an ordinary T5 encoder folder (`TextEncoder` loads it as it loads T5-v1.1-XXL)."""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm
from transformers import AutoTokenizer, T5Config, T5EncoderModel, T5ForConditionalGeneration

from ..atomic import atomic_dir
from ..errors import PixArtError
from .captions import clean_caption
from .text import _DTYPE_KW

__all__ = ["NOISE_DENSITY", "MEAN_NOISE_SPAN_LENGTH", "PretrainReport", "pretrain_t5", "random_spans_noise_mask",
           "spans_to_sentinels", "corrupt", "raw_length_for", "sentinel_ids"]

NOISE_DENSITY = 0.15  # T5: 15 % of the tokens are noise...
MEAN_NOISE_SPAN_LENGTH = 3.0  # ...in spans of mean length 3
_WEIGHTS = (".safetensors", ".bin", ".index.json")


def _span_counts(length: int, noise_density: float, mean_noise_span_length: float) -> tuple[int, int]:
    """(noise tokens, noise spans) of a sequence, as T5 fixes them: round(length * density) noise tokens,
    at least one and at most length - 1; round(noise / mean span length) spans, at least one."""
    num_noise = min(max(round(length * noise_density), 1), length - 1)
    return num_noise, max(round(num_noise / mean_noise_span_length), 1)


def _random_segmentation(num_items: int, num_segments: int, rng: np.random.Generator) -> np.ndarray:
    """Lengths of `num_segments` non-empty runs adding up to `num_items`, every such split equally likely:
    the cuts are `num_segments - 1` distinct positions among the `num_items - 1` gaps."""
    cuts = np.sort(rng.choice(num_items - 1, num_segments - 1, replace=False)) + 1
    return np.diff(np.concatenate([[0], cuts, [num_items]]))


def random_spans_noise_mask(length: int, rng: np.random.Generator, noise_density: float = NOISE_DENSITY,
                            mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH) -> np.ndarray:
    """T5's noise mask (True = noise) of a `length`-token sequence. The counts are fixed (`_span_counts`);
    spans alternate non-noise, noise, non-noise, ..., starting with non-noise and ending with noise, and
    subject to that every mask is equally likely. (T5 makes length 1 into 2 and cuts the mask back.)"""
    n = max(length, 2)
    num_noise, num_spans = _span_counts(n, noise_density, mean_noise_span_length)
    noise = _random_segmentation(num_noise, num_spans, rng)
    keep = _random_segmentation(n - num_noise, num_spans, rng)
    runs = np.stack([keep, noise], axis=1).reshape(-1)  # keep_1, noise_1, keep_2, noise_2, ...
    return np.repeat(np.tile([False, True], num_spans), runs)[:length]


def sentinel_ids(tokenizer) -> list[int]:
    """Ids of `<extra_id_0>`, `<extra_id_1>`, ... for as many as the tokenizer has (stops at the first missing)."""
    vocab, ids = tokenizer.get_vocab(), []
    while f"<extra_id_{len(ids)}>" in vocab:
        ids.append(vocab[f"<extra_id_{len(ids)}>"])
    return ids


def spans_to_sentinels(tokens: np.ndarray, mask: np.ndarray, sentinels: Sequence[int]) -> np.ndarray:
    """Each run of masked tokens replaced by one sentinel, the k-th run by `sentinels[k]`; the other
    tokens kept (T5's `noise_span_to_unique_sentinel`)."""
    starts = mask & ~np.concatenate([[False], mask[:-1]])
    if starts.sum() > len(sentinels):
        raise PixArtError(f"span corruption needs {int(starts.sum())} sentinels but the tokenizer has "
                          f"{len(sentinels)}; use shorter chunks or more <extra_id_N> tokens")
    out = np.array(tokens, copy=True)
    out[starts] = np.asarray(sentinels, dtype=out.dtype)[: int(starts.sum())]
    return out[~mask | starts]


def corrupt(tokens: np.ndarray, mask: np.ndarray, sentinels: Sequence[int], eos_id: int
            ) -> tuple[np.ndarray, np.ndarray]:
    """(input, target) of span corruption: the input has each noise span replaced by a sentinel, the
    target each non-noise span, so the target is the sentinels each followed by the span it stands for;
    `</s>` ends both (T5's `denoise` with `noise_span_to_unique_sentinel` / `nonnoise_...`)."""
    eos = np.array([eos_id], dtype=np.asarray(tokens).dtype)
    return (np.concatenate([spans_to_sentinels(tokens, mask, sentinels), eos]),
            np.concatenate([spans_to_sentinels(tokens, ~mask, sentinels), eos]))


def raw_length_for(input_length: int, noise_density: float = NOISE_DENSITY,
                   mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH) -> tuple[int, int]:
    """(tokens per chunk, target length) so that a corrupted chunk is exactly `input_length` long with its
    `</s>`: the longest chunk that fits (T5's `random_spans_helper`). 64 -> (70, 14)."""
    def lengths(n: int) -> tuple[int, int]:
        noise, spans = _span_counts(n, noise_density, mean_noise_span_length)
        return n - noise + spans + 1, noise + spans + 1
    if input_length < 3:
        raise PixArtError(f"input_length must be at least 3, got {input_length}")
    n = input_length
    while lengths(n + 1)[0] <= input_length:
        n += 1
    return n, lengths(n)[1]


def _chunks(token_lists: list[list[int]], raw_length: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Endless chunks of `raw_length` tokens: each pass shuffles the captions, concatenates them and cuts the
    stream from a random offset (so chunk borders move between passes); the ends are dropped."""
    while True:
        stream = np.concatenate([token_lists[i] for i in rng.permutation(len(token_lists))])
        start = int(rng.integers(raw_length))
        stream = stream[start:]
        yield from stream[: len(stream) // raw_length * raw_length].reshape(-1, raw_length)


@dataclass
class PretrainReport:
    """What a pretraining run did: `losses` per step (cross-entropy over target tokens, nats), `last_loss`
    the mean of the last 20 steps (or all, if fewer), `tokens` the corpus size in tokens."""
    folder: str
    steps: int
    batch_size: int
    lr: float
    seed: int
    captions: int
    tokens: int
    input_length: int
    target_length: int
    seconds: float
    first_loss: float
    last_loss: float
    heldout_before: float | None  # mean loss on the held-out captions before training (None: none given)
    heldout_after: float | None
    losses: list[float] = field(repr=False)

    @property
    def steps_per_s(self) -> float:
        return self.steps / self.seconds if self.seconds > 0 else float("inf")

    def describe(self) -> str:
        return (f"span-corruption pretraining: {self.steps} steps of {self.batch_size} x {self.input_length} "
                f"tokens on {self.captions} captions ({self.tokens} tokens) in {self.seconds:.0f} s "
                f"({self.steps_per_s:.1f} steps/s), loss {self.first_loss:.2f} -> {self.last_loss:.2f}"
                + (f", held-out {self.heldout_before:.2f} -> {self.heldout_after:.2f}"
                   if self.heldout_after is not None else ""))


def _seq2seq(encoder: T5EncoderModel, decoder_layers: int | None) -> T5ForConditionalGeneration:
    """A T5-v1.1-style encoder-decoder around `encoder`'s weights: the decoder (and the untied output layer)
    fresh, reading the shared input embedding as in T5; dropout off, as in T5-v1.1's pretraining.

    The output layer is T5-v1.1's: untied from the embedding, decoder outputs not rescaled. transformers 5
    always ties it (`T5Config` forces `tie_word_embeddings=True` and keeps only `scale_decoder_outputs`), so it
    is untied here by hand, on every version. It starts at std d_model^-0.5, so the first logits are O(1) and
    the first loss about ln(vocab) (the shared embedding, std 1, as a head starts a 32-wide model near 20)."""
    c = encoder.config
    cfg = T5Config(vocab_size=c.vocab_size, d_model=c.d_model, d_kv=c.d_kv, d_ff=c.d_ff, num_layers=c.num_layers,
                   num_decoder_layers=decoder_layers or c.num_layers, num_heads=c.num_heads,
                   relative_attention_num_buckets=c.relative_attention_num_buckets,
                   relative_attention_max_distance=c.relative_attention_max_distance,
                   feed_forward_proj=c.feed_forward_proj, layer_norm_epsilon=c.layer_norm_epsilon,
                   dropout_rate=0.0, tie_word_embeddings=False, use_cache=False, pad_token_id=c.pad_token_id,
                   eos_token_id=c.eos_token_id, decoder_start_token_id=c.pad_token_id)
    model = T5ForConditionalGeneration(cfg)
    missing, unexpected = model.load_state_dict(encoder.state_dict(), strict=False)
    stray = [k for k in missing if not k.startswith(("decoder.", "lm_head."))]
    if unexpected or stray:
        raise PixArtError(f"T5 pretraining: the encoder's weights do not fit a T5 encoder-decoder "
                          f"(unexpected {unexpected[:3]}, missing {stray[:3]})")
    model.lm_head.weight = torch.nn.Parameter(torch.randn(c.vocab_size, c.d_model) * c.d_model ** -0.5)
    if getattr(model.config, "scale_decoder_outputs", False):
        raise PixArtError("T5 pretraining: this transformers version rescales the decoder outputs of a T5-v1.1")
    return model


def _batch(chunks, rng: np.random.Generator, raw_length: int, sentinels: list[int], eos: int
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) of a batch of chunks, each corrupted with a fresh mask (drawn after its chunk: `chunks`
    may be a generator that draws from the same `rng`)."""
    pairs = [corrupt(c, random_spans_noise_mask(raw_length, rng), sentinels, eos) for c in chunks]
    return (torch.from_numpy(np.stack([p[0] for p in pairs])).long(),
            torch.from_numpy(np.stack([p[1] for p in pairs])).long())


def _train(model, opt, sched, chunks: Iterator[np.ndarray], rng: np.random.Generator, raw_length: int,
           sentinels: list[int], eos: int, batch_size: int, steps: int, losses: list[float], progress: bool) -> float:
    """The training loop; appends each step's loss to `losses` and returns the seconds it took."""
    t0 = time.perf_counter()
    with tqdm(total=steps, desc="pretrain T5 (span corruption)", unit="step", disable=not progress) as bar:
        for _ in range(steps):
            inputs, targets = _batch((next(chunks) for _ in range(batch_size)), rng, raw_length, sentinels, eos)
            loss = model(input_ids=inputs, labels=targets).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
            bar.update()
            bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    return time.perf_counter() - t0


@torch.no_grad()
def _heldout_loss(model, token_lists: list[list[int]], raw_length: int, sentinels: list[int], eos: int,
                  seed: int, max_chunks: int = 256) -> float | None:
    """Mean loss over (up to `max_chunks`) chunks of held-out captions, with masks fixed by `seed`."""
    if not token_lists:
        return None
    rng = np.random.default_rng([seed, 6])
    stream = np.concatenate(token_lists)
    chunks = stream[: len(stream) // raw_length * raw_length].reshape(-1, raw_length)[:max_chunks]
    if not len(chunks):
        return None
    inputs, targets = _batch(chunks, rng, raw_length, sentinels, eos)
    was = model.training
    model.eval()
    loss = model(input_ids=inputs, labels=targets).loss.item()
    model.train(was)
    return loss


def pretrain_t5(folder: str | os.PathLike, corpus: Sequence[str], steps: int, batch_size: int = 64,
                lr: float = 1e-2, seed: int = 0, input_length: int = 64, decoder_layers: int | None = None,
                weight_decay: float = 0.01, clean: bool = True, heldout: Sequence[str] = (),
                out: str | os.PathLike | None = None, threads: int | None = 1,
                progress: bool = True) -> PretrainReport:
    """Pretrain the T5 encoder in `folder` (a `make_tiny_t5` folder, or any T5 encoder + tokenizer with
    `<extra_id_N>` sentinels) by span corruption on `corpus`, and write it back into `folder` (or into `out`)
    as an ordinary T5 encoder folder, atomically; the tokenizer and any other files are copied unchanged.

    AdamW (weight decay on matrices only), `lr` after a linear warm-up over the first 5 % of the steps,
    decaying linearly to 0, gradients clipped at 1; float32 on the CPU. Captions go through `clean_caption`
    first, as `TextEncoder` does by default. The same seed gives the same weights (on one machine and
    thread count). `heldout` captions, if any, are scored before and after (the same masks both times).
    Returns a `PretrainReport`, also saved as the folder's `pretrain.json`.

    `threads`: torch's intra-op threads for the run (restored after; None leaves them). One by default: a
    32-wide model's ops are too small to split, and on a busy 2-core machine two threads measured 24x
    slower than one (each of a step's ~2,000 parallel regions waits for the other core)."""
    src = Path(folder)
    if steps < 1 or batch_size < 1:
        raise PixArtError(f"pretrain_t5: steps and batch_size must be positive, got {steps}, {batch_size}")
    tokenizer = AutoTokenizer.from_pretrained(src)
    sentinels = sentinel_ids(tokenizer)
    if not sentinels:
        raise PixArtError(f"{src}: the tokenizer has no <extra_id_N> sentinel tokens for span corruption "
                          "(make_tiny_t5 adds them)")
    def tokenize(captions: Sequence[str]) -> list[list[int]]:
        texts = [clean_caption(t) for t in captions] if clean else list(captions)
        return [ids for ids in tokenizer(texts, add_special_tokens=True).input_ids if len(ids) > 1] if texts else []

    token_lists, heldout_lists = tokenize(corpus), tokenize(heldout)
    raw_length, target_length = raw_length_for(input_length)
    n_tokens = sum(map(len, token_lists))
    if n_tokens < 2 * raw_length:
        raise PixArtError(f"pretrain_t5: the corpus has {n_tokens} tokens, too few for chunks of {raw_length}")

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = T5EncoderModel.from_pretrained(src, **{_DTYPE_KW: torch.float32})
        model = _seq2seq(encoder, decoder_layers)
    model.train()
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.999), eps=1e-8)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup else max(0.0, (steps - s) / max(1, steps - warmup)))
    rng = np.random.default_rng([seed, 5])  # masks and chunking; torch's generator is not touched
    chunks = _chunks(token_lists, raw_length, rng)
    eos, losses, scores = tokenizer.eos_token_id, [], []
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        scores.append(_heldout_loss(model, heldout_lists, raw_length, sentinels, eos, seed))
        seconds = _train(model, opt, sched, chunks, rng, raw_length, sentinels, eos, batch_size, steps, losses,
                         progress)
        scores.append(_heldout_loss(model, heldout_lists, raw_length, sentinels, eos, seed))
    finally:
        torch.set_num_threads(before)
    if not all(math.isfinite(x) for x in losses):
        raise PixArtError(f"pretrain_t5: the loss is not finite ({losses[-1]}); lower lr (was {lr})")

    encoder.load_state_dict({k: v for k, v in model.state_dict().items() if k in encoder.state_dict()})
    tail = losses[-min(20, len(losses)):]
    report = PretrainReport(folder=str(Path(out or src)), steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                            captions=len(token_lists), tokens=n_tokens, input_length=input_length,
                            target_length=target_length, seconds=seconds, first_loss=losses[0],
                            last_loss=sum(tail) / len(tail), heldout_before=scores[0], heldout_after=scores[1],
                            losses=losses)
    same = out is None or Path(out).resolve() == src.resolve()
    with atomic_dir(src if same else out, overwrite=same, sources=() if same else (src,)) as tmp:
        for f in src.iterdir():  # tokenizer, config and anything else: unchanged
            if f.is_file() and not f.name.endswith(_WEIGHTS) and f.name != "pretrain.json":
                shutil.copy2(f, tmp / f.name)
        encoder.save_pretrained(tmp)
        meta = {k: v for k, v in asdict(report).items() if k not in ("folder", "losses")}
        meta |= {"objective": "span corruption", "noise_density": NOISE_DENSITY,
                 "mean_noise_span_length": MEAN_NOISE_SPAN_LENGTH, "decoder_layers": model.config.num_decoder_layers}
        (tmp / "pretrain.json").write_text(json.dumps(meta, indent=2) + "\n")
    return report
