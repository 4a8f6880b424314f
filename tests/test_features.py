"""extract-features on tiny raw shards with the tiny T5/VAE: round trip, resume, workers, refusals, size."""
import argparse
import contextlib
import dataclasses
import functools
import io
import json
import os
import re
import socket
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest
import torch
import webdataset as wds
from PIL import Image
from safetensors.torch import load as load_tensors
from tolerance import lower_precision

from data_pipelines.features import FeatureConfig, bucket_table, extract_features, ours_text_bytes, pixart_text_bytes
from pixart.cli import extract_features as cli
from pixart.data.buckets import nearest_bucket
from pixart.data.manifest import MANIFEST, Manifest, file_sha256
from pixart.data.schema import FeatureSample
from pixart.encoders import TextEncoder, TextEncoderConfig, make_tiny_t5, make_tiny_vae
from pixart.errors import PixArtError

CAPTIONS = ["a photo of a cat sitting on a red chair", "two dogs playing in the snow at night",
            "green hills under a blue sky with white clouds", "the city skyline at sunset, digital art",
            "a close up of a bowl of fruit on a wooden table"]


def _png(w, h, seed):
    g = torch.Generator().manual_seed(seed)
    px = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(px).save(buf, "PNG")
    return buf.getvalue()


def _jpg(w, h, seed):
    buf = io.BytesIO()
    Image.open(io.BytesIO(_png(w, h, seed))).save(buf, "JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def enc(tmp_path_factory):
    root = tmp_path_factory.mktemp("enc")
    return {"t5": str(make_tiny_t5(root / "t5")), "vae": str(make_tiny_vae(root / "vae"))}


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    """3 shards x 4 samples, sizes vary; shard 1 has a corrupt png; shard 0 has a `meta` sidecar."""
    root = tmp_path_factory.mktemp("raw")
    for s in range(3):
        with wds.TarWriter(str(root / f"shard-{s:06d}.tar")) as w:
            for i in range(4):
                k = s * 4 + i
                img = b"\x89PNG broken" if (s, i) == (1, 2) else _png(48 if i % 2 else 32, 32, k)
                w.write({"__key__": f"{k:06d}", "png": img, "txt": CAPTIONS[k % 5].encode(),
                         "json": json.dumps({"width": 48, "height": 32, "label": k}).encode()})
        with open(root / f"shard-{s:06d}.meta.jsonl", "w") as f:
            for i in range(4):
                f.write(json.dumps({"__key__": f"{s * 4 + i:06d}", "caption": f"dense caption number {i} " * 3}) + "\n")
    return root


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Byte-identical outputs need equal thread counts per process (a conv's float rounding depends
    on it); spawned workers here get 1 each (2 cores / 2 workers), so the main process does too."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ref(enc, raw, tmp_path_factory):
    """The reference cache: all shards, one process, both caption sources."""
    out = tmp_path_factory.mktemp("ref") / "f"
    return out, extract_features(raw, out, _cfg(enc), progress=False)


def _cfg(enc, **kw):
    return FeatureConfig(**{"text_encoder": enc["t5"], "vae": enc["vae"], "resolution": 32, "batch_size": 3,
                            "captions": ("txt", "meta"), **kw})


def _read(path):
    return [FeatureSample.from_wds(s) for s in wds.WebDataset(str(path), shardshuffle=False)]


def _hashes(folder):
    return {p.name: file_sha256(p) for p in sorted(folder.iterdir())}


def test_round_trip_shapes_dtype_and_inputs_untouched(enc, raw, ref, tmp_path):
    before = _hashes(raw)
    out, ex = ref
    extract_features(raw, tmp_path / "again", _cfg(enc), progress=False)
    assert _hashes(raw) == before
    m = Manifest.load(out)
    assert m.complete and m.count == 11 and len(m.shards) == 3 and m.content_hash == ex.manifest.content_hash
    assert Manifest.load(tmp_path / "again").content_hash == m.content_hash  # deterministic
    assert m.shards[1].skipped[0]["key"] == "000006" and "bad image" in m.shards[1].skipped[0]["reason"]
    assert "0x" not in m.shards[1].skipped[0]["reason"]  # no object reprs: records are byte-stable
    for name in ["manifest.json"] + [f".done/shard-00000{i}.json" for i in range(3)]:
        assert (out / name).read_bytes() == (tmp_path / "again" / name).read_bytes(), name
    assert (m.scaling_factor, m.shift_factor, m.batch_size) == (0.18215, 0.0, 3)  # the tiny VAE's config
    assert [s.buckets for s in m.shards] == [{"32x32": 4}, {"32x32": 3}, {"32x32": 4}]
    te = TextEncoder(TextEncoderConfig(enc["t5"]))
    samples = _read(out / "shard-000000.tar")
    assert [s.key for s in samples] == ["000000", "000001", "000002", "000003"]
    for s in samples:
        assert s.latent_mean.shape == s.latent_std.shape == (4, 16, 16) and s.latent_mean.dtype == torch.float32
        assert set(s.text) == {"txt", "meta"} and s.meta["captions"]["txt"] == CAPTIONS[int(s.key) % 5]
        n = int(te.tokenize([s.meta["captions"]["txt"]])[1].sum())
        assert s.text["txt"].shape == (n, 32) and s.text["txt"].dtype == torch.bfloat16
        full, mask = te.encode([s.meta["captions"]["txt"]])  # padded to 120 as at sampling time
        torch.testing.assert_close(s.text["txt"], full[0, :n], **lower_precision(full[0, :n]))
        assert s.meta["label"] == int(s.key) and s.meta["target_hw"] == [32, 32]
        assert s.meta["width"] in (32, 48)
    assert [s.key for s in _read(out / "shard-000001.tar")] == ["000004", "000005", "000007"]
    assert _read(out / "shard-000001.tar")[0].text["meta"].shape[1] == 32


def test_pixel_autoencoder_and_buckets(enc, raw, tmp_path):
    cfg = _cfg(enc, vae=None, pixel_autoencoder=2, pixel_scale=2.5, resolution=None, buckets="ms32", dtype="fp32",
               captions=("txt",))
    extract_features(raw / "shard-000000.tar", tmp_path / "p", cfg, progress=False)
    samples = _read(tmp_path / "p" / "shard-000000.tar")
    table = bucket_table("ms32")
    for s in samples:
        h, w = nearest_bucket(32, s.meta["width"], table)[1]
        assert s.meta["target_hw"] == [h, w] and s.latent_mean.shape == (12, h // 2, w // 2)
        assert s.text["txt"].dtype == torch.float32 and not s.latent_std.any()
    raw_samples = list(wds.WebDataset(str(tmp_path / "p" / "shard-000000.tar"), shardshuffle=False))
    assert all("latent_std" not in load_tensors(r["features.safetensors"]) for r in raw_samples)  # all zero
    assert samples[0].latent_mean.shape != samples[1].latent_mean.shape  # 32x32 and 48x32 sources
    assert [s.key for s in samples] == ["000000", "000001", "000002", "000003"]  # input order kept
    m = Manifest.load(tmp_path / "p")
    assert (m.image_encoder, m.latent_channels, m.buckets, m.resolution) == ("pixel:2", 12, "ms32", None)
    assert (m.scaling_factor, m.shift_factor) == (2.5, 0.0)  # stored latents stay raw pixels, as a VAE's mean
    assert samples[0].latent_mean.abs().max() <= 1.0
    want = {}
    for s in samples:
        hw = "{}x{}".format(*s.meta["target_hw"])
        want[hw] = want.get(hw, 0) + 1
    assert m.shards[0].buckets == want and len(want) == 2


def test_a_lowpassed_pixel_cache_names_its_frequencies_and_trains_from_them(enc, raw, tmp_path):
    from pixart.train.encoders import load_autoencoder

    cfg = _cfg(enc, vae=None, pixel_autoencoder=8, pixel_lowpass=4, pixel_scale=3.0, resolution=32, dtype="fp32",
               captions=("txt",))
    extract_features(raw / "shard-000000.tar", tmp_path / "p", cfg, progress=False)
    m = Manifest.load(tmp_path / "p")
    assert (m.image_encoder, m.latent_channels, m.downsample_factor) == ("pixel:8:4", 48, 8)
    ae = load_autoencoder(SimpleNamespace(vae=None), m)
    assert (ae.id, ae.scale_factor, ae.latent_channels) == ("pixel:8:4", 3.0, 48)
    extract_features(raw / "shard-000000.tar", tmp_path / "full", dataclasses.replace(cfg, pixel_lowpass=None),
                     progress=False)
    assert Manifest.load(tmp_path / "full").image_encoder_hash != m.image_encoder_hash  # a cache of other latents
    for s, full in zip(_read(tmp_path / "p" / "shard-000000.tar"), _read(tmp_path / "full" / "shard-000000.tar"),
                       strict=True):  # the same pixels, projected onto the 48 kept frequencies
        assert s.latent_mean.shape == (48, 4, 4) and full.latent_mean.shape == (192, 4, 4)
        assert torch.allclose(s.latent_mean, torch.einsum("kd,dhw->khw", ae.basis, full.latent_mean), atol=1e-5)


def test_kill_then_resume_every_key_once(enc, raw, ref, tmp_path):
    out, states = tmp_path / "r", []

    def die_after_first(m):
        states.append((m.done, m.complete, Manifest.load(out).complete))
        if m.done == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        extract_features(raw, out, _cfg(enc), progress=False, on_shard=die_after_first)
    (out / ".shard-000001.tar.tmp-999").write_bytes(b"half a tar")  # as a killed writer (pid 999) leaves it
    dead = out / ".done" / f".shard-000001.json.tmp-{socket.gethostname()}-999999999-abc"  # killed in atomic_write
    dead.write_text("{")
    with pytest.raises(PixArtError, match=r"incomplete: 1 of 3 shards done; rerun extract-features"):
        Manifest.load(out).check({})
    ex = extract_features(raw, out, _cfg(enc), progress=False, on_shard=lambda m: states.append(
        (m.done, m.complete, Manifest.load(out).complete)))
    assert [r.name for r in ex.results] == ["shard-000001", "shard-000002"]
    assert states == [(1, False, False), (2, False, False), (3, True, True)]
    keys = [s.key for p in sorted(out.glob("*.tar")) for s in _read(p)]
    assert keys == sorted(set(keys)) and len(keys) == 11
    assert not list(out.glob(".*.tmp*")) and not dead.exists()
    again = extract_features(raw, out, _cfg(enc), progress=False)  # nothing left to do
    assert again.results == [] and again.manifest.content_hash == ex.manifest.content_hash
    assert ex.manifest.content_hash == ref[1].manifest.content_hash  # same bytes as an unbroken run


def test_ranks_split_shards(enc, raw, ref, tmp_path):
    a = extract_features(raw, tmp_path / "n", _cfg(enc), rank=0, world=2, progress=False)
    assert [r.name for r in a.results] == ["shard-000000", "shard-000002"] and not a.manifest.complete
    b = extract_features(raw, tmp_path / "n", _cfg(enc), rank=1, world=2, progress=False)
    assert [r.name for r in b.results] == ["shard-000001"] and b.manifest.complete
    assert b.manifest.content_hash == ref[1].manifest.content_hash


def test_two_workers_equal_one(enc, raw, ref, tmp_path):
    two = extract_features(raw, tmp_path / "w2", _cfg(enc, workers=2), progress=False)
    assert len(two.results) == 3 and two.manifest.complete
    assert [s.sha256 for s in two.manifest.shards] == [s.sha256 for s in ref[1].manifest.shards]


def test_refusals_before_any_work(enc, raw, tmp_path):
    out = tmp_path / "x"
    with pytest.raises(PixArtError, match="T5 text encoder.*does not exist"):
        extract_features(raw, out, _cfg(enc, text_encoder=str(tmp_path / "nope")), progress=False)
    with pytest.raises(PixArtError, match="VAE.*does not exist"):
        extract_features(raw, out, _cfg(enc, vae=str(tmp_path / "nope")), progress=False)
    with pytest.raises(PixArtError, match="no shards found"):
        extract_features(tmp_path, out, _cfg(enc), progress=False)
    with pytest.raises(PixArtError, match="llava.jsonl"):
        extract_features(raw, out, _cfg(enc, captions=("txt", "llava")), progress=False)
    with pytest.raises(PixArtError, match="would overwrite the input"):
        extract_features(raw, raw, _cfg(enc), progress=False)
    for bad, message in [({"resolution": -32}, "--resolution must be positive, got -32"),
                         ({"resolution": 0}, "--resolution must be positive, got 0"),
                         ({"vae": None, "pixel_autoencoder": 0}, "--pixel-factor must be positive, got 0")]:
        with pytest.raises(PixArtError, match=message):
            extract_features(raw, out, _cfg(enc, **bad), progress=False)
    assert not out.exists()
    extract_features(raw / "shard-000002.tar", out, _cfg(enc), progress=False)
    with pytest.raises(PixArtError, match="made with resolution 32 .this run: 64.; pass --overwrite"):
        extract_features(raw / "shard-000002.tar", out, _cfg(enc, resolution=64), progress=False)
    with pytest.raises(PixArtError, match=r"manifest.json: resolution 32 != config 512"):
        Manifest.load(out).check({"resolution": 512, "dtype": "bf16"})
    with pytest.raises(PixArtError, match=r"unknown cache setting 'learning_rate'"):
        Manifest.load(out).check({"resolution": 32, "learning_rate": 1e-4})
    with pytest.raises(PixArtError, match=r"made with batch_size 3 .this run: 2."):
        extract_features(raw / "shard-000002.tar", out, _cfg(enc, batch_size=2), progress=False)
    ex = extract_features(raw / "shard-000002.tar", out, _cfg(enc, resolution=64), overwrite=True, progress=False)
    assert ex.manifest.resolution == 64 and ex.manifest.complete and Manifest.load(out).resolution == 64
    assert sorted(p.name for p in out.parent.iterdir()) == ["x"]  # the replacement was moved in whole
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    for foreign in (None, '{"name": "my web app"}'):  # also beside another program's manifest.json
        if foreign:
            (tmp_path / "notes" / MANIFEST).write_text(foreign)
        with pytest.raises(PixArtError, match="is not empty and is not a feature cache; choose another --out"):
            extract_features(raw / "shard-000002.tar", tmp_path / "notes", _cfg(enc), overwrite=True, progress=False)
    assert (tmp_path / "notes" / "todo.txt").read_text() == "mine"
    for bad in ("notes/todo.txt", "notes/todo.txt/sub"):
        with pytest.raises(PixArtError, match=rf"^--out {re.escape(str(tmp_path / bad))} is not a folder"):
            extract_features(raw, tmp_path / bad, _cfg(enc), progress=False)
    assert (tmp_path / "notes" / "todo.txt").read_text() == "mine"


def test_overwrite_keeps_the_old_cache_until_the_new_one_is_whole(enc, raw, tmp_path):
    out, caps = tmp_path / "f", tmp_path / "f" / "caps"
    extract_features(raw / "shard-000002.tar", out, _cfg(enc, captions=("txt",)), progress=False)
    before = {p.name: p.read_bytes() for p in out.glob("*.tar")} | {MANIFEST: (out / MANIFEST).read_bytes()}

    def die_after_first(manifest):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # killed while the replacement is half built
        extract_features(raw, out, _cfg(enc, captions=("txt",), resolution=64), overwrite=True, progress=False,
                         on_shard=die_after_first)
    assert {p.name: p.read_bytes() for p in out.glob("*.tar")} | {MANIFEST: (out / MANIFEST).read_bytes()} == before
    ex = extract_features(raw, out, _cfg(enc, captions=("txt",), resolution=64), overwrite=True, progress=False)
    assert [r.name for r in ex.results] == ["shard-000001", "shard-000002"]  # the rerun went on from the first
    assert Manifest.load(out).resolution == 64 and len(Manifest.load(out).shards) == 3
    assert not [p for p in tmp_path.iterdir() if p.name != "f"]
    # killed between moving the old cache aside and the new one in: the next run finishes the move
    extract_features(raw, tmp_path / "other", _cfg(enc, captions=("txt",), resolution=64), progress=False)
    out.rename(tmp_path / ".f.old")
    (tmp_path / "other").rename(tmp_path / ".f.new")
    assert extract_features(raw, out, _cfg(enc, captions=("txt",), resolution=64), progress=False).results == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"] and Manifest.load(out).complete
    caps.mkdir()  # the inputs are never inside what --overwrite replaces
    (caps / "shard-000002.meta.jsonl").write_bytes((raw / "shard-000002.meta.jsonl").read_bytes())
    with pytest.raises(PixArtError, match="holds the input .*caps/shard-000002.meta.jsonl; --overwrite would"):
        extract_features(raw / "shard-000002.tar", out, _cfg(enc, captions=("meta",), captions_dir=str(caps)),
                         overwrite=True, progress=False)


def test_cli(enc, raw, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    cli.add_parser(sub)
    args = parser.parse_args(["extract-features", str(raw / "shard-00000{0,2}.tar"), "--out", str(tmp_path / "c"),
                              "--pixel-autoencoder", "--text-encoder", enc["t5"], "--resolution", "32",
                              "--captions", "txt,meta"])
    args.run(args)
    assert "encoded 8 samples in 2 shards" in capsys.readouterr().out
    assert Manifest.load(tmp_path / "c").caption_sources == ["txt", "meta"]
    accept = next(a.help for a in sub.choices["extract-features"]._actions if "--accept-damaged" in a.option_strings)
    # a garbage tar stays unfinished with it too (test_damaged_input_shards_are_retried_unless_accepted)
    assert "unreadable" not in accept and "nothing could be read (missing, empty, garbage) stays unfinished" in accept


def test_bytes_per_sample_goal(ref):
    """Our text features (valid tokens, bf16) vs PixArt's padded fp32 npz, at the tiny width and at 4096."""
    out, ex = ref
    n = sum(r.count for r in ex.results)
    tokens = sum(r.tokens["txt"] for r in ex.results) / n
    ours = sum(ours_text_bytes(len(s.text["txt"]), 32) for p in out.glob("*.tar") for s in _read(p)) / n
    assert ours <= pixart_text_bytes(32) / 3
    assert pixart_text_bytes(4096) > 120 * 4096 * 4 == 1_966_080
    assert ours_text_bytes(round(tokens), 4096) <= pixart_text_bytes(4096) / 3
    assert ours_text_bytes(79, 4096) <= pixart_text_bytes(4096) / 3 < ours_text_bytes(81, 4096)
    assert ours_text_bytes(120, 4096) / pixart_text_bytes(4096) == pytest.approx(1 / 2, abs=1e-3)  # not 1/3


def _cfg_txt(enc, **kw):
    return _cfg(enc, captions=("txt",), **kw)


def test_a_job_reads_each_shards_record_a_bounded_number_of_times(enc, tmp_path, monkeypatch):
    """The manifest follows each finished shard in memory and reaches the disk when complete (or every
    MANIFEST_EVERY_S): rebuilding it from every record after each shard grew as shards squared (70 minutes of
    bookkeeping for 10,000 shards)."""
    import data_pipelines.features as features
    (tmp_path / "in").mkdir()
    for s in range(12):
        with wds.TarWriter(str(tmp_path / "in" / f"shard-{s:06d}.tar")) as w:
            w.write({"__key__": f"{s:06d}", "png": _png(32, 32, s), "txt": CAPTIONS[s % 5].encode()})
    reads, saves = [], []
    monkeypatch.setattr(features, "MANIFEST_EVERY_S", 1e9)  # no timed save on a slow machine
    monkeypatch.setattr(features, "_entry", lambda out, name, read=features._entry: reads.append(name) or
                        read(out, name))
    monkeypatch.setattr(Manifest, "save", lambda m, folder, save=Manifest.save: saves.append(m.done) or
                        save(m, folder))
    ex = extract_features(tmp_path / "in", tmp_path / "f", _cfg_txt(enc), progress=False)
    assert ex.manifest.complete and Manifest.load(tmp_path / "f").content_hash == ex.manifest.content_hash
    assert len(reads) == 3 * 12 and saves == [0, 12, 12]  # at the start, when complete, and the final reread


def test_changed_input_is_encoded_again(enc, raw, tmp_path):
    """Same shard name, other content (a world regenerated with another seed): the cache follows."""
    src = tmp_path / "in" / "shard-000000.tar"
    src.parent.mkdir()
    src.write_bytes((raw / "shard-000000.tar").read_bytes())
    first = extract_features(src, tmp_path / "f", _cfg_txt(enc), progress=False)
    with wds.TarWriter(str(src)) as w:  # same keys and captions, other pixels
        for k in range(4):
            w.write({"__key__": f"{k:06d}", "png": _png(32, 32, 100 + k), "txt": CAPTIONS[k].encode()})
    again = extract_features(src, tmp_path / "f", _cfg_txt(enc), progress=False)
    assert [r.name for r in again.results] == ["shard-000000"] and again.manifest.complete
    assert again.manifest.shards[0].sha256 != first.manifest.shards[0].sha256
    data = src.read_bytes()
    src.unlink()
    src.write_bytes(data)  # a copy: new mtime, same bytes -> recognised by its sha256, not re-encoded
    assert extract_features(src, tmp_path / "f", _cfg_txt(enc), progress=False).results == []


def test_changed_captions_are_encoded_again(enc, raw, tmp_path):
    """Captions relabeled between runs (or read from another --captions-dir) are the shard's input too: a
    resumed run must not keep the shards encoded from the old ones beside new ones."""
    src, caps = tmp_path / "in" / "shard-000000.tar", tmp_path / "caps"
    src.parent.mkdir()
    caps.mkdir()
    src.write_bytes((raw / "shard-000000.tar").read_bytes())
    sidecar = caps / "shard-000000.meta.jsonl"
    sidecar.write_bytes((raw / "shard-000000.meta.jsonl").read_bytes())
    cfg = _cfg(enc, captions=("meta",), captions_dir=str(caps))
    first = extract_features(src, tmp_path / "f", cfg, progress=False)
    sidecar.write_text("".join(json.dumps({"__key__": f"{k:06d}", "caption": f"a new caption {k}"}) + "\n"
                               for k in range(4)))
    again = extract_features(src, tmp_path / "f", cfg, progress=False)
    assert [r.name for r in again.results] == ["shard-000000"]
    assert again.manifest.shards[0].sha256 != first.manifest.shards[0].sha256
    assert [s.meta["captions"]["meta"] for s in _read(tmp_path / "f" / "shard-000000.tar")][0] == "a new caption 0"
    data = sidecar.read_bytes()
    sidecar.unlink()
    sidecar.write_bytes(data)  # a copy: new mtime, same bytes -> not re-encoded
    assert extract_features(src, tmp_path / "f", cfg, progress=False).results == []


def test_a_subset_run_keeps_the_shards_already_there(enc, raw, tmp_path):
    extract_features(raw / "shard-000000.tar", tmp_path / "f", _cfg_txt(enc), progress=False)
    ex = extract_features(raw / "shard-000002.tar", tmp_path / "f", _cfg_txt(enc), progress=False)
    assert [r.name for r in ex.results] == ["shard-000002"]
    m = Manifest.load(tmp_path / "f")
    assert [s.name for s in m.shards] == ["shard-000000", "shard-000002"] and m.complete and m.count == 8


def test_damaged_input_shards_are_retried_unless_accepted(enc, raw, tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    data = (raw / "shard-000000.tar").read_bytes()
    (src / "cut-000000.tar").write_bytes(data[: len(data) // 2 + 100])  # a killed copy
    (src / "junk-000000.tar").write_bytes(b"garbage, not a tar" * 64)
    (src / "shard-000002.tar").write_bytes((raw / "shard-000002.tar").read_bytes())
    parser = argparse.ArgumentParser()
    cli.add_parser(parser.add_subparsers())
    argv = ["extract-features", str(src), "--out", str(tmp_path / "c"), "--pixel-autoencoder",
            "--text-encoder", enc["t5"], "--resolution", "32"]
    args = parser.parse_args(argv)
    assert args.run(args) == 1  # the exit status: shards left for a rerun
    out = capsys.readouterr().out
    assert "encoded 4 samples in 1 shards (0 skipped)" in out and "1 of 3 shards done;" in out
    assert "2 shards damaged: cut-000000 (" in out and "junk-000000 (nothing could be read (ReadError" in out
    assert out.rstrip().endswith("rerun to retry, or --accept-damaged to keep what was read")
    assert out.count("\n") == 1  # one line, however long tarfile's message
    m = Manifest.load(tmp_path / "c")
    assert not m.complete and not (tmp_path / "c" / "cut-000000.tar").exists()
    args = parser.parse_args(argv + ["--accept-damaged"])
    assert args.run(args) == 1  # the garbage one is never accepted
    out = capsys.readouterr().out
    assert "1 shard damaged, kept as read: cut-000000 (" in out and "2 of 3 shards done;" in out
    assert "1 shard damaged: junk-000000 (nothing could be read (ReadError" in out  # garbage: never an empty shard
    m = Manifest.load(tmp_path / "c")
    cut = next(s for s in m.shards if s.name == "cut-000000")
    assert not m.complete and cut.damaged.endswith(f"after {cut.count} samples") and 0 < cut.count < 4
    assert not cut.skipped and not (tmp_path / "c" / "junk-000000.tar").exists()


def test_pixel_scale_must_be_positive(enc, raw, tmp_path):
    cfg = _cfg(enc, vae=None, pixel_autoencoder=2, pixel_scale=0.0)
    with pytest.raises(PixArtError, match="--pixel-scale must be positive, got 0.0"):
        extract_features(raw, tmp_path / "bad", cfg, progress=False)
    assert not (tmp_path / "bad").exists()


def test_caption_sidecar_lines_are_checked(tmp_path):
    """The relabeling job's lines (data_pipelines/relabel/job.py): a string, or null where it failed."""
    from data_pipelines.features_encode import read_captions

    path = tmp_path / "s.llava.jsonl"
    path.write_text('{"__key__": "a", "caption": "a cat"}\n{"__key__": "b", "caption": null, "status": "failed"}\n')
    assert read_captions(str(path)) == {"a": "a cat", "b": None}
    for bad, message in [('{"__key__": "c", "caption": 123}', ":2: caption is a int, not a string"),
                         ('{"__key__": "c", "caption": {"text": "x"}}', ":2: caption is a dict"),
                         ('{"key": "c"}', ":2: not a caption line")]:
        path.write_text('{"__key__": "a", "caption": "a cat"}\n' + bad + "\n")
        with pytest.raises(PixArtError, match=message):
            read_captions(str(path))
    path.write_bytes(b'{"__key__": "a", "caption": "a cat"}\n{"__key__": "b", "caption": "caf\xe9"}\n')  # latin-1
    with pytest.raises(PixArtError, match=rf"^{re.escape(str(path))}:2: not UTF-8 \('utf-8' codec can't decode byte "
                                          r"0xe9 in position 32: .*\)$"):
        read_captions(str(path))


def test_a_caption_sidecar_without_some_of_the_shards_keys_stops_the_job(enc, raw, tmp_path):
    """A key with no line in the sidecar (a relabel sidecar has a line per sample): with no key in common it holds
    another shard's captions; with some, its captioning stopped early (relabel --accept-damaged on a tar that
    broke off then). One line naming the file and the fix, nothing written for the shard; a null caption is a
    missing caption."""
    caps = tmp_path / "caps"
    caps.mkdir()
    sidecar = caps / "shard-000000.meta.jsonl"
    sidecar.write_bytes((raw / "shard-000001.meta.jsonl").read_bytes())  # keys 4-7
    cfg = _cfg(enc, captions=("txt", "meta"), captions_dir=str(caps))
    with pytest.raises(PixArtError, match=r"^" + re.escape(
            f"{sidecar}: holds another shard's captions (none of the 4 samples of shard shard-000000, e.g. key "
            "'000000'): point --captions-dir at this shard's captions") + "$"):
        extract_features(raw / "shard-000000.tar", tmp_path / "f", cfg, progress=False)
    assert not list((tmp_path / "f").glob("*.tar")) and not list((tmp_path / "f").glob(".*.tmp*"))
    assert not Manifest.load(tmp_path / "f").complete
    sidecar.write_bytes(b"".join((raw / "shard-000000.meta.jsonl").read_bytes().splitlines(keepends=True)[:3]))
    with pytest.raises(PixArtError, match=r"^" + re.escape(
            f"{sidecar}: covers only 3 of 4 samples of shard shard-000000 (e.g. key '000003' is missing): its "
            f"captioning did not read the whole shard; remove {sidecar} and rerun pixart relabel") + "$"):
        extract_features(raw / "shard-000000.tar", tmp_path / "f", cfg, progress=False)
    assert not list((tmp_path / "f").glob("*.tar")) and not list((tmp_path / "f").glob(".*.tmp*"))
    (caps / "shard-000000.meta.jsonl").write_text("".join(
        json.dumps({"__key__": f"{k:06d}", "caption": None if k == 2 else f"a caption {k}"}) + "\n" for k in range(4)))
    ex = extract_features(raw / "shard-000000.tar", tmp_path / "f", cfg, progress=False)
    assert ex.manifest.complete and ex.manifest.count == 4 and ex.results[0].missing_captions == {"meta": 1}


def test_an_input_of_which_nothing_could_be_read_is_never_finished(enc, raw, tmp_path):
    """A failed pipe: command, an empty file, an HTTP 404: not a tar that broke off, so --accept-damaged does not
    finish them as empty shards; the summary does not offer it."""
    (tmp_path / "empty-000000.tar").write_bytes(b"")
    with serve(raw) as base:
        unreadable = ["pipe:false pipe-000000.tar", str(tmp_path / "empty-000000.tar"), f"{base}/gone-000000.tar"]
        ex = extract_features([str(raw / "shard-000000.tar"), *unreadable], tmp_path / "f",
                              _cfg_txt(enc, accept_damaged=True), progress=False)
    assert [r.name for r in ex.results] == ["shard-000000"] and not ex.manifest.complete
    assert sorted(r.name for r in ex.damaged) == ["empty-000000", "gone-000000", "pipe-000000"]
    assert all(r.damaged.startswith("nothing could be read (") for r in ex.damaged)
    assert "gone-000000 (nothing could be read (HTTPError: HTTP Error 404" in ex.describe(tmp_path / "f")
    assert ex.describe(tmp_path / "f").endswith("rerun to retry")  # --accept-damaged would not help
    assert sorted(p.name for p in (tmp_path / "f").glob("*.tar")) == ["shard-000000.tar"]


@contextlib.contextmanager
def serve(folder, head: bool = True):
    """`folder` over HTTP on 127.0.0.1: the base URL. Without `head`, HEAD requests get 403, as S3 answers them
    for a presigned GET-only URL."""
    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_HEAD(self):
            if head:
                return super().do_HEAD()
            self.send_error(403, "SignatureDoesNotMatch")

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()


def test_a_url_that_answers_no_head_is_known_by_its_text_and_resumes(enc, raw, tmp_path):
    with serve(raw, head=False) as base:
        urls = [f"{base}/shard-00000{i}.tar" for i in range(2)]
        ex = extract_features(urls, tmp_path / "f", _cfg_txt(enc), progress=False)
        assert ex.manifest.complete and len(ex.results) == 2
        records = sorted((tmp_path / "f" / ".done").glob("*.json"))
        assert [json.loads(r.read_text())["input"] for r in records] == [{"url": u} for u in urls]
        again = extract_features(urls, tmp_path / "f", _cfg_txt(enc), progress=False)
        assert again.manifest.complete and again.results == []  # kept, not encoded again


def test_encoders_of_the_wrong_kind_are_one_line(enc, raw, tmp_path):
    from data_pipelines.relabel.tiny_vlm import make_tiny_vlm

    with pytest.raises(PixArtError, match=r"^VAE: '.*t5' is not a VAE \(its config has no latent_channels\)$"):
        extract_features(raw, tmp_path / "x", _cfg(enc, vae=enc["t5"]), progress=False)
    vlm = make_tiny_vlm("llava", tmp_path / "llava")
    with pytest.raises(PixArtError, match=r"^T5 text encoder: '.*llava' is not a T5 encoder \(its config, "
                                          r"model_type 'llava', has no d_model\)$"):
        extract_features(raw, tmp_path / "x", _cfg(enc, text_encoder=str(vlm)), progress=False)
    with pytest.raises(PixArtError, match=r"^T5 text encoder: '.*vae' is not a T5 encoder \(its config, _class_name "
                                          r"'AutoencoderKL', has no d_model\)$"):  # --vae and --text-encoder swapped
        extract_features(raw, tmp_path / "x", _cfg(enc, text_encoder=enc["vae"], vae=enc["t5"]), progress=False)
    assert not (tmp_path / "x").exists()


def test_a_diffusers_pipeline_folder_names_its_own_encoders(enc, raw, ref, tmp_path):
    """`--text-encoder P --vae P` on a pipeline folder (as diffusers' `save_pretrained` lays it out: text_encoder/,
    tokenizer/, vae/ beside model_index.json) encodes as the encoders' own folders do, as the other loaders read it."""
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel
    from transformers import AutoTokenizer, T5EncoderModel

    transformer = PixArtTransformer2DModel(sample_size=4, num_layers=1, attention_head_dim=8, num_attention_heads=2,
                                           in_channels=4, out_channels=4, caption_channels=32, cross_attention_dim=16,
                                           patch_size=2, norm_type="ada_norm_single")
    PixArtAlphaPipeline(tokenizer=AutoTokenizer.from_pretrained(enc["t5"]),
                        text_encoder=T5EncoderModel.from_pretrained(enc["t5"]),
                        vae=AutoencoderKL.from_pretrained(enc["vae"]), transformer=transformer,
                        scheduler=DPMSolverMultistepScheduler()).save_pretrained(tmp_path / "pipe")
    pipe = str(tmp_path / "pipe")
    got = extract_features(raw, tmp_path / "f", _cfg(enc, text_encoder=pipe, vae=pipe), progress=False)
    want = Manifest.load(ref[0])
    assert got.manifest.text_encoder_hash == want.text_encoder_hash
    assert got.manifest.image_encoder_hash == want.image_encoder_hash
    for name in ("shard-000000.tar", "shard-000002.tar"):
        for a, b in zip(_read(ref[0] / name), _read(tmp_path / "f" / name), strict=True):
            assert torch.equal(a.latent_mean, b.latent_mean) and torch.equal(a.text["meta"], b.text["meta"])


def test_a_cache_with_no_finished_shard_takes_other_settings(enc, raw, tmp_path):
    """A first shard that failed (another shard's captions) leaves a manifest naming settings no features were made
    with: a rerun with other settings is no rerun of that cache, and needs no --overwrite."""
    caps = tmp_path / "caps"
    caps.mkdir()
    (caps / "shard-000000.meta.jsonl").write_bytes((raw / "shard-000001.meta.jsonl").read_bytes())
    with pytest.raises(PixArtError, match="holds another shard's captions"):
        extract_features(raw / "shard-000000.tar", tmp_path / "f", _cfg(enc, captions_dir=str(caps)), progress=False)
    ex = extract_features(raw / "shard-000000.tar", tmp_path / "f", _cfg_txt(enc, resolution=64), progress=False)
    assert ex.manifest.complete and ex.manifest.resolution == 64 and ex.manifest.caption_sources == ["txt"]
    with pytest.raises(PixArtError, match="made with resolution 64 .this run: 32.; pass --overwrite"):  # now bound
        extract_features(raw / "shard-000000.tar", tmp_path / "f", _cfg_txt(enc), progress=False)


def test_caption_sources_are_a_set(enc, raw, ref, tmp_path):
    """Each source's features are stored under its name: `--captions meta,txt` resumes a `txt,meta` cache, and
    gives the same bytes."""
    extract_features(raw / "shard-000000.tar", tmp_path / "f", _cfg(enc, captions=("txt", "meta")), progress=False)
    ex = extract_features(raw, tmp_path / "f", _cfg(enc, captions=("meta", "txt")), progress=False)
    assert [r.name for r in ex.results] == ["shard-000001", "shard-000002"] and ex.manifest.complete
    assert ex.manifest.content_hash == ref[1].manifest.content_hash
    with pytest.raises(PixArtError, match=r"made with caption_sources \['meta', 'txt'\] .this run: \['txt'\]."):
        extract_features(raw, tmp_path / "f", _cfg_txt(enc), progress=False)


def test_a_killed_worker_is_one_line_and_the_rerun_resumes(enc, raw, tmp_path):
    """A worker killed (the OOM killer, kill -9; here by its own shard's pipe: command) breaks the pool."""
    killer = f"pipe:[ $PPID != {os.getpid()} ] && kill -9 $PPID; cat {raw}/shard-000000.tar"  # never pytest itself
    with pytest.raises(PixArtError, match=r"^an extract-features worker died \(killed: out of memory\?\); finished "
                                          r"shards are kept, rerun to resume$"):
        extract_features([killer, str(raw / "shard-000001.tar")], tmp_path / "f", _cfg_txt(enc, workers=2),
                         progress=False)
    ex = extract_features(raw / "shard-00000[01].tar", tmp_path / "f", _cfg_txt(enc), progress=False)
    assert ex.manifest.complete and ex.manifest.count == 7


def test_a_full_disk_names_the_shard_being_written(enc, raw, tmp_path, monkeypatch):
    import errno

    from pixart.data.tars import ShardWriter

    def full(self, sample):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ShardWriter, "write", full)
    with pytest.raises(OSError, match="No space left on device") as e:
        extract_features(raw / "shard-000002.tar", tmp_path / "f", _cfg_txt(enc), progress=False)
    assert e.value.filename == str(tmp_path / "f" / "shard-000002.tar")
    assert not [p for p in (tmp_path / "f").iterdir() if p.name not in (".done", MANIFEST)]  # no temp file left


def test_a_folder_of_gzipped_shards(enc, raw, tmp_path):
    """The readers unpack gzip, so a folder lists its *.tar.gz as a glob does."""
    import gzip

    (tmp_path / "gz").mkdir()
    (tmp_path / "gz" / "shard-000000.tar.gz").write_bytes(gzip.compress((raw / "shard-000000.tar").read_bytes()))
    ex = extract_features(tmp_path / "gz", tmp_path / "f", _cfg_txt(enc), progress=False)
    assert [r.name for r in ex.results] == ["shard-000000.tar.gz"] and ex.manifest.count == 4
    assert [s.key for s in _read(tmp_path / "f" / "shard-000000.tar.gz.tar")] == [f"{k:06d}" for k in range(4)]


def test_the_cls_member_becomes_the_samples_label(enc, tmp_path):
    """webdataset's class member (`KEY.cls`: an integer as text, timm's `imagenet-1k-wds` shards' label) is kept as
    the feature sample's `label`, which a class-conditional stage trains on; a `cls` that is no integer is skipped."""
    with wds.TarWriter(str(tmp_path / "imagenet.tar")) as w:
        for i, cls in enumerate(["3", "17", "x"]):
            w.write({"__key__": f"n{i}", "jpg": _jpg(32, 32, i), "cls": cls, "json": json.dumps({"label": 99})})
    ex = extract_features(tmp_path / "imagenet.tar", tmp_path / "f", _cfg_txt(enc), progress=False)
    assert [s.meta["label"] for s in _read(tmp_path / "f" / "imagenet.tar")] == [3, 17]
    assert ex.manifest.shards[0].skipped == [{"key": "n2", "reason": "bad cls: 'x' is not an integer"}]


def test_img2dataset_shards_are_read_as_they_are(enc, tmp_path):
    """img2dataset's `--output_format webdataset`, as its `WebDatasetSampleWriter` (img2dataset/writer.py, 1.47)
    writes it: keys of shard and index digits through webdataset's TarWriter, the image (jpg, or webp with
    `--encode_format webp`), the caption as `txt`, its metadata as 4-space-indented `json`; beside each tar a
    `.parquet` of every url (failed downloads too) and a `_stats.json`. A failed download has no member."""
    folder = tmp_path / "laion"
    folder.mkdir()
    fmt = {0: "jpg", 1: "webp", 3: "jpg"}  # index 2 failed to download
    with wds.TarWriter(str(folder / "00000.tar")) as w:
        for i, ext in fmt.items():
            key, (iw, ih) = f"00000{i:04d}", ((48, 32), (32, 48), (40, 40), (32, 32))[i]
            buf = io.BytesIO()
            Image.open(io.BytesIO(_png(iw, ih, i))).save(buf, "JPEG" if ext == "jpg" else "WEBP")
            meta = {"url": f"https://example.com/{i}.jpg", "caption": CAPTIONS[i], "key": key, "status": "success",
                    "error_message": None, "width": iw, "height": ih, "original_width": iw * 4,
                    "original_height": ih * 4, "exif": "{}", "sha256": "0" * 64}
            w.write({"__key__": key, ext: buf.getvalue(), "txt": CAPTIONS[i], "json": json.dumps(meta, indent=4)})
    (folder / "00000.parquet").write_bytes(b"PAR1" + bytes(16) + b"PAR1")
    (folder / "00000_stats.json").write_text(json.dumps({"count": 4, "successes": 3, "failed_to_download": 1}))
    cfg = _cfg_txt(enc, vae=None, pixel_autoencoder=2, resolution=None, buckets="ms32")
    ex = extract_features(folder, tmp_path / "f", cfg, progress=False)
    assert [r.name for r in ex.results] == ["00000"]  # the parquet and the stats beside it are not shards
    assert ex.manifest.count == 3 and not ex.manifest.shards[0].skipped
    samples = _read(tmp_path / "f" / "00000.tar")
    assert [s.key for s in samples] == ["000000000", "000000001", "000000003"]
    for s, i in zip(samples, fmt, strict=True):
        assert s.meta["captions"]["txt"] == CAPTIONS[i] and s.meta["url"] == f"https://example.com/{i}.jpg"
        assert s.meta["target_hw"] == list(nearest_bucket(s.meta["height"], s.meta["width"], bucket_table("ms32"))[1])
    assert [s.meta["target_hw"][0] < s.meta["target_hw"][1] for s in samples] == [True, False, False]
