"""The feature-cache manifest: round trip, completeness, mismatch messages, content hash."""
import json
from dataclasses import dataclass

import pytest

from pixart.atomic import atomic_write
from pixart.data.manifest import CHECKED, Manifest, ShardEntry, config_hash, file_sha256, find_manifest
from pixart.errors import PixArtError


def _manifest(done=(True, True, True), **kw):
    base = dict(image_encoder="stabilityai/sd-vae-ft-ema", image_encoder_hash="aa", text_encoder="/models/t5",
                text_encoder_hash="bb", dtype="bf16", max_length=120, resolution=256, buckets=None,
                caption_sources=["txt", "llava"], latent_channels=4, downsample_factor=8, text_dim=4096,
                scaling_factor=0.18215, shift_factor=0.0, batch_size=16,
                shards=[ShardEntry(f"s{i}", 10, f"{i:064x}", d, buckets={"256x256": 10}) for i, d in enumerate(done)])
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
    m.check({"resolution": 256, "dtype": "bf16", "caption_sources": ["llava"], "scaling_factor": 0.18215})
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


def test_names_of_one_bucket_table_compare_equal():
    """docs/data.md extracts the 1024 px cache with --buckets ASPECT_RATIO_1024 (PixArt's name for the table) and
    configs/pixart_xl2/stage4_aesthetic1024.yaml expects ms1024: one table, so one cache."""
    m = _manifest(resolution=None, buckets="ASPECT_RATIO_1024")
    for name in ("ms1024", "1024", "aspect_ratio_1024", "ASPECT_RATIO_1024"):
        m.check({"buckets": name})
    with pytest.raises(PixArtError, match="buckets ASPECT_RATIO_1024 != config ms512$"):
        m.check({"buckets": "ms512"})
    with pytest.raises(PixArtError, match="buckets ASPECT_RATIO_1024 != config None$"):
        m.check({"buckets": None})
    m48 = _manifest(resolution=None, buckets="48/24")  # sizes in multiples of 24, another table than 48's in 16s
    m48.check({"buckets": "ms48/24"})
    with pytest.raises(PixArtError, match="buckets 48/24 != config 48$"):
        m48.check({"buckets": "48"})


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


def test_unknown_setting_is_refused_by_name():
    m = _manifest()
    with pytest.raises(PixArtError, match=r"manifest.json: unknown cache setting 'image_size'; known: image_encoder, "):
        m.check({"resolution": 256, "image_size": 256})
    with pytest.raises(PixArtError, match="unknown cache setting 'lr'"):
        m.check({"lr": 1e-4})
    assert "batch_size" not in CHECKED  # a training config's batch_size is another thing


def test_loader_fields_round_trip_and_old_versions_are_refused(tmp_path):
    assert find_manifest(tmp_path) is None  # raw shards, no cache
    m = _manifest()
    m.save(tmp_path)
    back = find_manifest(tmp_path)
    assert back == m and back.complete
    assert (back.scaling_factor, back.shift_factor, back.text_dim, back.latent_channels) == (0.18215, 0.0, 4096, 4)
    assert (back.shards[0].name, back.shards[0].count, back.shards[0].buckets) == ("s0", 10, {"256x256": 10})
    d = json.loads((tmp_path / "manifest.json").read_text())
    atomic_write(tmp_path / "manifest.json", json.dumps({**d, "version": 1}))
    for read in (Manifest.load, find_manifest):
        with pytest.raises(PixArtError, match=r"manifest.json: feature manifest version 1, .*rerun extract-features"):
            read(tmp_path)


def test_file_sha256_of_the_first_bytes(tmp_path):
    import hashlib

    data = bytes(range(256)) * 9000  # over one 1 MiB block
    (tmp_path / "f").write_bytes(data)
    for limit in (None, 0, 10, 1 << 20, (1 << 20) + 5, len(data), len(data) + 7):
        assert file_sha256(tmp_path / "f", limit=limit) == hashlib.sha256(data[:limit]).hexdigest()
