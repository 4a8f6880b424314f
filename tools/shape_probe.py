"""Where a finished demo's model loses shape: clean one-object scenes noised to a start timestep, then denoised
from there with their own captions by the exported pipeline's loop (SDEdit), judged for color, position and shape.

A start of 1000 is sampling from noise. The first row is the scenes round-tripped through the pixel autoencoder
without noise: what the latent space itself keeps.

With --x0, also what the model reads from the caption: its one-forward estimate of the clean scene at each start,
as mean squared error in latent space with the true caption, with the shape word or the color word changed (the
same wording otherwise), and with the null caption; and a PNG of those estimates under the true caption.

    python tools/shape_probe.py --demo demo_out --starts 1000 800 600 400 200 --x0 x0.png
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_pipelines.shapes import COLORS, SHAPES, ShapesConfig, render_scene  # noqa: E402
from pixart.cli import positive_int  # noqa: E402
from pixart.demo.drawer import Drawer  # noqa: E402
from pixart.demo.pipeline import (  # noqa: E402
    BACKGROUND_LEVELS,
    CFG_SCALE,
    FINAL_MULTIPLE,
    FINAL_SIDE,
    SAMPLE_STEPS,
)
from pixart.eval.heldout import prompt_for  # noqa: E402
from pixart.eval.judge import Judge  # noqa: E402
from pixart.train.validation import save_grid, to_pil  # noqa: E402


def scenes(count: int, seed: int) -> tuple[list, list[dict]]:
    """One large object on a plain background, square, undamaged: as the held-out prompts ask."""
    cfg = ShapesConfig(resolution=FINAL_SIDE, side_multiple=FINAL_MULTIPLE, max_objects=1, damaged_fraction=0.0,
                       aspects=("1:1",), backgrounds=("plain",), sizes=("large",), background_levels=BACKGROUND_LEVELS)
    images, specs = [], []
    for i in range(count):
        image, scene = render_scene(seed + i, cfg)
        images.append(image)
        specs.append({k: scene["objects"][0][k] for k in ("shape", "color", "position", "size")})
    return images, specs


def changed(spec: dict, key: str, values: tuple) -> dict:
    """`spec` with its shape or color replaced by the next one of `values`."""
    return {**spec, key: values[(values.index(spec[key]) + 1) % len(values)]}


@torch.no_grad()
def x0_estimates(drawer: Drawer, specs: list[dict], true_text: tuple, clean, noise, starts: list[int]):
    """Per start t, the model's x0 estimate under the true caption (`true_text`: its embeddings and mask), and the
    x0 MSE under each caption variant."""
    from diffusers import DDIMScheduler

    captions = {"shape changed": [prompt_for(changed(s, "shape", SHAPES), FINAL_SIDE, FINAL_SIDE, worded_as=s)
                                  for s in specs],
                "color changed": [prompt_for(changed(s, "color", COLORS), FINAL_SIDE, FINAL_SIDE, worded_as=s)
                                  for s in specs]}
    texts = {"true": true_text, **{k: drawer.encode(v) for k, v in captions.items()}}
    null = drawer.null[None].expand(len(specs), -1, -1)
    texts["null caption"] = (null, torch.ones(null.shape[:2]))
    # diffusers' own x0 from a model output, for any prediction type (DDIM's step computes it first)
    ddim = DDIMScheduler.from_config(drawer.pipe.scheduler.config, clip_sample=False)
    ddim.set_timesteps(ddim.config.num_train_timesteps)
    estimates, table = [], []
    for start in starts:
        t = min(start, ddim.config.num_train_timesteps - 1)
        noised = ddim.add_noise(clean, noise, torch.tensor([t]))
        row = []
        for name, (embeds, mask) in texts.items():
            x0 = ddim.step(drawer.predict(noised, torch.tensor(t), embeds, mask), t, noised).pred_original_sample
            row.append(float(((x0 - clean) ** 2).mean()))
            if name == "true":
                estimates.append(x0)
        table.append((t, row))
    return list(texts), table, estimates


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo", default="demo_out", help="a finished `pixart demo` folder (default demo_out)")
    p.add_argument("--starts", type=int, nargs="+", default=[1000, 800, 600, 400, 300, 200, 100],
                   help="start timesteps: scenes are noised to the first sampler step at or below each (1000: 999)")
    p.add_argument("--scenes", type=positive_int, default=48, help="how many scenes (default 48)")
    p.add_argument("--steps", type=positive_int, default=SAMPLE_STEPS, help="sampler steps over the whole schedule")
    p.add_argument("--cfg", type=float, default=CFG_SCALE, help=f"guidance scale (default {CFG_SCALE}, the demo's)")
    p.add_argument("--seed", type=int, default=1000, help="picks the scenes; the noise is seeded 0")
    p.add_argument("--grid", type=Path, help="PNG: the scenes, then 8 of them from each start")
    p.add_argument("--x0", type=Path, metavar="PNG",
                   help="also the model's one-forward x0 estimate from each start (noised to exactly that t, "
                   "at most 999; unguided, so --cfg and --steps do not apply): its error under the true, "
                   "shape-changed, color-changed and null captions, and a PNG of the scenes, then 8 of their "
                   "estimates under the true caption per start")
    args = p.parse_args()
    export = Path(args.demo) / "export"
    if not (export / "model_index.json").is_file():
        raise SystemExit(f"--demo: {export} is not an exported pipeline; run `pixart demo --out {args.demo}` first")
    drawer = Drawer(export, args.steps, args.cfg)
    sched = drawer.pipe.scheduler
    sched.set_timesteps(args.steps)
    schedule = [int(t) for t in sched.timesteps]  # high to low
    if min(args.starts) < schedule[-1]:
        raise SystemExit(f"--starts: no sampler step at or below t={min(args.starts)} (the last is {schedule[-1]})")
    judge = Judge.load_or_train()
    images, specs = scenes(args.scenes, args.seed)
    pixels = torch.stack([torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1) for im in images])
    dist = drawer.decoder.encode(pixels.float() / 127.5 - 1)
    clean = drawer.decoder.sample_latents(dist.mean, dist.std)
    embeds, mask = drawer.encode([prompt_for(s, FINAL_SIDE, FINAL_SIDE) for s in specs])
    assert sched.init_noise_sigma == 1.0, "the probe hands the noised latents to the loop as they are"

    def judged(label, steps: int, latents) -> list:
        out = to_pil(drawer.decoder.decode(latents.float()))
        s = judge.score(out, [[spec] for spec in specs])
        print(f"{label:>8} {steps:6d} {s['color']:6.2f} {s['position']:9.2f} {s['shape']:6.2f}", flush=True)
        return out

    print(f"{'start t':>8} {'steps':>6} {'color':>6} {'position':>9} {'shape':>6}")
    judged("no noise", 0, clean)
    rows = images[:8]
    noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(0))
    for start in args.starts:
        drawer.timesteps = [t for t in schedule if t <= start]
        noised = sched.add_noise(clean, noise, torch.tensor([drawer.timesteps[0]]))
        rows += judged(start, len(drawer.timesteps), drawer.denoise_alone(embeds, mask, noised))[:8]
    if args.grid:
        save_grid(rows, min(8, len(images)), args.grid, scale=2)
    if args.x0:
        names, table, estimates = x0_estimates(drawer, specs, (embeds, mask), clean, noise, args.starts)
        print(f"\nx0 error (latent MSE) {'t':>5} " + " ".join(f"{n:>13}" for n in names))
        for t, row in table:
            print(f"{'':>21} {t:5d} " + " ".join(f"{v:13.4f}" for v in row))
        x0_rows = images[:8] + [im for x0 in estimates for im in to_pil(drawer.decoder.decode(x0[:8].float()))]
        save_grid(x0_rows, min(8, len(images)), args.x0, scale=2)


if __name__ == "__main__":
    main()
