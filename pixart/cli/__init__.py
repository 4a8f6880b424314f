"""One module per `pixart` subcommand; what several share is here."""
from __future__ import annotations


def pick_device(device: str | None) -> str:
    """--device: CUDA when there is one, unless given; a name torch does not know, or a CUDA device this machine
    lacks, is a one-line error, not a traceback from the first tensor moved to it."""
    import torch

    from pixart.errors import PixArtError

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise PixArtError(f"--device {device!r}: not a device (cpu, cuda, cuda:N, ...)") from None
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (parsed.index or 0) >= count:
            raise PixArtError(f"--device {device}: this machine has {count or 'no'} CUDA device{'s' * (count != 1)}")
    return device


def positive_int(text: str) -> int:
    """An argparse `type` for counts: "0" or "-3" is argparse's one-line usage error naming the flag."""
    return _int_at_least(text, 1, "a positive integer")


def grid_columns(text: str) -> int:
    """--columns of a PNG grid: past 256 images per prompt the grid outgrows an image and its noise the memory."""
    return _int_at_least(text, 1, "from 1 to 256", 256)


def non_negative_int(text: str) -> int:
    """An argparse `type` for counts where 0 means none (`--warmup`, `--decode-workers`)."""
    return _int_at_least(text, 0, "0 or more")


def timestep(text: str) -> int:
    """A one-step student's start timestep: 1 to 999 on the 1000-step training schedule (at 0 there is no noise)."""
    return _int_at_least(text, 1, "a timestep from 1 to 999", 999)


def train_timestep(text: str) -> int:
    """A timestep of the 1000-step training schedule, 0 to 999 (`convert-dit --t-ref`)."""
    return _int_at_least(text, 0, "a timestep from 0 to 999", 999)


def seed(text: str) -> int:
    """An argparse `type` for --seed: 0 to 2**63 - 1, what torch's and numpy's generators both take; anything else
    is argparse's one-line usage error, not a traceback from the first generator seeded with it."""
    return _int_at_least(text, 0, f"a seed from 0 to 2**63 - 1 ({2**63 - 1})", 2**63 - 1)


def seed32(text: str) -> int:
    """--seed of a command that derives its per-step seeds from it by multiplying (Perfusion's seed * 1_000_003 +
    step): 0 to 2**32 - 1, so that they stay within what a generator takes."""
    return _int_at_least(text, 0, f"a seed from 0 to 2**32 - 1 ({2**32 - 1})", 2**32 - 1)


def _int_at_least(text: str, least: int, what: str, most: int | None = None) -> int:
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < least or (most is not None and value > most):
        raise argparse.ArgumentTypeError(f"{value} is not {what}")
    return value


def check_out_file(out: str, example: str, what: str = "output") -> None:
    """An --out FILE that cannot be written, found before the work rather than after it (`sample`, `eval`,
    `bench`): a folder (or a name ending in /, which would become a file of that name), or a parent folder
    missing or not writable."""
    import os
    from pathlib import Path

    from pixart.errors import PixArtError

    if not out.strip():
        raise PixArtError("--out is empty")
    if Path(out).is_dir() or out.endswith(("/", os.sep)):
        raise PixArtError(f"--out {out} is a folder; name the {what} file, e.g. {Path(out) / example}")
    folder = Path(out).absolute().parent
    if not (folder.is_dir() and os.access(folder, os.W_OK | os.X_OK)):
        raise PixArtError(f"--out {out}: {folder} is not a folder this user can write in")
