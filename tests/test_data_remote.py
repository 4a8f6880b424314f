"""Remote shards from real servers on 127.0.0.1: an HTTP server with Range and ETag (as object stores and CDNs
serve them, RFC 9110 §14 and §8.8.3), with a hook that cuts connections mid-shard; and moto's standalone S3
server, which speaks the S3 wire protocol to s3fs."""
import gzip
import hashlib
import os
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest

from pixart.data import remote
from pixart.data.shards import resolve_shards
from pixart.data.tars import TarDamage, iter_samples
from pixart.errors import PixArtError


class RangeHandler(SimpleHTTPRequestHandler):
    """Serves a folder with `Range: bytes=N-`; `cuts` is a list: each request pops one entry and, when it is a
    number, sends only that many bytes of its body and drops the connection."""

    cuts: list = []
    statuses: list = []  # each request pops one entry and, when it is a number, answers that error status
    after_cut: list = []  # each cut connection pops one callable and calls it (to replace the file meanwhile)
    ranges: list = []  # the Range header of each GET (None without one), for tests to read

    def log_message(self, *args):
        pass

    def do_HEAD(self):
        self.do_GET(head=True)

    def do_GET(self, head=False):
        if self.statuses and (status := self.statuses.pop(0)):
            self.send_error(status)
            return
        path = self.translate_path(self.path)
        try:
            data = open(path, "rb").read()
        except OSError:
            self.send_error(404)
            return
        start = 0
        rng = self.headers.get("Range")
        if not head:
            self.ranges.append(rng)
        if rng:
            start = int(rng.split("=")[1].split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.send_header("ETag", f'"{hashlib.md5(data).hexdigest()}"')
        self.end_headers()
        if head:
            return
        cut = self.cuts.pop(0) if self.cuts else None
        self.wfile.write(body if cut is None else body[:cut])
        if cut is not None:
            self.close_connection = True
            if self.after_cut:
                self.after_cut.pop(0)()


@pytest.fixture
def server(tmp_path):
    from data_pipelines.shapes import write_shapes

    write_shapes(tmp_path / "shards", 24, seed=0, resolution=32, shard_size=12, workers=1)
    yield from _serve(tmp_path / "shards")


def _serve(folder):
    RangeHandler.cuts, RangeHandler.statuses, RangeHandler.after_cut = [], [], []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(RangeHandler, directory=str(folder)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", folder
    httpd.shutdown()


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch):
    monkeypatch.setattr(remote, "DEFAULT_POLICY", remote.RetryPolicy(attempts=3, backoff_s=0.01, timeout_s=5))


def _keys(url):
    damage = TarDamage()
    return [s["__key__"] for s in iter_samples(url, damage)], damage


def test_http_brace_patterns_read_like_local_files(server):
    base, folder = server
    urls = resolve_shards(f"{base}/shapes-{{000000..000001}}.tar")
    assert urls == [f"{base}/shapes-000000.tar", f"{base}/shapes-000001.tar"]
    for url, local in zip(urls, sorted(folder.glob("*.tar")), strict=True):
        got, damage = _keys(url)
        want, _ = _keys(str(local))
        assert got == want and len(got) == 12 and not damage.error


def test_the_first_request_is_retried_and_a_missing_shard_is_not(server):
    """A 503 or a timeout on the first request is retried as a reconnect is (webdataset's curl opener retries
    too: `curl --retry 30`, webdataset/gopen.py); a 404 is not."""
    base, _ = server
    RangeHandler.statuses = [503, 503]
    got, damage = _keys(f"{base}/shapes-000000.tar")
    assert len(got) == 12 and not damage.error and not RangeHandler.statuses
    RangeHandler.statuses = [404, None]
    got, damage = _keys(f"{base}/shapes-000000.tar")
    assert got == [] and "HTTP Error 404" in damage.error and RangeHandler.statuses == [None]


def test_a_shard_replaced_while_it_is_read_is_damage_not_a_splice(server, tmp_path, monkeypatch):
    """The reconnect asks for the rest of the same ETag (If-Range, RFC 9110 §13.1.5); a server that sends the rest
    of another file anyway is caught by its ETag: the samples before the cut are kept, nothing after it."""
    base, folder = server
    size = (folder / "shapes-000000.tar").stat().st_size
    mine, other = (folder / "shapes-000000.tar").read_bytes(), (folder / "shapes-000001.tar").read_bytes()
    RangeHandler.cuts = [size // 2]
    RangeHandler.after_cut = [lambda: (folder / "shapes-000000.tar").write_bytes(other)]
    got, damage = _keys(f"{base}/shapes-000000.tar")
    assert 0 < len(got) < 12 and "replaced while it was read" in damage.error
    monkeypatch.setenv(remote.CACHE_ENV, str(tmp_path / "cache"))  # and the shard cache keeps no copy of either
    RangeHandler.cuts = [size // 2]
    RangeHandler.after_cut = [lambda: (folder / "shapes-000000.tar").write_bytes(mine)]
    got, damage = _keys(f"{base}/shapes-000000.tar")
    assert 0 < len(got) < 12 and "replaced while it was read" in damage.error
    assert list((tmp_path / "cache").iterdir()) == []


def test_a_dropped_connection_resumes_at_the_byte_it_reached(server):
    base, folder = server
    url = f"{base}/shapes-000000.tar"
    size = (folder / "shapes-000000.tar").stat().st_size
    RangeHandler.cuts, RangeHandler.ranges = [size // 3, size // 3], []  # two cuts mid-shard, then whole
    damage = TarDamage()
    got = list(iter_samples(url, damage))
    assert not damage.error and RangeHandler.cuts == []  # both cuts were met
    # each new connection asks for the byte the last one reached
    assert [r for r in RangeHandler.ranges if r] == [f"bytes={size // 3}-", f"bytes={2 * (size // 3)}-"]
    want = {s["__key__"]: s for s in iter_samples(str(folder / "shapes-000000.tar"))}
    assert sorted(s["__key__"] for s in got) == sorted(want)
    for s in got:  # every member's bytes arrive intact through the cuts
        assert all(s[k] == want[s["__key__"]][k] for k in want[s["__key__"]] if k not in ("__url__",))


def test_a_shard_that_keeps_failing_ends_there_and_keeps_what_came_before(server):
    base, folder = server
    size = (folder / "shapes-000000.tar").stat().st_size
    RangeHandler.cuts = [size // 2] + [0] * 10  # the reconnects all die at once
    got, damage = _keys(f"{base}/shapes-000000.tar")
    assert 0 < len(got) < 12
    assert "gave up at byte" in damage.error and damage.after == len(got)


def test_gzipped_and_cut_shards_over_http(server):
    """Plain tars are read in tarfile's file mode through ForwardSeeking; a gzipped one (told by its magic, not
    the ustar one) in stream mode; a shard cut at a header, which tarfile ends quietly, is still reported."""
    import tarfile

    base, folder = server
    plain = folder / "shapes-000000.tar"
    (folder / "zipped.tar.gz").write_bytes(gzip.compress(plain.read_bytes()))
    got, damage = _keys(f"{base}/zipped.tar.gz")
    assert got == _keys(str(plain))[0] and not damage.error
    with tarfile.open(plain) as tar:
        members = tar.getmembers()
    (folder / "cut.tar").write_bytes(plain.read_bytes()[:members[9].offset])  # three whole samples (png, json, txt)
    got, damage = _keys(f"{base}/cut.tar")
    assert got == _keys(str(folder / "cut.tar"))[0] and len(got) == 2  # the last may be partial: dropped
    assert "no end-of-archive block" in damage.error and damage.reason() == f"{damage.error}, after 2 samples"


def test_forward_seeking_skips_ahead_and_goes_back_only_into_its_last_read():
    import io

    class Unseekable(io.BytesIO):
        def seekable(self):
            return False

    f = remote.ForwardSeeking(Unseekable(bytes(range(100))))
    assert f.read(10) == bytes(range(10)) and f.tell() == 10
    assert f.seek(40) == 40 and f.read(5) == bytes(range(40, 45))
    f.seek(-3, io.SEEK_CUR)
    assert f.read(6) == bytes(range(42, 48))  # two bytes given again, then four new ones
    with pytest.raises(io.UnsupportedOperation, match="cannot seek back to byte 43"):
        f.seek(43)
    assert f.seek(200) == 100 and f.read(1) == b""


def test_a_missing_shard_is_reported(server, monkeypatch):
    """Reported as damage with nothing read (the loader goes on; jobs do not finish it); its identity is a
    one-line error naming the URL, which urllib's "HTTP Error 404: File not found" does not. A missing fsspec
    backend is said as such, not as a shard that cannot be reached."""
    base, _ = server
    got, damage = _keys(f"{base}/nope.tar")
    assert got == [] and damage.after == 0
    assert damage.reason() == "nothing could be read (HTTPError: HTTP Error 404: Not Found)"
    with pytest.raises(PixArtError, match=rf"^{base}/nope.tar: cannot reach the shard \(HTTPError: HTTP Error 404"):
        remote.remote_identity(f"{base}/nope.tar")
    with pytest.raises(PixArtError, match=r"^http://127.0.0.1:1/x.tar: cannot reach the shard \(URLError: .*refused"):
        remote.remote_identity("http://127.0.0.1:1/x.tar")
    got, damage = _keys(f"{base}/shapes-000000.tar")
    assert len(got) == 12 and not damage.error

    def no_backend(url):
        raise ImportError("Install s3fs to access S3")

    monkeypatch.setattr(remote.fsspec.core, "url_to_fs", no_backend)
    with pytest.raises(PixArtError, match=r"^s3://b/x.tar: Install s3fs to access S3$"):
        remote.remote_identity("s3://b/x.tar")


def test_a_changed_remote_shard_gets_a_new_identity(server):
    base, folder = server
    url = f"{base}/shapes-000000.tar"
    before = remote.remote_identity(url)
    assert before["etag"] == hashlib.md5((folder / "shapes-000000.tar").read_bytes()).hexdigest()
    assert remote.remote_identity(url) == before
    (folder / "shapes-000000.tar").write_bytes((folder / "shapes-000001.tar").read_bytes())
    assert remote.remote_identity(url) != before


def test_a_feature_cache_of_http_shards_re_encodes_a_changed_shard(server, tiny_feature_cache):
    import json

    from data_pipelines.features import FeatureConfig, extract_features

    base, folder = server
    cfg = FeatureConfig(text_encoder=str(tiny_feature_cache / "t5"), pixel_autoencoder=4, resolution=32,
                        captions=("txt",))
    out = folder.parent / "feats"
    extract_features(f"{base}/shapes-{{000000..000001}}.tar", out, cfg, progress=False)
    record = json.loads((out / ".done" / "shapes-000000.json").read_text())
    assert record["input"]["etag"] and record["count"] == 12
    (folder / "shapes-000000.tar").write_bytes((folder / "shapes-000001.tar").read_bytes())
    extract_features(f"{base}/shapes-{{000000..000001}}.tar", out, cfg, progress=False)
    again = json.loads((out / ".done" / "shapes-000000.json").read_text())
    assert again["input"]["etag"] != record["input"]["etag"] and again["sha256"] != record["sha256"]


@pytest.fixture
def s3(tmp_path, monkeypatch):
    """moto's standalone server on 127.0.0.1 holding bucket `data` with shapes/shapes-00000{0,1}.tar."""
    moto_server = pytest.importorskip("moto.server")
    from data_pipelines.shapes import write_shapes

    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    for key, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_ENDPOINT_URL": f"http://{host}:{port}"}.items():
        monkeypatch.setenv(key, value)
    import fsspec
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    fs = fsspec.filesystem("s3")
    if not fs.exists("data"):  # moto keeps its buckets from test to test in one process
        fs.mkdir("data")
    write_shapes(tmp_path / "shards", 24, seed=0, resolution=32, shard_size=12, workers=1)
    for p in sorted((tmp_path / "shards").glob("*.tar")):
        fs.put(str(p), f"data/shapes/{p.name}")
    yield tmp_path / "shards"
    s3fs.S3FileSystem.clear_instance_cache()
    server.stop()


def test_s3_prefixes_globs_and_brace_patterns(s3):
    import fsspec

    want = ["s3://data/shapes/shapes-000000.tar", "s3://data/shapes/shapes-000001.tar"]
    assert resolve_shards("s3://data/shapes/") == want
    assert resolve_shards("s3://data/shapes") == want  # a prefix, as a local folder needs no slash either
    fsspec.filesystem("s3").put(str(s3 / "shapes-000000.tar"), "data/odd/shard-without-suffix")
    assert resolve_shards("s3://data/odd/shard-without-suffix") == ["s3://data/odd/shard-without-suffix"]
    assert len(_keys("s3://data/odd/shard-without-suffix")[0]) == 12
    assert resolve_shards("s3://data/shapes/*.tar") == want
    assert resolve_shards("s3://data/shapes/shapes-{000000..000001}.tar") == want
    for url, local in zip(want, sorted(s3.glob("*.tar")), strict=True):
        got, damage = _keys(url)
        assert got == _keys(str(local))[0] and len(got) == 12 and not damage.error
    identity = remote.remote_identity(want[0])
    assert identity["etag"] == hashlib.md5((s3 / "shapes-000000.tar").read_bytes()).hexdigest()
    # a prefix lists gzipped shards too, as a local folder does

    zipped = gzip.compress((s3 / "shapes-000000.tar").read_bytes())
    fsspec.filesystem("s3").pipe("data/shapes/shapes-000002.tar.gz", zipped)
    assert resolve_shards("s3://data/shapes/") == [*want, "s3://data/shapes/shapes-000002.tar.gz"]
    assert _keys("s3://data/shapes/shapes-000002.tar.gz")[0] == _keys(want[0])[0]


def test_the_shard_cache_fills_once_then_serves_and_stays_bounded(server, tmp_path, monkeypatch):
    base, folder = server
    cache = tmp_path / "cache"
    size = (folder / "shapes-000000.tar").stat().st_size
    monkeypatch.setenv(remote.CACHE_ENV, str(cache))
    monkeypatch.setenv(remote.CACHE_GB_ENV, str(1.5 * size / 2**30))  # room for one shard, not two
    gets = []
    monkeypatch.setattr(RangeHandler, "log_message", lambda self, fmt, *a: gets.append(a[0]) if a else None)
    url = f"{base}/shapes-000000.tar"
    first, _ = _keys(url)
    assert [p.stat().st_size for p in cache.iterdir()] == [size]  # filled, whole
    reads = len([g for g in gets if g.startswith("GET")])
    second, damage = _keys(url)
    assert second == first and not damage.error
    assert len([g for g in gets if g.startswith("GET")]) == reads  # the second epoch read the cache
    _keys(f"{base}/shapes-000001.tar")
    assert len(list(cache.iterdir())) == 1 and "shapes-000001" in next(cache.iterdir()).name  # the older went
    RangeHandler.cuts = [size // 2] + [0] * 10  # a read that fails leaves no partial copy
    cached = {p.name: p.stat().st_size for p in cache.iterdir()}
    (folder / "shapes-000000.tar").write_bytes((folder / "shapes-000000.tar").read_bytes())
    monkeypatch.setattr(remote, "remote_identity", lambda u: {"url": u, "etag": "new"})
    got, damage = _keys(url)
    assert 0 < len(got) < 12 and "gave up at byte" in damage.error  # what came before the cut is kept
    assert {p.name: p.stat().st_size for p in cache.iterdir()} == cached  # nothing new, hidden or renamed in


def test_a_full_disk_leaves_the_shard_cache_without_a_cut_copy(server, tmp_path, monkeypatch, caplog):
    """The copy fails to be written (ENOSPC) half-way: the read goes on, uncached, and nothing is renamed into the
    cache, which the next read, with room again, fills whole."""
    import errno

    base, folder = server
    cache, size = tmp_path / "cache", (folder / "shapes-000000.tar").stat().st_size
    monkeypatch.setenv(remote.CACHE_ENV, str(cache))

    class HalfFull:
        def __init__(self, path, mode):
            self.file, self.room = open(path, mode), size // 2

        def write(self, data):
            if len(data) > self.room:
                raise OSError(errno.ENOSPC, "No space left on device")
            self.room -= len(data)
            return self.file.write(data)

        def __getattr__(self, name):
            return getattr(self.file, name)

    monkeypatch.setattr(remote, "open", lambda path, mode: HalfFull(path, mode) if "w" in mode else open(path, mode),
                        raising=False)
    got, damage = _keys(f"{base}/shapes-000000.tar")
    assert len(got) == 12 and not damage.error
    assert list(cache.iterdir()) == [] and "No space left on device" in caplog.text
    monkeypatch.undo()
    monkeypatch.setenv(remote.CACHE_ENV, str(cache))
    assert _keys(f"{base}/shapes-000000.tar")[0] == got
    assert [p.stat().st_size for p in cache.iterdir()] == [size]


def test_presigned_urls_are_cached_by_path_or_read_past_the_cache(server, tmp_path, monkeypatch):
    """A presigned URL's query (hundreds of bytes) is no file name; one that answers no HEAD (its signature covers
    GET alone) has no identity to cache it under: it is read uncached, not lost."""
    base, folder = server
    cache = tmp_path / "cache"
    monkeypatch.setenv(remote.CACHE_ENV, str(cache))
    url = f"{base}/shapes-000000.tar?X-Amz-Signature={'f' * 400}&X-Amz-Expires=3600"
    assert len(_keys(url)[0]) == 12
    assert [p.name.split("-", 1)[1] for p in cache.iterdir()] == ["shapes-000000.tar"]
    RangeHandler.statuses = [403]  # the HEAD
    got, damage = _keys(f"{base}/shapes-000001.tar")
    assert len(got) == 12 and not damage.error and len(list(cache.iterdir())) == 1
    got, damage = _keys(f"{base}/nope.tar")  # a HEAD that finds nothing is no presigned URL: the shard is missing
    assert got == [] and "cannot reach the shard (HTTPError: HTTP Error 404" in damage.error


def test_the_shard_cache_removes_the_copies_of_killed_readers(server, tmp_path, monkeypatch):
    import subprocess
    import sys

    base, _ = server
    cache = tmp_path / "cache"
    cache.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = cache / f".0123-shapes-000001.tar.{int(dead.stdout)}.tmp"
    live = cache / f".0123-shapes-000002.tar.{os.getpid()}.tmp"
    for p in (orphan, live):
        p.write_bytes(b"x" * 100)
    monkeypatch.setenv(remote.CACHE_ENV, str(cache))
    assert len(_keys(f"{base}/shapes-000000.tar")[0]) == 12
    assert not orphan.exists() and live.exists()


@pytest.fixture
def feature_server(tmp_path, tiny_feature_cache):
    """The tiny feature cache served over HTTP as BASE/feats/, its manifest given a latent scale and shift (the pixel
    autoencoder's are 1 and 0, which a loader that never read the manifest would use too)."""
    import json
    import shutil

    shutil.copytree(tiny_feature_cache / "feats", tmp_path / "www" / "feats")
    path = tmp_path / "www" / "feats" / "manifest.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "scaling_factor": 3.0, "shift_factor": 0.5}))
    yield from _serve(tmp_path / "www")


def test_a_feature_cache_over_http_is_read_with_its_manifest(feature_server, monkeypatch, caplog):
    """Scaled and scheduled as the same cache on disk: the manifest's scale and shift, its bucket counts (no scan of
    every shard), its manifest read once; `cache_manifest` (the trainer's encoders and checks) finds it too."""
    import logging

    import torch

    from pixart.data import loader as loader_module
    from pixart.data.loader import Loader, LoaderConfig
    from pixart.data.manifest import Manifest
    from pixart.train.config import TrainConfig
    from pixart.train.encoders import cache_manifest

    base, www = feature_server
    local = Loader(LoaderConfig(str(www / "feats"), batch_size=4))
    gets = []
    monkeypatch.setattr(RangeHandler, "log_message", lambda self, fmt, *a: gets.append(a[0]) if a else None)
    monkeypatch.setattr(loader_module, "scan_buckets", lambda *a: pytest.fail("scanned shards despite a manifest"))
    with caplog.at_level(logging.INFO, logger="pixart.data"):
        far = Loader(LoaderConfig(f"{base}/feats/shapes-{{000000..000003}}.tar", batch_size=4))
    assert (far.decoder.latent_scale, far.decoder.latent_shift) == (3.0, 0.5)
    assert (local.decoder.latent_scale, local.decoder.latent_shift) == (3.0, 0.5)
    assert "latents enter the model as (latent - 0.5) * 3" in caplog.text and "without a manifest" not in caplog.text
    assert far.schedule_hash == local.schedule_hash
    assert len([g for g in gets if "manifest.json" in g]) == 1
    a, b = next(iter(far)), next(iter(local))
    assert a["keys"] == b["keys"] and torch.equal(a["latents"], b["latents"])
    cfg = TrainConfig(data={"shards": f"{base}/feats/shapes-000000.tar?download=1"})  # query: not folder
    assert cache_manifest(cfg) == Manifest.load(www / "feats") and cache_manifest(cfg).scaling_factor == 3.0


def test_an_incomplete_remote_cache_is_refused_as_a_local_one(feature_server):
    import json

    from pixart.data.loader import Loader, LoaderConfig

    base, www = feature_server
    path = www / "feats" / "manifest.json"
    d = json.loads(path.read_text())
    d["shards"][1]["complete"] = False
    path.write_text(json.dumps(d))
    with pytest.raises(PixArtError) as local:
        Loader(LoaderConfig(str(www / "feats"), batch_size=4))
    with pytest.raises(PixArtError) as far:
        Loader(LoaderConfig(f"{base}/feats/shapes-{{000000..000003}}.tar", batch_size=4))
    assert str(local.value) == f"{www}/feats/manifest.json is incomplete: 3 of 4 shards done; rerun extract-features " \
                               "to finish"
    assert str(far.value) == str(local.value).replace(str(www), base)


def test_a_remote_manifest_is_none_only_when_missing_else_an_error_naming_it(feature_server):
    """404: a cache without a manifest (raw shards), and 403: a manifest a presigned shard URL's signature does not
    cover (unchecked, as the loader warns); 5xx is retried, then, like a refused connection, another status or a
    file that is not a manifest, one line naming the manifest's URL, never taken for a missing manifest."""
    from pixart.data.manifest import Manifest, find_manifest

    base, www = feature_server
    assert find_manifest(f"{base}/raw") is None
    RangeHandler.statuses = [503, 503]
    assert find_manifest(f"{base}/feats") == Manifest.load(www / "feats") and not RangeHandler.statuses
    RangeHandler.statuses = [503] * 10
    with pytest.raises(PixArtError, match=rf"^{base}/feats/manifest.json: cannot be read \(ConnectionError: gave up at "
                                          r"byte 0 after 3 reconnects \(HTTPError: HTTP Error 503"):
        find_manifest(f"{base}/feats")
    assert len(RangeHandler.statuses) == 10 - 4  # the first try and remote.DEFAULT_POLICY's 3 retries
    RangeHandler.statuses = [403, None]
    assert find_manifest(f"{base}/feats") is None and RangeHandler.statuses == [None]  # not retried
    RangeHandler.statuses = [400, None]
    with pytest.raises(PixArtError, match=rf"^{base}/feats/manifest.json: cannot be read \(HTTPError: HTTP Error 400"):
        find_manifest(f"{base}/feats")
    assert RangeHandler.statuses == [None]  # a 400 is not retried
    RangeHandler.statuses = []
    with pytest.raises(PixArtError, match=r"^http://127.0.0.1:1/feats/manifest.json: cannot be read \(ConnectionError: "
                                          r"gave up at byte 0 after 3 reconnects \(URLError: .*refused"):
        find_manifest("http://127.0.0.1:1/feats")
    (www / "feats" / "manifest.json").write_text("<html>moved</html>")
    with pytest.raises(PixArtError, match=rf"^{base}/feats/manifest.json: not a feature manifest \("):
        find_manifest(f"{base}/feats")


def test_a_shard_that_cannot_be_read_is_named_not_the_text_encoder(server, tmp_path):
    """Nothing readable in any shard was taken for raw shards, and the trainer then asked for a text encoder."""
    import torch

    from pixart.data.loader_samples import detect_kind
    from pixart.train.config import TrainConfig
    from pixart.train.trainer import build_loader

    base, _ = server
    missing = rf"^{base}/nope.tar: cannot reach the shard \(HTTPError: HTTP Error 404: Not Found\)"
    with pytest.raises(PixArtError, match=missing + "$"):
        detect_kind([f"{base}/nope.tar"])
    with pytest.raises(PixArtError, match=missing + r"; no readable sample in the other 1 shard\(s\) either$"):
        detect_kind([f"{base}/nope.tar", f"{base}/gone.tar"])
    assert detect_kind([f"{base}/nope.tar", f"{base}/shapes-000001.tar"]) == "raw"  # one readable shard tells
    with pytest.raises(PixArtError, match=r"^http://127.0.0.1:1/x.tar: cannot reach the shard \(ConnectionError: "
                                          r"gave up at byte 0 after 3 reconnects \(URLError: .*refused"):
        detect_kind(["http://127.0.0.1:1/x.tar"])
    (tmp_path / "junk.tar").write_bytes(b"not a tar" * 100)
    with pytest.raises(PixArtError, match=rf"^{tmp_path}/junk.tar: nothing could be read \(ReadError: "):
        detect_kind([str(tmp_path / "junk.tar")])
    with pytest.raises(PixArtError, match=missing):
        build_loader(TrainConfig(data={"shards": f"{base}/nope.tar"}), "pixart", torch.device("cpu"))


def test_object_store_errors_are_one_line_naming_the_url(monkeypatch):
    """botocore's errors (no credentials, no endpoint) came out as tracebacks, a missing bucket without the URL."""
    from pixart.data.loader_samples import detect_kind
    from pixart.data.manifest import find_manifest

    exceptions = pytest.importorskip("botocore.exceptions")
    error = exceptions.NoCredentialsError()

    class Store:
        def ls(self, path, detail=False):
            raise error

        glob = info = ls

    def store_open(url, mode="rb"):
        raise error

    monkeypatch.setattr(remote.fsspec.core, "url_to_fs", lambda url: (Store(), url.split("://", 1)[1]))
    monkeypatch.setattr(remote.fsspec, "open", store_open)
    why = r"\(NoCredentialsError: Unable to locate credentials\)$"
    with pytest.raises(PixArtError, match=r"^s3://bucket/sq32/: cannot list shards " + why):
        resolve_shards("s3://bucket/sq32/")
    with pytest.raises(PixArtError, match=r"^s3://bucket/sq32/\*.tar: cannot list shards " + why):
        resolve_shards("s3://bucket/sq32/*.tar")
    with pytest.raises(PixArtError, match=r"^s3://bucket/sq32/a.tar: cannot reach the shard " + why):
        remote.remote_identity("s3://bucket/sq32/a.tar")
    with pytest.raises(PixArtError, match=r"^s3://bucket/sq32/a.tar: cannot reach the shard " + why):
        detect_kind(["s3://bucket/sq32/a.tar"])
    with pytest.raises(PixArtError, match=r"^s3://bucket/sq32/manifest.json: cannot be read " + why):
        find_manifest("s3://bucket/sq32")
    error = exceptions.EndpointConnectionError(endpoint_url="http://127.0.0.1:1/bucket")
    with pytest.raises(PixArtError, match=r"^s3://bucket/sq32/: cannot list shards \(EndpointConnectionError: "
                                          r"Could not connect to the endpoint URL: \"http://127.0.0.1:1/bucket\"\)$"):
        resolve_shards("s3://bucket/sq32/")
    error = FileNotFoundError("bucket/sq32/manifest.json")
    assert find_manifest("s3://bucket/sq32") is None  # no manifest: raw shards


def test_s3_feature_cache_is_read_with_its_manifest(s3, tiny_feature_cache):
    import fsspec

    from pixart.data.loader import Loader, LoaderConfig
    from pixart.data.manifest import Manifest, find_manifest

    fs = fsspec.filesystem("s3")
    for p in sorted((tiny_feature_cache / "feats").glob("*.*")):
        fs.put(str(p), f"data/feats/{p.name}")
    assert find_manifest("s3://data/feats") == Manifest.load(tiny_feature_cache / "feats")
    assert find_manifest("s3://data/shapes") is None
    far = Loader(LoaderConfig("s3://data/feats/", batch_size=4))
    assert far.schedule_hash == Loader(LoaderConfig(str(tiny_feature_cache / "feats"), batch_size=4)).schedule_hash
    with pytest.raises(PixArtError, match=r"^s3://nowhere/feats/: cannot list shards \(\w+: "):
        resolve_shards("s3://nowhere/feats/")
