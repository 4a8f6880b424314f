"""Aspect-ratio buckets (PixArt-alpha multi-aspect training): tables, nearest bucket, resize-crop.

A table maps a ratio key (h / w, as a short string such as "0.57") to the bucket size (h, w) in
pixels. The sizes come from diffusers' PixArt pipeline tables (the well-kept copy of PixArt's
numbers). Those are its *inference* binning tables, 33 ratios; PixArt-alpha trained on 40, and
the seven ratios diffusers leaves out (three very wide, four very tall) are added here, so the
training tables hold the paper's 40 buckets from 0.25 to 4.
"""
from __future__ import annotations

import re

from PIL import Image

from pixart.errors import PixArtError

Table = dict[str, tuple[int, int]]

# The 40-bucket training table's ratios absent from diffusers' inference table, (h, w) at 1024 px.
_TRAIN_ONLY_1024 = {"0.26": (512, 1984), "0.27": (512, 1920), "2.89": (1664, 576), "3.11": (1792, 576),
                    "3.62": (1856, 512), "3.75": (1920, 512), "3.88": (1984, 512)}


def _table(name: str, side: int) -> Table:
    from diffusers.pipelines.pixart_alpha import pipeline_pixart_alpha  # heavy import: only when used
    table = {k: (int(h), int(w)) for k, (h, w) in getattr(pipeline_pixart_alpha, name).items()}
    table.update({k: (h * side // 1024, w * side // 1024) for k, (h, w) in _TRAIN_ONLY_1024.items()})
    return dict(sorted(table.items(), key=lambda kv: float(kv[0])))


_SIDES = {"ASPECT_RATIO_1024": 1024, "ASPECT_RATIO_512": 512, "ASPECT_RATIO_256": 256}
_BUILT: dict[int, Table] = {}
_PIXART_SIDES = tuple(_SIDES.values())


def pixart_table(side: int) -> Table:
    """PixArt's 40-bucket table at 1024, 512 or 256 px."""
    if side not in _BUILT:
        _BUILT[side] = _table(f"ASPECT_RATIO_{side}_BIN", side)
    return _BUILT[side]


def __getattr__(name: str) -> Table:  # ASPECT_RATIO_1024/512/256, built on first use
    if name in _SIDES:
        return pixart_table(_SIDES[name])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def bucket_spec(name: str) -> tuple[int, int]:
    """(side, multiple) a bucket table's name means: PixArt's own "ASPECT_RATIO_256", "_512" or "_1024", or
    "ms<side>" and "<side>" for a side that is a multiple of 16 (a bucket's sizes are), or "<side>/24" for sizes
    that are multiples of 24 (a 3x3 grid of whole 8 px tokens, as the demo's 72 px world). The names of one table
    mean one spec."""
    m = re.fullmatch(r"(aspect_ratio_|ms)?(\d+)(?:/(16|24))?", str(name).strip().lower())
    side, multiple = (int(m.group(2)), int(m.group(3) or 16)) if m else (0, 16)
    if m and m.group(1) == "aspect_ratio_" and (side not in _PIXART_SIDES or m.group(3)):
        raise PixArtError(f"--buckets {name!r}: PixArt's tables are ASPECT_RATIO_256, _512 and _1024; for another "
                          "side use ms<side>")
    if not m or side < multiple or side % multiple:
        raise PixArtError(f"--buckets {name!r}: unknown bucket table; use ASPECT_RATIO_512, ms256 or a side like "
                          "1024 (a multiple of 16), or 72/24 (sizes multiples of 24)")
    return side, multiple


def base_side(table: Table) -> int:
    """The side of the table's square bucket (or of the bucket closest to square)."""
    h, w = min(table.values(), key=lambda hw: abs(hw[0] / hw[1] - 1))
    return round((h * w) ** 0.5)


def scaled_table(base_table: Table, side: int, multiple: int = 16) -> Table:
    """`base_table` rescaled to about side x side pixels, sizes rounded to `multiple`.

    Small sides (the demo's 32-128 px) make neighbouring ratios round to the same size; those
    collapse into one bucket, keyed by the ratio of the rounded size.
    """
    scale = side / base_side(base_table)
    sizes: dict[tuple[int, int], None] = {}
    for h, w in base_table.values():
        sizes[tuple(max(multiple, round(x * scale / multiple) * multiple) for x in (h, w))] = None
    out: Table = {}
    for h, w in sizes:
        key = f"{round(h / w, 2)}"
        if key not in out or abs(h * w - side * side) < abs(out[key][0] * out[key][1] - side * side):
            out[key] = (h, w)
    return dict(sorted(out.items(), key=lambda kv: float(kv[0])))


def table_for(side: int, multiple: int = 16) -> Table:
    """PixArt's table at 1024/512/256 px; other sides scaled from the 1024 table."""
    return pixart_table(side) if side in (1024, 512, 256) else scaled_table(pixart_table(1024), side, multiple)


def nearest_bucket(h: int, w: int, table: Table) -> tuple[str, tuple[int, int]]:
    """The bucket whose ratio is closest to h / w (PixArt's rule: linear distance of ratios)."""
    ratio = h / w
    key = min(table, key=lambda k: abs(float(k) - ratio))
    return key, table[key]


def resize_crop(image: Image.Image, size: tuple[int, int], multi_aspect: bool) -> Image.Image:
    """Resize so the image covers (bh, bw), then center-crop: no padding, no distortion. The pixels are PixArt's:
    - one resolution (a square `size`), as its feature extraction and `default_train` transform: torchvision's
      `Resize(side)` (bilinear, the shorter side to `side`), then `CenterCrop(side)`;
    - buckets (`multi_aspect`), as its InternalDataMS: a bicubic resize to sides computed as it computes them,
      then torchvision's `CenterCrop`.
    """
    bh, bw = size
    w, h = image.size
    if not multi_aspect:  # torchvision's Resize(int): the shorter side to `bh`, the longer truncated
        nh, nw = (int(bh * h / w), bh) if w <= h else (bh, int(bh * w / h))
    elif bh / h > bw / w:
        nh, nw = bh, int(w * bh / h)
    else:
        nh, nw = int(h * bw / w), bw
    nh, nw = max(nh, bh), max(nw, bw)  # where float rounding truncates a side below the crop (torchvision would pad)
    image = image.resize((nw, nh), Image.BICUBIC if multi_aspect else Image.BILINEAR)
    top, left = int(round((nh - bh) / 2.0)), int(round((nw - bw) / 2.0))  # torchvision's CenterCrop
    return image.crop((left, top, left + bw, top + bh))
