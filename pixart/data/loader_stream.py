"""The loader's streaming half: who reads what, which bucket each step uses, and the resumable
per-worker stream of batches.

Distribution rule (per epoch, the same on every rank): the shards are shuffled with
(seed, epoch). With S = world_size * num_workers reading slots, the first n - n % S shards of
that order go whole to the slots, round-robin; the last n % S shards are split by sample index
(sample i of the j-th of them goes to slot (i + j) % S). So every slot reads the same amount of
data up to one shard's size difference, no slot is ever empty when n < S, every sample is read
exactly once per epoch, and each slot's stream runs on into the next epoch without a break:
every rank yields one batch per step forever, so no rank waits on another at an epoch's end.

Bucket rule: the bucket of global step t is a function of (seed, t) alone, so all ranks (and
the worker serving step t on each rank) use the same bucket and shapes always agree. It walks
a golden-ratio (Weyl) sequence through the buckets' cumulative weights: each bucket's share of
steps follows its population with an error that stays bounded, unlike independent draws whose
error grows with the step count and makes buffers drift.

Each slot keeps one FIFO per bucket and reads until the step's bucket holds a batch. When its
buffers hold `buffer_size` samples it stops reading ahead and completes the batch by repeating
that bucket's buffered samples (counted as `repeated`), so memory stays bounded.

Resume: a slot's state is its read position (epoch, unit, sample), the positions of the samples
in its buffers, its next step and its counters; the stream re-reads from the oldest buffered
position to restore the buffers exactly, so batches after a resume equal an uninterrupted run's.
"""
from __future__ import annotations

import itertools
import logging
import math
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from ..errors import PixArtError
from .loader_samples import BadSample, Decoder, Item, read_tar, stable_seed

log = logging.getLogger("pixart.data")
Pos = tuple[int, int, int]  # (epoch, unit, sample index within the unit's shard)
_GOLDEN = (math.sqrt(5) - 1) / 2


@dataclass
class Plan:
    """Which shards (whole, or a sample-index share) each reading slot gets in each epoch."""
    shards: list[str]
    seed: int
    rank: int
    world_size: int
    num_workers: int

    @property
    def slots(self) -> int:
        return self.world_size * max(1, self.num_workers)

    def units(self, epoch: int, slot: int) -> list[tuple[int, int | None]]:
        """(shard index, split phase or None for a whole shard), in reading order."""
        order = np.random.default_rng(stable_seed(self.seed, "shards", epoch)).permutation(len(self.shards))
        n, s = len(order), self.slots
        whole = n - n % s
        return [(int(order[j]), None) for j in range(slot, whole, s)] + \
               [(int(order[j]), j) for j in range(whole, n)]


@dataclass
class Schedule:
    """Bucket of each global step, from (seed, step) alone: the same on every rank and worker."""
    buckets: list[str]
    weights: list[float]
    seed: int

    def __post_init__(self) -> None:
        order = np.random.default_rng(stable_seed(self.seed, "bucket-order")).permutation(len(self.buckets))
        self._order = [self.buckets[i] for i in order]
        w = np.array([self.weights[i] for i in order], dtype=np.float64)
        self._cum = np.cumsum(w / w.sum())
        self._phase = np.random.default_rng(stable_seed(self.seed, "bucket-phase")).random()

    def __call__(self, step: int) -> str:
        u = (self._phase + step * _GOLDEN) % 1.0
        return self._order[min(int(np.searchsorted(self._cum, u, side="right")), len(self._order) - 1)]


@dataclass
class SlotStats:
    """Per-slot counters; JSON-serialisable through `vars`."""
    read: int = 0
    used: int = 0
    batches: int = 0
    repeated: int = 0
    skipped: Counter = field(default_factory=Counter)   # reason -> samples
    damaged_shards: Counter = field(default_factory=Counter)  # url -> times


def _log_skip(stats: SlotStats, reason: str, key: str) -> None:
    n = sum(stats.skipped.values())
    if n <= 10 or n % 1000 == 0:
        log.warning("skipped sample %s: %s (%d skipped so far in this worker)", key, reason, n)


class BucketStream:
    """One slot's infinite stream of (step, bucket, items), resumable from `state()`."""

    def __init__(self, plan: Plan, decoder: Decoder, schedule: Schedule, batch_size: int,
                 buffer_size: int, role: int, state: dict | None = None):
        self.plan, self.decoder, self.schedule = plan, decoder, schedule
        self.batch_size, self.buffer_size, self.role = batch_size, buffer_size, role
        self.slot = plan.rank * max(1, plan.num_workers) + role
        self.buffers: dict[str, deque[tuple[Pos, Item]]] = {b: deque() for b in schedule.buckets}
        self.stats = SlotStats()
        self.step = role
        self.last: Pos | None = None
        self.epoch = 0
        self._replaying = False
        self._raw: Iterator[tuple[Pos, dict]] | None = None
        if state:
            self._restore(state)  # sets _raw when it re-reads buffered samples
        if self._raw is None:
            start = (self.epoch, 0, 0) if self.last is None else (self.last[0], self.last[1], self.last[2] + 1)
            self._raw = self._samples(start)

    # -- reading --------------------------------------------------------------------------------
    def _damaged(self, url: str, exc: Exception) -> None:
        if not self._replaying:
            self.stats.damaged_shards[url] += 1
            log.warning("%s: damaged shard, rest skipped (%s: %s)", url, type(exc).__name__, exc)

    def _samples(self, start: Pos) -> Iterator[tuple[Pos, dict]]:
        epoch, unit0, index0 = start
        empty = 0
        while True:
            got = False
            for u, (shard, phase) in enumerate(self.plan.units(epoch, self.slot)):
                if u < unit0:
                    continue
                for i, raw in enumerate(read_tar(self.plan.shards[shard], self._damaged)):
                    if u == unit0 and i < index0:
                        continue
                    if phase is not None and (i + phase) % self.plan.slots != self.slot:
                        continue
                    got = True
                    yield (epoch, u, i), raw
            empty = 0 if got else empty + 1
            if empty >= 2:
                raise PixArtError(f"rank {self.plan.rank} worker {self.role}: its share of the shards held no "
                                  f"sample for two epochs (fewer samples than ranks x workers?)")
            epoch, unit0, index0 = epoch + 1, 0, 0

    def _read_one(self) -> None:
        pos, raw = next(self._raw)
        self.last, self.epoch = pos, pos[0]
        self.stats.read += 1
        try:
            item = self.decoder.decode(raw, pos[0])
        except BadSample as e:
            self.stats.skipped[str(e)] += 1
            _log_skip(self.stats, str(e), raw.get("__key__", "?"))
            return
        if item.bucket not in self.buffers:
            self.stats.skipped["unscheduled bucket " + item.bucket] += 1
            return
        self.buffers[item.bucket].append((pos, item))

    # -- batches --------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[tuple[int, str, list[Item], dict]]:
        B, W = self.batch_size, max(1, self.plan.num_workers)
        while True:
            bucket = self.schedule(self.step)
            buf, waited_from = self.buffers[bucket], self.epoch
            while len(buf) < B:
                if buf and sum(map(len, self.buffers.values())) >= self.buffer_size:
                    break  # read-ahead limit: repeat what this bucket has
                if not buf and self.epoch - waited_from >= 2:
                    raise PixArtError(f"rank {self.plan.rank} worker {self.role}: bucket {bucket} got no sample in "
                                      f"two epochs of this rank's shards; its samples sit in too few shards")
                self._read_one()
            items = [buf.popleft()[1] for _ in range(min(B, len(buf)))]
            self.stats.repeated += B - len(items)
            items += [items[i % len(items)] for i in range(B - len(items))]
            self.stats.used += len(items)
            self.stats.batches += 1
            step, self.step = self.step, self.step + W
            yield step, bucket, items, self.state()

    # -- state ----------------------------------------------------------------------------------
    def state(self) -> dict:
        s = self.stats
        return {"step": self.step, "epoch": self.epoch, "last": list(self.last) if self.last else None,
                "buffered": {b: [list(p) for p, _ in q] for b, q in self.buffers.items() if q},
                "stats": {"read": s.read, "used": s.used, "batches": s.batches, "repeated": s.repeated,
                          "skipped": dict(s.skipped), "damaged_shards": dict(s.damaged_shards)}}

    def _restore(self, state: dict) -> None:
        self.step, self.epoch = int(state["step"]), int(state.get("epoch", 0))
        self.last = tuple(state["last"]) if state.get("last") else None
        st = state.get("stats", {})
        self.stats = SlotStats(st.get("read", 0), st.get("used", 0), st.get("batches", 0), st.get("repeated", 0),
                               Counter(st.get("skipped", {})), Counter(st.get("damaged_shards", {})))
        wanted = {tuple(p): b for b, ps in state.get("buffered", {}).items() for p in ps}
        if not wanted or self.last is None:
            return
        # Re-read from the oldest buffered sample up to the last one read, keeping the buffered ones.
        stream = self._samples(min(wanted))
        self._replaying = True
        for pos, raw in stream:
            if pos > self.last:
                stream = itertools.chain([(pos, raw)], stream)
                break
            if pos in wanted:
                try:
                    item = self.decoder.decode(raw, pos[0])
                    self.buffers[item.bucket].append((pos, item))
                except (BadSample, KeyError):
                    log.warning("resume: buffered sample at %s no longer decodes; dropped", pos)
            if pos == self.last:
                break
        self._replaying = False
        self._raw = stream


def _bytes(t: torch.Tensor) -> np.ndarray:
    """A contiguous tensor's memory as a numpy uint8 array (last axis in bytes), for plain copies."""
    return t.contiguous().view(torch.uint8).numpy()


def collate(items: list[Item], kind: str) -> dict:
    """Items of one bucket -> a batch (see `pixart.data.loader` for the fields).

    Copies go through numpy: they are memcpys, and torch's intra-op threads turn them into
    0.1 s stalls per batch when the trainer keeps the cores busy (measured on 2 cores).
    """
    info = {"img_hw": torch.tensor([it.hw for it in items], dtype=torch.float32),
            "aspect_ratio": torch.tensor([[it.ratio] for it in items], dtype=torch.float32)}
    batch = {"keys": [it.key for it in items], "captions": [it.caption for it in items], "data_info": info}
    if kind == "raw":
        pixels = np.stack([it.x.numpy() for it in items]).astype(np.float32) / np.float32(127.5) - np.float32(1)
        batch["pixels"] = torch.from_numpy(pixels)
        return batch
    B, L, (D,) = len(items), max(it.y.shape[0] for it in items), items[0].y.shape[1:]
    y = torch.zeros(B, L, D, dtype=items[0].y.dtype)
    mask = torch.zeros(B, L, dtype=torch.long)
    y_bytes = _bytes(y)
    for i, it in enumerate(items):
        n = it.y.shape[0]
        y_bytes[i, :n] = _bytes(it.y.to(y.dtype))
        mask[i, :n] = 1
    latents = torch.from_numpy(np.stack([_bytes(it.x) for it in items])).view(items[0].x.dtype)
    batch.update(latents=latents, y=y, mask=mask)
    return batch


class BucketDataset(IterableDataset):
    """Yields whole batches; DataLoader worker k serves the steps t with t % W == its role."""

    def __init__(self, plan: Plan, decoder: Decoder, schedule: Schedule, batch_size: int, buffer_size: int,
                 states: dict[int, dict], start_step: int):
        super().__init__()
        self.plan, self.decoder, self.schedule = plan, decoder, schedule
        self.batch_size, self.buffer_size = batch_size, buffer_size
        self.states, self.start_step = states, start_step

    def __iter__(self):
        info = get_worker_info()
        W = max(1, self.plan.num_workers)
        # The DataLoader asks worker 0 first; after a resume at step n, step n belongs to role n % W.
        role = ((info.id if info else 0) + self.start_step) % W
        stream = BucketStream(self.plan, self.decoder, self.schedule, self.batch_size, self.buffer_size,
                              role, self.states.get(role))
        for step, bucket, items, state in stream:
            batch = collate(items, self.decoder.kind)
            batch.update(step=step, bucket=bucket, _state={"role": role, "state": state})
            yield batch
