"""Regression pairs: noise and the teacher's sample of it under its own sampler (DMD1; PixArt-DMD draws them
with 20 DPM-Solver steps at CFG 4.5), for captions taken from the run's data.

They are drawn once, before step 1, by rank 0, into RUN/pairs.safetensors (atomically), and read back on
every rank and every resume, so a resumed run regresses onto the same targets. The captions come from a
loader of their own (another seed), so drawing them never moves the training stream.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save

from pixart.atomic import atomic_write
from pixart.checkpoint import read_safetensors
from pixart.data.loader_samples import stable_seed
from pixart.diffusion import NoiseSchedule, sample

PAIRS_FILE = "pairs.safetensors"


@dataclass
class Pairs:
    noise: torch.Tensor  # (P, C, H, W)
    y: torch.Tensor  # (P, L, caption_channels), zero-padded to the model's caption length
    mask: torch.Tensor  # (P, L)
    target: torch.Tensor  # (P, C, H, W): the teacher's sample of `noise`

    def __len__(self) -> int:
        return self.noise.shape[0]

    def batch(self, step: int, rank: int, world: int, batch_size: int, seed: int) -> dict:
        """This rank's slice of step `step`'s global batch, walking one seeded permutation per epoch, so the
        global batch is the same whatever the number of ranks."""
        start = (step * world + rank) * batch_size
        idx = []
        for i in range(start, start + batch_size):
            epoch, pos = divmod(i, len(self))
            g = torch.Generator().manual_seed(stable_seed(seed, "pairs", epoch))
            idx.append(int(torch.randperm(len(self), generator=g)[pos]))
        idx = torch.tensor(idx)
        return {"noise": self.noise[idx], "y": self.y[idx], "mask": self.mask[idx], "target": self.target[idx],
                "keys": [f"pair-{i}" for i in idx.tolist()]}


def load_pairs(run_dir: Path) -> Pairs:
    _, t = read_safetensors(run_dir / PAIRS_FILE, "pairs file", "; delete it to draw the pairs again")
    return Pairs(t["noise"], t["y"], t["mask"], t["target"])


@torch.no_grad()
def make_pairs(teacher, batches, count: int, latent_hw: tuple[int, int], *, prediction_type: str, sampler: str,
               steps: int, cfg: float, seed: int, device: torch.device, dtype: torch.dtype, out: Path,
               chunk: int = 64) -> Pairs:
    """Draw `count` pairs with the teacher and write them to `out` (rank 0 only)."""
    L = teacher.config.model_max_length
    ys, masks = [], []
    for batch in batches:
        y, mask = batch["y"].float(), batch["mask"]
        ys.append(F.pad(y, (0, 0, 0, L - y.shape[1])))
        masks.append(F.pad(mask, (0, L - mask.shape[1])))
        if sum(len(m) for m in masks) >= count:
            break
    y, mask = torch.cat(ys)[:count], torch.cat(masks)[:count]
    g = torch.Generator().manual_seed(stable_seed(seed, "pair-noise"))
    noise = torch.randn(count, teacher.config.in_channels, *latent_hw, generator=g)
    null = teacher.y_embedder.y_embedding
    targets = []
    for lo in range(0, count, chunk):
        sl = slice(lo, lo + chunk)
        x = sample(teacher, noise[sl].to(device, dtype), y[sl].to(device, dtype), mask[sl].to(device), null,
                   sampler=sampler, steps=steps, cfg_scale=cfg, schedule=NoiseSchedule.linear(),
                   prediction_type=prediction_type)
        targets.append(x.float().cpu())
    pairs = Pairs(noise, y, mask, torch.cat(targets))
    atomic_write(out, save({"noise": pairs.noise, "y": pairs.y, "mask": pairs.mask.contiguous(),
                            "target": pairs.target}))
    return pairs
