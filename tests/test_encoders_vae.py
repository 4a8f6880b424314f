"""ImageAutoencoder on a tiny AutoencoderKL saved locally: the same loading path as sd-vae-ft-ema."""
import json

import pytest
import torch
from diffusers import AutoencoderKL

from pixart.encoders import TINY_VAE_DOWNSAMPLE, EncoderLoadError, ImageAutoencoder, VAEConfig, make_tiny_vae

H = W = 32


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    return make_tiny_vae(tmp_path_factory.mktemp("vae"), seed=0)


@pytest.fixture(scope="module")
def ae(vae_dir):
    return ImageAutoencoder(VAEConfig(str(vae_dir)))


@pytest.fixture()
def images():
    return torch.rand(2, 3, H, W, generator=torch.Generator().manual_seed(1)) * 2 - 1


def test_tiny_vae_loads_with_plain_diffusers_and_is_deterministic(vae_dir, tmp_path):
    a = AutoencoderKL.from_pretrained(vae_dir)
    b = AutoencoderKL.from_pretrained(make_tiny_vae(tmp_path, seed=0))
    c = AutoencoderKL.from_pretrained(make_tiny_vae(tmp_path / "s1", seed=1))
    assert a.config.scaling_factor == pytest.approx(0.18215)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), c.state_dict().values(), strict=True))


def test_encode_decode_shapes(ae, images):
    dist = ae.encode(images)
    h, w = H // TINY_VAE_DOWNSAMPLE, W // TINY_VAE_DOWNSAMPLE
    assert ae.downsample_factor == TINY_VAE_DOWNSAMPLE and ae.latent_channels == 4
    assert dist.mean.shape == dist.std.shape == (2, 4, h, w)
    assert dist.mean.dtype == torch.float32 and (dist.std > 0).all()
    out = ae.decode(ae.sample_latents(dist.mean, dist.std, torch.Generator().manual_seed(0)))
    assert out.shape == images.shape and out.dtype == torch.float32
    assert out.min() >= -1 and out.max() <= 1


def test_scale_factor_from_config_and_override(ae, vae_dir):
    assert ae.scale_factor == pytest.approx(0.18215)
    assert ImageAutoencoder(VAEConfig(str(vae_dir), scale_factor=0.5)).scale_factor == 0.5


def test_sample_latents_applies_scale(ae, images):
    dist = ae.encode(images)
    zero = ae.sample_latents(dist.mean, torch.zeros_like(dist.std), torch.Generator().manual_seed(0))
    torch.testing.assert_close(zero, dist.mean * ae.scale_factor)
    got = ae.sample_latents(dist.mean, dist.std, torch.Generator().manual_seed(3))
    noise = torch.randn(dist.mean.shape, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(got, (dist.mean + dist.std * noise) * ae.scale_factor)
    assert not torch.allclose(got, zero)


def test_decode_unscales(ae, vae_dir, images):
    """decode(latents) must equal the raw VAE decoding latents / scale."""
    lat = ae.sample_latents(ae.encode(images).mean, torch.zeros(1))
    raw = AutoencoderKL.from_pretrained(vae_dir).decode(lat / ae.scale_factor).sample.clamp(-1, 1)
    torch.testing.assert_close(ae.decode(lat), raw.detach())


def test_frozen(ae):
    assert not ae.vae.training and not any(p.requires_grad for p in ae.vae.parameters())


def test_bad_dtype_and_missing_path(tmp_path):
    with pytest.raises(ValueError, match="int8"):
        VAEConfig("x", dtype="int8")
    missing = str(tmp_path / "nope" / "vae")
    with pytest.raises(EncoderLoadError) as ei:
        ImageAutoencoder(VAEConfig(missing))
    assert missing in str(ei.value) and "\n" not in str(ei.value)
    with pytest.raises(EncoderLoadError, match="no-such-org/no-such-vae"):
        ImageAutoencoder(VAEConfig("no-such-org/no-such-vae", local_files_only=True))


def test_a_t5_folder_is_not_a_vae(tmp_path):
    from pixart.encoders import make_tiny_t5

    t5 = make_tiny_t5(tmp_path / "t5")
    with pytest.raises(EncoderLoadError, match=rf"^VAE: '{t5}' is not a VAE \(its config has model_type 't5', not "
                                               r"_class_name 'AutoencoderKL'\)$"):
        ImageAutoencoder(VAEConfig(str(t5)))


def test_wrong_class_rejected(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(EncoderLoadError, match="UNet2DModel"):
        ImageAutoencoder(VAEConfig(str(tmp_path)))
