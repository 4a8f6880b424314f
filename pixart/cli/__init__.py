"""One module per `pixart` subcommand; what several share is here."""
from __future__ import annotations


def pick_device(device: str | None) -> str:
    """--device: CUDA when there is one, unless given; a device this machine lacks is a one-line error, not a
    traceback from the first tensor moved to it."""
    import torch

    from pixart.errors import PixArtError

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise PixArtError(f"--device {device!r}: use cpu, cuda or cuda:N") from None
    if kind not in ("cpu", "cuda"):
        raise PixArtError(f"--device {device!r}: use cpu, cuda or cuda:N")
    if kind == "cuda" and not torch.cuda.is_available():
        raise PixArtError(f"--device {device}: no CUDA device here")
    return device
