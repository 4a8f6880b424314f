from types import SimpleNamespace

import torch

from pixart.encoders.pixel import PixelAutoencoder
from pixart.train.config import EncodersSection
from pixart.train.encoders import load_autoencoder


def _cfg(vae=None):
    return EncodersSection(vae=vae)


def test_pixel_autoencoder_takes_the_caches_scale_else_the_checkpoints():
    manifest = SimpleNamespace(image_encoder="pixel:2", scaling_factor=3.0)
    ae = load_autoencoder(_cfg(), manifest)
    assert isinstance(ae, PixelAutoencoder) and (ae.factor, ae.scale_factor) == (2, 3.0)
    images = torch.rand(1, 3, 4, 4) * 2 - 1
    latents = ae.sample_latents(ae.encode(images).mean, ae.encode(images).std)
    torch.testing.assert_close(latents, 3.0 * torch.nn.functional.pixel_unshuffle(images, 2))
    torch.testing.assert_close(ae.decode(latents), images)
    assert load_autoencoder(_cfg("pixel:4"), None, scale=2.5).scale_factor == 2.5  # `pixart sample`: encoders.json
    assert load_autoencoder(_cfg("pixel:4"), None).scale_factor == 1.0
