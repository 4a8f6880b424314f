"""Reading shards and decoding one sample: the loader's per-sample half.

Tar members are grouped into samples by key as webdataset does (`dir/key.ext`, the extension is
everything after the first dot of the file name). A truncated or unreadable tar ends its shard:
the samples read before the damage are kept, the shard is counted, the run goes on.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .buckets import Table, nearest_bucket, resize_crop
from .schema import FEATURES_EXT, FeatureSample
from .tars import read_tar

log = logging.getLogger("pixart.data")
IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")


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

    def bucket_of(self, raw: dict) -> str:
        """The sample's bucket before merging, read cheaply (metadata or file headers)."""
        if self.kind == "features":
            h, w = _safetensors_shape(raw[FEATURES_EXT], "latent_mean")[-2:]
            return f"{h}x{w}"
        if self.table is None:
            return "{}x{}".format(*self.resolution)
        return nearest_bucket(*self._raw_hw(raw), self.table)[0]

    def decode(self, raw: dict, epoch: int) -> Item:
        try:
            return self._features(raw, epoch) if self.kind == "features" else self._raw(raw, epoch)
        except BadSample:
            raise
        except Exception as e:
            raise BadSample(f"bad {self.kind} sample ({type(e).__name__})") from e

    def _pick(self, available: dict[str, object], key: str, epoch: int) -> str:
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
        w, h = Image.open(io.BytesIO(raw[ext])).size  # header only
        return h, w

    def _raw(self, raw: dict, epoch: int) -> Item:
        key, meta = raw["__key__"], self._meta(raw)
        ext = next((e for e in IMAGE_EXTS if e in raw), None)
        if ext is None:
            raise BadSample("no image")
        texts = {n: raw[n].decode("utf-8") for n in self.caption if isinstance(raw.get(n), bytes)}
        texts.update({n: t for n, t in meta.get("captions", {}).items() if n not in texts and isinstance(t, str)})
        caption = texts[self._pick(texts, key, epoch)]
        try:
            image = Image.open(io.BytesIO(raw[ext]))
            image.load()
            image = image.convert("RGB")
        except Exception as e:
            raise BadSample("bad image") from e
        if self.table is None:
            bucket, size = "{}x{}".format(*self.resolution), self.resolution
        else:
            bucket = nearest_bucket(*self._raw_hw(raw), self.table)[0]
            bucket = (self.remap or {}).get(bucket, bucket)
            size = self.table[bucket]
        pixels = torch.from_numpy(np.asarray(resize_crop(image, size)).copy()).permute(2, 0, 1)
        return Item(key, bucket, pixels, caption, None, (image.height, image.width), size[0] / size[1])

    def _features(self, raw: dict, epoch: int) -> Item:
        fs = FeatureSample.from_wds(raw)
        mean, std = fs.latent_mean.float(), fs.latent_std.float()
        if mean.dim() != 3 or mean.shape != std.shape:
            raise BadSample("bad latent shape")
        name = self._pick(fs.text, fs.key, epoch)
        y = fs.text[name]
        if y.dim() != 2:
            raise BadSample("bad caption features")
        g = torch.Generator().manual_seed(stable_seed(self.seed, "latent", epoch, fs.key))
        latent = (mean + std * torch.randn(mean.shape, generator=g) - self.latent_shift) * self.latent_scale
        h, w = mean.shape[-2:]
        ds = self.latent_downsample
        hw = (int(fs.meta.get("height", h * ds)), int(fs.meta.get("width", w * ds)))
        caption = fs.meta.get("captions", {}).get(name, "")
        return Item(fs.key, f"{h}x{w}", latent, caption if isinstance(caption, str) else "", y, hw, h / w)


def scan_buckets(shards: list[str], decoder: Decoder, limit: int | None = None) -> tuple[Counter, int]:
    """Bucket populations over the shards (the first `limit` samples), and how many were read.

    Every rank scans the same sorted shards, so every rank computes the same counts.
    """
    counts: Counter = Counter()
    seen = 0
    for url in shards:
        for raw in read_tar(url, on_error=lambda u, e: log.warning("scan: %s: damaged shard (%s)", u, e)):
            if limit is not None and seen >= limit:
                return counts, seen
            seen += 1
            try:
                counts[decoder.bucket_of(raw)] += 1
            except Exception:
                pass  # a bad sample; counted when the stream reaches it
    return counts, seen


def detect_kind(shards: list[str]) -> str:
    """'features' when the first sample holds a features file, else 'raw'."""
    for url in shards:
        for raw in read_tar(url):
            return "features" if FEATURES_EXT in raw else "raw"
    return "raw"


