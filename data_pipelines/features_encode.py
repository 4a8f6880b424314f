"""One shard's worth of feature extraction: decode, resize/crop, encode in batches, write.

Runs in the main process or in a spawned worker; either way the encoders are built once per
process (`load_encoders`) and reused for every shard it is given.
"""
from __future__ import annotations

import errno
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

from pixart.data.buckets import nearest_bucket, resize_crop
from pixart.data.schema import FEATURES_EXT, FeatureSample
from pixart.data.tars import ShardWriter, TarDamage, class_of, decode_image, iter_samples, stable_reason
from pixart.errors import PixArtError

META_DROP = ("annotations",)  # heavy raw metadata stays in the raw shard
FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # a full disk, quota or file size limit: named by the tar written


@dataclass
class Job:
    """What every worker needs to know; plain data so it pickles into spawned processes."""
    out: str
    text_encoder: dict  # TextEncoderConfig fields
    vae: dict | None  # VAEConfig fields, or None for the pixel autoencoder
    pixel: str | None  # the pixel autoencoder's id, pixel:F[:K]
    caption_sources: list[str]
    resolution: int | None
    buckets: dict[str, tuple[int, int]] | None  # ratio key -> (h, w), as in pixart.data.buckets
    batch_size: int
    threads: int = 0
    accept_damaged: bool = False  # keep what a broken-off input tar yielded instead of retrying it


@dataclass
class ShardResult:
    name: str
    count: int = 0
    skipped: list[dict] = field(default_factory=list)
    missing_captions: dict[str, int] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)  # valid tokens written, per source
    feature_bytes: int = 0  # bytes of the .features.safetensors files
    buckets: dict[str, int] = field(default_factory=dict)  # "HxW" of target_hw -> samples written
    damaged: str = ""  # why the input tar broke off early; "" when it was read to the end
    read: int = 0  # samples read from the input; a damaged one with none is never finished, even with accept_damaged
    seconds: float = 0.0


_ENC: dict = {}  # this process's encoders, keyed by their settings: loaded once, reused per shard


def load_encoders(job: Job) -> tuple:
    """(image autoencoder, text encoder) for `job`, built on first use in this process."""
    key = json.dumps([job.text_encoder, job.vae, job.pixel], sort_keys=True)
    if key not in _ENC:
        from pixart.encoders import ImageAutoencoder, PixelAutoencoder, TextEncoder, TextEncoderConfig, VAEConfig
        if job.threads:
            torch.set_num_threads(job.threads)
        ae = ImageAutoencoder(VAEConfig(**job.vae)) if job.vae else PixelAutoencoder.from_id(job.pixel)
        _ENC.clear()  # one set at a time: T5-XXL is 9 GB
        _ENC[key] = ae, TextEncoder(TextEncoderConfig(**job.text_encoder))
    return _ENC[key]


@torch.no_grad()
def encode_text(te, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """`TextEncoder.encode` without the padding past the batch's longest caption: T5 cost grows
    with length and alt-texts are ~15 of 120 tokens. Valid tokens match the padded run to float
    rounding (masked keys add exact zeros; only the summation blocking changes)."""
    ids, mask = te.tokenize(captions)
    n = max(1, int(mask.sum(1).max()))
    ids, mask = ids[:, :n].to(te.config.device), mask[:, :n].to(te.config.device)
    return te.model(input_ids=ids, attention_mask=mask).last_hidden_state.to(te.dtype), mask


def read_captions(path: str | None) -> dict[str, str | None]:
    """A sidecar `<shard>.<captioner>.jsonl`: one {"__key__", "caption"} per line, the caption a string, or null
    where the relabeling job failed (a missing caption, counted)."""
    if path is None:
        return {}
    out = {}
    with open(path, "rb") as f:  # decoded line by line, so that a byte that is not UTF-8 is named by its line
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise PixArtError(f"{path}:{n}: not UTF-8 ({e})") from None
            if line.strip():
                try:
                    row = json.loads(line)
                    key, caption = row["__key__"], row["caption"]
                except (ValueError, KeyError, TypeError) as e:
                    raise PixArtError(f"{path}:{n}: not a caption line ({type(e).__name__}: {e})") from None
                if not isinstance(caption, str | None):
                    raise PixArtError(f"{path}:{n}: caption is a {type(caption).__name__}, not a string")
                out[key] = caption
    return out


def _decode(sample: dict) -> tuple[Image.Image, dict]:
    img = decode_image(sample)
    meta = {}
    if "json" in sample:
        try:
            meta = {k: v for k, v in json.loads(sample["json"]).items() if k not in META_DROP}
        except (ValueError, AttributeError) as e:
            raise ValueError(f"bad json: {e}") from None
    if "cls" in sample:  # the class, as webdataset's and timm's shards give it: kept as the loader's `label`
        meta["label"] = class_of(sample, meta)
    return img, meta


def _sidecar_error(path: str, name: str, total: int, missing: list[str]) -> PixArtError:
    """A sidecar without a line for some of shard `name`'s `total` samples: another shard's captions when it
    has none of them, else a captioning that stopped early (relabel --accept-damaged on a tar that broke off
    then, whose rerun now says "nothing to do"), worded so the fix is the right one."""
    if len(missing) == total:
        return PixArtError(f"{path}: holds another shard's captions (none of the {total} samples of shard {name}, "
                           f"e.g. key {missing[0]!r}): point --captions-dir at this shard's captions")
    return PixArtError(f"{path}: covers only {total - len(missing)} of {total} samples of shard {name} (e.g. key "
                       f"{missing[0]!r} is missing): its captioning did not read the whole shard; remove {path} "
                       "and rerun pixart relabel")


class Pending(NamedTuple):
    pos: int  # index in the raw shard: output keeps input order
    key: str
    pixels: torch.Tensor  # (3, h, w) uint8, resized and cropped
    meta: dict


def encode_shard(url: str, name: str, job: Job, caption_files: dict[str, str | None],
                 progress: Callable[[int], None] | None = None) -> ShardResult:
    """Write `job.out/<name>.tar` whole (temp file, then rename); return counts for the manifest.

    Samples are batched per target size (bucket); at most `4 * batch_size` wait for a batch, the
    oldest group going first when that fills, so memory stays bounded and the output, written in
    input order as it becomes ready, needs only a short reorder buffer. A caption sidecar with no line
    for a sample's key (a relabel sidecar has a line per sample, null where captioning failed) stops the
    job (`_sidecar_error`), with nothing written for the shard."""
    ae, te = load_encoders(job)
    t0, res = time.perf_counter(), ShardResult(name)
    sidecars = {src: read_captions(p) for src, p in caption_files.items()}
    pending: dict[tuple[int, int], list[Pending]] = {}
    ready: dict[int, dict | None] = {}  # pos -> sample to write (None: skipped)
    next_pos = 0
    absent: dict[str, list[str]] = {}  # source -> keys its sidecar has no line for
    total = 0  # samples read
    writer = ShardWriter(Path(job.out) / f"{name}.tar")

    def flush(items: list[Pending]) -> None:
        dist = ae.encode(torch.stack([it.pixels for it in items]).float() / 127.5 - 1)
        texts: list[dict] = [{} for _ in items]
        for src in job.caption_sources:
            idx = [i for i, it in enumerate(items) if src in it.meta["captions"]]
            if not idx:
                continue
            feats, mask = encode_text(te, [items[i].meta["captions"][src] for i in idx])
            for j, i in enumerate(idx):
                n = int(mask[j].sum())
                texts[i][src] = feats[j, :n].clone()
                res.tokens[src] = res.tokens.get(src, 0) + n
        for it, mean, std, text in zip(items, dist.mean, dist.std, texts, strict=True):
            sample = FeatureSample(it.key, mean.clone(), std.clone(), text, it.meta).to_wds()
            res.feature_bytes += len(sample[FEATURES_EXT])
            ready[it.pos] = sample
            hw = f"{it.meta['target_hw'][0]}x{it.meta['target_hw'][1]}"
            res.buckets[hw] = res.buckets.get(hw, 0) + 1
        if progress:
            progress(len(items))

    def drain() -> None:
        nonlocal next_pos
        while next_pos in ready:
            sample = ready.pop(next_pos)
            if sample is not None:
                writer.write(sample)
            next_pos += 1

    try:
        damage = TarDamage()
        for pos, sample in enumerate(iter_samples(url, damage)):
            key, total = sample["__key__"], pos + 1
            for src, path in caption_files.items():
                if path is not None and key not in sidecars[src]:
                    absent.setdefault(src, []).append(key)
            if absent:  # the shard is refused below: only count what else is absent
                continue
            try:
                img, meta = _decode(sample)
            except ValueError as e:
                res.skipped.append({"key": key, "reason": stable_reason(str(e))})
                ready[pos] = None
                drain()
                continue
            caps = {}
            for src in job.caption_sources:
                text = sample["txt"].decode("utf-8", "replace") if src == "txt" and "txt" in sample \
                    else sidecars.get(src, {}).get(key)
                if text is None:
                    res.missing_captions[src] = res.missing_captions.get(src, 0) + 1
                else:
                    caps[src] = text
            w, h = img.size
            size = (job.resolution, job.resolution) if job.resolution else nearest_bucket(h, w, job.buckets)[1]
            meta.update(width=w, height=h, target_hw=list(size), captions=caps)
            image = resize_crop(img, size, multi_aspect=not job.resolution)
            pixels = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)
            pending.setdefault(size, []).append(Pending(pos, key, pixels, meta))
            if len(pending[size]) == job.batch_size:
                flush(pending.pop(size))
            elif sum(map(len, pending.values())) >= 4 * job.batch_size:
                flush(pending.pop(min(pending, key=lambda s: pending[s][0].pos)))
            drain()
        if absent:
            src, keys = next(iter(absent.items()))
            raise _sidecar_error(caption_files[src], name, total, keys)
        for size in sorted(pending, key=lambda s: pending[s][0].pos):
            flush(pending[size])
        drain()
        res.read, res.damaged = total, damage.reason() if damage.error else ""
        if damage.error and not (job.accept_damaged and total):
            writer.abort()  # no tar, no record: a rerun retries the shard (a flaky read, a finished copy)
        else:
            writer.close()
    except BaseException as e:
        try:
            writer.abort()
        except OSError:  # its own flush failed too (a full disk): the temp file must still go
            writer.tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno in FULL and not e.filename:  # "No space left on device": where?
            raise OSError(e.errno, e.strerror, str(writer.path)) from None
        raise
    res.count = writer.count
    res.seconds = time.perf_counter() - t0
    return res
