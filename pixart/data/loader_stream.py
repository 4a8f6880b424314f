"""The loader's streaming half: who reads what, which bucket each step uses, and the resumable
per-worker stream of batches.

Reading slots: S = world_size * num_workers; DataLoader worker k of rank r is slot r * W + k and
serves the global steps t with t % W == k (its "role"), so step t is served on every rank by the
slots of role t % W.

Distribution rule (per epoch, the same on every rank): the shards are shuffled with (seed, epoch).
The first n - n % S shards of that order go whole to the slots, round-robin; the last n % S are
split by sample index (sample i of the j-th of them goes to slot (i + j) % S). When buckets sit in
few shards, whole shards would leave slots without a bucket the others have: if that costs a role more
than half its epoch's batches, the epoch splits every shard instead (each slot then reads all
bytes: correct, slower). Every sample is read by exactly one slot per epoch, and no slot is empty.

Bucket rule: from the per-shard bucket counts (manifest or scan, the same on every rank), each
slot's epoch share is known (split shards: their count / S). Role k's epoch e holds
floor(min over ranks of that share / batch) batches of each bucket, so every rank can serve every
step of it; the batches are spread evenly through the epoch (exact counts, random phases from
(seed, epoch, role)). All ranks compute the same list, so they agree on every step's bucket.

A slot keeps one FIFO per bucket and reads its share until the step's bucket holds a batch. A
sample whose bucket has no batch left in the epoch is dropped without decoding (not buffered). The buffers never hold
more than `buffer_size` samples: when full, a bucket with samples completes its batch by repeating
them (counted as `repeated`), an empty one evicts the oldest sample of the fullest bucket (counted
as `dropped`). At the epoch's last step the rest of the share is skipped; a slot that runs out of a
bucket early (estimated split counts, a stale manifest) repeats, or borrows from its next epoch.

Resume: a slot's state is its (epoch, step index in the epoch), its read position, the positions
of the samples in its buffers and its counters; the stream re-reads from the oldest buffered
position to restore the buffers exactly, so batches after a resume equal an uninterrupted run's.
"""
from __future__ import annotations

import itertools
import logging
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from ..errors import PixArtError
from .loader_samples import BadSample, Decoder, Item, read_tar, stable_seed

log = logging.getLogger("pixart.data")
Pos = tuple[int, int, int]  # (epoch, unit, sample index within the unit's shard)
UNREAD = "unread: the shard broke off"


@dataclass
class Plan:
    """Which shards each reading slot reads in each epoch, and each role's bucket per step."""
    shards: list[str]
    counts: np.ndarray          # (shards, buckets): samples per shard and bucket (estimates allowed)
    buckets: list[str]          # the scheduled buckets, columns of `counts`
    seed: int
    rank: int
    world_size: int
    num_workers: int
    batch_size: int

    def __post_init__(self) -> None:
        self._epochs: dict[int, tuple] = {}

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_epochs"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _epochs={})

    @property
    def slots(self) -> int:
        return self.world_size * max(1, self.num_workers)

    def _batches(self, shares: np.ndarray) -> np.ndarray:
        """(roles, buckets) batches per epoch from the slots' (S, buckets) shares."""
        W = max(1, self.num_workers)
        per_role = shares.reshape(self.world_size, W, -1).min(axis=0)  # slot r * W + k: rank r, role k
        return np.floor(per_role / self.batch_size + 1e-9).astype(np.int64)

    def _epoch(self, epoch: int) -> tuple:
        """(shard order, shards kept whole, batches per role and bucket), cached."""
        if epoch not in self._epochs:
            order = np.random.default_rng(stable_seed(self.seed, "shards", epoch)).permutation(len(self.shards))
            n, S = len(order), self.slots
            whole = n - n % S
            shares = np.zeros((S, len(self.buckets)))
            np.add.at(shares, np.arange(whole) % S, self.counts[order[:whole]])
            shares += self.counts[order[whole:]].sum(axis=0) / S
            batches = self._batches(shares)
            split = self._batches(np.broadcast_to(self.counts.sum(axis=0) / S, shares.shape))
            if whole and (batches.sum(axis=1) < split.sum(axis=1) / 2).any():
                if not self._epochs:
                    log.warning("buckets are clustered by shard: whole shards would leave %d of %d batches; "
                                "epochs like %d split every shard over the %d reading slots (each reads all "
                                "bytes)", batches.sum(), split.sum(), epoch, S)
                whole, batches = 0, split
            if len(self._epochs) > 4:
                self._epochs.pop(min(self._epochs))
            self._epochs[epoch] = (order, whole, batches)
        return self._epochs[epoch]

    def units(self, epoch: int, slot: int) -> list[tuple[int, int | None]]:
        """(shard index, split phase or None for a whole shard), in reading order."""
        order, whole, _ = self._epoch(epoch)
        return [(int(order[j]), None) for j in range(slot, whole, self.slots)] + \
               [(int(order[j]), j) for j in range(whole, len(order))]

    def schedule(self, epoch: int, role: int) -> list[str]:
        """Role's bucket for each of its steps in the epoch: exact counts, evenly spread."""
        n = self._epoch(epoch)[2][role]
        phase = np.random.default_rng(stable_seed(self.seed, "buckets", epoch, role)).random(len(n))
        times = np.concatenate([(np.arange(k) + phase[b]) / k for b, k in enumerate(n) if k] or [np.zeros(0)])
        which = np.concatenate([np.full(k, b) for b, k in enumerate(n) if k] or [np.zeros(0, dtype=np.int64)])
        return [self.buckets[b] for b in which[np.argsort(times, kind="stable")]]


@dataclass
class SlotStats:
    """Per-slot counters; JSON-serialisable through `vars`."""
    read: int = 0
    used: int = 0
    batches: int = 0
    repeated: int = 0
    dropped: int = 0                                    # read, never used: surplus, evicted, epoch end
    skipped: Counter = field(default_factory=Counter)   # reason -> samples, in the slot's first epoch only
    damaged_shards: Counter = field(default_factory=Counter)  # url -> 1: each damaged shard once


class BucketStream:
    """One slot's infinite stream of (step, bucket, items), resumable from `state()`."""

    def __init__(self, plan: Plan, decoder: Decoder, buffer_size: int, role: int, state: dict | None = None):
        self.plan, self.decoder, self.buffer_size, self.role = plan, decoder, buffer_size, role
        self.slot = plan.rank * max(1, plan.num_workers) + role
        self.buffers: dict[str, deque[tuple[Pos, Item]]] = {b: deque() for b in plan.buckets}
        self.stats = SlotStats()
        self.step, self.epoch, self.index = role, 0, 0
        self.counted = 0            # the epoch whose skips are counted: each bad sample once
        self.last: Pos | None = None
        self._peek: tuple[Pos, dict] | None = None
        self._replaying = False
        self._raw: Iterator[tuple[Pos, dict]] | None = None
        if state:
            self._restore(state)
        if self._raw is None:
            self._raw = self._samples(self._start())
        self._enter(self.epoch)

    def _start(self) -> Pos:
        return (self.epoch, 0, 0) if self.last is None or self.last[0] < self.epoch else \
            (self.last[0], self.last[1], self.last[2] + 1)

    def _enter(self, epoch: int) -> None:
        self.order = self.plan.schedule(epoch, self.role)
        self.remaining = Counter(self.order[self.index:])

    # -- reading --------------------------------------------------------------------------------
    def _damaged(self, url: str, exc: Exception) -> None:
        if not self._replaying and url not in self.stats.damaged_shards:
            self.stats.damaged_shards[url] = 1
            log.warning("%s: damaged shard, rest skipped (%s: %s)", url, type(exc).__name__, exc)

    def _count_unread(self, epoch: int, shard: int, read: int, split: bool) -> None:
        """A shard that broke off (a cut file, a connection that stayed down): the samples the schedule expected
        past the break are skipped, and counted (exact with a manifest; a scan counts only what it could read)."""
        unread = max(0, round(self.plan.counts[shard].sum()) - read)
        if split:
            unread = round(unread / self.plan.slots)
        if unread and epoch == self.counted and not self._replaying:
            self.stats.skipped[UNREAD] += unread

    def _skip(self, pos: Pos, reason: str, key: str, warn: bool = True) -> None:
        """Count a skipped sample, and warn of the first few (not of the aesthetic selection's: it is chosen, and
        the loader says once how many it keeps)."""
        if pos[0] != self.counted:
            return
        self.stats.skipped[reason] += 1
        n = sum(self.stats.skipped.values())
        if warn and (n <= 10 or n % 1000 == 0):
            log.warning("skipped sample %s: %s (%d skipped so far in this worker)", key, reason, n)

    def _samples(self, start: Pos, need: Callable[[Pos], bool] | None = None) -> Iterator[tuple[Pos, dict]]:
        """This slot's samples from `start` on, epoch after epoch; those `need` rejects come as their keys alone."""
        epoch, unit0, index0 = start
        empty = 0
        while True:
            got = False
            for u, (shard, phase) in enumerate(self.plan.units(epoch, self.slot)):
                if u < unit0:
                    continue
                damage: list[tuple[str, Exception]] = []
                read, on_error = 0, (lambda url, exc, seen=damage: seen.append((url, exc)))

                def keep(i: int, unit: tuple = (epoch, u), first: int = index0 if u == unit0 else 0,
                         phase: int | None = phase) -> bool:
                    return i >= first and (phase is None or (i + phase) % self.plan.slots == self.slot) and \
                        (need is None or need((*unit, i)))

                for i, raw in enumerate(read_tar(self.plan.shards[shard], on_error, keep)):
                    read = i + 1
                    if u == unit0 and i < index0:
                        continue
                    if phase is not None and (i + phase) % self.plan.slots != self.slot:
                        continue
                    got = True
                    yield (epoch, u, i), raw
                if damage:
                    self._damaged(*damage[0])
                    self._count_unread(epoch, shard, read, phase is not None)
            empty = 0 if got else empty + 1
            if empty >= 2:
                raise PixArtError(f"rank {self.plan.rank} worker {self.role}: its share of the shards held no "
                                  f"sample for two epochs (fewer samples than ranks x workers?)")
            epoch, unit0, index0 = epoch + 1, 0, 0

    def _read_one(self, borrow: bool) -> bool:
        """Read the next sample into the buffers; False at the end of this epoch's share unless
        `borrow` lets it read on into the next epochs."""
        if self._peek is None:
            self._peek = next(self._raw)
        pos, raw = self._peek
        if pos[0] > self.epoch and not borrow:
            return False
        if pos[0] > self.epoch + 2:
            raise PixArtError(f"rank {self.plan.rank} worker {self.role}: bucket {self.order[self.index]} got no "
                              f"sample in two epochs of this worker's shards although the bucket counts say it "
                              f"has some; is the manifest stale?")
        self._peek, self.last = None, pos
        self.stats.read += 1
        key = raw.get("__key__", "?")
        reason = self.decoder.reject(raw)
        if reason:
            self._skip(pos, reason, key, warn=False)
            return True
        try:
            bucket = self.decoder.bucket(raw)
        except Exception:
            bucket = None  # decode() says why
        if bucket is not None and bucket not in self.buffers:
            self._skip(pos, "unscheduled bucket " + bucket, key)
            return True
        if bucket is not None and pos[0] == self.epoch and self.remaining[bucket] * self.plan.batch_size \
                <= len(self.buffers[bucket]):
            self.stats.dropped += 1  # its epoch has no batch left for it
            return True
        try:
            item = self.decoder.decode(raw, pos[0])
        except BadSample as e:
            self._skip(pos, str(e), key)
            return True
        self.buffers[item.bucket].append((pos, item))
        return True

    def _evict(self) -> None:
        q = max(self.buffers.values(), key=len)
        q.popleft()
        self.stats.dropped += 1

    def _next_epoch(self) -> None:
        for q in self.buffers.values():
            while q and q[0][0][0] <= self.epoch:
                q.popleft()
                self.stats.dropped += 1
        self.epoch, self.index = self.epoch + 1, 0
        if self.last is None or self.last[0] < self.epoch:  # skip the rest of the old share
            self._peek, self._raw = None, self._samples((self.epoch, 0, 0))
        self._enter(self.epoch)

    # -- batches --------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[tuple[int, str, list[Item], dict]]:
        B, W = self.plan.batch_size, max(1, self.plan.num_workers)
        while True:
            while self.index >= len(self.order):
                self._next_epoch()
            bucket = self.order[self.index]
            buf = self.buffers[bucket]
            while len(buf) < B:
                if sum(map(len, self.buffers.values())) >= self.buffer_size:
                    if buf:
                        break  # read-ahead limit: repeat what this bucket has
                    self._evict()
                if not self._read_one(borrow=not buf):
                    break  # this epoch's share is read: repeat
            items = [buf.popleft()[1] for _ in range(min(B, len(buf)))]
            self.stats.repeated += B - len(items)
            items += [items[i % len(items)] for i in range(B - len(items))]
            self.stats.used += len(items)
            self.stats.batches += 1
            self.remaining[bucket] -= 1
            self.index += 1
            step, self.step = self.step, self.step + W
            yield step, bucket, items, self.state()

    # -- state ----------------------------------------------------------------------------------
    def state(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "index": self.index, "counted": self.counted,
                "last": list(self.last) if self.last else None,
                "buffered": {b: [list(p) for p, _ in q] for b, q in self.buffers.items() if q},
                "stats": {k: dict(v) if isinstance(v, Counter) else v for k, v in vars(self.stats).items()}}

    def _restore(self, state: dict) -> None:
        self.step, self.epoch = int(state["step"]), int(state.get("epoch", 0))
        self.index, self.counted = int(state.get("index", 0)), int(state.get("counted", self.epoch))
        self.last = tuple(state["last"]) if state.get("last") else None
        st = state.get("stats", {})
        self.stats = SlotStats(**{k: Counter(v) if isinstance(v, dict) else v for k, v in st.items()})
        wanted = {tuple(p): b for b, ps in state.get("buffered", {}).items() for p in ps}
        if not wanted or self.last is None:
            return
        # Re-read from the oldest buffered sample up to the last one read, keeping the buffered ones (only their
        # members are read: the rest of an epoch's share between them can be most of it).
        stream = self._samples(min(wanted), need=lambda pos: pos in wanted or pos >= self.last)
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
        if self.last[0] >= self.epoch:  # else the epoch moved on: its share starts afresh
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
    batch = {"keys": [it.key for it in items], "captions": [it.caption for it in items], "data_info": info,
             "labels": torch.tensor([it.label for it in items], dtype=torch.long)}
    if kind == "raw":
        pixels = np.stack([it.x.numpy() for it in items]).astype(np.float32) / np.float32(127.5) - np.float32(1)
        batch["pixels"] = torch.from_numpy(pixels)
        return batch
    batch["latents"] = torch.from_numpy(np.stack([_bytes(it.x) for it in items])).view(items[0].x.dtype)
    if items[0].y is None:  # no captions read (a class-conditional stage)
        return batch
    B, L, (D,) = len(items), max(it.y.shape[0] for it in items), items[0].y.shape[1:]
    y = torch.zeros(B, L, D, dtype=items[0].y.dtype)
    mask = torch.zeros(B, L, dtype=torch.long)
    y_bytes = _bytes(y)
    for i, it in enumerate(items):
        n = it.y.shape[0]
        y_bytes[i, :n] = _bytes(it.y.to(y.dtype))
        mask[i, :n] = 1
    batch.update(y=y, mask=mask)
    return batch


class BucketDataset(IterableDataset):
    """Yields whole batches; DataLoader worker k serves the steps t with t % W == its role."""

    def __init__(self, plan: Plan, decoder: Decoder, buffer_size: int, states: dict[int, dict], start_step: int):
        super().__init__()
        self.plan, self.decoder, self.buffer_size = plan, decoder, buffer_size
        self.states, self.start_step = states, start_step

    def __iter__(self):
        info = get_worker_info()
        W = max(1, self.plan.num_workers)
        # The DataLoader asks worker 0 first; after a resume at step n, step n belongs to role n % W.
        role = ((info.id if info else 0) + self.start_step) % W
        stream = BucketStream(self.plan, self.decoder, self.buffer_size, role, self.states.get(role))
        for step, bucket, items, state in stream:
            batch = collate(items, self.decoder.kind)
            batch.update(step=step, bucket=bucket, _state={"role": role, "state": state})
            yield batch
