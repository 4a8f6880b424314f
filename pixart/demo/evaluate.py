"""The demo's judgement: held-out prompts through the exported pipeline, scored, and the report folder."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from pixart.train.monitor import read_log

from .dmd import contention_warning, diversity_line, evaluate_student, matmul_gflops
from .drawer import Drawer
from .perfusion import evaluate_concept
from .pipeline import (
    CFG_SCALE,
    FINAL_MULTIPLE,
    FINAL_SIDE,
    HOLDOUT,
    PAIR_HOLDOUT,
    PHRASING_SPECS,
    SAMPLE_STEPS,
    TWO_OBJECT_PROMPTS,
)
from .steps import step


def machine_reference() -> dict:
    """What this CPU does per second, measured now: the demo's seconds are comparable only beside it
    (these machines differ by up to 2x between sessions, and bf16 is ~100x slower without AVX-512)."""
    import re

    import torch

    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    name = re.search(r"model name\s*:\s*(.+)", info)
    return {"fp32_matmul_gflops": matmul_gflops(seconds=1.0),
            "threads": torch.get_num_threads(), "avx512": "avx512f" in info,
            "processor": name.group(1).strip() if name else "unknown"}


def evaluate(out: Path, seed: int, scale: float = 1.0, concept: dict | None = None) -> dict:
    """Held-out prompts through the exported PixArtAlphaPipeline, scored by the judge (all of them;
    a smoke run with --scale < 1 draws an even spread of at least 9)."""
    from pixart.eval.heldout import heldout_specs, prompt_for, score_heldout, spread
    from pixart.eval.judge import Judge
    from pixart.train.validation import save_grid

    specs = heldout_specs(HOLDOUT)
    if scale < 1:
        specs = spread(specs, max(9, int(len(specs) * scale)))
    prompts = [prompt_for(s, FINAL_SIDE, FINAL_SIDE) for s in specs]
    teacher = Drawer(out / "export", SAMPLE_STEPS, CFG_SCALE)
    with step(f"sample {len(prompts)} held-out prompts through PixArtAlphaPipeline"):
        images = teacher.images(prompts, seed)
        save_grid(images, 9, out / "report" / "heldout.png", scale=2)
    with step("judge the held-out samples"):
        judge = Judge.load_or_train()
        own = judge.self_accuracy(FINAL_SIDE, side_multiple=FINAL_MULTIPLE)
    metrics = {"heldout": score_heldout(judge, images, specs),
               "judge_self_accuracy": {k: own[k] for k in ("color", "position", "shape")},
               "resolution": FINAL_SIDE, "sampler": f"pipeline scheduler, {SAMPLE_STEPS} steps, CFG {CFG_SCALE}"}
    metrics["heldout_phrasings"] = evaluate_phrasings(out, teacher, judge, seed, scale)
    metrics["two_objects"] = evaluate_two_objects(out, teacher, judge, seed, scale)
    if (out / "export-dmd").is_dir():
        metrics["dmd"] = evaluate_student(out, teacher, seed, judge, metrics["heldout"], scale)
    if concept is not None:
        metrics["perfusion"] = evaluate_concept(out, Path(concept["base_checkpoint"]), seed, judge, concept, scale)
    return metrics


def evaluate_phrasings(out: Path, teacher: Drawer, judge, seed: int, scale: float) -> dict:
    """The held-out triples worded as users write them, in kinds no training caption uses
    (`pixart.eval.phrasings`): color, position and shape per kind, and their mean over kinds."""
    from pixart.eval.heldout import heldout_specs, score_heldout, spread
    from pixart.eval.phrasings import KINDS, phrasings
    from pixart.train.validation import save_grid

    specs = spread(heldout_specs(HOLDOUT), PHRASING_SPECS if scale >= 1 else 3)
    prompts = [phrasings(s, kind, seed) for kind in KINDS for s in specs]
    with step(f"sample {len(specs)} held-out triples in {len(KINDS)} user phrasings ({len(prompts)} prompts)"):
        images = teacher.images(prompts, seed)
        save_grid(images, len(specs), out / "report" / "heldout_phrasings.png", scale=2)
    n = len(specs)
    kinds = {kind: {k: v for k, v in score_heldout(judge, images[i * n:(i + 1) * n], specs).items()
                    if k in ("color", "position", "shape")}
             for i, kind in enumerate(KINDS)}
    mean = {k: sum(r[k] for r in kinds.values()) / len(kinds) for k in ("color", "position", "shape")}
    return {"mean": mean, "kinds": kinds, "examples": {kind: phrasings(specs[0], kind, seed) for kind in KINDS},
            "prompts": len(prompts)}


def evaluate_two_objects(out: Path, teacher: Drawer, judge, seed: int, scale: float) -> dict:
    """Two objects whose pairing training never showed (`pixart.eval.two_objects`), in the captioner's phrasing:
    both right, attribute swaps, missing objects."""
    from pixart.eval.heldout import spread
    from pixart.eval.two_objects import pair_prompt, score_two_objects, two_object_specs
    from pixart.train.validation import save_grid

    pairs = spread(two_object_specs(PAIR_HOLDOUT, HOLDOUT), TWO_OBJECT_PROMPTS if scale >= 1 else 9)
    prompts = [pair_prompt(p, FINAL_SIDE, FINAL_SIDE, seed) for p in pairs]
    with step(f"sample {len(prompts)} held-out two-object prompts"):
        images = teacher.images(prompts, seed)
        save_grid(images, 9, out / "report" / "two_objects.png", scale=2)
    return {**score_two_objects(judge, images, pairs), "example": prompts[0]}


def training_rates(out: Path, matmul_gflops: float) -> dict:
    """Per stage: wall seconds, mean samples/s and, for the diffusion stages, the model's FLOPs per second and
    their share of this machine's fp32 matmul rate (the `mfu` the runs log against it)."""
    rates = {}
    for stage in ("stage1", "stage2", "stage3", "dmd"):
        path = out / "runs" / stage / "metrics.jsonl"
        if not path.is_file():
            continue
        rows = read_log(path)[1:]  # not the warm-up
        if not rows:
            continue
        rates[stage] = {"samples_per_s": round(sum(r["samples_per_s"] for r in rows) / len(rows), 1)}
        if all("mfu" in r for r in rows):
            mfu = sum(r["mfu"] for r in rows) / len(rows)
            rates[stage].update(of_matmul_peak=round(mfu, 3), model_gflops=round(mfu * matmul_gflops, 1))
    return rates


def report(out: Path, outputs: dict, metrics: dict) -> None:
    """DIR/report: metrics.json, the held-out grid, each stage's last validation grid and the loss curves."""
    from pixart.atomic import atomic_write
    from pixart.train.monitor import save_loss_curve

    rep = out / "report"
    rep.mkdir(parents=True, exist_ok=True)
    runs = {}
    for run, name in (("dmd", "dmd_loss.png"), ("perfusion", "perfusion_loss.png")):  # losses of their own
        if (out / "runs" / run / "loss.png").is_file():
            shutil.copy(out / "runs" / run / "loss.png", rep / name)
    for stage in ("stage1", "stage2", "stage3"):
        grids = sorted((out / "runs" / stage / "samples").glob("step-*.png"))
        if grids:
            shutil.copy(grids[-1], rep / f"{stage}.png")
        rows = out / "runs" / stage / "metrics.jsonl"
        if rows.is_file():
            runs[stage] = read_log(rows)
    save_loss_curve(runs, rep / "loss.png")
    metrics["training"] = training_rates(out, metrics["machine"]["fp32_matmul_gflops"])
    metrics["checkpoints"] = outputs
    atomic_write(rep / "metrics.json", json.dumps(metrics, indent=2))
    for stage, r in metrics["training"].items():
        share = f", {r['model_gflops']:.0f} model GFLOP/s = {r['of_matmul_peak']:.0%} of the matmul peak" \
            if "model_gflops" in r else ""
        print(f"{stage}: {r['samples_per_s']:.0f} samples/s{share}")
    h = metrics["heldout"]
    again = " (this run's alone: it resumed a folder an earlier run started)" if metrics["resumed"] else ""
    print(f"held-out ({h['prompts']} prompts never seen in training): color {h['color']:.1%}, "
          f"position {h['position']:.1%}, shape {h['shape']:.1%}, background noise {h['background']:.1f} of 255 "
          f"(a plain render: 0); judge's own accuracy "
          f"{metrics['judge_self_accuracy']}; {metrics['seconds']:.0f} s{again} on a CPU doing "
          f"{metrics['machine']['fp32_matmul_gflops']:.0f} fp32 GFLOP/s ("
          + ", ".join(f"{name} {s:.0f} s" for name, s in metrics["phases"].items()) + ")")
    ph, two = metrics["heldout_phrasings"]["mean"], metrics["two_objects"]
    print(f"held-out triples in user phrasings ({len(metrics['heldout_phrasings']['kinds'])} kinds): color "
          f"{ph['color']:.1%}, position {ph['position']:.1%}; two objects never paired in training: both right "
          f"{two['both_right']:.1%}, attribute swaps {two['swapped']:.1%}, missing {two['missing']:.1%}")
    if "dmd" in metrics:
        d = metrics["dmd"]
        lat = d["latency"]
        print(f"one-step student (DMD): color {d['heldout']['color']:.1%}, position {d['heldout']['position']:.1%}, "
              f"shape {d['heldout']['shape']:.1%}; denoising {lat['speedup_denoise_batch1']:.0f}x faster than the "
              f"teacher at batch 1 ({lat['speedup_end_to_end_batch1']:.1f}x end to end); "
              f"{diversity_line(d['diversity'])}")
        warning = contention_warning(metrics["machine"]["fp32_matmul_gflops"], lat["fp32_matmul_gflops"])
        if warning:
            print(warning)
    if "perfusion" in metrics:
        p = metrics["perfusion"]
        print(f"concept '{p['concept']['name']}' (Perfusion, {p['bytes']:,} bytes, trained in "
              f"{p['train_seconds']:.0f} s): "
              f"fidelity {p['fidelity']:.0%} (the base model: {p['fidelity_base_super_word']:.0%}), position on new "
              f"placements {p['text_alignment']['position']:.0%} (the base model with '{p['concept']['super']}': "
              f"{p['text_alignment']['base_super_word_position']:.0%}), leakage {p['leakage']['max_change']:.2f}")
    print(f"report: {rep}/metrics.json, heldout.png, heldout_phrasings.png, two_objects.png, dmd.png, perfusion.png, "
          f"stage1-3.png, loss.png, dmd_loss.png, "
          f"perfusion_loss.png; exports: {out / 'export'}, {out / 'export-dmd'}; concept: {out / 'concepts'}")
