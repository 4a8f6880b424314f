"""The whole mission at toy scale on a CPU, in minutes (docs/demo.md has the times on our machines).

 1. makes the shapes world (one object per image; 1 in 8 shape-color-position triples held out);
 2. relabels it with dense captions and short, user-style ones (the relabeling job, `metadata` and
    `metadata-short` captioners);
 3. scores aesthetics and extracts features: a tiny T5 (real T5 classes, seeded, with a
    `tokenizers` tokenizer) and a pixel-space autoencoder;
 4-7. launches configs/demo/recipe.yaml: stage 1 class-conditional DiT -> reparameterize ->
    stage 2 alignment -> stage 3 at 72 px with aspect buckets on the high-aesthetic sixth (clean, plain), then
 8. distills stage 3 into a one-step student (DMD, `pixart distill` as a recipe step);
 9. exports both to diffusers (DIR/export and DIR/export-dmd, PixArtAlphaPipeline folders without VAE);
10. personalizes stage 3 with a concept it cannot draw (Perfusion, `pixart personalize`): DIR/concepts/zorb.safetensors;
11. samples the held-out prompts through those pipelines, the teacher at 20 steps and the student at one, and
    through the teacher the held-out triples in user phrasings and held-out pairs of two objects;
12. scores them with the judge, times both, measures their diversity, judges the concept: DIR/report/metrics.json.

Rerunning resumes: finished steps are kept, an interrupted stage resumes from its checkpoint. A folder keeps the
--seed and --scale of its first run (DIR/demo.json), and one demo at a time writes it.
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from pixart.errors import PixArtError

from .steps import step

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "demo"
HOLDOUT = 8  # 1 in 8 (shape, color, position) triples never drawn in training
# Scenes of two objects (binding colors and shapes to places) with this probability, 126 of the 1008 pairs of two
# colors never drawn together: off, as a pretrained T5 is, until they beat the one-object recipe everywhere
# (docs/experiments.md, 2026-12-04: 0.3 gave two held-out objects both right 0.11-0.14 but cost the concept and the
# student). The held-out pairs are prompted either way.
TWO_OBJECT_FRACTION, PAIR_HOLDOUT = 0.0, 8
CAPTIONERS = ("metadata", "metadata-short")  # dense captions, and short ones as users write (stages 2-3 mix them)
PHRASING_SPECS, TWO_OBJECT_PROMPTS = 18, 36  # held-out triples worded each user way; held-out pairs
SQUARE_COUNT, MULTI_COUNT = 8000, 3000  # images of the 32 px square world and the 72 px multi-aspect world
STAGE3_MIN_SCORE = 0.99  # configs/demo/stage3.yaml's and dmd.yaml's data.min_score: the scenes they train on
# Captions are at most 53 tiny-T5 tokens. The null caption (every token valid) has the model's caption length, and
# a batch with one dropped caption pads every caption to it: at 200 tokens for 16 image tokens, the caption path
# was two thirds of the model's FLOPs; at 64, a third.
T5_WIDTH, MAX_TOKENS = 32, 64
T5_VOCAB = 4096  # word pieces: a user's everyday words are whole, as in T5's 32k (docs/experiments.md)
T5_PRETRAIN_STEPS = 0  # > 0: span corruption, batch 64 of 1,500 documents (a scene's dense and short captions;
# 600: 38 s on one core). It lost user phrasings and the concept (docs/experiments.md), so the demo's T5 stays random
# The pixel autoencoder: a latent cell is an 8 x 8 px block, of which the 4 x 4 lowest DCT frequencies per color are
# kept (48 channels; the judge still names every shape of round-tripped images), as a VAE keeps a token narrower than
# the model. As raw pixels (2 x 2 px cells, scale 6) a token of 8 x 8 px was 192 numbers for a model 128 wide, which
# could not hold, so not remove, its noise: grainy backgrounds (docs/experiments.md, 2026-12-04). The scaling factor
# (the role of SD's 0.18215) gives unit variance: the kept coefficients' std is ~0.34. configs/demo/stage1.yaml and
# stage3.yaml give the model the matching latent sizes (32 px / 8 = 4, 72 px / 8 = 9) and 48 input channels.
PIXEL_FACTOR, PIXEL_LOWPASS, PIXEL_SCALE = 8, 4, 3.0
# CFG 1.5 was chosen on 162 prompts of *seen* triples (`python tools/cfg_sweep.py`), never on the held-out
# ones: stronger guidance breaks this small model's objects into several blobs (strict position on the seen
# prompts: 0.88 at 1.5, 0.70 at 4), weaker loses color.
SAMPLE_STEPS, CFG_SCALE = 20, 1.5
# Mid-gray backgrounds: over the full 20-235 range, background brightness was 90 % of the pixels' variance,
# so at the noise levels where the layout is decided the text's share of the loss (color and position)
# was lost in it, and position was never learned (docs/experiments.md).
BACKGROUND_LEVELS = (104.0, 152.0)
# px: stage 3's resolution, at which the held-out prompts are drawn and judged. Its world's sides are multiples of
# 24, so each cell of the 3x3 grid is whole 8 px tokens and an object sits on the token grid the same way wherever
# it is: on a square world, 500 steps of stage 3 learned shape 0.44 at 64 px (cells of 21.3 px) and 0.69 at 72 px
# (docs/experiments.md, 2026-12-07).
FINAL_SIDE, FINAL_MULTIPLE = 72, 24
RECORD = "demo.json"  # DIR's --seed and --scale
PHASES = ("data", "training", "personalize", "export", "evaluate")  # the report's `phases`: seconds of each


def run_demo(out: str | Path, seed: int = 0, scale: float = 1.0) -> dict:
    """Run every step into `out` (resuming what a previous run finished); returns the report's metrics."""
    from pixart.export.diffusers import PipelineParts, export_checkpoint
    from pixart.train.checkpoints import release_folder
    from pixart.train.recipe import launch

    from .evaluate import evaluate, machine_reference, report
    from .perfusion import personalize

    if not 0 < scale <= 10:
        raise PixArtError(f"--scale must be in (0, 10], got {scale}")
    if not str(out).strip():
        raise PixArtError("--out is empty; name the demo's folder, e.g. --out demo_out")
    out = Path(out).resolve()
    if out == Path.cwd() or out in Path.cwd().parents:  # its configs/, data/, runs/ ... among the user's files
        raise PixArtError(f"--out {out} holds the current directory; name a folder of its own, e.g. --out demo_out")
    lock = hold(out)
    try:
        resumed = claim(out, seed, scale)
        machine = machine_reference()
        marks = [time.time()]  # where the time goes: one mark after each phase
        t5 = make_data(out, seed, scale)
        marks.append(time.time())
        recipe = write_configs(out, seed, scale, machine["fp32_matmul_gflops"] / 1000)
        with step("staged training: stage 1 DiT -> reparameterize -> stage 2 -> stage 3 -> DMD one-step student"):
            outputs = launch(recipe, out / "runs")
        marks.append(time.time())
        concept = personalize(out, outputs["stage3"], seed, scale)
        marks.append(time.time())
        with step("export stage 3 (with the concept's covariance) and the one-step student to diffusers"):
            parts = PipelineParts(str(t5), str(t5), None)
            export_checkpoint(outputs["stage3"], out / "export", parts, overwrite=True)
            export_checkpoint(outputs["dmd"], out / "export-dmd", parts, overwrite=True)
        marks.append(time.time())
        metrics = evaluate(out, seed, scale, concept)
        marks.append(time.time())
        metrics["seconds"] = round(marks[-1] - marks[0], 1)
        metrics["phases"] = {name: round(marks[i + 1] - marks[i], 1) for i, name in enumerate(PHASES)}
        metrics["resumed"] = resumed
        metrics["machine"] = machine
        report(out, outputs, metrics)
    finally:
        release_folder(lock)
    return metrics


def hold(out: Path) -> int:
    """The demo's hold on its folder for the whole run (the launch's own lock covers only the training): a second
    demo into the same folder stops at once, in one line. A kill releases it. Returns the file to close."""
    from pixart.train.recipe import LOCK_FILE, lock_run

    try:
        return lock_run(out)
    except PixArtError:
        holder = (out / LOCK_FILE).read_text(errors="replace").strip() or "its process unknown"
        raise PixArtError(f"another demo is running in {out} ({holder}); wait for it or choose another --out") \
            from None


def claim(out: Path, seed: int, scale: float) -> bool:
    """DIR/demo.json records the --seed and --scale a folder is made with: a rerun with others would mix two
    demos, so it stops here, before anything is rewritten. Returns whether an earlier run had started the folder
    (its time then is not this run's)."""
    import json

    from pixart.atomic import atomic_write
    from pixart.checkpoint import read_json

    record = out / RECORD
    made = read_json(record) if record.is_file() else {}
    for flag, value in (("--seed", seed), ("--scale", scale)):
        was = made.get(flag[2:], value)
        if was != value:
            raise PixArtError(f"{flag} {value}: {out} holds a demo made with {flag} {was}; rerun with {flag} {was} "
                              "to resume it, or choose another --out")
    resumed = record.is_file() or (out / "data").exists()  # or a folder from before the record
    if not record.is_file():
        atomic_write(record, json.dumps({"seed": seed, "scale": scale}))
    return resumed


def make_data(out: Path, seed: int, scale: float) -> Path:
    """The two shapes worlds, their dense captions, aesthetic scores and features; returns the tiny T5's folder."""
    from tqdm import tqdm

    from data_pipelines.aesthetic import ShapesScorer, score_shards
    from data_pipelines.features import extract_features
    from data_pipelines.shapes import write_shapes
    from pixart.data.manifest import MANIFEST, Manifest
    from pixart.data.shards import resolve_shards

    d = out / "data"
    square, multi = max(64, int(SQUARE_COUNT * scale)), max(64, int(MULTI_COUNT * scale))
    world = world_settings()
    with step(f"shapes world: {square} clean square images at 32 px, {multi} multi-aspect at {FINAL_SIDE} px"):
        with tqdm(total=square + multi, unit="img", desc="shapes") as bar:
            write_shapes(d / "shapes32", square, seed=seed, workers=2, progress=bar.update, **SQUARE_WORLD, **world)
            write_shapes(d / "shapes72", multi, seed=seed + 1, workers=2, progress=bar.update, **MULTI_WORLD,
                         **world)
    with step("relabel with dense captions and short, user-style ones (metadata, metadata-short captioners)"):
        for side in ("32", str(FINAL_SIDE)):
            relabel_world(d / f"shapes{side}", d / f"captions{side}", seed)
    with step(f"aesthetic scores of the {FINAL_SIDE} px world"):
        s = score_shards(resolve_shards([str(d / "shapes72")]), d / "scores72", ShapesScorer(), STAGE3_MIN_SCORE)
        print(f"   stage 3 keeps {s.kept} of {s.samples} ({s.kept_fraction:.1%}): clean scenes on plain backgrounds")
    pretrained = ", span-corruption pretrained on captions" if T5_PRETRAIN_STEPS else ""
    with step(f"tiny T5 (seeded{pretrained}) and features: pixel autoencoder, dense, short and alt-text captions"):
        t5 = tiny_text_encoder(out / "parts" / "t5", seed, scale)
        for shards, features, sizing in (("shapes32", "sq32", SQUARE_FEATURES), ("shapes72", "ms72", FINAL_FEATURES)):
            cfg = feature_config(t5, d / f"captions{shards[-2:]}", **sizing)
            cache = out / "features" / features
            moved = (cache / MANIFEST).is_file() and Manifest.load(cache).text_encoder != str(t5.resolve())
            if moved:  # the cache names the T5 where the folder was: encoded again, not refused
                print(f"   {cache} was encoded with the T5 of a folder this one was moved or copied from: "
                      "encoding again")
            ex = extract_features([str(d / shards)], cache, cfg, overwrite=moved)
            print(f"   {ex.describe(cache)}")
    return t5


# The 32 px world stage 2 trains on (clean squares) and the 72 px one of stage 3 (aspect ratios, half damaged), as
# `write_shapes` settings besides `world_settings`; the square world's features keep its alt-text too.
SQUARE_WORLD = {"resolution": 32, "shard_size": 1000, "aspects": ("1:1",), "backgrounds": ("plain",),
                "damaged_fraction": 0.0}
MULTI_WORLD = {"resolution": FINAL_SIDE, "side_multiple": FINAL_MULTIPLE, "shard_size": 500}
SQUARE_FEATURES = {"resolution": 32, "captions": (*CAPTIONERS, "txt")}
FINAL_FEATURES = {"buckets": f"{FINAL_SIDE}/{FINAL_MULTIPLE}", "captions": CAPTIONERS}


def world_settings(two_object_fraction: float | None = None) -> dict:
    """`write_shapes` settings both worlds share: one large object per scene on mid-gray, 1 in 8 triples held out;
    a share of the scenes two objects (`two_object_fraction`, else TWO_OBJECT_FRACTION), the held-out pairs never
    drawn."""
    fraction = TWO_OBJECT_FRACTION if two_object_fraction is None else two_object_fraction
    world = {"max_objects": 1, "sizes": ("large",), "holdout": HOLDOUT, "background_levels": BACKGROUND_LEVELS}
    if fraction:
        world.update(two_object_fraction=fraction, pair_holdout=PAIR_HOLDOUT)
    return world


def relabel_world(shards: Path, captions: Path, seed: int) -> None:
    """Dense captions and short, user-style ones of every image in `shards`, into `captions`."""
    from data_pipelines.relabel.captioner import CaptionerConfig
    from data_pipelines.relabel.job import RelabelConfig, relabel

    for captioner in CAPTIONERS:
        relabel([str(shards)], captions,
                RelabelConfig(CaptionerConfig(captioner, seed=seed), decode_workers=min(8, os.cpu_count() or 1)))


def feature_config(t5: Path, captions_dir: Path, **sizing):
    """How the demo encodes a world: the pixel autoencoder, and the tiny T5 on the captions in `captions_dir`."""
    import torch

    from data_pipelines.features import FeatureConfig

    return FeatureConfig(captions_dir=str(captions_dir), text_encoder=str(t5), pixel_autoencoder=PIXEL_FACTOR,
                         pixel_lowpass=PIXEL_LOWPASS, pixel_scale=PIXEL_SCALE, max_length=MAX_TOKENS, workers=2,
                         device="cuda" if torch.cuda.is_available() else "cpu", **sizing)


def pixel_autoencoder():
    """The demo's image "autoencoder", as its feature cache names it."""
    from pixart.encoders.pixel import PixelAutoencoder

    return PixelAutoencoder(PIXEL_FACTOR, scale_factor=PIXEL_SCALE, lowpass=PIXEL_LOWPASS)


def tiny_text_encoder(folder: Path, seed: int, scale: float) -> Path:
    """The demo's T5: a tiny T5 whose tokenizer keeps the captions' words whole; with T5_PRETRAIN_STEPS, also
    pretrained with T5's span corruption on documents of captions (kept when a previous run did the same)."""
    from pixart.checkpoint import read_json
    from pixart.encoders.pretrain import pretrain_t5
    from pixart.encoders.tiny import TINY_T5_SENTINELS, make_tiny_t5

    steps = max(10, int(T5_PRETRAIN_STEPS * scale)) if T5_PRETRAIN_STEPS else 0
    corpus = caption_corpus(seed, n=1500, documents=True) if steps else []
    record = folder / "pretrain.json"
    done = read_json(record) if record.is_file() else {}
    if (done.get("steps"), done.get("captions")) == (steps, len(corpus)):
        return folder
    record.unlink(missing_ok=True)  # make_tiny_t5 writes into the folder: a stale record would vouch for it
    # Sentinels only for pretraining: the random T5 stays the one the demo's numbers were measured with (its
    # random features decide a lot at this scale: the concept's fidelity ranged 0.46-0.92 over T5 draws).
    make_tiny_t5(folder, d_model=T5_WIDTH, seed=seed, corpus=caption_corpus(seed), vocab_size=T5_VOCAB,
                 sentinels=TINY_T5_SENTINELS if steps else 0)
    if steps:
        report = pretrain_t5(folder, corpus, steps, seed=seed)
        print(f"   {report.describe()}")
    return folder


def caption_corpus(seed: int, n: int = 300, documents: bool = False) -> list[str]:
    """Dense captions of random scenes (metadata only, nothing drawn): what the tiny tokenizer learns its pieces
    from, so color, shape and position words are whole tokens as in T5's vocabulary. With `documents`, each item
    is one scene's dense caption and its short one: what the tiny T5 is pretrained on. In this world a scene's
    colors, shapes and places are independent draws, so in a caption alone span corruption can predict only the
    grammar, and it learned to drop those words (docs/experiments.md). A second description of the same scene
    lets a masked word be read from the other wherever a chunk holds both, as real text's repetitions do (a
    document is about 60 tokens, a chunk 70, cut at random offsets)."""
    import random

    import numpy as np

    from data_pipelines.relabel.metadata import describe, describe_short
    from data_pipelines.shapes import ShapesConfig, sample_scene

    rng = np.random.default_rng([seed, 7])
    scenes = [sample_scene(rng, ShapesConfig()) for _ in range(n)]
    if documents:
        return [f"{describe(scene, random.Random(i))} {describe_short(scene, random.Random(i))}"
                for i, scene in enumerate(scenes)]
    return [describe(scene, random.Random(i)) for i, scene in enumerate(scenes)]


def write_configs(out: Path, seed: int, scale: float, peak_tflops: float | None = None) -> Path:
    """DIR/configs/<stage>.yaml: the shipped demo configs with DIR's paths, resolved (each reruns with
    `pixart train`), and the recipe that chains them. `peak_tflops`, this machine's measured matmul rate,
    makes the stages log their model FLOPs' share of it (`mfu`)."""
    import yaml

    from pixart.distill.config import DistillConfig
    from pixart.eval.heldout import heldout_specs, prompt_for, spread
    from pixart.train.config import TrainConfig

    folder = out / "configs"
    folder.mkdir(parents=True, exist_ok=True)
    prompts = [prompt_for(s, FINAL_SIDE, FINAL_SIDE) for s in spread(heldout_specs(HOLDOUT), 4)]
    inits = {"reparam": out / "runs" / "reparam" / "checkpoint"}
    for name, previous in (("stage1", None), ("stage2", "reparam"), ("stage3", "stage2"), ("dmd", "stage3")):
        cfg = (DistillConfig if name == "dmd" else TrainConfig).load(CONFIGS / f"{name}.yaml")
        text = cfg.resolved_yaml().replace("demo_out/", f"{out}/")
        data = yaml.safe_load(text)
        data["train"]["seed"] = seed
        if peak_tflops and name != "dmd":
            data["train"]["peak_tflops"] = round(peak_tflops, 4)
        train = data["train"]
        full = train["max_steps"]
        train["max_steps"] = steps = max(2, int(full * scale))
        if scale < 1:  # as often per run as at scale 1: a kill mid-stage resumes, and rates have rows past warm-up
            train["ckpt_every"] = max(1, train["ckpt_every"] * steps // full)
            train["log_every"] = max(1, min(train["log_every"], steps // 10))
        if scale < 0.1:  # smoke runs: batches small enough for a few dozen images per bucket
            data["data"]["batch_size"] = max(4, int(data["data"]["batch_size"] * scale * 10))
        if name != "stage1":
            data["validation"]["prompts"] = prompts
        if previous:  # what the recipe hands this step (the launch sets the same)
            data["teacher" if name == "dmd" else "model"]["init"] = str(inits[previous])
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
        inits[name] = out / "runs" / name / "checkpoints" / f"step-{data['train']['max_steps']:06d}"
    shutil.copy(CONFIGS / "recipe.yaml", folder / "recipe.yaml")
    return folder / "recipe.yaml"
