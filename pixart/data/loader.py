"""The training data loader: an infinite, deterministic, resumable stream of same-bucket batches
over raw shards (images + captions) or feature shards (`FeatureSample`), split across ranks and
DataLoader workers. The rules (distribution, buckets, resume) are in `loader_stream`.

    loader = Loader(LoaderConfig(shards="data/feats", batch_size=8, seed=0))
    for batch in loader:                   # never ends; the trainer counts steps
        ...
        save_json(loader.state_dict())     # per rank; load_state_dict() resumes at that sample

Feature batches: latents (B, C, h, w) = (mean + std * noise - latent_shift) * latent_scale with
noise seeded by (seed, epoch, key); y (B, L, D) caption features padded to the batch's longest
caption; mask (B, L); keys; captions (text, when the metadata has it); data_info {img_hw (B, 2)
original height/width, aspect_ratio (B, 1) of the bucket}; bucket; step.
Raw batches: pixels (B, 3, H, W) in [-1, 1] (resized to cover the bucket, center-cropped);
captions; keys; data_info; bucket; step. With encoders passed to `Loader`, raw batches are
encoded in the main process into the feature-batch fields (latents are then VAE-scaled).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader

from ..errors import PixArtError
from .buckets import Table, table_for
from .loader_samples import Decoder, detect_kind, scan_buckets, stable_seed
from .loader_stream import BucketDataset, Plan, Schedule
from .shards import resolve_shards

log = logging.getLogger("pixart.data")
STATE_VERSION = 1


@dataclass
class LoaderConfig:
    shards: str | list[str]
    batch_size: int = 8
    seed: int = 0
    kind: str = "auto"                       # "auto" | "raw" | "features"
    buckets: int | dict | None = None        # raw: a side (1024/512/256: PixArt's tables; else scaled) or a table
    bucket_multiple: int = 16                # raw: scaled-table sizes are multiples of this
    resolution: int | tuple[int, int] = 256  # raw, without buckets: every image resized-cropped to this
    caption: str | dict[str, float] = "txt"  # a caption source, or a mix {source: probability}
    latent_scale: float = 1.0                # features: the VAE's scaling factor (0.18215 for SD) to get model space
    latent_shift: float = 0.0
    latent_downsample: int = 8               # features without width/height metadata: pixels per latent cell
    num_workers: int = 0
    rank: int | None = None                  # None: torch.distributed if initialised, else $RANK
    world_size: int | None = None            # None: torch.distributed if initialised, else $WORLD_SIZE
    buffer_size: int | None = None           # samples buffered per worker before repeating; None: 4 * batch * buckets
    scan_samples: int | None = None          # bucket populations from the first N samples (None: all)
    bucket_weights: dict[str, float] | None = None  # known populations (e.g. a manifest): skips the scan
    pin_memory: bool = False

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise PixArtError(f"batch_size must be positive, got {self.batch_size}")
        if self.kind not in ("auto", "raw", "features"):
            raise PixArtError(f"kind must be auto, raw or features, got {self.kind!r}")
        if self.num_workers < 0:
            raise PixArtError(f"num_workers must be >= 0, got {self.num_workers}")


@dataclass
class LoaderStats:
    """What the loader saw: counters summed over this rank's workers, and the bucket report."""
    read: int = 0
    used: int = 0
    batches: int = 0
    repeated: int = 0                                         # samples repeated to complete a batch
    skipped: dict[str, int] = field(default_factory=dict)    # reason -> samples (corrupt, missing caption...)
    damaged_shards: dict[str, int] = field(default_factory=dict)
    populations: dict[str, int] = field(default_factory=dict)  # bucket -> samples in the scan
    starving: dict[str, int] = field(default_factory=dict)     # bucket -> samples, too few for a batch per rank
    merged: dict[str, str] = field(default_factory=dict)       # raw: starving bucket -> bucket it joined


def dist_info(config: LoaderConfig) -> tuple[int, int]:
    """(rank, world size): the config's, else torch.distributed's, else $RANK/$WORLD_SIZE, else (0, 1)."""
    if config.rank is not None or config.world_size is not None:
        rank, world = config.rank or 0, config.world_size or 1
    elif torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    else:
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if not 0 <= rank < world:
        raise PixArtError(f"rank {rank} is outside world size {world}")
    return rank, world


def _caption_mix(caption: str | dict[str, float]) -> dict[str, float]:
    mix = {caption: 1.0} if isinstance(caption, str) else {str(k): float(v) for k, v in caption.items()}
    if not mix or any(p < 0 for p in mix.values()) or sum(mix.values()) <= 0:
        raise PixArtError(f"caption: give a source name or {{source: probability}} with a positive sum, "
                          f"got {caption!r}")
    return {k: p for k, p in mix.items() if p > 0}


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
        kind = detect_kind(shards) if c.kind == "auto" else c.kind
        table: Table | None = None
        if kind == "raw" and c.buckets is not None:
            table = dict(c.buckets) if isinstance(c.buckets, dict) else table_for(int(c.buckets), c.bucket_multiple)
        res = (c.resolution, c.resolution) if isinstance(c.resolution, int) else tuple(c.resolution)
        self.decoder = Decoder(kind, c.seed, _caption_mix(c.caption), table, res, None,
                               c.latent_scale, c.latent_shift, c.latent_downsample)
        self.stats_static = self._plan_buckets(shards)
        pops = self.stats_static.populations
        live = sorted(b for b in pops if b not in self.stats_static.starving)
        self.schedule = Schedule(live, [float(pops[b]) for b in live], c.seed)
        self.plan = Plan(shards, c.seed, self.rank, self.world_size, c.num_workers)
        self.buffer_size = c.buffer_size or 4 * c.batch_size * len(live)
        self.step = 0
        self._states: dict[int, dict] = {}

    def _plan_buckets(self, shards: list[str]) -> LoaderStats:
        c, d = self.config, self.decoder
        if c.bucket_weights:
            counts = {str(k): int(v) for k, v in c.bucket_weights.items() if v > 0}
        else:
            found, seen = scan_buckets(shards, d, c.scan_samples)
            counts = dict(found)
            log.info("scanned %d samples of %d shards: %d buckets", seen, len(shards), len(counts))
        if not counts:
            raise PixArtError(f"{c.shards!r}: no readable sample in {len(shards)} shard(s)")
        need = c.batch_size * self.world_size
        starving = {b: n for b, n in counts.items() if n < need}
        stats = LoaderStats(populations=counts, starving=starving)
        if d.kind == "raw" and d.table is not None:
            stats.merged = _merge_starving(counts, need)
            d.remap = stats.merged
            pops: dict[str, int] = {}
            for b, n in counts.items():
                pops[d.remap.get(b, b)] = pops.get(d.remap.get(b, b), 0) + n
            stats.populations = pops
            stats.starving = {b: n for b, n in pops.items() if n < need}
            for small, target in stats.merged.items():
                log.warning("bucket %s: %d samples, fewer than batch %d x %d ranks: merged into bucket %s",
                            small, counts[small], c.batch_size, self.world_size, target)
        for b, n in stats.starving.items():
            log.warning("bucket %s: %d samples, fewer than batch %d x %d ranks: starving, its samples are "
                        "skipped (counted as 'unscheduled bucket %s')", b, n, c.batch_size, self.world_size, b)
        if all(b in stats.starving for b in stats.populations):
            raise PixArtError(f"{c.shards!r}: {sum(counts.values())} samples cannot fill one batch of "
                              f"{c.batch_size} per rank on {self.world_size} rank(s) in any bucket")
        return stats

    # -- iteration ------------------------------------------------------------------------------
    def __iter__(self):
        c = self.config
        ds = BucketDataset(self.plan, self.decoder, self.schedule, c.batch_size, self.buffer_size,
                           dict(self._states), self.step)
        dl = DataLoader(ds, batch_size=None, num_workers=c.num_workers, pin_memory=c.pin_memory,
                        persistent_workers=False)
        for batch in dl:
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
            w = st["stats"]
            for name in ("read", "used", "batches", "repeated"):
                setattr(out, name, getattr(out, name) + w[name])
            for k, v in w["skipped"].items():
                out.skipped[k] = out.skipped.get(k, 0) + v
            for k, v in w["damaged_shards"].items():
                out.damaged_shards[k] = out.damaged_shards.get(k, 0) + v
        return out

    @property
    def epoch(self) -> int:
        """The oldest epoch any of this rank's workers is reading."""
        return min((int(s["epoch"]) for s in self._states.values()), default=0)

    def _signature(self) -> dict:
        return {"seed": self.config.seed, "rank": self.rank, "world_size": self.world_size,
                "num_workers": max(1, self.config.num_workers), "batch_size": self.config.batch_size,
                "shards": len(self.plan.shards), "buckets": self.schedule.buckets}

    def state_dict(self) -> dict:
        """Small and JSON-serialisable; one per rank (each rank reads its own share)."""
        return {"version": STATE_VERSION, "step": self.step, **self._signature(),
                "workers": {str(k): v for k, v in sorted(self._states.items())}}

    def load_state_dict(self, state: dict) -> None:
        """Resume exactly when rank, world size, workers, batch size and data match; otherwise
        (an elastic restart) warn and restart each worker at the oldest saved epoch's start."""
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
        self._states = {r: {"step": self.step + (r - self.step) % W, "epoch": epoch, "last": None, "buffered": {},
                            "stats": {"read": 0, "used": 0, "batches": 0, "repeated": 0, "skipped": {},
                                      "damaged_shards": {}}} for r in range(W)}
