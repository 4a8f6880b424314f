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


def test_lowpass_keeps_each_blocks_lowest_dct_frequencies_as_scipy_computes_them():
    """Outside truth: scipy.fft.dctn(norm="ortho") is the orthonormal 2-D DCT-II that JPEG uses per 8x8 block."""
    from scipy.fft import dctn

    ae = PixelAutoencoder(8, lowpass=3)
    x = torch.rand(2, 3, 16, 24, dtype=torch.float64).float() * 2 - 1
    z = ae.encode(x).mean
    assert z.shape == (2, 27, 2, 3) == (2, ae.latent_channels, 2, 3) and ae.id == "pixel:8:3"
    block = x[1, :, 8:16, 16:24].double().numpy()  # block row 1, column 2
    want = [dctn(block[c], norm="ortho")[u, v] for u, v in [(0, 0), (0, 1), (1, 0)] for c in range(3)]
    assert torch.allclose(z[1, :9, 1, 2].double(), torch.tensor(want), atol=1e-5)  # lowest frequencies first
    top = [dctn(block[c], norm="ortho")[2, 2] for c in range(3)]
    assert torch.allclose(z[1, -3:, 1, 2].double(), torch.tensor(top), atol=1e-5)


def test_lowpass_decode_is_the_projection_onto_the_kept_frequencies():
    from scipy.fft import dctn, idctn

    x = torch.rand(1, 3, 8, 8) * 2 - 1
    y = PixelAutoencoder(8, lowpass=4).decode(PixelAutoencoder(8, lowpass=4).encode(x).mean)
    coefficients = dctn(x[0].double().numpy(), axes=(1, 2), norm="ortho")
    coefficients[:, 4:, :] = 0
    coefficients[:, :, 4:] = 0
    want = torch.from_numpy(idctn(coefficients, axes=(1, 2), norm="ortho")).clamp(-1, 1)
    assert torch.allclose(y[0].double(), want, atol=1e-5)
    full = PixelAutoencoder(4, lowpass=4)  # every frequency kept: exact up to float rounding
    assert torch.allclose(full.decode(full.encode(x).mean), x, atol=1e-5)


def test_from_id_reads_what_a_manifest_records():
    ae = PixelAutoencoder.from_id("pixel:8:4", scale_factor=3.0)
    assert (ae.factor, ae.lowpass, ae.scale_factor, ae.latent_channels, ae.id) == (8, 4, 3.0, 48, "pixel:8:4")
    assert PixelAutoencoder.from_id("pixel:2").id == "pixel:2"
    for bad in ("pixel:", "pixel:8:x", "pixel:8:4:1"):
        with pytest.raises(PixArtError, match="'pixel:F' or 'pixel:F:K'"):
            PixelAutoencoder.from_id(bad)
    with pytest.raises(PixArtError, match="lowpass must be in 1..8"):
        PixelAutoencoder(8, lowpass=9)
