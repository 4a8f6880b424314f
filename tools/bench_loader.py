"""Loader throughput from feature shards: samples/s of `pixart.data.loader.Loader`.

Writes synthetic feature shards (FeatureSample.to_wds + webdataset.TarWriter) into a temporary
folder, then times batches after a warm-up. Example:
    python tools/bench_loader.py --samples 2048 --latent 32 --tokens 120 --dim 4096 --workers 0 2
"""
from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from pathlib import Path

import torch
import webdataset as wds

from pixart.data.loader import Loader, LoaderConfig
from pixart.data.schema import FeatureSample


def write_shards(out: Path, samples: int, shards: int, latent: int, tokens: int, dim: int) -> None:
    g = torch.Generator().manual_seed(0)
    shapes = [(latent, latent), (latent * 3 // 4, latent * 4 // 3), (latent * 4 // 3, latent * 3 // 4)]
    per = -(-samples // shards)
    for s in range(shards):
        with wds.TarWriter(str(out / f"feat-{s:06d}.tar")) as tw:
            for i in range(s * per, min(samples, (s + 1) * per)):
                h, w = shapes[i % len(shapes)]
                n = int(torch.randint(8, tokens + 1, (1,), generator=g))
                fs = FeatureSample(f"{i:08d}", torch.randn(4, h, w, generator=g), torch.rand(4, h, w, generator=g),
                                   {"txt": torch.randn(n, dim, generator=g).to(torch.bfloat16)},
                                   {"width": w * 8, "height": h * 8})
                tw.write(fs.to_wds())


def bench(shards: str, batch: int, workers: int, steps: int, warmup: int) -> float:
    loader = Loader(LoaderConfig(shards, batch_size=batch, num_workers=workers, seed=0))
    it = iter(loader)
    for _ in itertools.islice(it, warmup):
        pass
    t = time.perf_counter()
    for _ in itertools.islice(it, steps):
        pass
    return steps * batch / (time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=2048)
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--latent", type=int, default=32, help="latent side (32 = 256 px with the SD VAE)")
    p.add_argument("--tokens", type=int, default=120)
    p.add_argument("--dim", type=int, default=4096)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        write_shards(Path(tmp), a.samples, a.shards, a.latent, a.tokens, a.dim)
        size = sum(f.stat().st_size for f in Path(tmp).glob("*.tar")) / 2**20
        print(f"{a.samples} samples in {a.shards} shards, {size:.0f} MiB, written in {time.perf_counter() - t:.1f} s")
        for w in a.workers:
            rate = bench(tmp, a.batch, w, a.steps, a.warmup)
            print(f"workers={w} batch={a.batch} latent={a.latent} tokens<={a.tokens}x{a.dim}: {rate:,.0f} samples/s")


if __name__ == "__main__":
    main()
