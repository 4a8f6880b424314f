"""Outputs appear whole or not at all: write beside the target, then rename."""
from __future__ import annotations

import glob
import os
import re
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

    An existing non-empty `target` is replaced only with `overwrite`. Never is a `target` written that is, holds
    or lies inside one of `sources` (pass a checkpoint as typed and as resolved: `latest` is a file naming a
    folder), that holds the current folder (`--out ""`, `--out .`), or that is a file. A kill at any moment leaves
    the old `target`, the new one, or the old one parked as `.NAME.old`, which the next call puts back.
    """
    target = check_out_dir(target, overwrite, sources)
    old = target.with_name(f".{target.name}.old")
    if not target.exists() and old.exists():  # a previous replace was killed half-way
        os.replace(old, target)
        check_out_dir(target, overwrite, sources)
    with _writable(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_dead_writers(target.parent)
        tmp = Path(tempfile.mkdtemp(prefix=_writer_prefix(target), dir=target.parent))
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


def check_out_dir(target: str | os.PathLike, overwrite: bool = False, sources: tuple = ()) -> Path:
    """What `atomic_dir` refuses, said before the work whose result it writes (loading T5-XXL takes minutes). A
    file is the user's: never replaced by a folder, even with `overwrite`."""
    if not str(target).strip():
        raise PixArtError("--out is empty")
    check_out_folder(target)
    target = Path(target).resolve()
    if target == Path.cwd() or target in Path.cwd().parents:
        raise PixArtError(f"--out {target} holds the current directory; name a folder of its own")
    for src in (Path(s).resolve() for s in sources):
        if src == target or target in src.parents or src in target.parents:
            raise PixArtError(f"--out {target} would overwrite the input {src}")
    if not overwrite and target.is_dir() and any(target.iterdir()):
        raise PixArtError(f"--out {target} already exists and is not empty; pass --overwrite to replace it")
    return target


@contextmanager
def _writable(target: Path):
    """A folder the output cannot be written in is named as the user gave it, not by our hidden temp's name."""
    try:
        yield
    except OSError as e:
        raise PixArtError(f"{target}: cannot write there ({e.strerror or e})") from None


def _writer_prefix(target: Path) -> str:
    """`.NAME.tmp-HOST-PID-`: a temp file or folder says who writes it; a pid tells whether a writer is alive
    only on its own host (shared filesystems)."""
    return f".{target.name}.tmp-{socket.gethostname()}-{os.getpid()}-"


_SWEPT: set[Path] = set()  # folders this process has cleared of dead writers' temps


def remove_dead_writers(folder: Path) -> None:
    """Remove the temp files and folders of this host's killed writers in `folder`, which would stay forever."""
    from pixart.lifetime import alive

    _SWEPT.add(Path(folder).absolute())
    marker = f".tmp-{socket.gethostname()}-"
    for tmp in Path(folder).glob(f".*{glob.escape(marker)}*-*"):
        # PID-SUFFIX, the suffix mkstemp's (letters, digits, _): so host "node" never reads host "node-4"'s temps
        found = re.fullmatch(r"(\d+)-\w+", tmp.name.rsplit(marker, 1)[1])
        if found and not alive(int(found[1])):
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)


def check_out_folder(out: str | os.PathLike, flag: str = "--out") -> None:
    """An output folder, found fit before any work: not a file nor under one, and writable where it is (or would
    be) made. One line naming the flag, not an OSError from the first write."""
    out = Path(out)
    base = next(p for p in (out, *out.absolute().parents) if p.exists())  # the folder it is, or is made in
    if not base.is_dir():
        raise PixArtError(f"{flag} {out} is not a folder" + (f" ({base} is a file)" if base != out else ""))
    if not os.access(base, os.W_OK | os.X_OK):
        raise PixArtError(f"{flag} {out}: not a folder this user can write in")


def atomic_write(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write a file whole or not at all: a temp file beside it, fsync, rename. The temp files of this host's
    killed writers in that folder go at this process's first write there, so a rerun that writes there again
    leaves none behind; once, since listing a folder of 40,000 captions at every write made a job quadratic."""
    path = Path(path)
    with _writable(path):
        if path.parent.absolute() not in _SWEPT:
            remove_dead_writers(path.parent)
        fd, tmp = tempfile.mkstemp(prefix=_writer_prefix(path), dir=path.parent)
    try:
        with _writable(path), open(fd, "wb") as f:  # a full disk is named by the file, not left an OSError
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fchmod(f.fileno(), file_mode())
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
