"""`pixart demo`: the system end to end at toy scale on a CPU.

Today it runs the foundation's path: a class-conditional DiT checkpoint is
reparameterized into PixArt, exported as a whole diffusers pipeline (tiny local
T5 and VAE of the real classes) and sampled through `PixArtAlphaPipeline`. The
staged training (shapes world, relabeling, stages 1-3, judge) slots in before the
conversion as those parts land.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from pixart.cli.steps import step
from pixart.errors import PixArtError

PROMPTS = ["a red circle at the top left", "two blue squares on a gradient background"]


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="the whole pipeline at toy scale on a CPU", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=run)


def run(args) -> None:
    import torch
    from diffusers import PixArtAlphaPipeline

    from pixart.cli.main import main
    from pixart.encoders.tiny import make_tiny_t5, make_tiny_vae
    from pixart.export.diffusers import load_null_caption
    from pixart.models import build_model

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with step("tiny T5 encoder and VAE (real classes, seeded init)"):
        t5, vae = make_tiny_t5(out / "parts" / "t5", seed=args.seed), make_tiny_vae(out / "parts" / "vae", seed=args.seed)
    with step("class-conditional DiT checkpoint (official layout)"):
        torch.manual_seed(args.seed)
        dit = build_model("DiT-S/2", input_size=16, depth=4, num_classes=10)
        torch.save(dit.state_dict(), out / "dit.pt")
    for label, argv in (
        ("reparameterize DiT -> PixArt", ["convert-dit", str(out / "dit.pt"), "--out", str(out / "pixart"),
                                         "--caption-channels", "32", "--overwrite"]),
        ("export a diffusers pipeline", ["export-diffusers", str(out / "pixart"), "--out", str(out / "export"),
                                        "--text-encoder", str(t5), "--vae", str(vae), "--overwrite"]),
    ):
        with step(label):
            if main(argv) != 0:
                raise PixArtError(f"demo step failed: {label}")
    with step("sample through PixArtAlphaPipeline"):
        pipe = PixArtAlphaPipeline.from_pretrained(out / "export")
        null = load_null_caption(out / "export")[None].expand(len(PROMPTS), -1, -1)
        # The model's own null caption as the unconditional input, as the official sampler does.
        embeds, mask, _, _ = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False)
        images = pipe(prompt_embeds=embeds, prompt_attention_mask=mask, negative_prompt=None, negative_prompt_embeds=null, negative_prompt_attention_mask=torch.ones(null.shape[:2]),
                      num_inference_steps=20, guidance_scale=4.5, height=32, width=32, use_resolution_binning=False,
                      generator=torch.Generator().manual_seed(args.seed)).images
        grid = _grid(images)
        grid.save(out / "samples.png")
    report = {"seconds": round(time.time() - start, 1), "prompts": PROMPTS, "samples": str(out / "samples.png"),
              "export": str(out / "export")}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


def _grid(images):
    from PIL import Image

    w, h = images[0].size
    grid = Image.new("RGB", (w * len(images), h))
    for i, image in enumerate(images):
        grid.paste(image, (i * w, 0))
    return grid.resize((grid.width * 4, grid.height * 4), Image.NEAREST)
