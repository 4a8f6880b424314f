"""The demo's one-step student, judged as the teacher is: held-out prompts through its exported pipeline, the
latency of both, and how much samples of one prompt vary across seeds (a collapsed student would not)."""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
import torch

from .drawer import Drawer
from .pipeline import BACKGROUND_LEVELS, FINAL_MULTIPLE, FINAL_SIDE, HOLDOUT
from .steps import step

DIVERSITY_PROMPTS, DIVERSITY_SEEDS = 12, 6
CONTENDED = 0.7  # the matmul rate while timing below this share of the demo's start: other work shared the CPU


def matmul_gflops(seconds: float = 0.5) -> float:
    """The CPU's fp32 matmul rate now: a time on these shared machines is comparable only beside it."""
    from pixart.train.bench import measured_peak_tflops

    return round(measured_peak_tflops(torch.device("cpu"), torch.float32, seconds) * 1000, 1)


def contention_warning(start_gflops: float, timing_gflops: float) -> str | None:
    """A line for the report when the CPU was slower while latencies were timed than at the demo's start."""
    if timing_gflops >= CONTENDED * start_gflops:
        return None
    return (f"warning: while the latencies were timed the CPU ran fp32 matmuls at {timing_gflops:.0f} GFLOP/s, "
            f"{start_gflops:.0f} at the start: other work shared it, so the latencies are inflated")


def over(a: float, b: float) -> float | None:
    """a / b, or None where b is 0 (a teacher that scored nothing, or whose samples never vary)."""
    return a / b if b else None


def diversity_line(diversity: dict) -> str:
    """The report's words for the student's diversity against the teacher's (no ratio to a teacher without any)."""
    ratio = diversity["student_over_teacher"]
    if ratio is None:
        return f"diversity {diversity['student']:.3f}, the teacher's 0: its samples do not vary with the seed"
    return f"diversity {ratio:.2f}x the teacher's"


def latency(drawer: Drawer, prompt: str, batch: int, repeats: int = 5) -> dict:
    """Median seconds per image at `batch`: the denoising alone (text features -> latents: the transformer's
    forwards and the scheduler's steps) and end to end (prompt -> image through the whole pipeline call)."""
    embeds, mask = drawer.encode([prompt] * batch)
    noise = torch.randn(batch, drawer.pipe.transformer.config.in_channels, drawer.latent, drawer.latent)
    denoise, whole = [], []
    for i in range(repeats + 1):  # the first call warms up
        start = time.perf_counter()
        drawer.denoise_alone(embeds, mask, noise)
        mid = time.perf_counter()
        drawer.images([prompt] * batch, seed=i, batch=batch)
        end = time.perf_counter()
        if i:
            denoise.append((mid - start) / batch)
            whole.append((end - mid) / batch)
    return {"denoise_s": statistics.median(denoise), "end_to_end_s": statistics.median(whole)}


def spread_per_prompt(images: list, seeds: int) -> float:
    """Mean over prompts of the per-pixel standard deviation across `seeds` images of one prompt (in [0, 1])."""
    arr = np.stack([np.asarray(im, dtype=np.float32) / 255 for im in images])
    groups = arr.reshape(-1, seeds, *arr.shape[1:])
    return float(groups.std(axis=1).mean())


def data_spread(specs: list[dict], seeds: int, seed: int) -> float:
    """The same figure for the training data: `seeds` fresh renders of each spec's object (size, jitter and
    background level drawn as the demo's world draws them, on its clean plain backgrounds)."""
    from data_pipelines.shapes import ShapesConfig, draw_scene, sample_scene

    cfg = ShapesConfig(resolution=FINAL_SIDE, side_multiple=FINAL_MULTIPLE, max_objects=1, sizes=("large",),
                       aspects=("1:1",), backgrounds=("plain",), damaged_fraction=0.0,
                       background_levels=BACKGROUND_LEVELS)
    rng = np.random.default_rng([seed, 11])
    images = []
    for spec in specs:
        drawn = 0
        while drawn < seeds:  # rejection: scenes whose one object is this spec
            scene = sample_scene(rng, cfg)
            o = scene["objects"][0]
            if (o["shape"], o["color"], o["position"]) == (spec["shape"], spec["color"], spec["position"]):
                images.append(draw_scene(scene, rng, cfg.supersample, cfg.background_levels))
                drawn += 1
    return spread_per_prompt(images, seeds)


def evaluate_student(out: Path, teacher: Drawer, seed: int, judge, heldout_teacher: dict, scale: float) -> dict:
    """The `dmd` section of the report, and DIR/report/dmd.png (teacher row over student row per prompt)."""
    from pixart.checkpoint import load_student
    from pixart.eval.heldout import heldout_specs, prompt_for, score_heldout, seen_specs, spread
    from pixart.train.validation import save_grid

    call = load_student(out / "export-dmd")["call"]
    student = Drawer(out / "export-dmd", call["num_inference_steps"], call["guidance_scale"], call["timesteps"])
    specs = heldout_specs(HOLDOUT)
    if scale < 1:
        specs = spread(specs, max(9, int(len(specs) * scale)))
    prompts = [prompt_for(s, FINAL_SIDE, FINAL_SIDE) for s in specs]
    with step(f"sample {len(prompts)} held-out prompts through the one-step student's pipeline"):
        images = student.images(prompts, seed)
        scores = score_heldout(judge, images, specs)
    with step("latency and diversity: teacher and student"):
        speed, before = {}, matmul_gflops()
        for batch in (1, 16):
            for name, drawer in (("teacher", teacher), ("student", student)):
                speed[f"{name}_batch{batch}"] = latency(drawer, prompts[0], batch, repeats=2 if batch > 1 else 5)
        for batch in (1, 16):
            for kind in ("denoise_s", "end_to_end_s"):
                t, s = speed[f"teacher_batch{batch}"][kind], speed[f"student_batch{batch}"][kind]
                speed[f"speedup_{kind[:-2]}_batch{batch}"] = t / s
        speed["fp32_matmul_gflops"] = min(before, matmul_gflops())  # the slower of just before and just after
        seen = seen_specs(HOLDOUT, DIVERSITY_PROMPTS, seed)
        repeated = [prompt_for(s, FINAL_SIDE, FINAL_SIDE) for s in seen for _ in range(DIVERSITY_SEEDS)]
        diversity = {"student": spread_per_prompt(student.images(repeated, seed + 1), DIVERSITY_SEEDS),
                     "teacher": spread_per_prompt(teacher.images(repeated, seed + 1), DIVERSITY_SEEDS),
                     "data": data_spread(seen, DIVERSITY_SEEDS, seed),
                     "prompts": len(seen), "seeds": DIVERSITY_SEEDS}
        diversity["student_over_teacher"] = over(diversity["student"], diversity["teacher"])
    grid_prompts = prompts[:: max(1, len(prompts) // 6)][:6]
    rows = []
    for p in grid_prompts:
        rows += teacher.images([p] * 4, seed + 2) + student.images([p] * 4, seed + 2)
    save_grid(rows, 8, out / "report" / "dmd.png", scale=2)
    ratio = {k: over(scores[k], heldout_teacher[k]) for k in ("color", "position", "shape")}
    return {"heldout": scores, "teacher_heldout": {k: heldout_teacher[k] for k in ("color", "position", "shape")},
            "student_over_teacher": ratio, "latency": speed, "diversity": diversity,
            "sampler": f"one step from t={call['timesteps'][0]}, no guidance (DDPM pred_original_sample)"}
