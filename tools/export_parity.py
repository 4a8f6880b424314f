"""Output parity of our PixArt against its diffusers export, printed per case.

    python tools/export_parity.py

Each case exports a randomly initialised (then perturbed) model, loads it back with
`PixArtTransformer2DModel.from_pretrained`, and compares both outputs in fp32 on the
same latents, timesteps, padded captions and (PixArtMS) per-row micro-conditions.
"""
from __future__ import annotations

import tempfile

import torch
from diffusers import PixArtTransformer2DModel

from pixart.export.diffusers import export
from pixart.models import build_model

CASES = [  # (model, latent side it is built for, latent H x W fed in)
    ("PixArt-S/2", 32, (32, 32)),
    ("PixArt-S/2", 32, (24, 40)),
    ("PixArt-B/2", 64, (64, 64)),
    ("PixArtMS-S/2", 32, (32, 32)),
    ("PixArtMS-S/2", 128, (96, 160)),
    ("PixArtMS-B/2", 64, (48, 80)),
]


@torch.no_grad()
def parity(name: str, size: int, hw: tuple[int, int], depth: int = 4, cap: int = 64) -> float:
    torch.manual_seed(0)
    model = build_model(name, input_size=size, depth=depth, caption_channels=cap).eval()
    for p in model.parameters():
        p.add_(torch.randn_like(p) * 0.02)
    with tempfile.TemporaryDirectory() as tmp:
        export(model, f"{tmp}/out")
        theirs = PixArtTransformer2DModel.from_pretrained(f"{tmp}/out", subfolder="transformer").eval()
    x, t = torch.randn(2, 4, *hw), torch.tensor([25, 875])
    y, mask = torch.randn(2, 30, cap), torch.ones(2, 30)
    mask[0, 11:] = 0
    info, added = None, None
    if model.config.micro_conditions:
        info = dict(img_hw=torch.tensor([[hw[0] * 8.0, hw[1] * 8.0], [512.0, 768.0]]),
                    aspect_ratio=torch.tensor([[hw[0] / hw[1]], [1.5]]))
        added = {"resolution": info["img_hw"], "aspect_ratio": info["aspect_ratio"]}
    ours = model(x, t, y, mask, data_info=info)
    ref = theirs(x, encoder_hidden_states=y, timestep=t, encoder_attention_mask=mask, added_cond_kwargs=added,
                 return_dict=False)[0]
    return ((ours - ref).norm() / ref.norm()).item()


def main() -> None:
    import argparse

    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    torch.set_num_threads(2)
    print(f"{'model':14s} {'built for':>9s} {'input':>9s} {'rel. error':>11s}")
    for name, size, hw in CASES:
        print(f"{name:14s} {size:9d} {hw[0]:4d}x{hw[1]:<4d} {parity(name, size, hw):11.2e}")


if __name__ == "__main__":
    main()
