"""The feature-cache manifest: round trip, completeness, mismatch messages, content hash."""
import json
from dataclasses import dataclass

import pytest

from pixart.atomic import atomic_write
from pixart.data.manifest import Manifest, ShardEntry, config_hash
from pixart.errors import PixArtError


def _manifest(done=(True, True, True), **kw):
    base = dict(image_encoder="stabilityai/sd-vae-ft-ema", image_encoder_hash="aa", text_encoder="/models/t5",
                text_encoder_hash="bb", dtype="bf16", max_length=120, resolution=256, buckets=None,
                caption_sources=["txt", "llava"], latent_channels=4, downsample_factor=8, text_dim=4096,
                shards=[ShardEntry(f"s{i}", 10, f"{i:064x}", d) for i, d in enumerate(done)])
    return Manifest(**{**base, **kw})


def test_save_load_round_trip(tmp_path):
    m = _manifest()
    m.save(tmp_path)
    d = json.loads((tmp_path / "manifest.json").read_text())
    assert d["complete"] and d["count"] == 30 and d["content_hash"] == m.content_hash
    assert Manifest.load(tmp_path) == m
    assert not list(tmp_path.glob(".*"))


def test_check_names_first_mismatch():
    m = _manifest()
    m.check({"resolution": 256, "dtype": "bf16", "caption_sources": ["llava"], "lr": 1e-4})
    with pytest.raises(PixArtError, match=r"^feature cache DIR/manifest.json: resolution 256 != config 512$"):
        m.check({"resolution": 512, "dtype": "fp32"}, where="feature cache DIR")
    with pytest.raises(PixArtError, match="dtype bf16 != config fp32"):
        m.check({"resolution": 256, "dtype": "fp32"})
    with pytest.raises(PixArtError, match="caption source 'metadata' not in cache"):
        m.check({"caption_sources": "metadata"})

    @dataclass
    class TrainCfg:
        resolution: int = 256
        max_length: int = 77
    with pytest.raises(PixArtError, match="max_length 120 != config 77"):
        m.check(TrainCfg())


def test_incomplete_is_refused_and_never_complete():
    m = _manifest(done=(True, False, True))
    assert not m.complete and m.done == 2 and m.count == 20
    with pytest.raises(PixArtError, match=r"is incomplete: 2 of 3 shards done; rerun extract-features to finish"):
        m.check({"resolution": 256})
    assert not _manifest(done=()).complete


def test_content_hash_tracks_shards_and_load_errors(tmp_path):
    a, b = _manifest(), _manifest()
    assert a.content_hash == b.content_hash
    b.shards[0].sha256 = "f" * 64
    assert a.content_hash != b.content_hash
    assert config_hash({"d_model": 4, "_name_or_path": "x"}) == config_hash({"d_model": 4})
    with pytest.raises(PixArtError, match="no feature manifest"):
        Manifest.load(tmp_path)
    atomic_write(tmp_path / "manifest.json", "{not json")
    with pytest.raises(PixArtError, match="not a feature manifest"):
        Manifest.load(tmp_path)
