"""Outputs appear whole or not at all: write beside the target, then rename."""
from __future__ import annotations

import glob
import os
import shutil
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path

from pixart.errors import PixArtError


def file_mode() -> int:
    """The mode a new file gets from the umask (0o644 under the usual 022)."""
    return 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def share_modes(folder: Path) -> None:
    """mkdtemp makes 0700 folders and safetensors 0600 files: give them the usual umask modes."""
    mask = _umask()
    for root, _, files in os.walk(folder):
        os.chmod(root, 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~mask)


@contextmanager
def atomic_dir(target: str | os.PathLike, overwrite: bool = False, sources: tuple = ()):
    """Yield a fresh folder next to `target`; on success it becomes `target`, on error it is removed.

    An existing non-empty `target` is replaced only with `overwrite`, and never when it is,
    or holds, one of `sources`. A kill at any moment leaves the old `target`, the new one,
    or the old one parked as `.NAME.old`, which the next call puts back.
    """
    target = Path(target).resolve()
    old = target.with_name(f".{target.name}.old")
    if not target.exists() and old.exists():  # a previous replace was killed half-way
        os.replace(old, target)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        for src in sources:
            src = Path(src).resolve()
            if src == target or target in src.parents:
                raise PixArtError(f"--out {target} would overwrite the input {src}")
        if not overwrite:
            raise PixArtError(f"--out {target} already exists and is not empty; pass --overwrite to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_writers(target)
    tmp = Path(tempfile.mkdtemp(prefix=f"{_writer_prefix(target)}{os.getpid()}-", dir=target.parent))
    try:
        yield tmp
        share_modes(tmp)
        if target.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _writer_prefix(target: Path) -> str:
    """`.NAME.tmp-HOST-`: a pid says whether a writer is alive only on its own host (shared filesystems)."""
    return f".{target.name}.tmp-{socket.gethostname()}-"


def _remove_dead_writers(target: Path) -> None:
    """A killed writer's half-written folder (`.NAME.tmp-HOST-PID-*`, its process gone) would stay forever."""
    from pixart.lifetime import alive

    prefix = _writer_prefix(target)
    for tmp in target.parent.glob(f"{glob.escape(prefix)}*-*"):
        pid = tmp.name[len(prefix):].split("-")[0]
        if tmp.is_dir() and pid.isdigit() and not alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def atomic_write(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write a file whole or not at all: a temp file beside it, fsync, rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, file_mode())
    os.replace(tmp, path)
    return path
