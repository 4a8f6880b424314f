"""The feature cache's manifest: what made the cache, which shards are done, and a content hash.

`DIR/manifest.json` lets training refuse a stale or half-built cache with one line instead
of silently training on features from another encoder, resolution or dtype. It is rewritten
atomically after every finished shard and says `complete` only when every shard is.

What a loader reads: `Manifest.load(folder)` (or `find_manifest(folder)`, None when there is no
manifest; the folder may be an http(s):// or s3:// URL), `complete`, `scaling_factor`/`shift_factor`
(model latents = (latent - shift) * scale), `text_dim`, `latent_channels`, and per shard `name`,
`count` and `buckets` ({"HxW": samples}).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from pixart.atomic import atomic_write
from pixart.errors import PixArtError

from .remote import is_fsspec, is_http, read_object

MANIFEST = "manifest.json"
VERSION = 2  # 2: scaling/shift factor, batch size, per-shard buckets and damage
# Fields of the manifest a training config may name to be checked; any other name is refused.
CHECKED = ("image_encoder", "image_encoder_hash", "text_encoder", "text_encoder_hash", "dtype", "max_length",
           "resolution", "buckets", "caption_sources", "latent_channels", "downsample_factor", "text_dim",
           "scaling_factor", "shift_factor")
# What must match to resume a cache: text features depend on batch padding at float rounding.
SETTINGS = CHECKED + ("batch_size",)


def file_sha256(path: str | os.PathLike, limit: int | None = None) -> str:
    """The file's sha256; with `limit`, of its first `limit` bytes (does a grown file begin with the old one?)."""
    h, left = hashlib.sha256(), float("inf") if limit is None else limit
    with open(path, "rb") as f:
        while left > 0 and (block := f.read(int(min(left, 1 << 20)))):
            h.update(block)
            left -= len(block)
    return h.hexdigest()


def config_hash(cfg: dict, drop: tuple[str, ...] = ()) -> str:
    """Short hash of a model config, without keys that name versions or paths rather than the model."""
    keep = {k: v for k, v in cfg.items() if k not in drop and not k.startswith("_")}
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class ShardEntry:
    name: str  # the raw shard's name; the feature tar is DIR/<name>.tar
    count: int = 0
    sha256: str = ""
    complete: bool = False
    skipped: list[dict] = field(default_factory=list)  # [{"key", "reason"}] of samples left out
    buckets: dict[str, int] = field(default_factory=dict)  # encoded size "HxW" (target_hw) -> samples
    damaged: str = ""  # the input tar broke off (kept as read with --accept-damaged); "" when whole


@dataclass
class Manifest:
    image_encoder: str  # local path or hub id of the VAE, or "pixel:<factor>"
    image_encoder_hash: str
    text_encoder: str
    text_encoder_hash: str
    dtype: str  # text features' dtype as stored ("bf16"/"fp32"); latents are fp32
    max_length: int
    resolution: int | None
    buckets: str | None
    caption_sources: list[str]
    latent_channels: int
    downsample_factor: int
    scaling_factor: float  # the VAE's (1.0 for the pixel autoencoder)
    shift_factor: float  # the VAE's (0.0 for SD VAEs and the pixel autoencoder)
    text_dim: int
    batch_size: int  # encoder batch: text features depend on batch padding at float rounding
    shards: list[ShardEntry] = field(default_factory=list)
    version: int = VERSION

    @property
    def count(self) -> int:
        return sum(s.count for s in self.shards if s.complete)

    @property
    def done(self) -> int:
        return sum(s.complete for s in self.shards)

    @property
    def complete(self) -> bool:
        return bool(self.shards) and self.done == len(self.shards)

    @property
    def content_hash(self) -> str:
        """Hash over the finished shards' names and tar hashes: equal caches have equal hashes."""
        lines = sorted(f"{s.name} {s.sha256}" for s in self.shards if s.complete)
        return hashlib.sha256("\n".join(lines).encode()).hexdigest()

    def settings(self) -> dict:
        """Everything that decides what the features are (not which shards are done)."""
        return {k: getattr(self, k) for k in SETTINGS}

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        d.update(count=self.count, complete=self.complete, content_hash=self.content_hash)
        return json.dumps(d, indent=1)

    def save(self, folder: str | os.PathLike) -> Path:
        return atomic_write(Path(folder) / MANIFEST, self.to_json())

    @classmethod
    def load(cls, folder: str | os.PathLike) -> Manifest:
        m = find_manifest(folder)
        if m is None:
            raise PixArtError(f"{manifest_path(folder)}: no feature manifest; run extract-features first")
        return m

    @classmethod
    def parse(cls, text: str | bytes, folder: str | os.PathLike) -> Manifest:
        path = manifest_path(folder)
        try:
            d = json.loads(text)
            if not isinstance(d, dict):
                raise TypeError("not a JSON object")
            if d.get("version") != VERSION:
                raise PixArtError(f"{path}: feature manifest version {d.get('version')}, this pixart reads "
                                  f"version {VERSION}; rerun extract-features with --overwrite to rebuild the cache")
            names = {f.name for f in dataclasses.fields(cls)}
            d = {k: v for k, v in d.items() if k in names}
            d["shards"] = [ShardEntry(**s) for s in d.get("shards", [])]
            m = cls(**d)
            m.folder = str(folder)  # for messages; not saved
            return m
        except PixArtError:
            raise
        except (ValueError, TypeError) as e:
            raise PixArtError(f"{path}: not a feature manifest ({e})") from None

    def check(self, expected, where: str | os.PathLike | None = None) -> Manifest:
        """Raise PixArtError naming the first field of `expected` (a dict or a dataclass of CHECKED
        names) that differs, or when the cache is unfinished. An unknown name is an error too: a
        misspelt or misplaced setting would otherwise pass unchecked."""
        if dataclasses.is_dataclass(expected):
            expected = dataclasses.asdict(expected)
        where = str(where or getattr(self, "folder", None) or "feature cache")
        where = where if where.endswith(MANIFEST) else f"{where}/{MANIFEST}"
        for key, want in expected.items():
            if key not in CHECKED:
                raise PixArtError(f"{where}: unknown cache setting {key!r}; known: {', '.join(CHECKED)}")
            have = getattr(self, key)
            if key == "caption_sources":
                want = [want] if isinstance(want, str) else list(want)
                missing = [s for s in want if s not in have]
                if missing:
                    raise PixArtError(f"{where}: caption source {missing[0]!r} not in cache {have}")
            elif want != have and not (key.endswith("encoder") and _same_path(want, have)) and not (
                    key == "buckets" and _same_buckets(want, have)):
                raise PixArtError(f"{where}: {key} {have} != config {want}")
        if not self.complete:
            raise PixArtError(f"{where} is incomplete: {self.done} of {len(self.shards)} shards done; "
                              "rerun extract-features to finish")
        return self


def _same_buckets(a, b) -> bool:
    """Two names of one bucket table ("ASPECT_RATIO_1024", "ms1024", "1024")."""
    from .buckets import bucket_spec

    try:
        return a is not None and b is not None and bucket_spec(a) == bucket_spec(b)
    except PixArtError:
        return False


def is_remote(folder: str | os.PathLike) -> bool:
    return is_http(str(folder)) or is_fsspec(str(folder))


def manifest_path(folder: str | os.PathLike) -> str:
    """FOLDER/manifest.json; a URL stays one (Path would fold `https://` into `https:/`)."""
    return f"{str(folder).rstrip('/')}/{MANIFEST}" if is_remote(folder) else str(Path(folder) / MANIFEST)


def shard_folder(url: str) -> str | None:
    """The folder a (feature) shard's manifest lies in: a local path's parent, a URL's prefix (without its query
    string); None for `pipe:`."""
    if url.startswith("pipe:"):
        return None
    if "://" not in url:
        return str(Path(url).parent)
    u = urlsplit(url)
    return urlunsplit((u.scheme, u.netloc, u.path.rsplit("/", 1)[0], "", ""))


def find_manifest(folder: str | os.PathLike) -> Manifest | None:
    """The folder's manifest, or None when it has none (raw shards); a broken or old one is an error. A URL folder
    (http(s), s3, ...) is read too, so a remote cache is checked and scaled as a local one: None only when the
    object does not exist, and a PixArtError naming the URL when it cannot be read."""
    path = manifest_path(folder)
    if is_remote(folder):
        text = read_object(path)
    else:
        text = Path(path).read_bytes() if Path(path).is_file() else None
    return None if text is None else Manifest.parse(text, folder)


def _same_path(a, b) -> bool:
    """Encoder ids are paths or hub ids; two spellings of one local folder are the same encoder."""
    try:
        return Path(a).exists() and Path(b).exists() and Path(a).resolve() == Path(b).resolve()
    except (TypeError, OSError):
        return False
