"""SA-1B tars read as `sa_N.jpg` + `sa_N.json` pairs matched by name, whatever the member order.

Meta ships SA-1B tars with their members in random order, so a reader that pairs neighbours
(webdataset, `pixart.data.tars.read_tar`) loses almost every sample. A local tar is read through
tarfile's member index: members wait as headers, and a pair's bytes are read by seeking once both
are listed. A stream (`pipe:`, http) cannot seek back, so members wait as bytes: in memory up to a
bound, past it in a temp folder. A sample comes out as soon as its second member is read.
"""
from __future__ import annotations

import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pixart.data.remote import open_shard
from pixart.data.tars import IMAGE_EXTS, check_archive_end, member_key, stable_reason

PARTS = ("json", *IMAGE_EXTS)


@dataclass
class TarRead:
    """What reading one tar left besides its samples."""
    error: str = ""  # why reading stopped early ("" when the tar was whole)
    after: int = 0  # samples that came out before it stopped
    unpaired: list[tuple[str, str]] = field(default_factory=list)  # (key, "no json" | "no image")
    spilled: int = 0  # members that waited on disk


class Spill:
    """Members of a stream waiting for their pair: bytes in memory up to `limit`, past it files in a
    temp folder under `parent` (a shuffled 11 GB SA-1B tar can leave gigabytes waiting)."""

    def __init__(self, limit: int, parent: Path):
        self.limit, self.parent, self.held, self.spilled = limit, parent, 0, 0
        self._dir: tempfile.TemporaryDirectory | None = None

    def keep(self, data: bytes) -> bytes | Path:
        if self.held + len(data) <= self.limit:
            self.held += len(data)
            return data
        if self._dir is None:
            self._dir = tempfile.TemporaryDirectory(prefix=".sam-spill-", dir=self.parent)
        path = Path(self._dir.name) / str(self.spilled)
        path.write_bytes(data)
        self.spilled += 1
        return path

    def load(self, item: bytes | Path) -> bytes:
        if isinstance(item, Path):
            data = item.read_bytes()
            item.unlink()
            return data
        self.held -= len(item)
        return item

    def close(self) -> None:
        if self._dir is not None:
            self._dir.cleanup()


def _parts(tar: tarfile.TarFile, members: Iterator[tarfile.TarInfo]) -> Iterator[tuple[str, str, tarfile.TarInfo]]:
    """(key, ext, member) of the members a sample is made of; a `./` prefix (`tar -C DIR .`) is dropped."""
    for member in members:
        split = member_key(member)
        if split is not None and split[1] in PARTS:
            yield split[0].removeprefix("./"), split[1], member


def _whole(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    """The members of a seekable tar, each held back until tarfile has read the next header (or the
    end): only then has it checked that the member's data is all there, not cut short."""
    prev = None
    for member in tar:
        if prev is not None:
            yield prev
        prev = member
    if prev is not None:
        yield prev


def _missing(parts: dict) -> str:
    return "no json" if "json" not in parts else "no image"


def read_pairs(url: str, read: TarRead, hold_bytes: int, spill_parent: Path) -> Iterator[dict]:
    """Samples {"__key__", "__url__", "jpg", "json"} of one SA-1B tar, each as soon as its second member
    is read. Damage ends the tar (the samples before it are kept) and is recorded in `read`, as are the
    members that never found their pair."""
    waiting: dict[str, dict] = {}  # key -> {ext: TarInfo (local) | bytes or spill file (stream)}
    spill = Spill(hold_bytes, spill_parent)
    try:
        stream = open_shard(url)
        try:
            seekable = getattr(stream, "seekable", lambda: False)()
            with tarfile.open(fileobj=stream, mode="r:*" if seekable else "r|*") as tar:
                if seekable:
                    members, keep, load = _whole(tar), (lambda m: m), (lambda m: tar.extractfile(m).read())
                else:
                    members, keep, load = tar, (lambda m: spill.keep(tar.extractfile(m).read())), spill.load
                for key, ext, member in _parts(tar, members):
                    parts = waiting.setdefault(key, {})
                    parts[ext] = keep(member)
                    if "json" in parts and len(parts) > 1:
                        del waiting[key]
                        yield {"__key__": key, "__url__": url, **{e: load(v) for e, v in parts.items()}}
                        read.after += 1
                check_archive_end(tar, seekable)
        finally:
            stream.close()
    except Exception as e:  # truncated, unreadable or missing tar
        read.error = stable_reason(f"{type(e).__name__}: {e}".strip(": "))
    finally:
        spill.close()
        read.spilled = spill.spilled
    read.unpaired = [(key, _missing(parts)) for key, parts in waiting.items()]
