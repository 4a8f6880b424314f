"""The pixel autoencoder: exact inverse, shapes, the ImageAutoencoder surface."""
import pytest
import torch

from pixart.encoders import ImageAutoencoder, PixelAutoencoder
from pixart.errors import PixArtError


@pytest.mark.parametrize("f", [1, 2, 4])
def test_decode_inverts_encode_exactly(f):
    ae = PixelAutoencoder(f)
    x = torch.rand(2, 3, 16, 24) * 2 - 1
    dist = ae.encode(x)
    assert dist.mean.shape == (2, 3 * f * f, 16 // f, 24 // f) == (2, ae.latent_channels, 16 // f, 24 // f)
    assert ae.downsample_factor == f and not dist.std.any()
    assert torch.equal(ae.decode(ae.sample_latents(dist.mean, dist.std)), x)
    assert torch.equal(ae.decode(dist.mean), x)


def test_channels_hold_pixels_and_surface_matches():
    x = torch.arange(3 * 4 * 4, dtype=torch.float32).reshape(1, 3, 4, 4) / 48 - 0.5
    z = PixelAutoencoder(2).encode(x).mean
    assert torch.equal(z[0, :4, 0, 0], x[0, 0, :2, :2].flatten())  # channel c*f*f + i*f + j = pixel (i, j) of c
    for name in ("encode", "decode", "sample_latents", "latent_channels", "downsample_factor", "scale_factor"):
        assert hasattr(ImageAutoencoder, name) or name == "scale_factor"
        assert hasattr(PixelAutoencoder(2), name)


def test_refuses_indivisible_sizes():
    with pytest.raises(PixArtError, match="not divisible by factor 4"):
        PixelAutoencoder(4).encode(torch.zeros(1, 3, 10, 8))
    with pytest.raises(PixArtError):
        PixelAutoencoder(0)
