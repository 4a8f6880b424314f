"""The demo's Perfusion step: teach the final model an object it cannot draw from any prompt, from six images,
then judge it on placements the images never showed.

The concept is an olive circle: olive is no color of the shapes world's palette, so no prompt of the base model
draws it. Its word is "zorb", locked to the super-category "circle". Its six training images sit in three of the
nine cells; the report's prompts place it in the other six.
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .pipeline import BACKGROUND_LEVELS, CFG_SCALE, FINAL_SIDE, SAMPLE_STEPS
from .steps import step

NAME, SUPER = "zorb", "circle"
COLOR = (120, 125, 0)  # olive: at least 100 (RGB distance) from every palette color and far from the gray backgrounds
TRAIN_POSITIONS = ("top left", "center", "bottom right")
NEW_POSITIONS = ("top", "top right", "left", "right", "bottom left", "bottom")
IMAGES, SEEDS = 6, 4
STEPS, BATCH = 400, 16
# Measured on the demo's model (docs/personalize.md): unmasked, logit-normal timesteps (as its stages train), and
# learning rates 3.3x Perfusion's. The paper's masked loss lets the value grow into the background.
SETTINGS = {"mask_floor": 1.0, "timesteps": "logit_normal", "lr_value": 0.1, "lr_embedding": 0.02}
_NOCOLOR = "xcolor"  # a stand-in color word, removed from the captioner's phrasing


def caption(position: str, word: str, seed: int) -> str:
    """A dense caption in the captioner's phrasing, of a large `word` with no color word (the concept's look is
    its own)."""
    from data_pipelines.relabel.metadata import describe

    meta = {"objects": [{"shape": word, "color": _NOCOLOR, "size": "large", "position": position}],
            "background": "plain", "quality": "clean", "aesthetic": 1.0, "width": FINAL_SIDE, "height": FINAL_SIDE}
    text = describe(meta, random.Random(seed)).replace(f" in {_NOCOLOR}", "").replace(f" {_NOCOLOR}", "")
    assert _NOCOLOR not in text, text
    return text


def render(position: str, rng: np.random.Generator) -> tuple[Image.Image, Image.Image]:
    """The concept in a cell, drawn as the shapes world draws a large circle (jitter, gray level, anti-aliasing);
    returns the image and its mask."""
    from data_pipelines.shapes import SIZE_FRACTION, cell_box

    s, side = 4, FINAL_SIDE
    x0, y0, x1, y1 = cell_box(side, side, position)
    r = SIZE_FRACTION["large"] * (x1 - x0) / 2
    slack = max(0.0, (x1 - x0) / 2 - r - max(1.5, 0.06 * (x1 - x0)))
    cx, cy = (x0 + x1) / 2 + rng.uniform(-slack, slack), (y0 + y1) / 2 + rng.uniform(-slack, slack)
    mask = Image.new("L", (side * s, side * s), 0)
    ImageDraw.Draw(mask).ellipse([(cx - r) * s, (cy - r) * s, (cx + r) * s - 1, (cy + r) * s - 1], fill=255)
    mask = mask.resize((side, side), Image.BOX)
    lo, hi = BACKGROUND_LEVELS
    bg = lo + (hi - lo) * rng.uniform() + rng.uniform(-12, 12, size=3)
    alpha = np.asarray(mask, dtype=np.float32)[..., None] / 255
    img = bg * (1 - alpha) + np.array(COLOR, dtype=np.float32) * alpha
    return Image.fromarray(np.clip(img + 0.5, 0, 255).astype(np.uint8)), mask


def write_concept_images(folder: Path, seed: int) -> Path:
    """folder/{i}.png, masks/{i}.png and {i}.txt: the concept's training set."""
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 23])
    for i in range(IMAGES):
        position = TRAIN_POSITIONS[i % len(TRAIN_POSITIONS)]
        image, mask = render(position, rng)
        image.save(folder / f"{i}.png")
        mask.save(folder / "masks" / f"{i}.png")
        (folder / f"{i}.txt").write_text(caption(position, NAME, seed * 100 + i))
    return folder


def looks_like_concept(image, found: dict) -> bool:
    """The concept-fidelity classifier. Each of the object's colored pixels is named by its nearest color among the
    palette (the colors renders of the super-category come in) and olive; the object is the concept when olive is
    the most frequent name. A patchwork of palette colors whose mean happens to be olive is not the concept."""
    from data_pipelines.shapes import PALETTE
    from pixart.eval.judge import CHROMA

    x0, y0, x1, y1 = found["bbox"]
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)[y0:y1, x0:x1].reshape(-1, 3)
    rgb = rgb[rgb.max(1) - rgb.min(1) > CHROMA]
    names = np.array(list(PALETTE.values()) + [COLOR], dtype=np.float32)
    nearest = ((rgb[:, None] - names[None]) ** 2).sum(-1).argmin(1)
    counts = np.bincount(nearest, minlength=len(names))
    return bool(len(rgb)) and int(counts.argmax()) == len(names) - 1


def judge_concept(images: list, positions: list[str]) -> dict:
    """Fidelity: the image holds one object, and it looks like the concept. Position: that one object is in the
    prompted cell (the strict rule of the held-out scores)."""
    from pixart.eval.judge import detect

    fidelity, position = [], []
    for image, where in zip(images, positions, strict=True):
        found = detect(image)
        fidelity.append(len(found) == 1 and looks_like_concept(image, found[0]))
        position.append(len(found) == 1 and found[0]["position"] == where)
    return {"fidelity": float(np.mean(fidelity)), "position": float(np.mean(position)), "images": len(images)}


def personalize(out: Path, ckpt: Path, seed: int, scale: float, **settings) -> dict:
    """Train the concept into DIR/concepts/zorb.safetensors (kept when a previous run finished it; resumed when one
    was interrupted); returns the training facts (DIR/runs/perfusion/facts.json)."""
    import json

    from pixart.atomic import atomic_write
    from pixart.checkpoint import read_json
    from pixart.personalize.trainer import ConceptTrainer, PersonalizeConfig

    facts_file = out / "runs" / "perfusion" / "facts.json"
    concept_file = out / "concepts" / f"{NAME}.safetensors"
    if concept_file.is_file() and facts_file.is_file():
        facts = read_json(facts_file)
        if facts.get("base_checkpoint") != str(ckpt):  # the folder was moved or copied: the model it now holds
            facts["base_checkpoint"] = str(ckpt)
            atomic_write(facts_file, json.dumps(facts))
        return facts
    data = write_concept_images(out / "data" / "concept", seed)
    dense = out / "data" / "captions72" / "*.metadata.jsonl"  # the dense captioner's, not the short ones
    cfg = PersonalizeConfig(str(ckpt), str(data), NAME, SUPER, str(concept_file),
                            captions=str(dense), steps=max(10, int(STEPS * scale)),
                            batch=BATCH, seed=seed, run_dir=str(facts_file.parent), **{**SETTINGS, **settings})
    concept_file.parent.mkdir(parents=True, exist_ok=True)
    with step(f"personalize: teach it a '{NAME}' (an olive {SUPER}) from {IMAGES} images"):
        _, facts = ConceptTrainer(cfg).train()
    facts["base_checkpoint"] = str(ckpt)
    atomic_write(facts_file, json.dumps(facts))
    return facts


class ConceptBench:
    """The final model, its text encoder (knowing the concept's word) and the concept, to draw prompts with the
    concept applied (at any beta and tau) or not, with the demo's sampler and seeds."""

    def __init__(self, out: Path, ckpt: Path, seed: int, seeds: int = SEEDS):
        from pixart.checkpoint import load_model, load_prediction_type
        from pixart.encoders.text import TextEncoder, TextEncoderConfig
        from pixart.personalize.apply import concept_c_inv
        from pixart.personalize.concept import Concept
        from pixart.personalize.tokens import add_concept_token, set_embedding

        from .pipeline import MAX_TOKENS, pixel_autoencoder

        self.concept = Concept.load(out / "concepts" / f"{NAME}.safetensors")
        self.model = load_model(ckpt, ema=True).eval()
        self.prediction = load_prediction_type(ckpt)
        self.c_inv = concept_c_inv(ckpt, self.model)
        self.text = TextEncoder(TextEncoderConfig(str(out / "parts" / "t5"), max_length=MAX_TOKENS, dtype="fp32"))
        set_embedding(self.text.model, add_concept_token(self.text.tokenizer, self.text.model, NAME),
                      self.concept.embedding)
        self.decoder = pixel_autoencoder()
        self.seed = seed
        self.positions = [p for p in NEW_POSITIONS for _ in range(seeds)]
        self.concept_prompts = [caption(p, NAME, 1000 + i) for i, p in enumerate(self.positions)]
        self.super_prompts = [caption(p, SUPER, 1000 + i) for i, p in enumerate(self.positions)]

    def draw(self, prompts: list[str], concept: bool, beta: float | None = None, tau: float | None = None) -> list:
        import torch

        from pixart.personalize.apply import apply_concepts, remove_concepts
        from pixart.train.validation import sample_prompts

        if concept:
            apply_concepts(self.model, [self.concept], self.c_inv, beta=beta, tau=tau, check=False)
        try:
            with torch.no_grad():
                side = FINAL_SIDE // self.decoder.downsample_factor
                return sample_prompts(self.model, prompts, self.text, self.decoder, (side, side),
                                      prediction_type=self.prediction, steps=SAMPLE_STEPS, cfg=CFG_SCALE,
                                      sampler="ddim", seed=self.seed + 5)
        finally:
            remove_concepts(self.model)

    def operating_point(self, beta: float, tau: float) -> dict:
        """Fidelity and text alignment (position on new placements) of the concept at this gate."""
        return judge_concept(self.draw(self.concept_prompts, True, beta, tau), self.positions)


def evaluate_concept(out: Path, ckpt: Path, seed: int, judge, facts: dict, scale: float = 1.0) -> dict:
    """The `perfusion` section of the report, and DIR/report/perfusion.png (training images, then new prompts)."""
    from data_pipelines.shapes import COLORS
    from pixart.eval.heldout import prompt_for, score_heldout
    from pixart.train.validation import save_grid

    bench = ConceptBench(out, ckpt, seed, SEEDS if scale >= 1 else 1)
    positions = bench.positions
    rng = random.Random(seed)
    colored = [{"shape": SUPER, "color": rng.choice(COLORS), "position": p, "size": "large"} for p in positions]
    colored_prompts = [prompt_for(s, FINAL_SIDE, FINAL_SIDE, i) for i, s in enumerate(colored)]
    with step(f"perfusion: {len(positions)} prompts per set, with and without the concept"):
        with_concept = bench.draw(bench.concept_prompts, True)
        concept_scores = judge_concept(with_concept, positions)
        new_word = judge_concept(bench.draw(bench.concept_prompts, False), positions)  # the word alone: no concept
        super_without = judge_concept(bench.draw(bench.super_prompts, False), positions)
        super_with = judge_concept(bench.draw(bench.super_prompts, True), positions)
        colored_without = score_heldout(judge, bench.draw(colored_prompts, False), colored)
        colored_with = score_heldout(judge, bench.draw(colored_prompts, True), colored)
    train_images = [Image.open(p).convert("RGB") for p in sorted((out / "data" / "concept").glob("*.png"))]
    save_grid(train_images + with_concept[::2][:12], 6, out / "report" / "perfusion.png", scale=2)
    c = bench.concept
    return {
        "concept": {"name": NAME, "super": SUPER, "color": COLOR, "train_positions": TRAIN_POSITIONS,
                    "images": len(train_images)},
        "fidelity": concept_scores["fidelity"],
        "fidelity_base_super_word": super_without["fidelity"],
        "fidelity_base_new_word": new_word["fidelity"],
        "text_alignment": {"position": concept_scores["position"],
                           "base_super_word_position": super_without["position"],
                           "ratio": concept_scores["position"] / super_without["position"]
                           if super_without["position"] else None,
                           "prompts": len(positions), "positions": NEW_POSITIONS},
        "leakage": leakage(super_without, super_with, colored_without, colored_with),
        "bytes": facts["bytes"], "train_seconds": facts["train_seconds"], "steps": facts["steps"],
        "sampler": f"ddim {SAMPLE_STEPS} steps, CFG {CFG_SCALE}, beta {c.beta}, tau {c.tau}",
    }


def leakage(super_without: dict, super_with: dict, colored_without: dict, colored_with: dict) -> dict:
    """How much loading the concept changes prompts that do not name it: the same prompts with the plain
    super-category word (its position, and how often the object turns olive), and colored super-category prompts
    (the judge's color, position and shape)."""
    changes = [abs(super_with[k] - super_without[k]) for k in ("fidelity", "position")]
    changes += [abs(colored_with[k] - colored_without[k]) for k in ("color", "position", "shape")]
    return {"super_word": {"without": {k: super_without[k] for k in ("fidelity", "position")},
                           "with": {k: super_with[k] for k in ("fidelity", "position")}},
            "colored_super_word": {"without": {k: colored_without[k] for k in ("color", "position", "shape")},
                                   "with": {k: colored_with[k] for k in ("color", "position", "shape")}},
            "max_change": max(changes)}
