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
