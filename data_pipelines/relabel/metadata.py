"""`metadata` and `metadata-short`: the shapes world's captioners, written from each sample's truth (`.json`).

It stands in for LLaVA on SAM: every object's color, size, shape and position, the background, the
image's format and its style (a clean render, or degraded by noise, blur or JPEG, by how much from
`aesthetic`). Phrasing, sentence order and object order vary per sample, seeded by (seed, key), so
stage 2 learns the attributes rather than one template; the same seed gives the same caption in any
process and order. Color and shape names are always the world's own words: those are what prompts
use and what the judge scores.

`metadata-short` writes what a user would type instead ("red circle, top left"): a few words per
object, sometimes its size, no background or style. PixArt-Σ trains on long and short captions
mixed, so that short prompts in other word orders are followed too (issue 19); the loader draws
`{"metadata": p, "metadata-short": 1 - p}`.
"""
from __future__ import annotations

import random

from data_pipelines.relabel.captioner import CaptionerConfig
from pixart.data.loader_samples import stable_seed

TEMPLATES_VERSION = 1  # part of model_id: captions from other templates are told apart
SHORT_VERSION = 1  # the same for metadata-short
COUNTS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SIZE_WORDS = {"small": ("small", "little", "small"), "large": ("large", "big", "large")}
UPPER = {"top": "upper", "bottom": "lower"}


def position_phrase(rng: random.Random, position: str) -> str:
    """"top left" -> "in the top left corner" / "at the top left" / "in the upper left", and so on."""
    parts = position.split()
    if position == "center":
        return rng.choice(("in the center", "in the middle", "at the center of the frame"))
    if len(parts) == 2:
        v, h = parts
        return rng.choice((f"in the {v} {h} corner", f"at the {v} {h}", f"in the {UPPER[v]} {h}"))
    if position in UPPER:
        return rng.choice((f"at the {position}", f"at the {position} center", f"along the {position} edge"))
    return rng.choice((f"on the {position}", f"on the {position} side", f"at the middle {position}"))


def article(word: str) -> str:
    """"a red" / "an orange"."""
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def object_phrase(rng: random.Random, obj: dict) -> str:
    size, color, shape = rng.choice(SIZE_WORDS[obj["size"]]), obj["color"], obj["shape"]
    where = position_phrase(rng, obj["position"])
    return rng.choice((f"{article(size)} {color} {shape} {where}", f"{article(color)} {shape}, {size}, {where}",
                       f"{where}, {article(size)} {color} {shape}", f"{article(size)} {shape} in {color} {where}"))


def _join(items: list[str]) -> str:
    """"A, B and C"; "A; B; and C" when a phrase has commas of its own, so objects never run together."""
    if len(items) == 1:
        return items[0]
    sep = "; " if any("," in i for i in items) else ", "
    return sep.join(items[:-1]) + (sep.rstrip() if len(items) > 2 or sep == "; " else "") + " and " + items[-1]


def background_phrase(rng: random.Random, kind: str) -> str:
    return rng.choice({
        "plain": ("a plain background", "a flat, uniform neutral background", "a solid plain background"),
        "gradient": ("a gradient background", "a smoothly shaded neutral gradient",
                     "a background with a soft gradient"),
        "texture": ("a textured background", "a patterned, textured neutral background",
                    "a background with a subtle texture"),
    }.get(kind, (f"a {kind} background",)))


def style_sentence(rng: random.Random, meta: dict) -> str:
    """Clean render vs damaged, and how badly: the shapes world's `aesthetic` is 1 - damage severity."""
    if meta.get("quality", "clean") == "clean" and meta.get("aesthetic", 1.0) >= 1.0:
        return rng.choice(("The rendering is clean and sharp, with crisp edges and flat colors.",
                           "Style: a clean, high-quality digital render with sharp edges.",
                           "It looks like a clean, crisp vector graphic with no noise or blur."))
    severity = 1.0 - float(meta.get("aesthetic", 0.5))
    deg = "slightly" if severity < 0.5 else "noticeably" if severity < 0.75 else "heavily"
    return rng.choice((f"The image is {deg} degraded by noise, blur or JPEG compression.",
                       f"It looks like a {deg} damaged, low-quality picture: grainy, blurred or compressed.",
                       f"Style: {deg} noisy and blurry, with JPEG artifacts; low quality."))


def format_word(meta: dict) -> str:
    w, h = meta.get("width"), meta.get("height")
    if not w or not h:
        return ""
    return "wide" if w > 1.2 * h else "tall" if h > 1.2 * w else "square"


def describe(meta: dict, rng: random.Random) -> str:
    """One dense caption of a shapes-world scene."""
    objects = list(meta["objects"])
    rng.shuffle(objects)
    things = _join([object_phrase(rng, o) for o in objects])
    n = len(objects)
    count = f"{COUNTS[n] if n < len(COUNTS) else n} {'shape' if n == 1 else 'shapes'}"
    bg = background_phrase(rng, meta.get("background", "plain"))
    fmt = format_word(meta)
    image = rng.choice(("image", "picture", "scene"))
    opener = f"{article(fmt)} {image}" if fmt else f"an {image}"
    scene = rng.choice((
        f"{opener} of {count} on {bg}: {things}.",
        f"{things}, on {bg}.",
        f"{count} on {bg}: {things}.",
        f"on {bg} there {'is' if n == 1 else 'are'} {count}: {things}.",
        f"{opener} showing {things} against {bg}.",
    ))
    scene = scene[0].upper() + scene[1:]
    style = style_sentence(rng, meta)
    return f"{scene} {style}" if rng.random() < 0.7 else f"{style} {scene}"


# ---------------------------------------------------------------- metadata-short

def short_place(rng: random.Random, position: str) -> str:
    """The bare words a user types for a cell: "top left" / "upper left", "center" / "middle", "top"."""
    parts = position.split()
    if position == "center":
        return rng.choice(("center", "middle"))
    if len(parts) == 2:
        return rng.choice((position, f"{UPPER[parts[0]]} {parts[1]}"))
    return position


def short_where(rng: random.Random, position: str) -> str:
    """The cell with its preposition: "in the top left", "at the top", "on the left", "in the middle"."""
    if position in UPPER:
        return f"at the {position}"
    if position in ("left", "right"):
        return f"on the {position}"
    return f"{rng.choice(('in', 'at')) if ' ' in position else 'in'} the {short_place(rng, position)}"


def short_thing(rng: random.Random, obj: dict) -> str:
    """"red circle", or with its size about a third of the time: "big red circle"."""
    size = f"{rng.choice(SIZE_WORDS[obj['size']])} " if rng.random() < 0.35 else ""
    return f"{size}{obj['color']} {obj['shape']}"


SHORT_FORMS = ("{a_thing} {where}", "{thing} {where}", "{thing}, {place}", "{place}: {thing}")
"""One form per caption, as one user writes all of a prompt alike; the punctuated forms are joined by ";"."""


def describe_short(meta: dict, rng: random.Random) -> str:
    """A short caption as a user writes it: a few words per object, no background or style sentence."""
    objects = list(meta["objects"])
    rng.shuffle(objects)
    form = rng.choice(SHORT_FORMS)
    items = []
    for o in objects:
        thing = short_thing(rng, o)
        items.append(form.format(thing=thing, a_thing=article(thing), where=short_where(rng, o["position"]),
                                 place=short_place(rng, o["position"])))
    if any(c in form for c in ",:") or len(items) == 1:
        return "; ".join(items)
    return ", ".join(items[:-1]) + rng.choice((" and ", ", ")) + items[-1]


def check_metadata(meta) -> None:
    """Raise ValueError naming what makes a sample's metadata unusable for a caption."""
    if meta is None:
        raise ValueError("no usable metadata: the sample has no readable .json")
    objects = meta.get("objects") if isinstance(meta, dict) else None
    if not objects or not isinstance(objects, list):
        raise ValueError("no usable metadata: .json has no objects")
    for o in objects:
        missing = [k for k in ("shape", "color", "size", "position") if not isinstance(o, dict) or k not in o]
        if missing:
            raise ValueError(f"no usable metadata: an object lacks {', '.join(missing)}")
        if o["size"] not in SIZE_WORDS:
            raise ValueError(f"no usable metadata: unknown size {o['size']!r}")


class MetadataCaptioner:
    """Captions from `sample["json"]`; the image is not looked at."""
    name = "metadata"
    model_id = f"shapes-metadata-v{TEMPLATES_VERSION}"
    prompt = None  # nothing is prompted
    write = staticmethod(describe)

    def __init__(self, config: CaptionerConfig | None = None):
        self.seed = (config or CaptionerConfig(self.name)).seed

    def caption(self, samples: list[dict], seed: int | None = None) -> list[str]:
        """A caption per sample; `seed` (a retry's) replaces the configured one. Raises ValueError
        when a sample's metadata is unusable (the job then records just that sample as failed)."""
        for s in samples:
            check_metadata(s.get("json"))
        seed = self.seed if seed is None else seed
        return [self.write(s["json"], random.Random(stable_seed(seed, s["__key__"]))) for s in samples]


class ShortCaptioner(MetadataCaptioner):
    """`metadata-short`: user-style captions, beside the dense ones under their own name."""
    name = "metadata-short"
    model_id = f"shapes-metadata-short-v{SHORT_VERSION}"
    write = staticmethod(describe_short)
