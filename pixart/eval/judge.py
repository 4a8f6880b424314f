"""The judge: does a generated image show what its prompt asked for?

Shapes-world objects are saturated colors on neutral backgrounds, one per cell of a
3x3 grid, so finding them is analytic: in each cell, the largest blob of high chroma
(max - min over RGB after a 3x3 box blur), ignoring specks and the thin rim a
blurred neighbour leaves. Position is the cell, count the number of blobs, color the
palette color nearest the blob's core. Shape and size are learned: a small CNN reads
the blob's matte (each pixel's coverage, from the blob's color and the background's)
cropped square around it and resized to 20x20, so every shape arrives centred and at
one scale whatever the resolution; size is a per-shape logistic threshold on the
blob's extent and area against its cell. Both are trained on fresh renders (clean and
damaged, 32-128 px, every aspect ratio) from a fixed seed in about 20 s on two cores,
and cached once per machine as `judge-<version>.safetensors`.

Judgeable objects are at least `MIN_SIDE` (8) pixels across: at 32 px only large
ones; at 64 px small ones in 1:1 images only; at 128 px all. A smaller prompted
object is not scored, and whatever the judge finds in its cell is ignored.

Scoring (`Judge.score`) is per prompted object: with a position, the candidates are
the detection in that cell (position is right iff there is one); without, all
detections. An attribute (color, shape, size) is right iff a candidate has it, and
the object is right iff one candidate has every attribute the prompt gives. Count is
per image: as many detections as judgeable prompted objects. A miss scores zero everywhere.
Every score says what it covers: `judged` of `prompted` objects (`judged_fraction`); the rest
were too small to judge (`describe` puts both in one line).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter
from scipy import ndimage
from torch import nn

from data_pipelines import shapes
from data_pipelines.shapes import (
    COLORS,
    PALETTE,
    POSITIONS,
    SHAPES,
    SIZE_FRACTION,
    SIZES,
    ShapesConfig,
    cell_box,
    render_scene,
)

VERSION = f"v1-w{shapes.VERSION}"
ATTRIBUTES = ("position", "color", "shape", "size", "count", "object")
MIN_SIDE = 8.0  # pixels: smaller objects are not judged
CHROMA = 50.0  # blob threshold: neutral backgrounds stay below it, even damaged
MIN_AREA = 6  # pixels: smaller blobs are noise
THIN = 0.25  # blobs narrower than this share of the cell are noise or a neighbour's rim
PATCH = 20
_RGB = np.array([PALETTE[c] for c in COLORS], dtype=np.float32)


KNOWN = {"color": COLORS, "shape": SHAPES, "size": SIZES, "position": POSITIONS}


def spec_problem(spec) -> str | None:
    """Why a sample's spec cannot be scored, or None. A spec of another dataset (SA-1B's JSON has no
    "objects") or a value the shapes world lacks ("grey") would otherwise crash or silently score as a miss;
    the reason names the value and the known ones, so the samples are skipped, counted and explained."""
    objects = spec.get("objects") if isinstance(spec, dict) else spec
    if not isinstance(objects, list):
        return 'KEY.json has no "objects" list (not a shapes-world scene spec)'
    for o in objects:
        if not isinstance(o, dict):
            return 'KEY.json "objects" holds something other than JSON objects'
        for attr, known in KNOWN.items():
            if attr in o and o[attr] not in known:
                return f"unknown {attr} {o[attr]!r} (known: {', '.join(known)})"
    return None


def object_side(size: str, width: int, height: int) -> float:
    """Nominal side in pixels of an object of this size in a width x height image."""
    return SIZE_FRACTION[size] * min(width, height) / 3


def judgeable(obj: dict, width: int, height: int) -> bool:
    return "size" not in obj or object_side(obj["size"], width, height) >= MIN_SIDE


@dataclass(frozen=True)
class JudgeTrainConfig:
    scenes: int = 3000
    resolutions: tuple[int, ...] = (32, 48, 64, 96, 128)
    damaged_fraction: float = 0.8  # clean shapes are easy; damaged ones need the examples
    epochs: int = 8
    batch_size: int = 64
    lr: float = 3e-3
    seed: int = 0


class BlobNet(nn.Module):
    """20x20 blob matte -> shape logits; [extent, sqrt(area)] / cell side, cell side -> per-shape "is large" logits."""

    def __init__(self, width: int = 16):
        super().__init__()
        w = width

        def block(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]

        self.features = nn.Sequential(*block(1, w), nn.MaxPool2d(2), *block(w, 2 * w), nn.MaxPool2d(2),
                                      *block(2 * w, 2 * w), nn.Flatten())
        self.head = nn.Sequential(nn.Linear(2 * w * (PATCH // 4) ** 2, 64), nn.ReLU(), nn.Linear(64, len(SHAPES)))
        self.large = nn.Linear(3, len(SHAPES))  # a size threshold per shape: a star's tips vanish first

    @staticmethod
    def size_features(feats):
        return 4 * (feats.log() - math.log(0.6))

    def forward(self, crop, feats):
        return self.head(self.features(crop)), self.large(self.size_features(feats))


# ---------------------------------------------------------------- analytic detection

def _to_array(image) -> np.ndarray:
    """PIL image, (H, W, 3) uint8 array, or (3, H, W) tensor in [0, 1] (a decoded sample) -> (H, W, 3) uint8."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    if isinstance(image, torch.Tensor):
        return (image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255 + 0.5).astype(np.uint8)
    return np.asarray(image, dtype=np.uint8)


def detect(image) -> list[dict]:
    """Blobs, one per cell at most: position, color, bbox, plus the `crop` and `feats` the blob net reads."""
    arr = _to_array(image)
    h, w = arr.shape[:2]
    rgb = arr.astype(np.float32)
    smooth = np.asarray(Image.fromarray(arr).filter(ImageFilter.BoxBlur(1)), dtype=np.float32)
    chroma = smooth.max(-1) - smooth.min(-1)
    mask = chroma > CHROMA
    best: dict[int, tuple] = {}
    for cell in range(len(POSITIONS)):  # blobs never span cells: damage may have joined neighbours
        bx0, by0, bx1, by1 = cell_box(w, h, cell)
        labels = ndimage.label(mask[by0:by1, bx0:bx1])[0]  # 4-connected, numbered in raster order
        ids, areas = np.unique(labels[labels > 0], return_counts=True)
        for i, area in zip(ids, areas, strict=True):
            ys, xs = np.nonzero(labels == i)
            x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
            # noise specks and the blurred rims of a neighbour's object are thin
            if area < MIN_AREA or min(x1 - x0, y1 - y0) < max(3, THIN * min(bx1 - bx0, by1 - by0)):
                continue
            if cell not in best or area > best[cell][0]:
                best[cell] = (area, ys + by0, xs + bx0, (x0 + bx0, y0 + by0, x1 + bx0, y1 + by0))
    found = []
    for cell, (area, ys, xs, (x0, y0, x1, y1)) in sorted(best.items()):
        core = chroma[ys, xs] >= 0.6 * chroma[ys, xs].max()
        fg = rgb[ys[core], xs[core]].mean(0)
        color = COLORS[int(((_RGB - fg) ** 2).sum(1).argmin())]
        bx0, by0, bx1, by1 = cell_box(w, h, cell)
        side = min(bx1 - bx0, by1 - by0)
        bg = np.median(rgb[by0:by1, bx0:bx1][~mask[by0:by1, bx0:bx1]], 0) if not mask[by0:by1, bx0:bx1].all() \
            else np.median(rgb.reshape(-1, 3), 0)
        # the object's coverage of each pixel, from its color and the background's (a matte)
        alpha = np.clip((rgb - bg) @ (fg - bg) / max(float(((fg - bg) ** 2).sum()), 1.0), 0, 1)
        half = max(x1 - x0, y1 - y0) * 0.6 + 1
        cx, cy, pad = (x0 + x1) / 2, (y0 + y1) / 2, int(half) + 2  # crops may reach past the image edge
        crop = Image.fromarray(np.pad(alpha, pad).astype(np.float32)).resize(
            (PATCH, PATCH), Image.BILINEAR, box=(cx - half + pad, cy - half + pad, cx + half + pad, cy + half + pad))
        feats = np.array([max(x1 - x0, y1 - y0) / side, np.sqrt(area) / side, side / 12], dtype=np.float32)
        found.append({"position": POSITIONS[cell], "color": color, "bbox": [int(x0), int(y0), int(x1), int(y1)],
                      "crop": np.asarray(crop), "feats": feats})
    return found


def _render_set(n: int, resolutions, seed: int, tag: int, damaged_fraction: float = 0.5, side_multiple: int = 16):
    """n fresh scenes, resolutions in turn; each from its own RNG, apart from any dataset's seeds."""
    for i in range(n):
        cfg = ShapesConfig(resolution=resolutions[i % len(resolutions)], damaged_fraction=damaged_fraction,
                           side_multiple=side_multiple)
        yield render_scene(np.random.default_rng([tag, seed, i]), cfg)


def default_cache_dir() -> Path:
    root = os.environ.get("PIXART_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "pixart")
    return Path(root).expanduser()


MIN_RESOLUTION = min(JudgeTrainConfig.resolutions)  # px: the smallest images the judge was trained on


class Judge:
    def __init__(self, net: BlobNet):
        self.net = net.eval()

    # ------------------------------------------------------------ training and cache

    @classmethod
    def train(cls, cfg: JudgeTrainConfig = JudgeTrainConfig(), log=None) -> Judge:
        """Train the shape net on blobs found in fresh renders; deterministic for a cfg (and torch build)."""
        start = time.time()
        crops, feats, labels = [], [], []
        for image, scene in _render_set(cfg.scenes, cfg.resolutions, cfg.seed, 0x1D6E, cfg.damaged_fraction):
            truth = {o["position"]: o for o in scene["objects"] if judgeable(o, scene["width"], scene["height"])}
            for d in detect(image):
                if d["position"] in truth:
                    o = truth[d["position"]]
                    crops.append(d["crop"])
                    feats.append(d["feats"])
                    labels.append((SHAPES.index(o["shape"]), SIZES.index(o["size"])))
        x, f, y = torch.from_numpy(np.stack(crops))[:, None], torch.from_numpy(np.stack(feats)), torch.tensor(labels)
        log and log(f"judge: {len(x)} blobs from {cfg.scenes} scenes in {time.time() - start:.1f}s")
        g = torch.Generator().manual_seed(cfg.seed)
        with torch.random.fork_rng():
            torch.manual_seed(cfg.seed)
            net = BlobNet()
        steps = cfg.epochs * ((len(x) + cfg.batch_size - 1) // cfg.batch_size)
        opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=steps, pct_start=0.15)
        net.train()
        denormal = torch.set_flush_denormal(True)  # tiny activations are slow on CPUs, and do not matter
        for epoch in range(cfg.epochs):
            for idx in torch.randperm(len(x), generator=g).split(cfg.batch_size):
                xb = x[idx].flip(-1) if torch.rand((), generator=g) < 0.5 else x[idx]  # all shapes are mirror-symmetric
                loss = F.cross_entropy(net(xb, f[idx])[0], y[idx, 0])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
            log and log(f"judge: epoch {epoch + 1}/{cfg.epochs} loss {loss.item():.4f} ({time.time() - start:.1f}s)")
        # the size thresholds: a logistic regression per shape, fitted on all blobs at once
        size_opt = torch.optim.Adam(net.large.parameters(), lr=0.05)
        for _ in range(300):
            large = net.large(net.size_features(f)).gather(1, y[:, :1])[:, 0]
            loss = F.binary_cross_entropy_with_logits(large, y[:, 1].float())
            size_opt.zero_grad(set_to_none=True)
            loss.backward()
            size_opt.step()
        log and log(f"judge: size loss {loss.item():.4f} ({time.time() - start:.1f}s)")
        if denormal:
            torch.set_flush_denormal(False)
        return cls(net)

    @staticmethod
    def cache_path(cache_dir=None, cfg: JudgeTrainConfig = JudgeTrainConfig()) -> Path:
        """`judge-<version>.safetensors`; a non-default training config gets its own file."""
        name = f"judge-{VERSION}"
        if cfg != JudgeTrainConfig():
            name += "-" + hashlib.sha1(json.dumps(asdict(cfg), sort_keys=True).encode()).hexdigest()[:8]
        return Path(cache_dir or default_cache_dir()) / f"{name}.safetensors"

    def save(self, path) -> None:
        """Atomically: a killed write never leaves a half file under the cached name."""
        from safetensors.torch import save

        from pixart.atomic import atomic_write

        Path(path).parent.mkdir(parents=True, exist_ok=True)
        state = {k: v.contiguous() for k, v in self.net.state_dict().items()}
        atomic_write(path, save(state, metadata={"version": VERSION}))

    @classmethod
    def load(cls, path) -> Judge:
        from safetensors.torch import load_file

        net = BlobNet()
        net.load_state_dict(load_file(path))
        return cls(net)

    @classmethod
    def load_or_train(cls, cache_dir=None, cfg: JudgeTrainConfig = JudgeTrainConfig(), log=None) -> Judge:
        """The cached judge, training and caching it first if this machine has none."""
        path = cls.cache_path(cache_dir, cfg)
        if path.is_file():
            try:
                return cls.load(path)
            except Exception:  # a corrupt or foreign cache file: retrain over it
                pass
        judge = cls.train(cfg, log=log)
        judge.save(path)
        return judge

    # ------------------------------------------------------------ inference and scoring

    @torch.no_grad()
    def predict(self, images) -> list[dict] | list[list[dict]]:
        """Detected objects (shape, color, size, position, bbox) of one image, or of each image in a list."""
        single = not isinstance(images, (list, tuple))
        found = [detect(im) for im in ([images] if single else images)]
        flat = [d for f in found for d in f]
        if flat:
            crops = torch.from_numpy(np.stack([d.pop("crop") for d in flat]))[:, None]
            shape, large = self.net(crops, torch.from_numpy(np.stack([d.pop("feats") for d in flat])))
            shape = shape.argmax(-1)
            for d, s, z in zip(flat, shape.tolist(), (large.gather(1, shape[:, None])[:, 0] > 0).tolist(), strict=True):
                d["shape"], d["size"] = SHAPES[s], SIZES[int(z)]
        return found[0] if single else found

    def score(self, images, specs) -> dict:
        """Per-attribute accuracy of images against their prompts' object lists (see the module doc).

        A spec is a scene's metadata (with "objects") or the object list itself; an object may
        leave out attributes its prompt does not state. Besides the accuracies: `images`,
        `prompted` objects, `judged` (= `objects`) and `judged_fraction`, since objects too small
        to judge are left out of every accuracy.
        """
        images = list(images)
        hits = {a: [] for a in ATTRIBUTES}
        prompted = 0
        for lo in range(0, len(images), 64):
            batch = images[lo:lo + 64]
            for found, spec, image in zip(self.predict(batch), specs[lo:lo + 64], batch, strict=True):
                h, w = _to_array(image).shape[:2]
                prompted += len(spec["objects"] if isinstance(spec, dict) else spec)
                for attr, ok in match(found, spec, w, h).items():
                    hits[attr].extend(ok)
        out = {a: (sum(v) / len(v) if v else float("nan")) for a, v in hits.items()}
        out["images"], out["objects"] = len(images), len(hits["object"])
        out["prompted"], out["judged"] = prompted, len(hits["object"])
        out["judged_fraction"] = out["judged"] / prompted if prompted else float("nan")
        return out

    def self_accuracy(self, resolution: int, n: int = 300, seed: int = 0, damaged_fraction: float = 0.5,
                      side_multiple: int = 16) -> dict:
        """Accuracy on n fresh renders at this resolution (never seen in training): the judge's own error bar.
        `side_multiple` as the world's (`ShapesConfig`): 24 for the demo's 72 px world."""
        renders = _render_set(n, (resolution,), seed, tag=0xE7A1, damaged_fraction=damaged_fraction,
                              side_multiple=side_multiple)
        images, specs = zip(*renders, strict=True)
        return self.score(images, list(specs))


def describe(scores: dict, attr: str = "object") -> str:
    """One line for a report: the accuracy and what it covers, e.g. "object 98.4% of 412 judged
    objects (91.6% of 450 prompted; 38 too small to judge)"."""
    left = scores["prompted"] - scores["judged"]
    return (f"{attr} {percent(scores[attr])} of {scores['judged']} judged objects "
            f"({percent(scores['judged_fraction'])} of {scores['prompted']} prompted; {left} too small to judge)")


def percent(x: float) -> str:
    """An accuracy for a report; "n/a" where nothing was scored (NaN), never "nan%"."""
    return "n/a" if math.isnan(x) else f"{x:.1%}"


def match(found: list[dict], spec, width: int, height: int) -> dict[str, list[bool]]:
    """Per-attribute hits of one image's detections against its prompt (see the module doc)."""
    objects = spec["objects"] if isinstance(spec, dict) else spec
    skip = {o["position"] for o in objects if "position" in o and not judgeable(o, width, height)}
    objects = [o for o in objects if judgeable(o, width, height)]
    found = [d for d in found if d["position"] not in skip]
    hits = {a: [] for a in ATTRIBUTES}
    for o in objects:
        cands = found
        if "position" in o:
            cands = [d for d in found if d["position"] == o["position"]]
            hits["position"].append(bool(cands))
        for attr in ("color", "shape", "size"):
            if attr in o:
                hits[attr].append(any(d[attr] == o[attr] for d in cands))
        wanted = [a for a in ("color", "shape", "size", "position") if a in o]
        hits["object"].append(any(all(d[a] == o[a] for a in wanted) for d in cands))
    hits["count"].append(len(found) == len(objects))
    return hits
