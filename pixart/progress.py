"""A progress bar for jobs over shards whose sizes are unknown until read."""
from __future__ import annotations

from tqdm import tqdm


class ShardBar(tqdm):
    """Counts samples, with a total (and so an ETA) estimated from the samples per shard of the shards finished
    so far: a relabeling or feature job over thousands of shards shows how long it has left."""

    def __init__(self, shards: int, **kwargs):
        super().__init__(**kwargs)
        self.shards, self.finished, self.finished_samples = shards, 0, 0

    def shard_done(self, samples: int) -> None:
        self.finished += 1
        self.finished_samples += samples
        self.total = max(self.n, round(self.finished_samples / self.finished * self.shards))
        self.refresh()
