"""The training data loader: an infinite, deterministic, resumable stream of same-bucket batches
over raw shards (images + captions) or feature shards (`FeatureSample`), split across ranks and
DataLoader workers. The rules (distribution, buckets, resume) are in `loader_stream`.

    loader = Loader(LoaderConfig(shards="data/feats", batch_size=8, seed=0))
    for batch in loader:                   # never ends; the trainer counts steps
        ...
        save_json(loader.state_dict())     # per rank; load_state_dict() resumes at that sample

Feature shards are checked against their folder's `manifest.json`, local or remote (complete, one VAE
and text encoder across folders, `expected` settings); it gives the VAE's scale/shift and the per-shard
bucket counts (else the shards are scanned). Shards without a manifest are read with a warning.
With `scores_dir`, samples scored below `min_score` (or unscored) are skipped.

Feature batches: latents (B, C, h, w) = (mean + std * noise - latent_shift) * latent_scale with
noise seeded by (seed, epoch, key); y (B, L, D) caption features padded to the batch's longest
caption, and mask (B, L) (neither when `caption` is None); keys; captions (text, when the metadata has it);
labels (B,) the sample's class: its `cls` member (webdataset's and timm's), else its json's `label` (-1 without
one); data_info {img_hw (B, 2) original height/width, aspect_ratio (B, 1)
of the bucket}; bucket; step.
Raw batches: pixels (B, 3, H, W) in [-1, 1] (resized to cover the bucket, center-cropped);
captions; keys; labels; data_info; bucket; step. With encoders passed to `Loader`, raw batches are
encoded in the main process into the feature-batch fields (latents are then VAE-scaled).
"""
from __future__ import annotations

import atexit
import hashlib
import json
import logging
import signal
import weakref
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..errors import PixArtError
from .buckets import Table, table_for
from .loader_samples import Decoder, Scores, detect_kind, scan_buckets, stable_seed
from .loader_stream import BucketDataset, Plan
from .manifest import Manifest, find_manifest, shard_folder
from .shards import rank_and_world, resolve_shards, shard_name

log = logging.getLogger("pixart.data")
STATE_VERSION = 1  # older states lack the schedule hash: they resume as from another setup
MAX_BUFFER = 512  # default read-ahead bound in samples: ~0.5 GB per worker with 120 x 4096 bf16 T5 features


@dataclass
class LoaderConfig:
    shards: str | list[str]
    batch_size: int = 8
    seed: int = 0
    buckets: int | dict | None = None        # raw: a side (1024/512/256: PixArt's tables; else scaled) or a table
    resolution: int | tuple[int, int] = 256  # raw, without buckets: every image resized-cropped to this
    caption: str | dict[str, float] | None = "txt"  # a caption source, a mix {source: probability}, or None:
    # no captions are read (a class-conditional stage; its samples carry their class)
    latent_scale: float | None = None        # features: the VAE's scaling factor; None: the manifest's, else 1.0
    latent_shift: float | None = None        # None: the manifest's shift factor, else 0.0
    num_workers: int = 0
    rank: int | None = None                  # None: torch.distributed if initialised, else $RANK
    world_size: int | None = None            # None: torch.distributed if initialised, else $WORLD_SIZE
    buffer_size: int | None = None           # samples buffered per worker, at most; None: min(4 * batch * buckets,
                                             # 512), at least 2 * batch (512 T5 samples are ~0.5 GB)
    scan_samples: int | None = None          # no manifest: bucket counts from the first N samples (None: all)
    expected: dict | None = None             # features: settings the manifests must match (Manifest.check)
    scores_dir: str | None = None            # aesthetic selection: DIR/<shard>.aesthetic.jsonl; unscored are skipped
    min_score: float | None = None           # with scores_dir: skip samples scored below this

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise PixArtError(f"batch_size must be positive, got {self.batch_size}")
        if self.num_workers < 0:
            raise PixArtError(f"num_workers must be >= 0, got {self.num_workers}")
        if self.min_score is not None and not self.scores_dir:
            raise PixArtError("min_score needs scores_dir (the folder of <shard>.aesthetic.jsonl sidecars)")


@dataclass
class LoaderStats:
    """What the loader saw: counters summed over this rank's workers, and the bucket report."""
    read: int = 0
    used: int = 0
    batches: int = 0
    repeated: int = 0                                         # samples repeated to complete a batch
    dropped: int = 0                                          # read but unused: no batch left in the epoch
    skipped: dict[str, int] = field(default_factory=dict)    # reason -> samples (corrupt, missing caption...),
                                                              # each once: counted in the first epoch read
    damaged_shards: dict[str, int] = field(default_factory=dict)  # url -> 1
    populations: dict[str, int] = field(default_factory=dict)  # bucket -> kept samples (manifest or scan)
    starving: dict[str, int] = field(default_factory=dict)     # bucket -> samples, too few for a batch per reader
    merged: dict[str, str] = field(default_factory=dict)       # raw: starving bucket -> bucket it joined


def dist_info(config: LoaderConfig) -> tuple[int, int]:
    """(rank, world size): the config's, else torch.distributed's, else $RANK/$WORLD_SIZE, else (0, 1)."""
    group = torch.distributed
    if config.rank is None and config.world_size is None and group.is_available() and group.is_initialized():
        return group.get_rank(), group.get_world_size()
    return rank_and_world(config.rank, config.world_size)


def _outlive_stop_signals(worker_id: int) -> None:
    """A scheduler signals every process of a job (Slurm's SIGTERM, `--signal=USR1`), the loader's workers too:
    they ignore it, so that the training process can finish its step and save (pixart.train.preemption) before it
    shuts them down. They still end with it (DataLoader's watch on their parent)."""
    for signum in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(signum, signal.SIG_IGN)


_WITH_WORKERS: weakref.WeakSet = weakref.WeakSet()  # this process's DataLoader iterators that have workers


@atexit.register  # after multiprocessing's own exit hook (imported with torch), so it runs before it
def _stop_workers_at_exit() -> None:
    """Multiprocessing ends daemonic children at exit with SIGTERM, which these workers ignore: a process leaving on
    an uncaught exception (its traceback keeps the iterator alive) would wait for them forever. They are told to
    stop as DataLoader tells them when its iterator is collected."""
    for it in list(_WITH_WORKERS):
        it._shutdown_workers()


def _caption_mix(caption: str | dict[str, float] | None) -> dict[str, float]:
    if caption is None:
        return {}
    mix = {caption: 1.0} if isinstance(caption, str) else {str(k): float(v) for k, v in caption.items()}
    if not mix or any(p < 0 for p in mix.values()) or sum(mix.values()) <= 0:
        raise PixArtError(f"caption: give a source name or {{source: probability}} with a positive sum, "
                          f"got {caption!r}")
    return {k: p for k, p in mix.items() if p > 0}


def _check_caption_sources(caption, sources: list[str], folder: str) -> None:
    """A folder must hold some source of the caption mix (each sample draws among the sources it has), else
    every sample would be skipped and the loader would starve epochs later; a missing few are a warning."""
    mix = _caption_mix(caption)
    if not mix:
        return
    absent = [s for s in mix if s not in sources]
    if len(absent) == len(mix):
        raise PixArtError(f"data.caption: none of {list(mix)} is in {folder} (its features hold captions {sources})")
    if absent:
        log.warning("%s: caption sources %s are not in its features (%s): its samples draw among the others",
                    folder, absent, sources)


def _remapped(counts: dict, remap: dict[str, str]) -> dict:
    out: dict = {}
    for b, n in counts.items():
        out[remap.get(b, b)] = out.get(remap.get(b, b), 0) + n
    return out


def _merge_starving(counts: dict[str, int], need: int) -> dict[str, str]:
    """Raw buckets: fold each bucket with fewer than `need` samples into the nearest-ratio one."""
    counts, merged = dict(counts), {}
    while len(counts) > 1:
        small = min(counts, key=lambda b: (counts[b], b))
        if counts[small] >= need:
            break
        target = min((b for b in counts if b != small), key=lambda b: (abs(float(b) - float(small)), b))
        counts[target] += counts.pop(small)
        merged.update({k: target for k, v in merged.items() if v == small})
        merged[small] = target
    return merged


class Loader:
    """Iterable of batches for this rank; `state_dict()`/`load_state_dict()` resume at the sample."""

    def __init__(self, config: LoaderConfig, text_encoder=None, autoencoder=None):
        self.config = c = config
        shards = resolve_shards(c.shards) if c.shards else []
        if not shards:
            raise PixArtError(f"{c.shards!r}: empty shard list")
        self.rank, self.world_size = dist_info(c)
        self.text_encoder, self.autoencoder = text_encoder, autoencoder
        kind = detect_kind(shards)
        table: Table | None = None
        if kind == "raw" and c.buckets is not None:
            table = dict(c.buckets) if isinstance(c.buckets, dict) else table_for(int(c.buckets))
        res = (c.resolution, c.resolution) if isinstance(c.resolution, int) else tuple(c.resolution)
        scores = Scores(c.scores_dir, c.min_score) if c.scores_dir else None
        self.decoder = d = Decoder(kind, c.seed, _caption_mix(c.caption), table, res, scores=scores)
        inputs = self._shared(lambda: self._inputs(shards))
        d.latent_scale = c.latent_scale if c.latent_scale is not None else inputs["scale"]
        d.latent_shift = c.latent_shift if c.latent_shift is not None else inputs["shift"]
        if kind == "features":
            log.info("feature cache: latents enter the model as (latent - %g) * %g", d.latent_shift, d.latent_scale)
        if scores is not None:
            kept, total = inputs["kept"]
            log.info("aesthetic selection (min_score %s): keeps %d of %d samples (%.1f%%)", c.min_score, kept, total,
                     100 * kept / max(total, 1))
        self.stats_static, counts = self._plan_buckets(inputs["counts"])
        live = sorted(b for b in self.stats_static.populations if b not in self.stats_static.starving)
        matrix = np.array([[n.get(b, 0) for b in live] for n in counts], dtype=np.float64).reshape(len(shards), -1)
        self.plan = Plan(shards, matrix, live, c.seed, self.rank, self.world_size, c.num_workers, c.batch_size)
        self.schedule_hash = hashlib.blake2b(json.dumps([live, np.round(matrix, 6).tolist()]).encode(),
                                             digest_size=8).hexdigest()
        self.buffer_size = c.buffer_size or max(2 * c.batch_size, min(4 * c.batch_size * len(live), MAX_BUFFER))
        self.step = 0
        self._states: dict[int, dict] = {}

    def _shared(self, compute):
        """compute() on rank 0, broadcast to the process group (ranks must agree on the schedule);
        locally without a group or when the config names rank/world itself."""
        c, dist = self.config, torch.distributed
        if c.rank is not None or c.world_size is not None or not (dist.is_available() and dist.is_initialized()):
            return compute()
        box, error = [None], None
        if dist.get_rank() == 0:
            try:
                box[0] = compute()
            except Exception as e:  # the other ranks raise it too instead of waiting
                box[0], error = {"error": str(e)}, e
        dist.broadcast_object_list(box, src=0)
        if error is not None:
            raise error
        if "error" in box[0]:
            raise PixArtError(f"rank 0: {box[0]['error']}")
        return box[0]

    def _manifests(self, shards: list[str]) -> dict[str, Manifest | None]:
        """Feature shards: each folder's manifest (local or http(s)/s3, read once per folder), checked (complete,
        `expected`, the caption sources `caption` draws from, one encoder setup)."""
        folders = {url: shard_folder(url) for url in shards}
        found: dict[str, Manifest | None] = {}
        for folder in dict.fromkeys(folders.values()):
            m = found[folder] = find_manifest(folder) if folder is not None else None
            if m is None:
                log.warning("%s: feature shards without a manifest.json (or one this URL may not read): not checked, "
                            "buckets scanned",
                            folder or "pipe: shards")
                continue
            m.check(self.config.expected or {}, folder)
            _check_caption_sources(self.config.caption, m.caption_sources, folder)
        same = ("text_dim", "latent_channels", "scaling_factor", "shift_factor")
        known = [(f, m) for f, m in found.items() if m is not None]
        for f, m in known[1:]:
            diff = [k for k in same if getattr(m, k) != getattr(known[0][1], k)]
            if diff:
                raise PixArtError(f"{f} and {known[0][0]}: feature caches differ in {diff[0]} "
                                  f"({getattr(m, diff[0])} != {getattr(known[0][1], diff[0])}); train on one setup")
        return {url: found[f] for url, f in folders.items()}

    def _inputs(self, shards: list[str]) -> dict:
        """What the schedule is made from: per-shard bucket counts (of the kept samples), the VAE's
        scale/shift, and (kept, total) samples of the aesthetic selection."""
        d = self.decoder
        manifests = self._manifests(shards) if d.kind == "features" else {}
        ms = [m for m in manifests.values() if m is not None]
        counts: list[Counter | None] = [None] * len(shards)
        kept = total = 0
        by_name: dict[int, dict] = {}  # each manifest's entries by shard name: a lookup per shard, not a scan
        for i, url in enumerate(shards):
            m = manifests.get(url)
            if m is not None and id(m) not in by_name:
                by_name[id(m)] = {e.name: e for e in m.shards}
            entry = by_name[id(m)].get(shard_name(url)) if m is not None else None
            if entry is None or not entry.buckets:
                continue
            f = max(1, int(m.downsample_factor))
            frac = 1.0
            if d.scores is not None:
                k = min(d.scores.kept(url), entry.count)
                kept, total, frac = kept + k, total + entry.count, k / max(entry.count, 1)
            counts[i] = Counter()
            for key, n in entry.buckets.items():  # encoded (pixel) size -> latent cells, the loader's key
                h, w = (int(x) for x in key.split("x"))
                counts[i][f"{h // f}x{w // f}"] += n * frac
        todo = [i for i, n in enumerate(counts) if n is None]
        if todo:
            found, seen, got = scan_buckets([shards[i] for i in todo], d, self.config.scan_samples)
            kept, total = kept + got, total + seen
            log.info("scanned %d samples of %d shards for bucket counts", seen, len(todo))
            full = [n for n in found if n is not None]
            mean = Counter({b: n / max(len(full), 1) for b, n in sum(full, Counter()).items()})
            for i, n in zip(todo, found, strict=True):
                counts[i] = n if n is not None else mean  # past scan_samples: the scanned shards' mean
        return {"counts": [dict(n) for n in counts], "kept": (kept, total),
                "scale": float(ms[0].scaling_factor) if ms else 1.0,
                "shift": float(ms[0].shift_factor) if ms else 0.0}

    def _plan_buckets(self, shard_counts: list[dict]) -> tuple[LoaderStats, list[dict]]:
        """Populations, starving buckets (raw: merged into neighbours), per-shard counts after merging."""
        c, d = self.config, self.decoder
        counts: Counter = sum((Counter(n) for n in shard_counts), Counter())
        counts = {b: round(n) for b, n in counts.items() if n > 0}
        if not counts:
            raise PixArtError(f"{c.shards!r}: no readable sample in {len(shard_counts)} shard(s)")
        need = c.batch_size * self.world_size * max(1, c.num_workers)
        readers = f"batch {c.batch_size} x {self.world_size} ranks x {max(1, c.num_workers)} workers"
        starving = {b: n for b, n in counts.items() if n < need}
        stats = LoaderStats(populations=counts, starving=starving)
        if d.kind == "raw" and d.table is not None:
            stats.merged = _merge_starving(counts, need)
            d.remap = stats.merged
            shard_counts = [_remapped(n, d.remap) for n in shard_counts]
            stats.populations = _remapped(counts, d.remap)
            stats.starving = {b: n for b, n in stats.populations.items() if n < need}
            for small, target in stats.merged.items():
                log.warning("bucket %s: %d samples, fewer than %s: merged into bucket %s",
                            small, counts[small], readers, target)
        for b, n in stats.starving.items():
            log.warning("bucket %s: %d samples, fewer than %s: starving, its samples are skipped (counted as "
                        "'unscheduled bucket %s')", b, n, readers, b)
        if all(b in stats.starving for b in stats.populations):
            raise PixArtError(f"{c.shards!r}: {sum(counts.values())} samples cannot fill one batch of "
                              f"{c.batch_size} per reader on {self.world_size} rank(s) x "
                              f"{max(1, c.num_workers)} worker(s) in any bucket")
        return stats, shard_counts

    # -- iteration ------------------------------------------------------------------------------
    def __iter__(self):
        c = self.config
        ds = BucketDataset(self.plan, self.decoder, self.buffer_size, dict(self._states), self.step)
        dl = DataLoader(ds, batch_size=None, num_workers=c.num_workers, persistent_workers=False,
                        worker_init_fn=_outlive_stop_signals)
        batches = iter(dl)
        if c.num_workers:
            _WITH_WORKERS.add(batches)
        for batch in batches:
            st = batch.pop("_state")
            self._states[int(st["role"])] = st["state"]
            self.step += 1
            if self.autoencoder is not None or self.text_encoder is not None:
                batch = self.encode(batch)
            yield batch

    @torch.no_grad()
    def encode(self, batch: dict) -> dict:
        """Raw batch -> feature fields with the frozen encoders (latent noise seeded by seed and step)."""
        out = dict(batch)
        if self.autoencoder is not None and "pixels" in batch:
            dist = self.autoencoder.encode(batch["pixels"])
            g = torch.Generator().manual_seed(stable_seed(self.config.seed, "vae", batch["step"]))
            out["latents"] = self.autoencoder.sample_latents(dist.mean.cpu(), dist.std.cpu(), g)
        if self.text_encoder is not None and "captions" in batch:
            y, mask = self.text_encoder.encode(batch["captions"])
            L = max(int(mask.sum(1).max()), 1)
            out["y"], out["mask"] = y[:, :L], mask[:, :L]
        return out

    # -- state ----------------------------------------------------------------------------------
    @property
    def stats(self) -> LoaderStats:
        s = self.stats_static
        out = LoaderStats(populations=dict(s.populations), starving=dict(s.starving), merged=dict(s.merged))
        for st in self._states.values():
            w = st.get("stats", {})
            for name in ("read", "used", "batches", "repeated", "dropped"):
                setattr(out, name, getattr(out, name) + w.get(name, 0))
            for k, v in w.get("skipped", {}).items():
                out.skipped[k] = out.skipped.get(k, 0) + v
            out.damaged_shards.update(dict.fromkeys(w.get("damaged_shards", {}), 1))
        return out

    def _signature(self) -> dict:
        return {"seed": self.config.seed, "rank": self.rank, "world_size": self.world_size,
                "num_workers": max(1, self.config.num_workers), "batch_size": self.config.batch_size,
                "shards": len(self.plan.shards), "buckets": self.plan.buckets, "schedule": self.schedule_hash}

    def state_dict(self) -> dict:
        """Small and JSON-serialisable; one per rank (each rank reads its own share)."""
        return {"version": STATE_VERSION, "step": self.step, **self._signature(),
                "workers": {str(k): v for k, v in sorted(self._states.items())}}

    def load_state_dict(self, state: dict) -> None:
        """Resume exactly when rank, world size, workers, batch size and the bucket schedule's inputs
        (per-shard bucket counts) match; otherwise (an elastic restart, another schedule) warn and
        restart each worker at the oldest saved epoch's start."""
        if state.get("version") != STATE_VERSION:
            raise PixArtError(f"loader state version {state.get('version')!r}, expected {STATE_VERSION}")
        self.step = int(state["step"])
        workers = {int(k): v for k, v in state.get("workers", {}).items()}
        mismatch = {k: (state.get(k), v) for k, v in self._signature().items() if state.get(k) != v}
        if not mismatch:
            self._states = workers
            return
        epoch = min((int(s["epoch"]) for s in workers.values()), default=0)
        log.warning("loader state is from another setup %s: exact data position lost, restarting epoch %d",
                    mismatch, epoch)
        W = max(1, self.config.num_workers)
        self._states = {r: {"step": self.step + (r - self.step) % W, "epoch": epoch, "counted": epoch}
                        for r in range(W)}
