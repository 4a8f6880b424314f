"""The demo's judgement: held-out prompts through the exported pipeline, scored, and the report folder."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from .pipeline import CFG_SCALE, FINAL_SIDE, HOLDOUT, MAX_TOKENS, PIXEL_FACTOR, PIXEL_SCALE, SAMPLE_STEPS
from .steps import step


def machine_reference() -> dict:
    """What this CPU does per second, measured now: the demo's seconds are comparable only beside it
    (these machines differ by up to 2x between sessions, and bf16 is ~100x slower without AVX-512)."""
    import re

    import torch

    from pixart.train.bench import measured_peak_tflops

    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    name = re.search(r"model name\s*:\s*(.+)", info)
    return {"fp32_matmul_gflops": round(measured_peak_tflops(torch.device("cpu"), torch.float32) * 1000, 1),
            "threads": torch.get_num_threads(), "avx512": "avx512f" in info,
            "processor": name.group(1).strip() if name else "unknown"}


def evaluate(out: Path, seed: int, scale: float = 1.0) -> dict:
    """Held-out prompts through the exported PixArtAlphaPipeline, scored by the judge (all of them;
    a smoke run with --scale < 1 draws an even spread of at least 9)."""
    from pixart.eval.heldout import heldout_specs, prompt_for, score_heldout, spread
    from pixart.eval.judge import Judge
    from pixart.train.validation import save_grid

    specs = heldout_specs(HOLDOUT)
    if scale < 1:
        specs = spread(specs, max(9, int(len(specs) * scale)))
    prompts = [prompt_for(s, FINAL_SIDE, FINAL_SIDE) for s in specs]
    with step(f"sample {len(prompts)} held-out prompts through PixArtAlphaPipeline"):
        images = pipeline_images(out / "export", prompts, FINAL_SIDE, seed)
        save_grid(images, 9, out / "report" / "heldout.png", scale=2)
    with step("judge the held-out samples"):
        judge = Judge.load_or_train()
        own = judge.self_accuracy(FINAL_SIDE)
    return {"heldout": score_heldout(judge, images, specs),
            "judge_self_accuracy": {k: own[k] for k in ("color", "position", "shape")},
            "resolution": FINAL_SIDE, "sampler": f"pipeline scheduler, {SAMPLE_STEPS} steps, CFG {CFG_SCALE}"}


def pipeline_images(export_dir: Path, prompts: list[str], side: int, seed: int, cfg: float = CFG_SCALE,
                    steps: int = SAMPLE_STEPS, batch: int = 16):
    """PIL images for `prompts` from an exported pixel-space pipeline (loaded with vae=None; its
    latents are decoded by the pixel autoencoder). The unconditional branch is the model's own null
    caption, as the official sampler uses (diffusers would encode "")."""
    import torch
    from diffusers import PixArtAlphaPipeline

    from pixart.encoders.pixel import PixelAutoencoder
    from pixart.export.diffusers import load_null_caption
    from pixart.train.validation import to_pil

    pipe = PixArtAlphaPipeline.from_pretrained(export_dir, vae=None)
    pipe.set_progress_bar_config(disable=True)
    decoder = PixelAutoencoder(PIXEL_FACTOR, scale_factor=PIXEL_SCALE)
    latent = side // PIXEL_FACTOR
    images = []
    generator = torch.Generator().manual_seed(seed)
    for lo in range(0, len(prompts), batch):
        chunk = prompts[lo:lo + batch]
        embeds, mask, _, _ = pipe.encode_prompt(chunk, do_classifier_free_guidance=False, clean_caption=False,
                                                max_sequence_length=MAX_TOKENS)
        null = load_null_caption(export_dir)[None].expand(len(chunk), -1, -1)
        latents = pipe(prompt_embeds=embeds, prompt_attention_mask=mask, negative_prompt=None,
                       negative_prompt_embeds=null, negative_prompt_attention_mask=torch.ones(null.shape[:2]),
                       num_inference_steps=steps, guidance_scale=cfg,
                       height=latent * pipe.vae_scale_factor, width=latent * pipe.vae_scale_factor,
                       use_resolution_binning=False, output_type="latent", generator=generator).images
        images += to_pil(decoder.decode(latents.float()))
    return images


def report(out: Path, outputs: dict, metrics: dict) -> None:
    """DIR/report: metrics.json, the held-out grid, each stage's last validation grid and the loss curves."""
    from pixart.atomic import atomic_write
    from pixart.train.monitor import save_loss_curve

    rep = out / "report"
    rep.mkdir(parents=True, exist_ok=True)
    runs = {}
    for stage in ("stage1", "stage2", "stage3"):
        grids = sorted((out / "runs" / stage / "samples").glob("step-*.png"))
        if grids:
            shutil.copy(grids[-1], rep / f"{stage}.png")
        rows = out / "runs" / stage / "metrics.jsonl"
        if rows.is_file():
            runs[stage] = [json.loads(line) for line in rows.read_text().splitlines() if line.strip()]
    save_loss_curve(runs, rep / "loss.png")
    metrics["checkpoints"] = outputs
    atomic_write(rep / "metrics.json", json.dumps(metrics, indent=2))
    h = metrics["heldout"]
    print(f"held-out ({h['prompts']} prompts never seen in training): color {h['color']:.1%}, "
          f"position {h['position']:.1%}, shape {h['shape']:.1%}; judge's own accuracy "
          f"{metrics['judge_self_accuracy']}; {metrics['seconds']:.0f} s on a CPU doing "
          f"{metrics['machine']['fp32_matmul_gflops']:.0f} fp32 GFLOP/s")
    print(f"report: {rep}/metrics.json, heldout.png, stage1-3.png, loss.png; export: {out / 'export'}")
