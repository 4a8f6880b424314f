"""Caption statistics for a relabeling job's summary: dense captions beside the input alt-texts.

PixArt-alpha measured nouns per image (alt-text 6.4, LLaVA captions 29.3). Counting nouns needs a
POS tagger; we count *distinct content words* instead: lowercased alphabetic tokens minus a short
stopword list. It tracks the same thing (how many things and attributes a caption names) without
a tagger, but also counts adjectives and verbs, so it reads higher than a noun count.

Statistics are kept as histograms so that per-shard records merge exactly, medians included.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

from pixart.data.tars import NOTHING_READ

STOPWORDS = frozenset("""
a an the and or but nor of in on at to from by for with without into onto over under above below
near beside between behind against along across through about as than then so such
is are was were be been being has have had do does did there here this that these those it its
which who whom whose what where when while also very one each both all some any no not
""".split())
CONTENT_WORDS = "distinct content words: lowercased alphabetic tokens minus a stopword list (not a noun count)"


def words(text: str) -> list[str]:
    """Lowercased alphabetic tokens: one tokenizer for both counts, so distinct <= words always."""
    return re.findall(r"[a-z]+", text.lower())


def content_words(text: str) -> set[str]:
    return {w for w in words(text) if w not in STOPWORDS}


@dataclass
class TextStats:
    """Words per text and distinct content words per text, as histograms (value -> texts)."""
    words: Counter = field(default_factory=Counter)
    distinct: Counter = field(default_factory=Counter)

    def add(self, text: str) -> None:
        self.words[len(words(text))] += 1
        self.distinct[len(content_words(text))] += 1

    def merge(self, other: TextStats) -> TextStats:
        self.words.update(other.words)
        self.distinct.update(other.distinct)
        return self

    @property
    def count(self) -> int:
        return sum(self.words.values())

    def to_json(self) -> dict:
        return {"words": {str(k): v for k, v in sorted(self.words.items())},
                "distinct": {str(k): v for k, v in sorted(self.distinct.items())}}

    @classmethod
    def from_json(cls, d: dict) -> TextStats:
        return cls(Counter({int(k): v for k, v in d.get("words", {}).items()}),
                   Counter({int(k): v for k, v in d.get("distinct", {}).items()}))

    def summary(self) -> dict:
        return {"texts": self.count, "words_mean": _mean(self.words), "words_median": _median(self.words),
                "distinct_mean": _mean(self.distinct), "distinct_median": _median(self.distinct)}


def _mean(h: Counter) -> float | None:
    n = sum(h.values())
    return round(sum(k * v for k, v in h.items()) / n, 2) if n else None


def _median(h: Counter) -> float | None:
    n = sum(h.values())
    if not n:
        return None

    def at(i: int) -> int:  # the i-th smallest value of the expanded histogram
        for k in sorted(h):
            i -= h[k]
            if i < 0:
                return k

    return (at((n - 1) // 2) + at(n // 2)) / 2


@dataclass
class ShardStats:
    """What a finished shard's output holds; written beside it and merged into the job summary."""
    ok: int = 0
    failed: int = 0
    reasons: Counter = field(default_factory=Counter)  # failure kind ("bad image", "refusal", ...) -> samples
    captions: TextStats = field(default_factory=TextStats)
    alt_text: TextStats = field(default_factory=TextStats)
    damaged: str = ""  # why the input tar broke off early; "" when it was read to the end

    def add_row(self, row: dict) -> None:
        if row["status"] == "ok":
            self.ok += 1
            self.captions.add(row["caption"])
        else:
            self.failed += 1
            self.reasons[row.get("reason", "").split(":")[0] or "unknown"] += 1

    def to_json(self) -> dict:
        return {"ok": self.ok, "failed": self.failed, "reasons": dict(sorted(self.reasons.items())),
                "captions": self.captions.to_json(), "alt_text": self.alt_text.to_json(), "damaged": self.damaged}

    @classmethod
    def from_json(cls, d: dict) -> ShardStats:
        return cls(d["ok"], d["failed"], Counter(d["reasons"]), TextStats.from_json(d["captions"]),
                   TextStats.from_json(d["alt_text"]), d.get("damaged", ""))


def summarize(captioner: str, model: str, prompt: str | None, shards: dict[str, ShardStats | None],
              run: dict, damaged: dict[str, str] | None = None, visual_tokens: Counter | None = None) -> dict:
    """The job summary: counts, caption vs alt-text statistics over every finished shard, this run's speed.
    `shards` maps every shard of the job to its stats (None while unfinished); `run` holds this run's
    done/failed/skipped counts and seconds; `damaged` the shards this run left unfinished because their
    input tar broke off (name -> why); `visual_tokens` a VLM's images per visual-token count this run,
    reported beside its captions/s (what a family and its preprocessing cost)."""
    total, kept = ShardStats(), {}
    for name, s in shards.items():
        if s is None:
            continue
        total.ok, total.failed = total.ok + s.ok, total.failed + s.failed
        total.reasons.update(s.reasons)
        total.captions.merge(s.captions)
        total.alt_text.merge(s.alt_text)
        if s.damaged:
            kept[name] = s.damaged
    secs = run.get("seconds", 0.0)
    speed = round((run.get("done", 0) + run.get("failed", 0)) / secs, 1) if secs else None
    return {
        "captioner": captioner, "model": model, "prompt": prompt,
        "shards": {"total": len(shards), "finished": sum(s is not None for s in shards.values()),
                   "damaged": dict(damaged or {}),
                   **({"damaged_kept": kept} if kept else {})},
        "counts": {"done": total.ok, "failed": total.failed, "skipped": run.get("skipped", 0)},
        "failure_reasons": dict(sorted(total.reasons.items())),
        "captions": total.captions.summary(), "alt_text": total.alt_text.summary(),
        "distinct_words": CONTENT_WORDS,
        "this_run": {**run, "captions_per_s": speed},
        **({"vlm": {"family": captioner, "visual_tokens_per_image": _token_stats(visual_tokens),
                    "captions_per_s": speed}} if visual_tokens else {}),
    }


def _token_stats(h: Counter) -> dict:
    return {"images": sum(h.values()), "mean": _mean(h), "median": _median(h), "min": min(h), "max": max(h)}


def format_summary(s: dict) -> str:
    """The summary as a few printed lines: counts, then captions and alt-texts side by side."""
    c, r = s["counts"], s["this_run"]
    cap, alt = s["captions"], s["alt_text"]

    def num(x):
        return "-" if x is None else f"{x:g}"

    lines = [f"{s['captioner']}: {s['shards']['finished']}/{s['shards']['total']} shards captioned; "
             f"in all: done {c['done']}, failed {c['failed']}; this run: skipped {c['skipped']} (already captioned), "
             f"captioned {r.get('done', 0) + r.get('failed', 0)} samples in {r.get('seconds', 0):.1f}s"
             + (f", {r['captions_per_s']:g} captions/s" if r.get("captions_per_s") else ""),
             f"{'':34}{s['captioner'] + ' captions':>20}{'alt-text (.txt)':>18}",
             f"{'texts':34}{num(cap['texts']):>20}{num(alt['texts']):>18}"]
    for key, label in (("words_mean", "words per caption, mean"), ("words_median", "words per caption, median"),
                       ("distinct_mean", "distinct content words, mean"),
                       ("distinct_median", "distinct content words, median")):
        lines.append(f"{label:34}{num(cap[key]):>20}{num(alt[key]):>18}")
    if "vlm" in s:
        v, t = s["vlm"], s["vlm"]["visual_tokens_per_image"]
        lines.append(f"{v['family']}: {t['mean']:g} visual tokens per image (min {t['min']}, max {t['max']}), "
                     f"{num(v['captions_per_s'])} captions/s")
    if s["failure_reasons"]:
        lines.append("failed: " + ", ".join(f"{k} {v}" for k, v in s["failure_reasons"].items()))
    if s["shards"]["damaged"]:
        d = s["shards"]["damaged"]
        lines.append(f"{len(d)} shard{'s' * (len(d) != 1)} damaged: " + ", ".join(f"{k} ({v})" for k, v in d.items())
                     + "; rerun to retry" + (", or --accept-damaged to keep what was read"
                                             if any(not v.startswith(NOTHING_READ) for v in d.values()) else ""))
    if s["shards"].get("damaged_kept"):
        lines.append("damaged input shards kept as read (--accept-damaged): "
                     + ", ".join(f"{k} ({v})" for k, v in s["shards"]["damaged_kept"].items()))
    return "\n".join(lines)
