"""Remote shards: over HTTP(S) surviving a dropped connection, and from object storage through fsspec (s3://).

A shard is read as one byte stream. When the connection drops (reset, timeout, a short body), the reader
reconnects with `Range: bytes=<offset>-` and goes on from the byte it reached, so the tar reader never sees the
cut: the sample it was reading comes out whole; a shard replaced meanwhile (another ETag) is an error, not a
splice of two files. After `attempts` failed tries (with exponential backoff) it gives up with an error that names
the byte; the tar reader then ends the shard there and reports the damage, keeping every sample read before it.
"""
from __future__ import annotations

import hashlib
import http.client
import io
import json
import logging
import os
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import fsspec

from pixart.errors import PixArtError

log = logging.getLogger(__name__)

TRANSIENT = (ConnectionError, TimeoutError, http.client.IncompleteRead, http.client.RemoteDisconnected,
             urllib.error.URLError, OSError)


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 5  # reconnects per shard before it is given up
    backoff_s: float = 0.5  # the first wait; doubled each time
    timeout_s: float = 30.0  # per socket operation


DEFAULT_POLICY = RetryPolicy()
# Bytes a remote shard (and a shard cache's copy of it) is read ahead by. 4 MiB against 1 MiB, two alternated runs
# each: the loader bench's HTTP rate went from 0.76-0.78x to 0.81-0.82x of local files with 0 workers, 0.74-0.76x
# to 0.85x with 2 (docs/benchmarks.md); in single runs 8 and 16 MiB did not do better.
READ_BUFFER = 4 << 20


def is_http(url: str) -> bool:
    return url.startswith(("http://", "https://"))


class RetryingHTTPReader(io.RawIOBase):
    """A forward-only binary stream of `url`'s body that reconnects where it stopped. The first request is
    retried as the reconnects are; a 4xx other than 408 and 429 is not (a missing or forbidden shard stays so)."""

    def __init__(self, url: str, policy: RetryPolicy):
        super().__init__()
        self.url, self.policy = url, policy
        self.offset, self.size, self.etag = 0, None, None
        self._response = None
        self._retrying(self._connect)

    def _connect(self) -> None:
        headers = {"Range": f"bytes={self.offset}-"} if self.offset else {}
        if self.offset and self.etag and not self.etag.startswith("W/"):
            headers["If-Range"] = self.etag  # RFC 9110 §13.1.5: a shard replaced since comes whole, not as a tail
        response = urllib.request.urlopen(urllib.request.Request(self.url, headers=headers),
                                          timeout=self.policy.timeout_s)
        etag = response.headers.get("ETag")
        if self.offset and self.etag and etag and etag != self.etag:
            response.close()
            raise PixArtError(f"{self.url}: replaced while it was read (ETag {self.etag}, then {etag}), "
                              f"at byte {self.offset}")
        if self.offset and response.status != 206:  # the server ignored the range: skip to where we were
            skipped = 0
            while skipped < self.offset:
                chunk = response.read(min(1 << 20, self.offset - skipped))
                if not chunk:
                    raise ConnectionError(f"body ended at byte {skipped}, before {self.offset}")
                skipped += len(chunk)
        if not self.offset:
            length = response.headers.get("Content-Length")
            self.size, self.etag = (int(length) if length is not None else None), etag
        self._response = response

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        return self._retrying(lambda: self._read_into(buffer))

    def _read_into(self, buffer) -> int:
        if self._response is None:
            self._connect()
        n = self._response.readinto(buffer)
        if n == 0 and self.size is not None and self.offset < self.size:
            raise http.client.IncompleteRead(b"", self.size - self.offset)
        self.offset += n
        return n

    def _retrying(self, action):
        failures = 0
        while True:
            try:
                return action()
            except urllib.error.HTTPError as e:
                if e.code < 500 and e.code not in (408, 429):
                    raise
                error = e
            except TRANSIENT as e:
                if isinstance(getattr(e, "reason", None), ssl.SSLCertVerificationError):
                    raise  # a certificate stays wrong
                error = e
            self._drop()
            if failures >= self.policy.attempts:
                raise ConnectionError(f"gave up at byte {self.offset} after {failures} reconnects "
                                      f"({type(error).__name__}: {error})") from None
            time.sleep(self.policy.backoff_s * 2 ** failures)
            failures += 1

    def _drop(self) -> None:
        if self._response is not None:
            try:
                self._response.close()
            except OSError:
                pass
        self._response = None

    def close(self) -> None:
        self._drop()
        super().close()


def open_http(url: str) -> io.BufferedReader:
    return io.BufferedReader(RetryingHTTPReader(url, DEFAULT_POLICY), buffer_size=READ_BUFFER)


class ForwardSeeking(io.RawIOBase):
    """A forward-only stream that answers tell(), seeks forward by skipping, and seeks back into its last read: all
    that tarfile's file mode asks of a tar read in order. Its stream mode ("r|") copies every member through a
    10 KB buffer; its file mode reads a member in one call, 1.4x faster over HTTP on loopback."""

    def __init__(self, stream):
        super().__init__()
        self.stream, self.position, self._read_to, self._last = stream, 0, 0, b""

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence not in (io.SEEK_SET, io.SEEK_CUR):
            raise io.UnsupportedOperation("a forward-only stream has no end to seek from")
        target = offset + (self.position if whence == io.SEEK_CUR else 0)
        if target < self._read_to - len(self._last):
            raise io.UnsupportedOperation(f"cannot seek back to byte {target} of a forward-only stream")
        if target <= self._read_to:
            self.position = target
        while self.position < target and self.read(min(target - self.position, 1 << 20)):
            pass
        return self.position

    def read(self, size: int = -1) -> bytes:
        behind = self._read_to - self.position  # bytes of the last read given again after a seek back
        if behind:
            start = len(self._last) - behind
            head = self._last[start:] if size < 0 else self._last[start:start + size]
            self.position += len(head)
            return head if len(head) == size else head + self.read(-1 if size < 0 else size - len(head))
        self._last = self.stream.read(size)
        self._read_to += len(self._last)
        self.position = self._read_to
        return self._last

    def close(self) -> None:
        self.stream.close()
        super().close()


def is_fsspec(url: str) -> bool:
    """An object-store URL (s3://, gs://, ...) that fsspec opens; http(s) and pipe: are read by us and webdataset."""
    return "://" in url and not is_http(url) and not url.startswith(("pipe:", "file://"))


CACHE_ENV, CACHE_GB_ENV = "PIXART_SHARD_CACHE", "PIXART_SHARD_CACHE_GB"
_said_uncached = False  # the warning that a shard is read past the cache: once a process


class ShardCache:
    """A size-bounded folder of remote shards, keyed by URL and ETag (or size and mtime). The first read of a
    shard fills it, whole or not at all; later reads come from it; the least recently read go first when it is
    full. Set by `data.shard_cache` in a stage config, or by PIXART_SHARD_CACHE (and PIXART_SHARD_CACHE_GB,
    default 50) for any command, so loader workers inherit it."""

    def __init__(self, folder: str | os.PathLike, max_gb: float = 50.0):
        self.folder, self.max_bytes = Path(folder), int(max_gb * 2**30)
        self.folder.mkdir(parents=True, exist_ok=True)

    @classmethod
    def from_env(cls) -> ShardCache | None:
        folder = os.environ.get(CACHE_ENV)
        return cls(folder, float(os.environ.get(CACHE_GB_ENV, 50))) if folder else None

    def path(self, url: str) -> Path:
        key = hashlib.sha256(json.dumps(remote_identity(url), sort_keys=True).encode()).hexdigest()[:24]
        name = urllib.parse.urlsplit(url).path.rstrip("/").split("/")[-1]  # a presigned URL's query is no name
        return self.folder / f"{key}-{name[-100:]}"

    def open(self, url: str, opener):
        try:
            path = self.path(url)
        except NoIdentity as e:  # a presigned URL answers no HEAD: read it, uncached
            global _said_uncached
            if not _said_uncached:
                log.warning("shard cache: %s; such shards are read without caching them", e)
                _said_uncached = True
            return opener(url)
        try:
            os.utime(path)  # most recently read
            return open(path, "rb")
        except FileNotFoundError:  # not cached, or evicted by another reader just now
            pass
        return io.BufferedReader(_Filling(opener(url), path, self), buffer_size=READ_BUFFER)

    def evict(self, keep: Path) -> None:
        """Least recently read first, until the cache fits; with the temp copies of killed readers."""
        for tmp in self.folder.glob(".*.tmp"):
            if _reader_is_gone(tmp):
                tmp.unlink(missing_ok=True)
        files = []
        for p in self.folder.iterdir():
            try:  # another reader may evict it meanwhile
                stat = p.stat()
            except FileNotFoundError:
                continue
            if not p.name.startswith("."):  # not a temp copy
                files.append((stat.st_mtime, stat.st_size, p))
        total = sum(size for _, size, _ in files)
        for _, size, p in sorted(files):
            if total <= self.max_bytes:
                break
            if p != keep:
                total -= size
                p.unlink(missing_ok=True)


def _reader_is_gone(tmp: Path) -> bool:
    """A temp copy (`.NAME.PID.tmp`) whose reader was killed: nothing else removes it."""
    pid = tmp.name.rsplit(".", 2)[-2]
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:  # another user's process
        pass
    return False


class _Filling(io.RawIOBase):
    """Reads the remote stream and copies it into the cache; the copy is renamed into place only when the
    stream ended and every byte was written, so an interrupted read or a full disk leaves nothing behind (the
    read goes on, uncached)."""

    def __init__(self, stream, target: Path, cache: ShardCache):
        super().__init__()
        self.stream, self.target, self.cache = stream, target, cache
        self.tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        self.copy = open(self.tmp, "wb")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self._read(len(buffer))
        if not data:
            self._finish()
            return 0
        buffer[:len(data)] = data
        self._write(data)
        return len(data)

    def _read(self, size: int) -> bytes:
        """At most one read of the remote stream: a failure after some bytes then loses none of them."""
        return getattr(self.stream, "read1", self.stream.read)(size)

    def _write(self, data: bytes) -> None:
        if self.copy is None:
            return
        try:
            self.copy.write(data)
        except OSError as e:
            self._give_up(e)

    def _finish(self) -> None:
        if self.copy is None:
            return
        try:  # a full disk may say so only at the flush; a crash after the rename leaves the whole copy
            self.copy.flush()
            os.fsync(self.copy.fileno())
            self.copy.close()
            os.replace(self.tmp, self.target)
        except OSError as e:
            self._give_up(e)
            return
        self.copy = None
        self.cache.evict(keep=self.target)

    def _give_up(self, error: OSError | None) -> None:
        """Drop the copy; the stream goes on."""
        if error is not None:
            log.warning("shard cache: cannot keep %s (%s); read without caching it", self.target.name, error)
        try:
            self.copy.close()
        except OSError:
            pass
        self.tmp.unlink(missing_ok=True)
        self.copy = None

    def close(self) -> None:
        try:
            if self.copy is not None:
                self._drain(64 << 10)  # a tar reader stops at the end-of-archive block, before the record padding
        finally:
            if self.copy is not None:  # stopped early (or damaged): drop the partial copy
                self._give_up(None)
            self.stream.close()
            super().close()

    def _drain(self, limit: int) -> None:
        try:
            while limit > 0 and self.copy is not None:
                data = self._read(min(limit, 1 << 14))
                if not data:
                    self._finish()
                    return
                self._write(data)
                limit -= len(data)
        except (OSError, ValueError):  # the shard is damaged (or replaced): no copy of it
            pass


def open_shard(url: str):
    """A binary stream of the shard: http(s) reconnecting, fsspec URLs (s3fs retries its own reads), or
    webdataset's `gopen` (local paths, `pipe:`); remote shards through the shard cache when one is set."""
    cache = ShardCache.from_env() if is_http(url) or is_fsspec(url) else None
    if cache is not None:
        return cache.open(url, _open_remote)
    return _open_remote(url)


def _open_remote(url: str):
    if is_http(url):
        return open_http(url)
    if is_fsspec(url):
        with object_store_errors(url, "cannot reach the shard"):
            return fsspec.open(url, "rb").open()
    import webdataset as wds

    return wds.gopen(url, "rb")


@contextmanager
def object_store_errors(url: str, failed: str):
    """fsspec's and its backends' errors (botocore's NoCredentialsError, EndpointConnectionError, a missing bucket)
    as one line naming the URL, `URL: FAILED (Class: message)`, not a traceback or a message without the URL."""
    try:
        yield
    except PixArtError:
        raise
    except ImportError as e:  # fsspec names the package: "Please install s3fs to access S3"
        raise PixArtError(f"{url}: {e}") from None
    except Exception as e:
        raise PixArtError(f"{url}: {failed} ({type(e).__name__}: {' '.join(str(e).split())})") from None


SHARD_SUFFIXES = (".tar", ".tar.gz")  # what a folder or prefix lists: the tars the readers read, plain or gzipped


def list_shards(url: str) -> list[str]:
    """The shards under an object-store prefix (`s3://bucket/prefix/`), or matching a glob, as full URLs; an
    object's own URL when it is one."""
    with object_store_errors(url, "cannot list shards"):
        fs, path = fsspec.core.url_to_fs(url)
        found = fs.glob(path) if any(c in path for c in "*?[") else fs.ls(path, detail=False)
    if found == [path]:  # not a prefix: one object, whatever its name
        return [url]
    scheme = url.split("://", 1)[0]
    return sorted(f"{scheme}://{p}" for p in found if p.endswith(SHARD_SUFFIXES))


def read_object(url: str) -> bytes | None:
    """A small remote file's bytes (a feature manifest), or None when it does not exist (HTTP 404 or 410, an
    object store's FileNotFoundError) or may not be read (HTTP 401 or 403: a presigned shard URL's signature
    covers that shard alone). HTTP 5xx is retried as a shard's reconnects are; any other failure is a
    PixArtError naming the URL, so that an unreachable cache is not taken for one without a manifest."""
    if is_fsspec(url):
        with object_store_errors(url, "cannot be read"):
            try:
                with fsspec.open(url, "rb") as f:
                    return f.read()
            except FileNotFoundError:
                return None
    try:
        with open_http(url) as f:  # 5xx and dropped connections are retried there
            return f.read()
    except urllib.error.HTTPError as e:
        if e.code in (401, 403, 404, 410):
            return None
        raise PixArtError(f"{url}: cannot be read ({type(e).__name__}: {e})") from None
    except (OSError, http.client.HTTPException) as e:  # unreachable, or the body broke off past its retries
        raise PixArtError(f"{url}: cannot be read ({type(e).__name__}: {e})") from None


NO_HEAD = (403, 405, 501)  # a URL that answers GET, not HEAD: a presigned one is signed for GET alone


class NoIdentity(PixArtError):
    """The URL answers no HEAD, so its bytes have no identity short of reading them."""


def remote_identity(url: str) -> dict:
    """What identifies a remote shard's bytes without reading them: its ETag (object stores, most HTTP servers),
    else its size and modification time; `pipe:` commands only by their text. A changed shard under the same URL
    then gets a new identity, so a feature cache re-encodes it. A shard that cannot be reached is a
    PixArtError naming the URL (urllib's "HTTP Error 404: File not found" does not)."""
    if is_http(url):
        try:
            request = urllib.request.Request(url, method="HEAD")
            with urllib.request.urlopen(request, timeout=DEFAULT_POLICY.timeout_s) as response:
                h = response.headers
                return _identity(url, h.get("ETag"), h.get("Content-Length"), h.get("Last-Modified"))
        except (OSError, http.client.HTTPException) as e:  # HTTPError, URLError, timeouts
            error = NoIdentity if isinstance(e, urllib.error.HTTPError) and e.code in NO_HEAD else PixArtError
            raise error(f"{url}: cannot reach the shard ({type(e).__name__}: {e})") from None
    if is_fsspec(url):
        with object_store_errors(url, "cannot reach the shard"):
            fs, path = fsspec.core.url_to_fs(url)
            info = fs.info(path)
        return _identity(url, info.get("ETag") or info.get("etag"), info.get("size"),
                         info.get("LastModified") or info.get("mtime"))
    return {"url": url}


def _identity(url: str, etag, size, modified) -> dict:
    if etag:
        return {"url": url, "etag": str(etag).strip('"')}
    return {"url": url, "bytes": int(size) if size is not None else None, "modified": str(modified)}
