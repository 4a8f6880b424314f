"""Reading shards and decoding one sample: the loader's per-sample half.

Tar members are grouped into samples by key as webdataset does (`dir/key.ext`, the extension is
everything after the first dot of the file name). A truncated or unreadable tar ends its shard:
the samples read before the damage are kept, the shard is counted, the run goes on.
"""
from __future__ import annotations

import hashlib
import http.client
import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import PixArtError
from .buckets import Table, nearest_bucket, resize_crop
from .schema import FEATURES_EXT, FeatureSample
from .shards import is_url, shard_name
from .tars import DUPLICATE, IMAGE_EXTS, NOTHING_READ, class_of, decode_image, displayed_size, read_tar, stable_reason

log = logging.getLogger("pixart.data")


class BadSample(Exception):
    """A sample to skip; the message is the reason it is counted under."""


def stable_seed(*parts) -> int:
    """A seed from any printable parts, the same in every process (unlike hash())."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little") >> 1


def _safetensors_shape(blob: bytes, name: str) -> list[int]:
    """A tensor's shape from the safetensors header alone (no tensor is read)."""
    n = int.from_bytes(blob[:8], "little")
    return json.loads(blob[8:8 + n])[name]["shape"]


@dataclass
class Item:
    """One decoded sample, ready to batch."""
    key: str
    bucket: str
    x: torch.Tensor            # raw: uint8 pixels (3, H, W); features: sampled latent (C, h, w)
    caption: str
    y: torch.Tensor | None     # features: caption features (n, D)
    hw: tuple[int, int]        # original image (height, width)
    ratio: float               # the bucket's aspect ratio h / w
    label: int = -1            # the metadata's class label (stage 1's class-conditional DiT); -1 when none


class Scores:
    """Aesthetic selection (stage 3): a sample is kept when `DIR/<shard>.aesthetic.jsonl` (written by
    `pixart data score-aesthetic`, named after the raw shard, which feature shards share) scores it
    at least `min_score` (any score when None). One shard's scores are held at a time."""

    def __init__(self, folder: str, min_score: float | None):
        self.folder, self.min_score = str(folder), min_score
        self._url, self._scores = None, {}

    def __getstate__(self) -> dict:  # pickled into DataLoader workers without the cache
        return {"folder": self.folder, "min_score": self.min_score}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["folder"], state["min_score"])

    def path(self, url: str) -> Path:
        return Path(self.folder) / f"{shard_name(url)}.aesthetic.jsonl"

    def of(self, url: str) -> dict[str, float]:
        """key -> score of the shard's sidecar ({} when it has none)."""
        if url != self._url:
            scores = {}
            if self.path(url).is_file():
                for line in self.path(url).read_text().splitlines():
                    row = json.loads(line) if line.strip() else {}
                    if isinstance(row.get("score"), (int, float)):
                        scores[str(row.get("__key__"))] = float(row["score"])
            self._url, self._scores = url, scores
        return self._scores

    def kept(self, url: str) -> int:
        return sum(self.min_score is None or s >= self.min_score for s in self.of(url).values())

    def reject(self, raw: dict) -> str | None:
        """Why the sample is left out, or None to keep it."""
        score = self.of(raw.get("__url__", "")).get(raw["__key__"])
        if score is None:
            return "no score"
        return "below min_score" if self.min_score is not None and score < self.min_score else None


@dataclass
class Decoder:
    """Turns a raw tar sample into an Item. Pickled into every DataLoader worker."""
    kind: str                          # "raw" or "features"
    seed: int
    caption: dict[str, float]          # source name -> probability
    table: Table | None = None         # raw: aspect buckets; None = fixed `resolution`
    resolution: tuple[int, int] = (256, 256)
    remap: dict[str, str] | None = None  # raw: starving bucket -> bucket it is merged into
    latent_scale: float = 1.0
    latent_shift: float = 0.0
    latent_downsample: int = 8         # features without width/height metadata: pixels per latent cell
    scores: Scores | None = None       # aesthetic selection

    def reject(self, raw: dict) -> str | None:
        return self.scores.reject(raw) if self.scores is not None else None

    def bucket(self, raw: dict) -> str:
        """The sample's bucket after merging."""
        b = self.bucket_of(raw)
        return (self.remap or {}).get(b, b)

    def bucket_of(self, raw: dict) -> str:
        """The sample's bucket before merging, read cheaply (metadata or file headers)."""
        if self.kind == "features":
            h, w = _safetensors_shape(raw[FEATURES_EXT], "latent_mean")[-2:]
            return f"{h}x{w}"
        if self.table is None:
            return "{}x{}".format(*self.resolution)
        return nearest_bucket(*self._raw_hw(raw), self.table)[0]

    def decode(self, raw: dict, epoch: int) -> Item:
        if DUPLICATE in raw:
            raise BadSample("duplicate file name")
        try:
            return self._features(raw, epoch) if self.kind == "features" else self._raw(raw, epoch)
        except BadSample:
            raise
        except Exception as e:
            raise BadSample(f"bad {self.kind} sample ({type(e).__name__})") from e

    def _pick(self, available: dict[str, object], key: str, epoch: int) -> str | None:
        """The caption source this sample trains on this epoch; None when no captions are read."""
        if not self.caption:
            return None
        names = [n for n in self.caption if n in available]
        if not names:
            raise BadSample("missing caption")
        if len(names) == 1:
            return names[0]
        g = np.random.default_rng(stable_seed(self.seed, "caption", epoch, key))
        p = np.array([self.caption[n] for n in names], dtype=np.float64)
        return names[int(g.choice(len(names), p=p / p.sum()))]

    @staticmethod
    def _meta(raw: dict) -> dict:
        return json.loads(raw["json"]) if "json" in raw else {}

    def _raw_hw(self, raw: dict) -> tuple[int, int]:
        meta = self._meta(raw)
        if "height" in meta and "width" in meta:
            return int(meta["height"]), int(meta["width"])
        ext = next((e for e in IMAGE_EXTS if e in raw), None)
        if ext is None:
            raise BadSample("no image")
        return displayed_size(raw[ext])

    def _raw(self, raw: dict, epoch: int) -> Item:
        key, meta = raw["__key__"], self._meta(raw)
        ext = next((e for e in IMAGE_EXTS if e in raw), None)
        if ext is None:
            raise BadSample("no image")
        texts = {n: raw[n].decode("utf-8") for n in self.caption if isinstance(raw.get(n), bytes)}
        texts.update({n: t for n, t in meta.get("captions", {}).items() if n not in texts and isinstance(t, str)})
        name = self._pick(texts, key, epoch)
        try:
            image = decode_image(raw)
        except ValueError as e:
            raise BadSample("bad image") from e
        if self.table is None:
            bucket, size = "{}x{}".format(*self.resolution), self.resolution
        else:
            bucket = nearest_bucket(*self._raw_hw(raw), self.table)[0]
            bucket = (self.remap or {}).get(bucket, bucket)
            size = self.table[bucket]
        cropped = resize_crop(image, size, multi_aspect=self.table is not None)
        pixels = torch.from_numpy(np.asarray(cropped).copy()).permute(2, 0, 1)
        return Item(key, bucket, pixels, texts[name] if name else "", None, (image.height, image.width),
                    size[0] / size[1], class_of(raw, meta))

    def _features(self, raw: dict, epoch: int) -> Item:
        fs = FeatureSample.from_wds(raw)
        mean, std = fs.latent_mean.float(), fs.latent_std.float()
        if mean.dim() != 3 or mean.shape != std.shape:
            raise BadSample("bad latent shape")
        name = self._pick(fs.text, fs.key, epoch)
        y = fs.text[name] if name else None
        if y is not None and y.dim() != 2:
            raise BadSample("bad caption features")
        g = torch.Generator().manual_seed(stable_seed(self.seed, "latent", epoch, fs.key))
        latent = (mean + std * torch.randn(mean.shape, generator=g) - self.latent_shift) * self.latent_scale
        h, w = mean.shape[-2:]
        ds = self.latent_downsample
        hw = (int(fs.meta.get("height", h * ds)), int(fs.meta.get("width", w * ds)))
        caption = fs.meta.get("captions", {}).get(name, "") if name else ""
        return Item(fs.key, f"{h}x{w}", latent, caption if isinstance(caption, str) else "", y, hw, h / w,
                    int(fs.meta.get("label", -1)))


def scan_buckets(shards: list[str], decoder: Decoder, limit: int | None = None
                 ) -> tuple[list[Counter | None], int, int]:
    """Per-shard bucket populations of the samples the decoder keeps (None for a shard not read
    whole within the first `limit` samples), the samples read and those kept."""
    counts: list[Counter | None] = []
    seen = kept = 0
    for url in shards:
        c: Counter | None = Counter()
        for raw in read_tar(url, on_error=lambda u, e: log.warning("scan: %s: damaged shard (%s)", u, e)):
            if limit is not None and seen >= limit:
                c = None
                break
            seen += 1
            if decoder.reject(raw):
                continue
            kept += 1
            try:
                c[decoder.bucket_of(raw)] += 1
            except Exception:
                pass  # a bad sample; counted when the stream reaches it
        counts.append(c)
    return counts, seen, kept


def detect_kind(shards: list[str]) -> str:
    """'features' when the first readable sample holds a features file, else 'raw'. When no shard gives a sample,
    a PixArtError naming the first shard and why: guessing 'raw' would blame a missing text encoder instead."""
    errors: dict[str, Exception] = {}
    for url in shards:
        for raw in read_tar(url, on_error=errors.__setitem__):
            return "features" if FEATURES_EXT in raw else "raw"
    if not shards:
        return "raw"
    url, e = shards[0], errors.get(shards[0])
    reason = stable_reason(f"{type(e).__name__}: {e}")
    if e is None:  # a whole tar of no sample
        why = f"{url}: no readable sample in the shard"
    elif isinstance(e, PixArtError):  # an object store's error, already one line naming the URL
        why = str(e)
    elif is_url(url) and isinstance(e, (OSError, http.client.HTTPException)):  # 404, refused, timed out
        why = f"{url}: cannot reach the shard ({reason})"
    else:  # an empty or garbage file, a failed pipe: command
        why = f"{url}: {NOTHING_READ} ({reason})"
    others = f"; no readable sample in the other {len(shards) - 1} shard(s) either" if len(shards) > 1 else ""
    raise PixArtError(why + others)
