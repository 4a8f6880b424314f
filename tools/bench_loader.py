"""Loader throughput from feature shards: samples/s of `pixart.data.loader.Loader`, from local files and from
servers on 127.0.0.1 (an HTTP server; moto's S3 server, when moto is installed), side by side.

Writes synthetic feature shards (FeatureSample.to_wds + webdataset.TarWriter) into a temporary
folder, then times batches after a warm-up, every source and worker count once per round, and prints
the medians and each remote source's ratio to local files. Example:
    python tools/bench_loader.py --samples 2048 --latent 32 --tokens 120 --dim 4096 --workers 0 2
    python tools/bench_loader.py --samples 2048 --steps 60 --rounds 4 --sources local http s3
"""
from __future__ import annotations

import argparse
import itertools
import multiprocessing
import os
import socket
import statistics
import tempfile
import time
from contextlib import ExitStack, contextmanager
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch
import webdataset as wds
from tqdm import tqdm

from pixart.cli import positive_int
from pixart.data.loader import Loader, LoaderConfig
from pixart.data.remote import open_shard
from pixart.data.schema import FeatureSample
from pixart.data.shards import resolve_shards


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


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stream_rate(url: str) -> float:
    """MiB/s of one shard read whole through `open_shard`, without the loader: what the server gives one stream."""
    t, n = time.perf_counter(), 0
    with open_shard(url) as f:
        while chunk := f.read(1 << 20):
            n += len(chunk)
    return n / 2**20 / (time.perf_counter() - t)


class SendfileHandler(SimpleHTTPRequestHandler):
    """Serves files with sendfile(2), as nginx or a CDN's edge does: the kernel copies, so on a 2-core machine
    the server leaves the cores to the loader (python's own handler copies in Python: ~0.85 GiB/s per stream
    against ~2 GiB/s here)."""

    def log_message(self, *args):
        pass

    def copyfile(self, source, outputfile) -> None:
        outputfile.flush()
        offset, size = source.tell(), os.fstat(source.fileno()).st_size
        try:
            while offset < size:
                sent = os.sendfile(self.connection.fileno(), source.fileno(), offset, size - offset)
                if not sent:
                    break
                offset += sent
        except (BrokenPipeError, ConnectionResetError):
            pass  # the tar reader stops at the end-of-archive block and hangs up before the record's padding


def _serve_http(port: int, folder: str) -> None:
    ThreadingHTTPServer(("127.0.0.1", port), partial(SendfileHandler, directory=folder)).serve_forever()


def _serve_s3(port: int) -> None:
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise

    ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False).start()
    time.sleep(10**9)


@contextmanager
def server_process(target, *args):
    """A server in a process of its own, as on another machine: not in this process's GIL. Yields its URL."""
    port = _port()
    proc = multiprocessing.get_context("fork").Process(target=target, args=(port, *args), daemon=True)
    proc.start()
    try:
        for _ in range(300):
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.kill()
        proc.join()


@contextmanager
def serve(folder: Path, source: str):
    """The shards' SHARDS spec from `source`: the folder itself, an HTTP server (sendfile) or moto's S3 server,
    each on 127.0.0.1."""
    if source == "local":
        yield str(folder)
        return
    if source == "http":
        with server_process(_serve_http, str(folder)) as base:
            yield [f"{base}/{p.name}" for p in sorted(folder.glob("*.tar"))]
        return
    with server_process(_serve_s3) as base:
        os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": base})
        import fsspec

        fs = fsspec.filesystem("s3")
        fs.mkdir("bench")
        for p in sorted(folder.glob("*.tar")):
            fs.put(str(p), f"bench/feats/{p.name}")
        yield "s3://bench/feats/"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=positive_int, default=2048)
    p.add_argument("--shards", type=positive_int, default=8)
    p.add_argument("--latent", type=positive_int, default=32, help="latent side (32 = 256 px with the SD VAE)")
    p.add_argument("--tokens", type=positive_int, default=120)
    p.add_argument("--dim", type=positive_int, default=4096)
    p.add_argument("--batch", type=positive_int, default=32)
    p.add_argument("--steps", type=positive_int, default=40)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--sources", nargs="+", choices=("local", "http", "s3"), default=["local"],
                   help="where the shards are read from (default local)")
    p.add_argument("--rounds", type=positive_int, default=3,
                   help="measure every source and worker count this many times, interleaved, and report the "
                   "median: the machine's speed drifts within a run (default 3)")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as servers:
        t = time.perf_counter()
        write_shards(Path(tmp), a.samples, a.shards, a.latent, a.tokens, a.dim)
        size = sum(f.stat().st_size for f in Path(tmp).glob("*.tar")) / 2**20
        sample_bytes = size * 2**20 / a.samples
        print(f"{a.samples} samples in {a.shards} shards, {size:.0f} MiB, written in {time.perf_counter() - t:.1f} s")
        shards_by_source = {source: servers.enter_context(serve(Path(tmp), source)) for source in a.sources}
        for source, shards in shards_by_source.items():  # measured once: what one stream gives, for scale
            first = shards[0] if isinstance(shards, list) else resolve_shards(shards)[0]
            rate = stream_rate(first)
            per_s = rate * 2**20 / sample_bytes
            print(f"{source:5s} one stream, no loader: {rate:,.0f} MiB/s = {per_s:,.0f} samples/s")
        rates = {(source, w): [] for source in shards_by_source for w in a.workers}
        for _ in tqdm(range(a.rounds), desc="rounds", leave=False):
            for (source, w), got in rates.items():
                got.append(bench(shards_by_source[source], a.batch, w, a.steps, a.warmup))
        for (source, w), got in rates.items():
            median = statistics.median(got)
            local = rates.get(("local", w))
            ratio = f" ({median / statistics.median(local):.2f}x local)" if local and source != "local" else ""
            print(f"{source:5s} workers={w} batch={a.batch} latent={a.latent} tokens<={a.tokens}x{a.dim}: "
                  f"{median:,.0f} samples/s{ratio}, median of {', '.join(f'{r:,.0f}' for r in got)}")


if __name__ == "__main__":
    main()
