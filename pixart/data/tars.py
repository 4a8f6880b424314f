"""Webdataset tars: read defensively, written deterministically and atomically.

Reading groups members into samples by key as webdataset does (`dir/key.ext`; the
extension is everything after the first dot of the file name) and works on local
paths, `pipe:`, http(s) (reconnecting where a dropped connection stopped: `remote.py`)
and fsspec URLs. A truncated or unreadable tar ends its shard: the samples read before
the damage are kept and the damage is reported, never raised.
tarfile alone ends quietly at a cut that falls on a header, so local shards must
also show their end-of-archive block. Writing gives byte-identical tars for
identical samples (mtime 0, no owner), and a shard appears under its name only whole.
"""
from __future__ import annotations

import io
import os
import re
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pixart.atomic import file_mode

from .remote import ForwardSeeking, open_shard

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
DUPLICATE = "__duplicate__"  # a sample holding two members of one name: which one is meant is unknown
_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")


def read_tar(url: str, on_error=None, keep=None) -> Iterator[dict]:
    """Samples of one tar, in file order. Damage ends the shard and calls on_error(url, exc). Where `keep(i)` is
    false the i-th sample comes as its key alone, its members unread (a local tar seeks past them): a slot that
    keeps one sample in N of a shard, or a resume that replays up to its last one, reads no more bytes than it uses."""
    sample: dict | None = None
    index, wanted = -1, True
    try:
        stream = open_shard(url)
        try:
            seekable = getattr(stream, "seekable", lambda: False)()  # local files: ~8x faster than stream mode
            mode = "r:*" if seekable else "r|*"
            if not seekable and is_plain_tar(stream):  # http(s): read in file mode too, without seeking back
                stream, seekable, mode = ForwardSeeking(stream), True, "r:"
            with tarfile.open(fileobj=stream, mode=mode) as tar:
                for member in tar:
                    split = member_key(member)
                    if split is None:
                        continue
                    key, ext = split
                    if sample is not None and sample["__key__"] != key:
                        yield sample
                        sample = None
                    if sample is None:
                        sample = {"__key__": key, "__url__": url}
                        index += 1
                        wanted = keep is None or keep(index)
                    if not wanted:
                        continue
                    if ext in sample:  # webdataset stops the stream there; we skip the sample (decoding raises)
                        sample[DUPLICATE] = f"{key}.{ext}"
                    sample[ext] = tar.extractfile(member).read()
                check_archive_end(tar, seekable)
        finally:
            stream.close()
    except Exception as e:  # truncated, unreadable or missing shard: the partial sample is dropped
        if on_error is not None:
            on_error(url, e)
        return
    if sample is not None:
        yield sample


def is_plain_tar(stream) -> bool:
    """An uncompressed tar, told by the ustar magic (POSIX.1-1988, at byte 257 of its first header) in the bytes
    the stream has buffered; streams that cannot peek are read in stream mode, which also unpacks gz, bz2, xz."""
    peek = getattr(stream, "peek", None)
    return peek is not None and peek(512)[257:262] == b"ustar"


def member_key(member: tarfile.TarInfo) -> tuple[str, str] | None:
    """(key, ext) of a regular file `dir/key.ext`, split as webdataset does, extension lowercased
    (`KEY.JPG` is a jpg, as webdataset's `group_by_keys`); None for anything else."""
    m = _KEY_EXT.match(member.name) if member.isfile() else None
    return None if m is None else (m.group(1), m.group(2).lower())


def check_archive_end(tar: tarfile.TarFile, seekable: bool) -> None:
    """Raise ReadError unless the end-of-archive block follows the last member: tarfile ends quietly
    at a cut or garbled header. Call it once iterating `tar` has ended."""
    if seekable:
        tar.fileobj.seek(tar.offset)
        end = tar.fileobj.read(512)
        if len(end) < 512 or any(end):
            raise tarfile.ReadError(f"no end-of-archive block at byte {tar.offset}")
    elif tar.fileobj.tell() < tar.offset + 512:
        raise tarfile.ReadError(f"truncated at byte {tar.offset}")


def stable_reason(text: str) -> str:
    """One line, and `<_io.BytesIO object at 0x7f..>` -> `<_io.BytesIO>`: reasons land in .done
    records and the manifest, which must be byte-identical across runs, and in one-line reports."""
    return re.sub(r"<([\w.]+) object at 0x[0-9a-fA-F]+>", r"<\1>", " ".join(text.split()))


def decode_image(sample: dict):
    """The sample's image as a PIL RGB image, turned as its EXIF orientation says (as viewers show it, and as
    diffusers' `load_image` and DreamBooth scripts read it: a phone's photo is stored sideways with a tag).
    ValueError("no image") or ("bad image: ...") says why not; PIL raises many types for broken files, so every
    decoding error is turned into one."""
    from PIL import Image, ImageOps

    if DUPLICATE in sample:
        raise ValueError(f"duplicate file name {sample[DUPLICATE]}")
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if ext is None:
        raise ValueError("no image")
    try:
        with Image.open(io.BytesIO(sample[ext])) as im:
            im.load()
            return ImageOps.exif_transpose(im).convert("RGB")
    except Exception as e:
        raise ValueError(stable_reason(f"bad image: {type(e).__name__}: {e}")) from None


def displayed_size(data: bytes) -> tuple[int, int]:
    """(height, width) of an encoded image as `decode_image` returns it, from its header alone."""
    from PIL import ExifTags, Image

    with Image.open(io.BytesIO(data)) as im:
        w, h = im.size
        turned = im.getexif().get(ExifTags.Base.Orientation, 1) in (5, 6, 7, 8)  # a quarter turn: sides swap
    return (w, h) if turned else (h, w)


def class_of(sample: dict, meta: dict) -> int:
    """A sample's class for a class-conditional stage: its `cls` member (an integer as text: webdataset's
    convention, which timm's ImageNet shards follow), else its json's `label`; -1 without either."""
    if "cls" in sample:
        try:
            return int(sample["cls"])
        except ValueError:
            text = bytes(sample["cls"][:20]).decode("utf-8", "replace")
            raise ValueError(f"bad cls: {text!r} is not an integer") from None
    return int(meta.get("label", -1))


NOTHING_READ = "nothing could be read"


@dataclass
class TarDamage:
    """Why reading stopped early; `after` is how many whole samples came out first. With `after` 0 nothing of
    the shard was read (missing, HTTP 404, a failed `pipe:` command, an empty or garbage file): a job never
    finishes it, not even with --accept-damaged, as an empty shard would hide the loss."""
    error: str = ""
    after: int = 0

    def reason(self) -> str:
        """One line for a job's report."""
        return f"{NOTHING_READ} ({self.error})" if not self.after else f"{self.error}, after {self.after} samples"


def iter_samples(url: str, damage: TarDamage | None = None) -> Iterator[dict]:
    """`read_tar`, with the damage (if any) recorded in `damage` for a job's report."""
    count = 0

    def on_error(_url, exc):
        if damage is not None:
            damage.error, damage.after = stable_reason(f"{type(exc).__name__}: {exc}".strip(": ")), count  # one line

    for sample in read_tar(url, on_error):
        count += 1
        yield sample


class ShardWriter:
    """Write one tar to a `.NAME.tmp-*` file of its own beside `path`; `close()` renames it into place,
    `abort()` drops it. Its own, so that a killed run's leftover process and the rerun never rename each
    other's half-written file into place (a rerun may delete `.NAME.tmp*` files: their writers then fail)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.tmp-", dir=self.path.parent)
        os.fchmod(fd, file_mode())  # mkstemp's 0600 would hide the shard from the team
        self.tmp, self._file = Path(tmp), os.fdopen(fd, "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w")
        self.count = 0

    def write(self, sample: dict) -> None:
        key = sample["__key__"]
        for ext, data in sample.items():
            if ext.startswith("__"):
                continue
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mode, info.mtime = len(data), 0o444, 0
            self._tar.addfile(info, io.BytesIO(data))
        self.count += 1

    def close(self) -> Path:
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())  # the bytes this writer wrote, not whatever file has the name now
        self._file.close()
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        self._tar.close()
        self._file.close()
        self.tmp.unlink(missing_ok=True)
