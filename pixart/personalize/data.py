"""A concept's few training images, their object masks and captions, from a folder or from shards.

A folder holds images (png, jpg, webp), optionally `masks/<stem>.png` (white = object) and `<stem>.txt` (a
caption naming the concept). Shards are webdataset tars; a sample's mask comes from its json: the shapes world's
object boxes, or SA-1B's largest annotation (its RLE mask, or its XYWH box). Without a mask the loss covers the
whole image.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from pixart.errors import PixArtError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
# Captions for images without one (Perfusion's ports train on a few such templates).
TEMPLATES = ("a photo of a {}", "a rendering of a {}", "an image of the {}", "a good photo of a {}",
             "a close-up photo of the {}", "a picture of a {}")


@dataclass
class ConceptImage:
    image: Image.Image  # RGB
    mask: np.ndarray | None  # (H, W) float in [0, 1], the object; None = the whole image
    caption: str | None  # names the concept by its word; None = a template
    source: str = ""  # where the caption came from (a file, or a shard's sample), for messages


def _open_image(source, label: str) -> Image.Image:
    try:
        with Image.open(source) as im:
            return ImageOps.exif_transpose(im).convert("RGB")  # upright, as diffusers' DreamBooth reads photos
    except Exception as e:
        raise PixArtError(f"{label}: cannot read image ({type(e).__name__})") from None


def _mask_file(path: Path, size: tuple[int, int]) -> np.ndarray:
    try:
        with Image.open(path) as im:
            mask = np.asarray(im.convert("L").resize(size, Image.BOX), dtype=np.float32) / 255
    except Exception as e:
        raise PixArtError(f"{path}: cannot read mask ({type(e).__name__})") from None
    if mask.max() <= 0:
        raise PixArtError(f"{path}: the mask is empty (no white pixels)")
    return mask / mask.max()


def _box_mask(boxes: list[list[float]], size: tuple[int, int], frame: tuple[float, float]) -> np.ndarray:
    """Boxes (x0, y0, x1, y1) in a `frame` of (width, height) -> a mask at `size`."""
    w, h = size
    mask = np.zeros((h, w), dtype=np.float32)
    for x0, y0, x1, y1 in boxes:
        sx, sy = w / frame[0], h / frame[1]
        mask[max(0, int(y0 * sy)):int(np.ceil(y1 * sy)), max(0, int(x0 * sx)):int(np.ceil(x1 * sx))] = 1
    return mask


def rle_decode(rle: dict) -> np.ndarray:
    """A COCO RLE mask (SA-1B's `segmentation`: {"size": [h, w], "counts": compressed string or run list}) ->
    (h, w) bool. Runs alternate background and object, column by column; the compressed string stores each run
    in 5-bit groups (pycocotools' rleFrString), after the second run as the difference to the run two back."""
    h, w = rle["size"]
    counts = rle["counts"]
    if isinstance(counts, str):
        runs, p = [], 0
        while p < len(counts):
            x, k, more = 0, 0, True
            while more:
                c = ord(counts[p]) - 48
                x |= (c & 0x1F) << (5 * k)
                more = bool(c & 0x20)
                p, k = p + 1, k + 1
                if not more and c & 0x10:
                    x |= -1 << (5 * k)
            runs.append(x + runs[-2] if len(runs) > 2 else x)
        counts = runs
    flat = np.zeros(h * w, dtype=bool)
    ends = np.cumsum(counts)
    for start, end in zip(ends[0::2], ends[1::2], strict=False):  # object runs are the odd ones
        flat[start:end] = True
    return flat.reshape(w, h).T


def _json_mask(meta: dict, size: tuple[int, int]) -> np.ndarray | None:
    """The object's mask at `size`: the shapes world's object boxes, or SA-1B's largest annotation (its RLE mask
    when the shard kept it, else its box); None when the json has neither."""
    if meta.get("objects"):  # the shapes world: bbox x0 y0 x1 y1 in the image's pixels
        return _box_mask([o["bbox"] for o in meta["objects"]], size, (meta["width"], meta["height"]))
    if meta.get("annotations") and meta.get("image"):  # SA-1B: the frame is the json's image width and height
        ann = max(meta["annotations"], key=lambda a: a.get("area", 0))
        if "segmentation" in ann:
            mask = Image.fromarray(rle_decode(ann["segmentation"]).astype(np.uint8) * 255)
            return np.asarray(mask.resize(size, Image.BOX), dtype=np.float32) / 255
        x, y, bw, bh = ann["bbox"]
        return _box_mask([[x, y, x + bw, y + bh]], size, (meta["image"]["width"], meta["image"]["height"]))
    return None


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def read_folder(folder: Path) -> list[ConceptImage]:
    out = []
    for path in _image_files(folder):
        image = _open_image(path, str(path))
        mask_path = folder / "masks" / f"{path.stem}.png"
        mask = _mask_file(mask_path, image.size) if mask_path.is_file() else None
        caption_path = path.with_suffix(".txt")
        out.append(ConceptImage(image, mask, _caption_file(caption_path), str(caption_path)))
    return out


def _caption_file(path: Path) -> str | None:
    """An image's `<stem>.txt` caption, or None; one that is not UTF-8 is named, not a decode traceback."""
    if not path.is_file():
        return None
    try:
        return path.read_bytes().decode().strip()
    except UnicodeDecodeError as e:
        raise PixArtError(f"{path}: not UTF-8 text (byte {e.start}); save the caption as UTF-8") from None


def read_shards(spec: str) -> list[ConceptImage]:
    from pixart.data.shards import resolve_shards
    from pixart.data.tars import DUPLICATE, IMAGE_EXTS, TarDamage, iter_samples, stable_reason

    try:
        urls = resolve_shards(spec)
    except PixArtError as e:
        raise PixArtError(f"--data {e}") from None
    out = []
    for url in urls:
        damage = TarDamage()
        for sample in iter_samples(url, damage):
            ext = next((e for e in IMAGE_EXTS if e in sample), None)
            if ext is None:
                continue
            try:  # a bad sample of a stream is skipped and said, as the loader does
                if DUPLICATE in sample:
                    raise PixArtError(f"duplicate file name {sample[DUPLICATE]}")
                image = _open_image(io.BytesIO(sample[ext]), f"{url}:{sample['__key__']}.{ext}")
                meta = json.loads(sample["json"]) if "json" in sample else {}
                caption = sample["txt"].decode().strip() if "txt" in sample else None
                source = f"{url}:{sample['__key__']}.txt"
                out.append(ConceptImage(image, _json_mask(meta, image.size), caption, source))
            except (PixArtError, ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
                print(f"warning: {url}: skipped {sample['__key__']} ({stable_reason(f'{type(e).__name__}: {e}')})")
        if damage.error:
            print(f"warning: {url}: {damage.reason()}")
    return out


def read_concept_images(data: str) -> list[ConceptImage]:
    """The images of `--data` (a folder, or shards); refuses an empty set."""
    path = Path(data)
    images_folder = path.is_dir() and (_image_files(path) or not any(path.glob("*.tar")))  # else a folder of shards
    images = read_folder(path) if images_folder else read_shards(data)
    if not images:
        raise PixArtError(f"--data {data}: no images found (a folder of png/jpg/webp files, or webdataset shards)")
    return images


def caption_for(item: ConceptImage, name: str, index: int) -> str:
    """The item's caption, or a template, naming the concept."""
    from .tokens import mentions

    if item.caption and mentions(item.caption, name):
        return item.caption
    return TEMPLATES[index % len(TEMPLATES)].format(name)
