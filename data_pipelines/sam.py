"""SA-1B tars -> webdataset shards of resized images plus their metadata.

SA-1B ships ~11M photos at ~1500x2250 with ~100 RLE masks each. Training at <= 1024 px
needs neither the full pixels nor (for text-to-image) the masks, so we shrink both:
images to `max_side`, annotations to their boxes and scores scaled to the new size.
Damaged inputs are skipped and listed in `DIR/sam_report.json`, never fatal.
"""
from __future__ import annotations

import io
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from pixart.atomic import atomic_write
from pixart.data.shards import resolve_shards
from pixart.data.tars import IMAGE_EXTS, ShardWriter, TarDamage, decode_image, iter_samples
from pixart.errors import PixArtError

REPORT = "sam_report.json"


@dataclass(frozen=True)
class SamConfig:
    max_side: int = 1024
    shard_size: int = 1000
    keep_masks: bool = False  # keep the RLE masks (at the original size, as `segmentation.size` says)
    quality: int = 95
    prefix: str = "sam"


@dataclass
class SamReport:
    written: int = 0
    shards: list[str] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)  # {"source", "key", "reason"}
    damaged: list[dict] = field(default_factory=list)  # {"source", "error", "after"}: tars read up to the damage


class BadSample(Exception):
    pass


def _scale_annotation(ann: dict, s: float, keep_masks: bool) -> dict:
    """Boxes, areas and points in the resized image's pixels; the RLE mask dropped unless asked."""
    out = {k: v for k, v in ann.items() if keep_masks or k != "segmentation"}
    if "bbox" in ann:
        out["bbox"] = [round(v * s, 2) for v in ann["bbox"]]
    if "area" in ann:
        out["area"] = round(ann["area"] * s * s, 2)
    if "crop_box" in ann:
        out["crop_box"] = [round(v * s, 2) for v in ann["crop_box"]]
    if "point_coords" in ann:
        out["point_coords"] = [[round(v * s, 2) for v in p] for p in ann["point_coords"]]
    return out


def convert(sample: dict, cfg: SamConfig) -> dict:
    """One SA-1B sample {"__key__", "jpg", "json"} -> output sample; BadSample says why not."""
    if not any(e in sample for e in IMAGE_EXTS):
        raise BadSample("no image")
    if "json" not in sample:
        raise BadSample("no json")
    try:
        meta = json.loads(sample["json"])
    except ValueError as e:
        raise BadSample(f"bad json: {e}") from None
    try:
        img = decode_image(sample)
    except ValueError as e:
        raise BadSample(str(e)) from None
    w, h = img.size
    s = min(1.0, cfg.max_side / max(w, h))
    if s < 1:
        img = img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BICUBIC, reducing_gap=3.0)
    nw, nh = img.size
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=cfg.quality)
    info = dict(meta.get("image", {}))
    info.update(width=nw, height=nh, orig_width=w, orig_height=h, scale=round(nw / w, 6))
    anns = [_scale_annotation(a, nw / w, cfg.keep_masks) for a in meta.get("annotations", [])]
    out_meta = {"width": nw, "height": nh, "image": info, "num_annotations": len(anns), "annotations": anns}
    return {"__key__": sample["__key__"], "jpg": buf.getvalue(), "json": json.dumps(out_meta).encode()}


def _prepare_out(out: Path, srcs: list[str], overwrite: bool, prefix: str) -> None:
    for src in srcs:
        if Path(src).resolve().parent == out.resolve() and Path(src).name.startswith(prefix + "-"):
            raise PixArtError(f"--out {out} would overwrite the input {src}")
    old = sorted(out.glob(f"{prefix}-*.tar")) + ([out / REPORT] if (out / REPORT).exists() else [])
    if old and not overwrite:
        raise PixArtError(f"--out {out} already holds {prefix} shards; pass --overwrite to replace them")
    for p in old + list(out.glob(f".{prefix}-*.tar.tmp")):
        p.unlink()
    out.mkdir(parents=True, exist_ok=True)


def ingest(srcs: list[str], out: str | os.PathLike, cfg: SamConfig = SamConfig(),
           overwrite: bool = False, progress: bool = True) -> SamReport:
    """Convert every sample of `srcs` into `out/<prefix>-NNNNNN.tar` shards of `shard_size` samples."""
    if cfg.max_side < 1 or cfg.shard_size < 1:
        raise PixArtError("--max-side and --shard-size must be positive")
    srcs, out = resolve_shards(srcs), Path(out)
    _prepare_out(out, srcs, overwrite, cfg.prefix)
    report, writer = SamReport(), None
    bar = tqdm(desc="sam", unit="img", disable=not progress)
    try:
        for src in srcs:
            damage = TarDamage()
            for sample in iter_samples(src, damage):
                bar.update(1)
                try:
                    converted = convert(sample, cfg)
                except BadSample as e:
                    report.skipped.append({"source": src, "key": sample["__key__"], "reason": str(e)})
                    bar.set_postfix(skipped=len(report.skipped))
                    continue
                if writer is None:
                    writer = ShardWriter(out / f"{cfg.prefix}-{len(report.shards):06d}.tar")
                writer.write(converted)
                report.written += 1
                if writer.count == cfg.shard_size:
                    report.shards.append(writer.close().name)
                    writer = None
            if damage.error:
                report.damaged.append({"source": src, "error": damage.error, "after": damage.after})
                tqdm.write(f"sam: {src} is damaged after {damage.after} samples ({damage.error}); going on")
        if writer is not None:
            report.shards.append(writer.close().name)
            writer = None
    finally:
        if writer is not None:
            writer.abort()
        bar.close()
    atomic_write(out / REPORT, json.dumps(asdict(report), indent=1))
    return report
