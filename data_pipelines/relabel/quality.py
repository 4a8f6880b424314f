"""Is a captioner's output usable? Refusals, degenerate repetition, empty or over-long text.

A bad caption is worse than none: stage 2 would learn "I'm sorry, I cannot..." or a looping
"a red circle, a red circle, ..." as the description of an image. The job retries a rejected
sample once (with another seed where the captioner takes one), then records it as failed with
the reason this module gives.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

# Phrases VLMs open a refusal or disclaimer with, at the start of a sentence among the first words,
# so a caption that quotes a sign saying "I cannot wait" is not thrown away.
REFUSAL = re.compile(
    r"(?:^|[.!?]\s+)(i'?m sorry|i am sorry|sorry, but|i apologi[sz]e|i cannot|i can'?t|i can not"
    r"|i'?m (?:not able|unable)"
    r"|i am (?:not able|unable)|i do not have the ability|as an ai\b|as a language model|i'?m an ai\b)", re.I)


@dataclass(frozen=True)
class QualityConfig:
    max_words: int = 150  # longer is rambling or a loop cut at max_new_tokens; T5 keeps 120 tokens anyway
    refusal_words: int = 30  # where a refusal is looked for
    min_repeats: int = 4  # an n-gram this frequent ...
    max_repeat_share: float = 0.5  # ... covering more than this share of the words is degenerate
    max_ngram: int = 8


def _tokens(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


def repetition(tokens: list[str], cfg: QualityConfig = QualityConfig()) -> tuple[str, int] | None:
    """(n-gram, count) when one n-gram loops: repeated back to back `min_repeats` times anywhere,
    or covering more than `max_repeat_share` of all words; None for healthy text."""
    k = cfg.min_repeats
    for n in range(1, cfg.max_ngram + 1):
        if len(tokens) < n * k:
            break
        for i in range(len(tokens) - n * k + 1):  # a loop: the same n words k times in a row
            gram = tokens[i:i + n]
            if all(tokens[i + j * n:i + (j + 1) * n] == gram for j in range(1, k)):
                return " ".join(gram), k
        gram, count = Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)).most_common(1)[0]
        if count >= k and count * n > cfg.max_repeat_share * len(tokens):
            return " ".join(gram), count
    return None


def check(text: str | None, cfg: QualityConfig = QualityConfig()) -> str | None:
    """Why `text` is not a usable caption ("empty", "refusal: ...", ...), or None when it is."""
    if not text or not re.search(r"[^\W\d_]", text):
        return "empty"
    head = " ".join(text.replace("\u2019", "'").split()[:cfg.refusal_words])
    m = REFUSAL.search(head)
    if m:
        return f"refusal: {m.group(1)!r}"
    loop = repetition(_tokens(text), cfg)
    if loop:
        return f"repetition: {loop[0]!r} x{loop[1]}"
    n = len(text.split())
    if n > cfg.max_words:
        return f"over-long: {n} words > {cfg.max_words}"
    return None
