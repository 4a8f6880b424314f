"""Loader throughput from feature shards: samples/s of `pixart.data.loader.Loader`, from local files and from
servers on 127.0.0.1 (an HTTP server; moto's S3 server, when moto is installed), side by side.

Writes synthetic feature shards (FeatureSample.to_wds + webdataset.TarWriter) into a temporary
folder, then times batches after a warm-up. Example:
    python tools/bench_loader.py --samples 2048 --latent 32 --tokens 120 --dim 4096 --workers 0 2
    python tools/bench_loader.py --sources local http s3 --workers 2
"""
from __future__ import annotations

import argparse
import itertools
import os
import tempfile
import threading
import time
from contextlib import contextmanager
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
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


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


class QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address):  # the timed loop stops mid-shard: its reset is expected
        pass


@contextmanager
def serve(folder: Path, source: str):
    """The shards' SHARDS spec from `source`: the folder itself, an HTTP server or an S3 server on 127.0.0.1."""
    if source == "local":
        yield str(folder)
        return
    if source == "http":
        httpd = QuietServer(("127.0.0.1", 0), partial(QuietHandler, directory=str(folder)))
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        names = sorted(p.name for p in folder.glob("*.tar"))
        try:
            yield [f"http://127.0.0.1:{httpd.server_address[1]}/{n}" for n in names]
        finally:
            httpd.shutdown()
        return
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://{host}:{port}"})
    import fsspec

    fs = fsspec.filesystem("s3")
    fs.mkdir("bench")
    for p in sorted(folder.glob("*.tar")):
        fs.put(str(p), f"bench/feats/{p.name}")
    try:
        yield "s3://bench/feats/"
    finally:
        server.stop()


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
    p.add_argument("--sources", nargs="+", choices=("local", "http", "s3"), default=["local"],
                   help="where the shards are read from (default local)")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        write_shards(Path(tmp), a.samples, a.shards, a.latent, a.tokens, a.dim)
        size = sum(f.stat().st_size for f in Path(tmp).glob("*.tar")) / 2**20
        print(f"{a.samples} samples in {a.shards} shards, {size:.0f} MiB, written in {time.perf_counter() - t:.1f} s")
        for source in a.sources:
            with serve(Path(tmp), source) as shards:
                for w in a.workers:
                    rate = bench(shards, a.batch, w, a.steps, a.warmup)
                    print(f"{source:5s} workers={w} batch={a.batch} latent={a.latent} tokens<={a.tokens}x{a.dim}: "
                          f"{rate:,.0f} samples/s")


if __name__ == "__main__":
    main()
