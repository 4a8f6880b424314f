"""SA-1B tars -> webdataset shards of resized images plus their metadata.

SA-1B ships ~11M photos at ~1500x2250 with ~100 RLE masks each. Training at <= 1024 px
needs neither the full pixels nor (for text-to-image) the masks, so we shrink both:
images to `max_side`, annotations to their boxes and scores scaled to the new size.
Every coordinate in an SA-1B json (bbox, point_coords, area, crop_box, the RLE's `size`) is in the
frame its `image.width` x `image.height` names, whatever size the jpg was stored at, so that frame,
not the decoded jpg, is what gets scaled to the output size, one factor per axis.
Members are paired by name (`sam_tar.py`). Damaged inputs are skipped and listed in
`DIR/sam_report.json`, never fatal; a run that writes not one sample is an error, and leaves the old set.
The new set is built in `DIR/.sam-new`, which records after each finished shard where the run stands: a killed
run's rerun with the same inputs and settings goes on from there (re-reading the tar it was in, converting only
what came after).
"""
from __future__ import annotations

import io
import json
import math
import os
import shutil
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from pixart.atomic import atomic_write, check_out_folder
from pixart.data.shards import input_id, is_url, resolve_shards
from pixart.data.tars import IMAGE_EXTS, ShardWriter, decode_image
from pixart.errors import PixArtError

from .sam_tar import TarRead, read_pairs

REPORT = "sam_report.json"
PROGRESS = ".progress.json"  # in the new set's folder, after each finished shard: where a rerun goes on


@dataclass(frozen=True)
class SamConfig:
    max_side: int = 1024
    shard_size: int = 1000
    keep_masks: bool = False  # keep the RLE masks (at the original size, as `segmentation.size` says)
    quality: int = 95
    prefix: str = "sam"
    hold_mb: float = 256  # members of a streamed tar waiting for their pair, in memory; past it, on disk in --out


@dataclass
class SamReport:
    written: int = 0
    shards: list[str] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)  # {"source", "key", "reason"}
    unpaired: int = 0  # of the skipped: a jpg without its json or a json without its jpg
    spilled: int = 0  # members that waited for their pair on disk (streams past `hold_mb`)
    damaged: list[dict] = field(default_factory=list)  # {"source", "error", "after"}: tars read up to the damage
    nothing_to_do: bool = False  # a rerun: --out holds what these inputs with these settings make (not saved)

    def saved(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "nothing_to_do"}


class BadSample(Exception):
    pass


@dataclass(frozen=True)
class Frame:
    """From the json's frame to the output image: a factor per axis (rounding the output's sides makes
    them differ: 1500x2250 -> 683x1024), and the output's sides to clamp to."""
    sx: float
    sy: float
    width: int
    height: int

    def _xy(self, x: float, y: float) -> tuple[float, float]:
        return min(max(x * self.sx, 0.0), self.width), min(max(y * self.sy, 0.0), self.height)

    def point(self, x: float, y: float) -> list[float]:
        return [round(v, 2) for v in self._xy(x, y)]

    def box(self, xywh: list[float]) -> list[float]:
        """An XYWH box (SA-1B's bbox and crop_box), clamped to the image."""
        x0, y0 = self._xy(xywh[0], xywh[1])
        x1, y1 = self._xy(xywh[0] + xywh[2], xywh[1] + xywh[3])
        return [round(v, 2) for v in (x0, y0, x1 - x0, y1 - y0)]


def _scale_annotation(ann: dict, f: Frame, keep_masks: bool) -> dict:
    """Boxes, areas and points in the output image's pixels; the RLE mask (in the json's frame, as its
    `size` says) dropped unless asked."""
    out = {k: v for k, v in ann.items() if keep_masks or k != "segmentation"}
    if "bbox" in ann:
        out["bbox"] = f.box(ann["bbox"])
    if "area" in ann:
        out["area"] = round(ann["area"] * f.sx * f.sy, 2)
    if "crop_box" in ann:
        out["crop_box"] = f.box(ann["crop_box"])
    if "point_coords" in ann:
        out["point_coords"] = [f.point(*p) for p in ann["point_coords"]]
    return out


def _json_frame(meta: dict) -> tuple[int, int]:
    """The json's `image.width` x `image.height`: the frame of all its coordinates."""
    image = meta.get("image") if isinstance(meta, dict) else None
    try:
        w, h = int(image["width"]), int(image["height"])
    except (TypeError, KeyError, ValueError, OverflowError):  # OverflowError: Infinity, which json reads
        raise BadSample("json has no image.width/height") from None
    if w < 1 or h < 1:
        raise BadSample(f"json frame {w}x{h} is empty")
    return w, h


def _same_aspect(w: int, h: int, fw: int, fh: int, tol: float = 1.0) -> bool:
    """Could a w x h jpg be the fw x fh frame resized by one factor, each side rounded within `tol` px?"""
    return max((w - tol) / fw, (h - tol) / fh) <= min((w + tol) / fw, (h + tol) / fh)


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
    fw, fh = _json_frame(meta)
    try:
        img = decode_image(sample)
    except ValueError as e:
        raise BadSample(str(e)) from None
    w, h = img.size
    if not _same_aspect(w, h, fw, fh):
        raise BadSample(f"aspect mismatch: jpg {w}x{h}, json frame {fw}x{fh}")
    s = min(1.0, cfg.max_side / max(w, h))
    if s < 1:
        img = img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BICUBIC, reducing_gap=3.0)
    nw, nh = img.size
    frame = Frame(nw / fw, nh / fh, nw, nh)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=cfg.quality)
    info = dict(meta["image"])
    info.update(width=nw, height=nh, orig_width=fw, orig_height=fh,
                scale_x=round(frame.sx, 6), scale_y=round(frame.sy, 6))
    try:
        anns = [_scale_annotation(a, frame, cfg.keep_masks) for a in meta.get("annotations") or []]
    except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:  # a field of another type or shape
        raise BadSample(f"bad annotation ({type(e).__name__}: {e})") from None
    out_meta = {"width": nw, "height": nh, "image": info, "num_annotations": len(anns), "annotations": anns}
    return {"__key__": sample["__key__"], "jpg": buf.getvalue(), "json": json.dumps(out_meta).encode()}


def _prepare_out(out: Path, srcs: list[str], overwrite: bool, prefix: str) -> Path:
    """The folder to write the new shards into (a killed run's is kept for `_resume_point`), beside the old set,
    which stays whole until the new one is (`_move_in`). A killed run's set that was being moved in is finished
    first."""
    check_out_folder(out)
    for src in srcs:
        if Path(src).resolve().parent == out.resolve() and Path(src).name.startswith(prefix + "-"):
            raise PixArtError(f"--out {out} would overwrite the input {src}")
    new = out / f".{prefix}-new"
    finished = (new / REPORT).is_file()
    if finished:
        _move_in(new, out, prefix)
    if any(out.glob(f"{prefix}-*.tar")) and not overwrite:
        why = " (a killed run's set, now moved in whole)" if finished else ""
        raise PixArtError(f"--out {out} already holds {prefix} shards{why}; pass --overwrite to replace them")
    for p in out.glob(f".{prefix}-*.tar.tmp*"):
        p.unlink()
    for p in out.glob(".sam-spill-*"):  # left by a killed run
        shutil.rmtree(p, ignore_errors=True)
    try:
        new.mkdir(parents=True, exist_ok=True)  # a killed run's, kept for `_resume_point`
    except OSError as e:
        raise PixArtError(f"--out {out}: not a folder this user can write in ({e.strerror})") from None
    return new


def _resume_point(new: Path, settings: dict, inputs: list[dict]) -> dict | None:
    """A killed run's progress in `new`, when it converted these inputs with these settings; otherwise `new`
    is emptied and None returned."""
    try:
        state = json.loads((new / PROGRESS).read_text())
        if state["settings"] == settings and state["inputs"] == inputs:
            for p in new.iterdir():  # a shard finished after the last record is written again
                if p.name != PROGRESS and p.name not in state["report"]["shards"]:
                    p.unlink()
            return state
    except (OSError, ValueError, KeyError, TypeError):
        pass
    shutil.rmtree(new)
    new.mkdir()
    return None


def _discard(new: Path, out: Path, created: bool) -> None:
    shutil.rmtree(new, ignore_errors=True)
    if created:
        shutil.rmtree(out, ignore_errors=True)  # a first run that failed leaves no empty --out


def _move_in(new: Path, out: Path, prefix: str) -> None:
    """Replace the old set with the finished one in `new`, its report last: a kill half-way leaves `new`
    holding the report, and the next run calls this again to finish."""
    shards = json.loads((new / REPORT).read_text())["shards"]
    (new / PROGRESS).unlink(missing_ok=True)  # finished: its report, not the progress, says what the set is
    (out / REPORT).unlink(missing_ok=True)  # no report beside a set half moved in
    for p in out.glob(f"{prefix}-*.tar"):
        if p.name not in shards:
            p.unlink()
    for name in shards:
        if (new / name).exists():
            os.replace(new / name, out / name)
    os.replace(new / REPORT, out / REPORT)
    new.rmdir()


def _nothing_written(srcs: list[str], report: SamReport, paired: int) -> str:
    """Why not one sample was written, in one line: why its pairs were skipped, else why nothing could be read."""
    where = srcs[0] + (f" or the {len(srcs) - 1} other inputs" if len(srcs) > 1 else "")
    if paired:  # read, but none is an SA-1B sample (img2dataset's jpg + json, say)
        reasons = Counter(s["reason"] for s in report.skipped).most_common()
        why = "; ".join(f"{n}: {reason}" for reason, n in reasons[:3]) + ("; ..." if len(reasons) > 3 else "")
        return f"no SA-1B sample in {where}: all {len(report.skipped)} skipped ({why})"
    if report.damaged:  # not one sample read: not an SA-1B tar, rather than a bad one
        d = report.damaged[0]
        return f"{d['source']}: no SA-1B sample could be read ({d['error']})"
    return f"no SA-1B samples (image + json pairs) in {where}"  # a whole tar, but of something else


def ingest(srcs: list[str], out: str | os.PathLike, cfg: SamConfig = SamConfig(),
           overwrite: bool = False, progress: bool = True) -> SamReport:
    """Convert every sample of `srcs` into `out/<prefix>-NNNNNN.tar` shards of `shard_size` samples."""
    for flag, value in (("--max-side", cfg.max_side), ("--shard-size", cfg.shard_size)):
        if value < 1:
            raise PixArtError(f"{flag} {value}: must be positive")
    if not (math.isfinite(cfg.hold_mb) and cfg.hold_mb >= 0):
        raise PixArtError(f"--hold-mb {cfg.hold_mb}: must be a number of megabytes, 0 or more")
    srcs, out = resolve_shards(srcs), Path(out)
    settings = {k: v for k, v in asdict(cfg).items() if k != "hold_mb"}  # what the shards' bytes depend on
    inputs = [input_id(src) for src in srcs]
    done = None if overwrite else _finished(out, srcs, settings, inputs)
    if done is not None:
        return done
    created = not out.exists()
    new = _prepare_out(out, srcs, overwrite, cfg.prefix)
    state = _resume_point(new, settings, inputs)
    report, writer = SamReport(), None
    start, skip, paired = 0, 0, 0
    if state is not None:
        report, start, skip, paired = SamReport(**state["report"]), state["src"], state["pairs"], state["paired"]
    bar = tqdm(desc="sam", unit="img", disable=not progress)
    try:
        for i, src in enumerate(srcs[start:], start):
            read, pairs = TarRead(), 0
            for sample in read_pairs(src, read, int(cfg.hold_mb * 2**20), out):
                bar.update(1)
                pairs += 1
                if i == start and pairs <= skip:  # converted by the killed run
                    continue
                paired += 1
                try:
                    converted = convert(sample, cfg)
                except BadSample as e:
                    report.skipped.append({"source": src, "key": sample["__key__"], "reason": str(e)})
                    bar.set_postfix(skipped=len(report.skipped))
                    continue
                if writer is None:
                    writer = ShardWriter(new / f"{cfg.prefix}-{len(report.shards):06d}.tar")
                writer.write(converted)
                report.written += 1
                if writer.count == cfg.shard_size:
                    report.shards.append(writer.close().name)
                    writer = None
                    atomic_write(new / PROGRESS, json.dumps({"settings": settings, "inputs": inputs, "src": i,
                                                             "pairs": pairs, "paired": paired,
                                                             "report": report.saved()}))
            for key, reason in read.unpaired:
                report.skipped.append({"source": src, "key": key, "reason": reason})
            report.unpaired += len(read.unpaired)
            report.spilled += read.spilled
            if read.error:
                report.damaged.append({"source": src, "error": read.error, "after": read.after})
                tqdm.write(f"sam: {src} is damaged after {read.after} samples ({read.error}); going on")
        if writer is not None:
            report.shards.append(writer.close().name)
            writer = None
    except BaseException:
        if writer is not None:
            writer.abort()
        if not (new / PROGRESS).is_file():  # not one shard finished: nothing to go on from
            _discard(new, out, created)
        raise
    finally:
        bar.close()
    if report.written == 0:  # an error, and the old set stays
        _discard(new, out, created)
        raise PixArtError(_nothing_written(srcs, report, paired))
    made_from = {"sources": _where(srcs), "inputs": inputs, "settings": settings}
    atomic_write(new / REPORT, json.dumps({**report.saved(), "made_from": made_from}, indent=1))
    _move_in(new, out, cfg.prefix)
    return report


def _where(srcs: list[str]) -> list[str]:
    """The inputs as a rerun from another folder, or by another path to the same files, names them too."""
    return [src if is_url(src) else os.path.realpath(src) for src in srcs]


def _finished(out: Path, srcs: list[str], settings: dict, inputs: list[dict]) -> SamReport | None:
    """The report of the set in `out`, when a finished run made it from these inputs with these settings and
    every shard it lists is there: a rerun has nothing to do."""
    try:
        saved = json.loads((out / REPORT).read_text())
        if saved["made_from"] != json.loads(json.dumps({"sources": _where(srcs), "inputs": inputs,
                                                        "settings": settings})):
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not all((out / name).is_file() for name in saved["shards"]):
        return None
    kept = {k: v for k, v in saved.items() if k in SamReport().saved()}
    return SamReport(**kept, nothing_to_do=True)
