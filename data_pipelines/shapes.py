"""The synthetic shapes world: a text-to-image dataset whose every image has a known answer.

Each scene holds 1-3 objects (shape x color x size), one per cell of a 3x3 grid, on a
plain, gradient or textured neutral background, at one of several aspect ratios. All
are drawn 4x supersampled (anti-aliased); half are then damaged by noise, blur and/or
JPEG (milder on small images: the looks suffer, the content survives). `aesthetic` is
1.0 clean and 1 - severity damaged. The `.txt` is sparse, noisy alt-text as scraped
from the web; the `.json` has the truth, which relabeling jobs turn into dense
captions and the judge scores generations against.

Objects stay inside their cell with a margin, so they never touch: position is exact
and the judge can look at one cell at a time.

With `two_object_fraction` > 0 a scene holds exactly two objects (in two cells) with that
probability, else one: the world for teaching attribute binding ("a red star on the left and a
blue circle on the right"). `pair_holdout` keeps `held_out_pair`s of objects out of every scene,
for prompts that test composition of two objects.

A sample's `label` (for the class-conditional DiT stage) is the largest object's
`SHAPES.index(shape) * len(COLORS) + COLORS.index(color)` (large before small, the
first object on ties): `NUM_CLASSES` = 48 classes.

Every sample is drawn from its own RNG, seeded by (seed, index): same seed, same
bytes, whichever shards are (re)written and in whatever order.
"""
from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from pixart.atomic import atomic_write, check_out_folder
from pixart.data.tars import ShardWriter
from pixart.errors import PixArtError

SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")  # distinct even at 8 px
PALETTE = {  # saturated and far apart in hue, so a neutral background never looks like one
    "red": (220, 40, 40), "orange": (245, 140, 30), "yellow": (235, 215, 40), "green": (40, 170, 60),
    "cyan": (40, 200, 215), "blue": (40, 80, 225), "purple": (140, 60, 190), "pink": (245, 125, 195),
}
COLORS = tuple(PALETTE)
SIZES = ("small", "large")
SIZE_FRACTION = {"small": 0.45, "large": 0.8}  # object side / cell side (the cell's shorter side)
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
BACKGROUNDS = ("plain", "gradient", "texture")
BACKGROUND_LEVELS = (20.0, 235.0)  # brightness range (0-255) of the neutral backgrounds
ASPECTS = {"1:1": 1.0, "4:3": 4 / 3, "3:4": 3 / 4, "16:9": 16 / 9, "9:16": 9 / 16}
NUM_CLASSES = len(SHAPES) * len(COLORS)
SHARD_PATTERN = "shapes-{:06d}.tar"
VERSION = 2  # bump when the rendering changes: the judge's cache is keyed by it


@dataclass
class ShapesConfig:
    resolution: int = 64  # images have about resolution**2 pixels, sides multiples of `side_multiple`
    # 24: every cell of the 3x3 grid is a whole number of 8 px tokens, so an object sits on the token grid the same
    # way in every cell of a bucket (docs/experiments.md, 2026-12-07: on square worlds, shape learned 0.69 at 72 px
    # against 0.44 at 64)
    side_multiple: int = 16
    max_objects: int = 3
    damaged_fraction: float = 0.5
    supersample: int = 4  # scenes are drawn this much larger, then box-downscaled
    aspects: tuple[str, ...] = tuple(ASPECTS)
    backgrounds: tuple[str, ...] = BACKGROUNDS
    sizes: tuple[str, ...] = SIZES  # e.g. ("large",) where small objects would be too few pixels to judge
    holdout: int = 0  # > 0: objects whose (shape, color, position) is `held_out` are never drawn
    background_levels: tuple[float, float] = BACKGROUND_LEVELS
    two_object_fraction: float = 0.0  # > 0: two objects with this probability, else one (replaces 1..max_objects)
    pair_holdout: int = 0  # > 0: no scene holds two objects whose (shape, color)s are a `held_out_pair`

    def __post_init__(self):  # else image_size rounds the sides to another resolution, silently
        if self.resolution % self.side_multiple:
            raise ValueError(f"resolution {self.resolution} is not a multiple of side_multiple {self.side_multiple}")


# options added after VERSION 2's shards: `shapes.json` records them only when on, so older folders still resume
_LATER_OPTIONS = {"two_object_fraction": 0.0, "pair_holdout": 0, "side_multiple": 16}


def held_out(shape: str, color: str, position: str, every: int) -> bool:
    """The held-out combinations: 1 in `every` (shape, color, position) triples, chosen so that every
    pair of the three still occurs in training (for every >= 7: each pair misses at most 2 of its
    6-9 completions). Prompts built from them test composition, never memory."""
    return every > 0 and (SHAPES.index(shape) + COLORS.index(color) + POSITIONS.index(position)) % every == 0


def held_out_pair(a: tuple[str, str], b: tuple[str, str], every: int) -> bool:
    """The held-out pairs of objects, a and b as (shape, color), unordered, positions free: about 1 in
    `every` pairs of two colors (126 of 1008 for every = 8), by the sum of the four indices. Pairs of one
    color are never held out (a swap of colors would not show). Every object still occurs with most
    partners (at least 42 of 48 for every = 8), and with every color and every shape beside it."""
    (sa, ca), (sb, cb) = a, b
    index = SHAPES.index(sa) + COLORS.index(ca) + SHAPES.index(sb) + COLORS.index(cb)
    return every > 0 and ca != cb and index % every == 0


def image_size(resolution: int, aspect: float, multiple: int = 16) -> tuple[int, int]:
    """(width, height): multiples of `multiple` with about resolution**2 pixels."""
    w = max(multiple, multiple * round(resolution * math.sqrt(aspect) / multiple))
    h = max(multiple, multiple * round(resolution / math.sqrt(aspect) / multiple))
    return w, h


def cell_box(width: int, height: int, position: str | int) -> tuple[int, int, int, int]:
    """Pixel box (x0, y0, x1, y1) of a grid cell; the judge crops the same boxes."""
    i = POSITIONS.index(position) if isinstance(position, str) else position
    r, c = divmod(i, 3)
    return round(width * c / 3), round(height * r / 3), round(width * (c + 1) / 3), round(height * (r + 1) / 3)


def class_label(objects: list[dict]) -> int:
    """The class-conditional label: the largest object's shape x color (first on ties)."""
    main = max(objects, key=lambda o: SIZES.index(o["size"]))  # max keeps the first of equals
    return SHAPES.index(main["shape"]) * len(COLORS) + COLORS.index(main["color"])


# ---------------------------------------------------------------- scene sampling

def sample_scene(rng: np.random.Generator, cfg: ShapesConfig) -> dict:
    """The scene's metadata (the `.json`), without the pixels."""
    aspect = cfg.aspects[rng.integers(len(cfg.aspects))]
    width, height = image_size(cfg.resolution, ASPECTS[aspect], cfg.side_multiple)
    objects = []
    for cell in rng.choice(len(POSITIONS), size=_object_count(rng, cfg), replace=False):
        x0, y0, x1, y1 = cell_box(width, height, int(cell))
        size = cfg.sizes[rng.integers(len(cfg.sizes))]
        side = min(x1 - x0, y1 - y0)
        r, margin = SIZE_FRACTION[size] * side / 2, max(1.5, 0.06 * side)  # neighbours never touch, even blurred
        slack_x, slack_y = max(0.0, (x1 - x0) / 2 - r - margin), max(0.0, (y1 - y0) / 2 - r - margin)
        cx = (x0 + x1) / 2 + rng.uniform(-slack_x, slack_x)
        cy = (y0 + y1) / 2 + rng.uniform(-slack_y, slack_y)
        shape, color = _draw_kind(rng, cfg, POSITIONS[cell], objects)
        xs, ys = zip(*_outline(shape, cx, cy, r), strict=True)
        bbox = [max(0, math.floor(min(xs))), max(0, math.floor(min(ys))),
                min(width, math.ceil(max(xs))), min(height, math.ceil(max(ys)))]
        objects.append({"shape": shape, "color": color, "size": size,
                        "position": POSITIONS[cell], "bbox": bbox, "center": [round(cx, 3), round(cy, 3)],
                        "radius": round(r, 3)})
    damaged = bool(rng.random() < cfg.damaged_fraction)
    severity = float(rng.uniform(0.25, 1.0)) if damaged else 0.0
    return {"objects": objects, "background": cfg.backgrounds[rng.integers(len(cfg.backgrounds))],
            "width": width, "height": height, "quality": "damaged" if damaged else "clean",
            "aesthetic": round(1.0 - severity, 3), "label": class_label(objects)}


def _object_count(rng: np.random.Generator, cfg: ShapesConfig) -> int:
    """1..max_objects uniformly; with `two_object_fraction`, 2 with that probability, else 1."""
    if cfg.two_object_fraction > 0:
        return 2 if rng.random() < cfg.two_object_fraction else 1
    return int(rng.integers(1, cfg.max_objects + 1))


def _draw_kind(rng: np.random.Generator, cfg: ShapesConfig, position: str, others: list[dict]) -> tuple[str, str]:
    """(shape, color) for an object at `position`, redrawn while it is a held-out triple or makes a held-out
    pair with an object already in the scene (redrawn, not skipped: a rejected combination stays rare)."""
    def rejected(shape, color):
        return held_out(shape, color, position, cfg.holdout) or any(
            held_out_pair((shape, color), (o["shape"], o["color"]), cfg.pair_holdout) for o in others)

    shape, color = SHAPES[rng.integers(len(SHAPES))], COLORS[rng.integers(len(COLORS))]
    while rejected(shape, color):
        shape, color = SHAPES[rng.integers(len(SHAPES))], COLORS[rng.integers(len(COLORS))]
    return shape, color


def _outline(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """The shape's polygon inside the circle of radius r (a circle is a 48-gon for its bbox)."""
    def ring(k, rad, start):
        return [(cx + rad * math.cos(start + 2 * math.pi * i / k), cy + rad * math.sin(start + 2 * math.pi * i / k))
                for i in range(k)]
    if shape == "circle":
        return ring(48, r, 0.0)
    if shape == "square":
        s = 0.8 * r
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "triangle":  # pointing up, centred vertically
        return [(x, y + 0.25 * r) for x, y in ring(3, r, -math.pi / 2)]
    if shape == "star":
        outer, inner = ring(5, r, -math.pi / 2), ring(5, 0.5 * r, -math.pi / 2 + math.pi / 5)
        return [p for pair in zip(outer, inner, strict=True) for p in pair]
    if shape == "cross":  # a plus sign, arms 0.6 r wide
        a = 0.3 * r
        return [(cx + x, cy + y) for x, y in ((-a, -r), (a, -r), (a, -a), (r, -a), (r, a), (a, a), (a, r), (-a, r),
                                              (-a, a), (-r, a), (-r, -a), (-a, -a))]
    if shape == "diamond":
        return ring(4, r, -math.pi / 2)
    raise ValueError(f"unknown shape {shape!r}")


# ---------------------------------------------------------------- drawing

def _background(rng: np.random.Generator, kind: str, width: int, height: int,
                levels: tuple[float, float] = BACKGROUND_LEVELS) -> np.ndarray:
    """Neutral (low-chroma) float RGB background, (H, W, 3) in 0..255, its brightness within `levels`."""
    def neutral():
        lo, hi = levels  # the same draw for any range: the default world's bytes never change
        return lo + (hi - lo) * rng.uniform(0, 1) + rng.uniform(-12, 12, size=3)
    if kind == "plain":
        return np.broadcast_to(neutral(), (height, width, 3)).astype(np.float32)
    if kind == "gradient":
        a, b, angle = neutral(), neutral(), rng.uniform(0, 2 * math.pi)
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
        t = (xx / width - 0.5) * math.cos(angle) + (yy / height - 0.5) * math.sin(angle)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        return (a + (b - a) * t[..., None]).astype(np.float32)
    if kind == "texture":  # stripes, checks or blotches, +-30 around a neutral base
        base, amp, period = neutral(), rng.uniform(12, 30), rng.uniform(4, 12) * max(width, height) / 64
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
        pattern = rng.integers(3)
        if pattern == 0:
            angle = rng.uniform(0, math.pi)
            t = np.sin(2 * math.pi * (xx * math.cos(angle) + yy * math.sin(angle)) / period)
        elif pattern == 1:
            t = np.sign(np.sin(math.pi * xx / period) * np.sin(math.pi * yy / period))
        else:
            coarse = rng.uniform(-1, 1, size=(max(2, height // 8), max(2, width // 8)))
            t = np.asarray(Image.fromarray(coarse.astype(np.float32), mode="F").resize((width, height), Image.BILINEAR))
        lum = np.clip(base.mean() + amp * t, 0, 255)
        return (lum[..., None] + (base - base.mean())).astype(np.float32)
    raise ValueError(f"unknown background {kind!r}")


def draw_scene(scene: dict, rng: np.random.Generator, supersample: int = 4,
               background_levels: tuple[float, float] = BACKGROUND_LEVELS) -> Image.Image:
    """Pixels for a scene's metadata: objects composited over the background, then the damage."""
    w, h = scene["width"], scene["height"]
    s = supersample  # aliased 8-pixel shapes are ambiguous: damage comes after anti-aliasing
    mask, paint = Image.new("L", (w * s, h * s), 0), Image.new("RGB", (w * s, h * s), (0, 0, 0))
    dm, dp = ImageDraw.Draw(mask), ImageDraw.Draw(paint)
    for obj in scene["objects"]:
        (cx, cy), r = obj["center"], obj["radius"]
        if obj["shape"] == "circle":
            box = [(cx - r) * s, (cy - r) * s, (cx + r) * s - 1, (cy + r) * s - 1]
            dm.ellipse(box, fill=255)
            dp.ellipse(box, fill=PALETTE[obj["color"]])
        else:
            pts = [(x * s, y * s) for x, y in _outline(obj["shape"], cx, cy, r)]
            dm.polygon(pts, fill=255)
            dp.polygon(pts, fill=PALETTE[obj["color"]])
    if s > 1:  # box-filtering premultiplied colour and coverage is exact anti-aliasing
        mask, paint = mask.resize((w, h), Image.BOX), paint.resize((w, h), Image.BOX)
    alpha = np.asarray(mask, dtype=np.float32)[..., None] / 255
    background = _background(rng, scene["background"], w, h, background_levels)
    img = background * (1 - alpha) + np.asarray(paint, dtype=np.float32)
    if scene["quality"] == "damaged":
        img = _damage(img, rng, 1.0 - scene["aesthetic"], min(w, h))
    return Image.fromarray(np.clip(img + 0.5, 0, 255).astype(np.uint8))


def _damage(img: np.ndarray, rng: np.random.Generator, severity: float, side: int) -> np.ndarray:
    """Blur, noise and/or JPEG, each scaled by severity (at least one is applied)."""
    scale = min(1.0, side / 64)  # small images get milder damage: it should lower the looks, not hide the content
    kinds = rng.random(3) < 0.6
    if not kinds.any():
        kinds[rng.integers(3)] = True
    blur, noise, jpeg = kinds
    if blur:
        pil = Image.fromarray(np.clip(img + 0.5, 0, 255).astype(np.uint8))
        img = np.asarray(pil.filter(ImageFilter.GaussianBlur(0.8 * severity * side / 64)), dtype=np.float32)
    if noise:
        img = img + rng.normal(0, 10 * severity * scale, size=img.shape).astype(np.float32)
    if jpeg:
        buf = io.BytesIO()
        quality = int(90 - 40 * severity * scale)  # 4:4:4: half-resolution chroma would erase 8-pixel shapes
        Image.fromarray(np.clip(img + 0.5, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=quality, subsampling=0)
        img = np.asarray(Image.open(buf).convert("RGB"), dtype=np.float32)
    return img


def render_scene(rng: np.random.Generator | int, cfg: ShapesConfig | None = None) -> tuple[Image.Image, dict]:
    """One random scene: (image, metadata). An int seeds a fresh generator."""
    cfg = cfg or ShapesConfig()
    rng = np.random.default_rng(rng) if not isinstance(rng, np.random.Generator) else rng
    scene = sample_scene(rng, cfg)
    return draw_scene(scene, rng, cfg.supersample, cfg.background_levels), scene


# ---------------------------------------------------------------- alt-text

_GENERIC = ("shapes", "abstract art", "geometric shapes", "untitled", "graphic", "clip art", "pattern",
            "wallpaper", "design", "background", "icon set", "modern art", "colorful", "minimal")


def alt_text(rng: np.random.Generator, scene: dict, index: int) -> str:
    """Web-like alt-text: mostly useless, sometimes one true attribute, sometimes a wrong one."""
    r, obj = rng.random(), scene["objects"][rng.integers(len(scene["objects"]))]
    if r < 0.35:
        return _GENERIC[rng.integers(len(_GENERIC))]
    if r < 0.5:
        return ("image {:04d}", "IMG_{:04d}.png", "DSC{:05d}", "pic {}")[rng.integers(4)].format(index % 10000)
    if r < 0.85:  # one correct attribute
        return (f"a {obj['color']} thing", f"{obj['shape']}", f"{obj['color']}", f"{obj['shape']} icon",
                f"{obj['color']} abstract art", f"a {obj['shape']}")[rng.integers(6)]
    wrong = (COLORS + SHAPES)[rng.integers(len(COLORS) + len(SHAPES))]
    return (f"{wrong}", f"a {wrong} thing", f"{wrong} pattern")[rng.integers(3)]


# ---------------------------------------------------------------- shards

def make_sample(seed: int, index: int, cfg: ShapesConfig) -> dict:
    """The webdataset sample for dataset index `index` (its own RNG: any order, same bytes)."""
    rng = np.random.default_rng([seed, index])
    image, scene = render_scene(rng, cfg)
    buf = io.BytesIO()
    image.save(buf, "PNG")
    meta = {k: v for k, v in scene.items()}
    meta["objects"] = [{k: o[k] for k in ("shape", "color", "size", "position", "bbox")} for o in scene["objects"]]
    return {"__key__": f"{index:09d}", "png": buf.getvalue(), "json": json.dumps(meta).encode(),
            "txt": alt_text(rng, scene, index).encode()}


def _write_shard(out_dir: str, shard: int, start: int, stop: int, seed: int, cfg: ShapesConfig) -> int:
    """Write one whole shard under a temporary name, then rename it into place (deterministic bytes)."""
    writer = ShardWriter(Path(out_dir) / SHARD_PATTERN.format(shard))
    try:
        for i in range(start, stop):
            writer.write(make_sample(seed, i, cfg))
        writer.close()
    except BaseException:
        writer.abort()
        raise
    return stop - start


def check_args(count: int, resolution: int, shard_size: int, side_multiple: int = 16) -> None:
    if count < 1:
        raise PixArtError(f"--count must be at least 1, got {count}")
    if side_multiple not in (16, 24):
        raise PixArtError(f"--side-multiple must be 16 or 24, got {side_multiple}")
    if resolution < 32 or resolution % side_multiple:
        raise PixArtError(f"--resolution must be a multiple of {side_multiple} and at least 32, got {resolution}")
    if shard_size < 1:
        raise PixArtError(f"--shard-size must be at least 1, got {shard_size}")


def write_shapes(out_dir: str | os.PathLike, count: int, seed: int = 0, resolution: int = 64, shard_size: int = 1000,
                 workers: int = 1, progress: Callable[[int], None] | None = None, **config) -> list[Path]:
    """Write `count` samples as `shapes-NNNNNN.tar` shards; complete shards of a previous run are kept.

    `shapes.json` records the dataset's parameters; a folder holding a different dataset is an error.
    `config` overrides other `ShapesConfig` fields. `progress(n)` is called as samples are done.
    """
    check_args(count, resolution, shard_size, config.get("side_multiple", 16))
    cfg = ShapesConfig(resolution=resolution, **config)
    out = Path(out_dir)
    check_out_folder(out)
    out.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in asdict(cfg).items() if k not in _LATER_OPTIONS or v != _LATER_OPTIONS[k]}
    manifest = {"version": VERSION, "seed": seed, "count": count, "shard_size": shard_size, "config": config}
    manifest = json.loads(json.dumps(manifest))  # tuples -> lists, as read back
    path = out / "shapes.json"
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except ValueError:
            old = None
        if old != manifest:
            raise PixArtError(f"{path}: the folder holds a different shapes dataset; choose another --out")
    elif any(out.glob("shapes-*.tar")):
        raise PixArtError(f"--out {out} holds shards but no shapes.json; choose another --out")
    else:
        atomic_write(path, json.dumps(manifest, indent=2))
    for stale in out.glob(".shapes-*.tar.tmp*"):  # left by a killed run
        stale.unlink(missing_ok=True)

    jobs, shards = [], []
    for k, start in enumerate(range(0, count, shard_size)):
        stop = min(start + shard_size, count)
        shards.append(out / SHARD_PATTERN.format(k))
        if shards[-1].exists():
            progress and progress(stop - start)
        else:
            jobs.append((str(out), k, start, stop, seed, cfg))
    if workers > 1 and len(jobs) > 1:
        from concurrent.futures import ProcessPoolExecutor, as_completed

        from pixart.lifetime import die_with

        with ProcessPoolExecutor(workers, initializer=die_with, initargs=(os.getpid(),)) as pool:
            for fut in as_completed([pool.submit(_write_shard, *job) for job in jobs]):
                n = fut.result()
                progress and progress(n)
    else:
        for job in jobs:
            n = _write_shard(*job)
            progress and progress(n)
    return shards
