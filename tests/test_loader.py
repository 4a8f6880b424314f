"""The streaming loader: distribution over ranks, shared buckets, exact resume, corrupt data."""
import io
import itertools
import json
import logging
import re
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
import webdataset as wds
from conftest import turned_photo, write_tar
from PIL import Image
from tolerance import conditioned

from pixart.data.loader import Loader, LoaderConfig
from pixart.data.schema import FeatureSample
from pixart.data.shards import shard_name
from pixart.errors import PixArtError


def _png(h, w, seed):
    rgb = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def write_raw(path, keys, sizes):
    with wds.TarWriter(str(path)) as tw:
        for i, (key, (h, w)) in enumerate(zip(keys, sizes, strict=True)):
            tw.write({"__key__": key, "png": _png(h, w, i), "txt": f"caption {key}".encode(),
                      "json": json.dumps({"width": w, "height": h}).encode()})


def write_features(path, keys, shapes, seed=0, dim=8, std=0.1):
    """Feature shard `path`; returns what it stores, by key."""
    g, stored = torch.Generator().manual_seed(seed), {}
    with wds.TarWriter(str(path)) as tw:
        for i, (key, (h, w)) in enumerate(zip(keys, shapes, strict=True)):
            n = 2 + i % 5
            fs = FeatureSample(key, torch.randn(4, h, w, generator=g), torch.rand(4, h, w, generator=g) * std,
                               {"txt": torch.randn(n, dim, generator=g)},
                               {"width": w * 8 + i, "height": h * 8, "captions": {"txt": f"cap {key}"}})
            tw.write(fs.to_wds())
            stored[key] = fs
    return stored


@pytest.fixture
def feats(tmp_path):
    """3 feature shards of uneven size (7, 5, 4 samples), two latent shapes."""
    sizes, k = [7, 5, 4], 0
    for s, n in enumerate(sizes):
        keys = [f"s{s}_{i:03d}" for i in range(n)]
        write_features(tmp_path / f"f-{s:02d}.tar", keys, [(4, 4) if (k + i) % 3 else (4, 6) for i in range(n)], seed=s)
        k += n
    return tmp_path


def take(loader, n):
    return list(itertools.islice(iter(loader), n))


def keys_of(batches):
    return [b["keys"] for b in batches]


def epoch_share(loader, epoch, role=0):
    """The keys of one epoch's share of the loader's slot for `role`, in reading order."""
    from pixart.data.loader_stream import BucketStream
    keys = []
    for pos, raw in BucketStream(loader.plan, loader.decoder, 1, role)._samples((epoch, 0, 0)):
        if pos[0] > epoch:
            return keys
        keys.append(raw["__key__"])


def write_manifest(folder, shards, scaling=1.0, shift=0.0, done=None, text_dim=8, downsample=8):
    """A manifest.json for feature shards: {shard name: (count, {"HxW" pixel size: samples})}."""
    done = len(shards) if done is None else done
    entries = [{"name": name, "count": n, "complete": i < done, "buckets": buckets}
               for i, (name, (n, buckets)) in enumerate(shards.items())]
    m = {"image_encoder": "vae", "image_encoder_hash": "h", "text_encoder": "t5", "text_encoder_hash": "h",
         "dtype": "fp32", "max_length": 8, "resolution": None, "buckets": None, "caption_sources": ["txt"],
         "latent_channels": 4, "downsample_factor": downsample, "scaling_factor": scaling, "shift_factor": shift,
         "text_dim": text_dim, "batch_size": 4, "shards": entries, "version": 2}
    (folder / "manifest.json").write_text(json.dumps(m))


def test_feature_batch_fields(feats):
    b = take(Loader(LoaderConfig(str(feats), batch_size=2, seed=1)), 1)[0]
    B, L = 2, b["y"].shape[1]
    assert b["latents"].shape[0] == B and b["latents"].shape[1] == 4 and b["y"].shape == (B, L, 8)
    assert b["mask"].shape == (B, L) and b["mask"].sum(1).max() == L  # padded to the longest caption
    assert b["data_info"]["img_hw"].shape == (B, 2) and b["data_info"]["aspect_ratio"].shape == (B, 1)
    assert b["captions"][0].startswith("cap ")


def test_a_batch_holds_each_samples_stored_features(tmp_path):
    """Sample by sample against what the shard stores: the latent mean shifted and scaled as the manifest says
    (its std 0: no posterior noise), the caption's features padded to the batch's longest with the mask marking
    them, PixArt's img_hw (height, width of the source image) and aspect ratio (of the latent), the caption text."""
    keys, shapes = [f"k{i}" for i in range(6)], [(4, 4), (4, 6)] * 3
    stored = write_features(tmp_path / "web-000000.tar", keys, shapes, std=0.0)
    write_manifest(tmp_path, {"web-000000": (6, {"32x32": 3, "32x48": 3})}, scaling=0.5, shift=0.25)
    seen = set()
    for b in take(Loader(LoaderConfig(str(tmp_path), batch_size=3, seed=1)), 2):
        L = b["y"].shape[1]
        for i, key in enumerate(b["keys"]):
            fs, n = stored[key], stored[key].text["txt"].shape[0]
            assert torch.equal(b["latents"][i], (fs.latent_mean - 0.25) * 0.5), key
            assert torch.equal(b["y"][i, :n], fs.text["txt"]) and not b["y"][i, n:].any(), key
            assert b["mask"][i].tolist() == [1] * n + [0] * (L - n), key
            assert b["data_info"]["img_hw"][i].tolist() == [fs.meta["height"], fs.meta["width"]], key
            h, w = fs.latent_mean.shape[1:]
            assert b["data_info"]["aspect_ratio"][i].item() == pytest.approx(h / w), key
            assert b["captions"][i] == f"cap {key}"
            seen.add(key)
    assert seen == set(keys)


def test_two_ranks_three_uneven_shards_cover_each_epoch(feats):
    """Both ranks yield every step; within epoch 0 no key is on both ranks and all are covered."""
    per_rank = []
    for rank in range(2):
        loader = Loader(LoaderConfig(str(feats), batch_size=2, seed=3, rank=rank, world_size=2, buffer_size=10_000))
        seen = []
        for b in take(loader, 12):
            seen.append(b)
        per_rank.append((seen, loader))
    for seen, _ in per_rank:
        assert len(seen) == 12  # nobody runs dry on uneven shards
    # Same bucket (shape) at every step on both ranks.
    for a, b in zip(per_rank[0][0], per_rank[1][0], strict=True):
        assert a["bucket"] == b["bucket"] and a["latents"].shape == b["latents"].shape
    # Epoch 0: each rank's whole epoch-0 share, sample by sample.
    shares = [epoch_share(loader, 0) for _, loader in per_rank]
    assert not set(shares[0]) & set(shares[1])
    assert len(shares[0]) + len(shares[1]) == 16 and len(set(shares[0]) | set(shares[1])) == 16
    assert abs(len(shares[0]) - len(shares[1])) <= 3  # balanced within a shard's size difference


def test_same_bucket_across_ranks_raw(tmp_path):
    sizes = [(32, 64), (64, 32), (48, 48), (32, 64), (64, 32), (48, 48)] * 2
    for s in range(3):
        write_raw(tmp_path / f"r-{s}.tar", [f"r{s}_{i}" for i in range(12)], sizes)
    cfg = dict(shards=str(tmp_path), batch_size=2, seed=0, buckets=64, world_size=3)
    runs = [take(Loader(LoaderConfig(**cfg, rank=r)), 9) for r in range(3)]
    for step in zip(*runs, strict=True):
        assert len({b["bucket"] for b in step}) == 1
        assert len({tuple(b["pixels"].shape) for b in step}) == 1
    assert {b["bucket"] for b in runs[0]} == {"0.5", "1.0", "2.0"}  # all three buckets get used
    px = runs[0][0]["pixels"]
    assert px.min() >= -1 and px.max() <= 1 and px.dtype == torch.float32
    assert runs[0][0]["captions"][0].startswith("caption ")


def test_resume_exact(feats):
    cfg = LoaderConfig(str(feats), batch_size=3, seed=7, buffer_size=6)
    straight = keys_of(take(Loader(cfg), 10))
    first = Loader(cfg)
    part = keys_of(take(first, 5))
    state = json.loads(json.dumps(first.state_dict()))
    second = Loader(cfg)
    second.load_state_dict(state)
    assert part + keys_of(take(second, 5)) == straight
    assert len(json.dumps(state)) < 4000


def test_a_resume_reads_the_members_of_its_buffered_samples_alone(tmp_path, monkeypatch):
    """A rare bucket's buffered samples can lie far behind the last one read; the replay that brings them back
    used to read every sample between (32,000 at step 4,500 of 2,000 shards: gigabytes of latents at 256 px)."""
    import pixart.data.loader_stream as stream
    entries = {}
    for s in range(40):  # 8 samples of 4x6, one batch, read early and scheduled late (seed 2)
        shapes = [(4, 6) if s % 5 == 0 and i == 0 else (4, 4) for i in range(5)]
        write_features(tmp_path / f"web-{s:06d}.tar", [f"s{s}_{i}" for i in range(5)], shapes, seed=s)
        entries[f"web-{s:06d}"] = (5, {"32x48": shapes.count((4, 6)), "32x32": shapes.count((4, 4))})
    write_manifest(tmp_path, entries)
    cfg = LoaderConfig(str(tmp_path), batch_size=8, seed=2)
    straight = keys_of(take(Loader(cfg), 20))
    first = Loader(cfg)
    part = keys_of(take(first, 15))
    state = json.loads(json.dumps(first.state_dict()))
    assert {b: len(ps) for b, ps in state["workers"]["0"]["buffered"].items()} == {"4x6": 5}
    payloads, read = [], stream.read_tar
    monkeypatch.setattr(stream, "read_tar", lambda url, on_error=None, keep=None: (
        payloads.append(len(s) > 2) or s for s in read(url, on_error, **({"keep": keep} if keep else {}))))
    second = Loader(cfg)
    second.load_state_dict(state)
    rest = iter(second)
    part.append(next(rest)["keys"])
    assert sum(payloads) <= 5 + 2 * 8 and len(payloads) > 100  # the buffered five and about a batch; the rest keys
    assert part + [next(rest)["keys"] for _ in range(4)] == straight


def test_resume_exact_with_workers(feats):
    cfg = LoaderConfig(str(feats), batch_size=2, seed=5, num_workers=2)
    straight = take(Loader(cfg), 8)
    first = Loader(cfg)
    part = take(first, 3)  # resume mid-cycle: step 3 belongs to worker role 1
    second = Loader(cfg)
    second.load_state_dict(json.loads(json.dumps(first.state_dict())))
    rest = take(second, 5)
    assert keys_of(part + rest) == keys_of(straight)
    for a, b in zip(part + rest, straight, strict=True):  # the latent noise is the same too
        assert torch.equal(a["latents"], b["latents"])


def test_a_process_that_fails_while_its_workers_read_exits(feats):
    """The workers ignore SIGTERM (preemption), the signal multiprocessing ends them with at exit: a training process
    that failed with an uncaught exception (a bug, an out-of-memory error) hung at exit forever, never reaching the
    launcher that would restart it."""
    script = (f"from pixart.data.loader import Loader, LoaderConfig\n"
              f"def train():  # as Trainer._loop holds its batches\n"
              f"    batches = iter(Loader(LoaderConfig({str(feats)!r}, batch_size=2, num_workers=1)))\n"
              f"    next(batches)\n"
              f"    raise RuntimeError('a step failed')\n"
              f"train()\n")
    failed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert failed.returncode == 1 and failed.stderr.strip().endswith("RuntimeError: a step failed")


def test_deterministic_and_seed_dependent(feats):
    a = keys_of(take(Loader(LoaderConfig(str(feats), batch_size=2, seed=0)), 6))
    assert a == keys_of(take(Loader(LoaderConfig(str(feats), batch_size=2, seed=0)), 6))
    assert a != keys_of(take(Loader(LoaderConfig(str(feats), batch_size=2, seed=1)), 6))


def test_starving_bucket_reported(tmp_path, caplog):
    shapes = [(4, 8)] + [(4, 4)] * 9  # one lonely 4x8 sample: cannot fill a batch of 2 per rank
    write_features(tmp_path / "a.tar", [f"k{i}" for i in range(10)], shapes)
    with caplog.at_level(logging.WARNING, logger="pixart.data"):
        loader = Loader(LoaderConfig(str(tmp_path), batch_size=2))
    assert loader.stats.starving == {"4x8": 1}
    assert "4x8" in caplog.text and "starving" in caplog.text
    batches = take(loader, 20)  # five epochs: the sample is counted once, not once per epoch
    assert {b["bucket"] for b in batches} == {"4x4"}
    assert loader.stats.skipped.get("unscheduled bucket 4x8") == 1


def test_starving_raw_bucket_merged(tmp_path):
    sizes = [(32, 64)] + [(32, 32)] * 6  # the single wide image joins the nearest bucket
    write_raw(tmp_path / "a.tar", [f"k{i}" for i in range(7)], sizes)
    loader = Loader(LoaderConfig(str(tmp_path), batch_size=2, buckets=64))
    assert loader.stats.merged == {"0.5": "1.0"} and loader.stats.starving == {}
    batches = take(loader, 4)
    assert "k0" in sum(keys_of(batches), []) and all(b["pixels"].shape[-2:] == (64, 64) for b in batches)


def test_a_turned_photo_goes_to_the_bucket_of_its_displayed_shape(tmp_path):
    """64 x 32 px as stored, tagged for a quarter turn: shown 32 wide and 64 high (diffusers' `load_image`
    reads it so), so it belongs with the tall images, and trains upright."""
    with wds.TarWriter(str(tmp_path / "a.tar")) as tw:  # jpg + txt, no json: its size is read from the header
        for i in range(4):
            tw.write({"__key__": f"p{i}", "jpg": turned_photo(6, w=64, h=32), "txt": b"a photo"})
    batches = take(Loader(LoaderConfig(str(tmp_path), batch_size=2, buckets=64)), 2)
    assert {b["bucket"] for b in batches} == {"2.0"}  # height / width
    assert all(b["pixels"].shape[-2] > b["pixels"].shape[-1] for b in batches)


def test_a_class_conditional_loader_reads_the_cls_member_and_no_caption(tmp_path, feats):
    """webdataset's class member (`KEY.cls`, an integer as text, as timm's ImageNet shards have it) is the label, and
    with `caption=None` a sample needs no caption: raw shards give pixels and labels, feature shards no `y`."""
    raw = tmp_path / "raw" / "a.tar"  # feats are in tmp_path
    raw.parent.mkdir()
    with wds.TarWriter(str(raw)) as tw:
        for i in range(4):
            tw.write({"__key__": f"n{i}", "png": _png(32, 32, i), "cls": str(7 + i).encode()})
    (batch,) = take(Loader(LoaderConfig(str(raw), batch_size=4, resolution=32, caption=None)), 1)
    assert sorted(batch["labels"].tolist()) == [7, 8, 9, 10] and batch["captions"] == [""] * 4
    (batch,) = take(Loader(LoaderConfig(str(feats), batch_size=2, caption=None)), 1)
    assert "y" not in batch and "mask" not in batch and batch["latents"].shape[0] == 2


def test_corrupt_samples_skipped_and_counted(tmp_path):
    write_raw(tmp_path / "a.tar", [f"a{i}" for i in range(6)], [(32, 32)] * 6)
    with wds.TarWriter(str(tmp_path / "b.tar")) as tw:
        tw.write({"__key__": "bad_img", "png": b"not a png", "txt": b"x", "json": b'{"width": 32, "height": 32}'})
        tw.write({"__key__": "no_cap", "png": _png(32, 32, 0), "json": b'{"width": 32, "height": 32}'})
        for i in range(4):
            tw.write({"__key__": f"b{i}", "png": _png(32, 32, i), "txt": b"ok"})
    write_raw(tmp_path / "c.tar", [f"c{i}" for i in range(40)], [(32, 32)] * 40)
    data = (tmp_path / "c.tar").read_bytes()
    (tmp_path / "c.tar").write_bytes(data[: len(data) // 2])  # truncated mid-shard
    write_raw(tmp_path / "d.tar", [f"d{i}" for i in range(6)], [(32, 32)] * 6)
    with tarfile.open(tmp_path / "d.tar") as tar:
        cut = tar.getmembers()[9].offset  # exactly at a header: tarfile alone would not notice
    (tmp_path / "d.tar").write_bytes((tmp_path / "d.tar").read_bytes()[:cut])
    # a member name twice: which one is meant is unknown
    write_tar(tmp_path / "e.tar", [("dup.png", _png(32, 32, 0)), ("dup.png", _png(32, 32, 1)), ("dup.txt", b"x")])
    loader = Loader(LoaderConfig(str(tmp_path), batch_size=4, resolution=32))
    keys = sum(keys_of(take(loader, 30)), [])  # about four epochs: each bad sample is counted once
    st = loader.stats
    assert st.skipped.get("bad image") == 1 and st.skipped.get("missing caption") == 1
    assert st.skipped.get("duplicate file name") == 1
    assert st.damaged_shards == {str(tmp_path / "c.tar"): 1, str(tmp_path / "d.tar"): 1}
    assert not {"bad_img", "no_cap", "dup"} & set(keys) and any(k.startswith("c") for k in keys)


def test_missing_or_empty_shards_error(tmp_path):
    with pytest.raises(PixArtError, match="no such shard"):
        Loader(LoaderConfig(str(tmp_path / "nope-{000..003}.tar")))
    with pytest.raises(PixArtError, match="no shards found"):
        Loader(LoaderConfig(str(tmp_path)))
    with pytest.raises(PixArtError, match="empty shard list"):
        Loader(LoaderConfig([]))
    with wds.TarWriter(str(tmp_path / "empty.tar")):
        pass
    with pytest.raises(PixArtError, match="no readable sample"):
        Loader(LoaderConfig(str(tmp_path)))


def test_rank_and_world_come_from_the_config_else_the_environment(feats, monkeypatch):
    """torchrun's $RANK/$WORLD_SIZE split the shards when no process group is up; a bad value is one line."""
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)  # another test's group may be up
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    loader = Loader(LoaderConfig(str(feats), batch_size=2))
    assert (loader.rank, loader.world_size) == (1, 2)
    assert Loader(LoaderConfig(str(feats), batch_size=2, rank=0)).rank == 0
    monkeypatch.setenv("RANK", "one")
    with pytest.raises(PixArtError, match=r"^RANK='one' is not an integer$"):
        Loader(LoaderConfig(str(feats), batch_size=2))
    with pytest.raises(PixArtError, match=re.escape("RANK 2 is not in [0, WORLD_SIZE=2)")):
        Loader(LoaderConfig(str(feats), batch_size=2, rank=2, world_size=2))


def test_caption_mix(tmp_path):
    g = torch.Generator().manual_seed(0)
    with wds.TarWriter(str(tmp_path / "m.tar")) as tw:
        for i in range(40):
            fs = FeatureSample(f"k{i}", torch.zeros(4, 2, 2), torch.zeros(4, 2, 2),
                               {"txt": torch.randn(2, 8, generator=g), "llava": torch.randn(9, 8, generator=g)})
            tw.write(fs.to_wds())
    loader = Loader(LoaderConfig(str(tmp_path), batch_size=4, caption={"txt": 0.5, "llava": 0.5}))
    lengths = torch.cat([b["mask"].sum(1) for b in take(loader, 10)])
    assert set(lengths.tolist()) == {2, 9}


def test_raw_with_encoders(tmp_path):
    from pixart.encoders import ImageAutoencoder, TextEncoder, TextEncoderConfig, VAEConfig, make_tiny_t5, make_tiny_vae
    write_raw(tmp_path / "a.tar", [f"a{i}" for i in range(4)], [(32, 32)] * 4)
    t5 = TextEncoder(TextEncoderConfig(str(make_tiny_t5(tmp_path / "t5")), dtype="fp32", local_files_only=True))
    vae = ImageAutoencoder(VAEConfig(str(make_tiny_vae(tmp_path / "vae")), local_files_only=True))
    b = take(Loader(LoaderConfig(str(tmp_path / "a.tar"), batch_size=2, resolution=32), t5, vae), 1)[0]
    assert b["latents"].shape == (2, 4, 16, 16) and b["y"].shape[0] == 2 and b["y"].shape[-1] == t5.dim
    assert b["mask"].shape == b["y"].shape[:2] and b["mask"][:, -1].any()


def test_bounded_buffers_repeat_and_still_resume(tmp_path):
    """Buckets sitting in separate shards: the read-ahead limit repeats samples instead of growing."""
    write_features(tmp_path / "a.tar", [f"a{i}" for i in range(12)], [(4, 4)] * 12)
    write_features(tmp_path / "b.tar", [f"b{i}" for i in range(12)], [(4, 6)] * 12)
    cfg = LoaderConfig(str(tmp_path), batch_size=3, seed=2, buffer_size=4)
    loader = Loader(cfg)
    straight = take(loader, 12)
    assert loader.stats.repeated > 0
    for b in straight:
        assert len(b["keys"]) == 3 and b["latents"].shape[-1] == int(b["bucket"].split("x")[1])
        assert {k[0] for k in b["keys"]} == {"a" if b["bucket"] == "4x4" else "b"}
    first = Loader(cfg)
    part = keys_of(take(first, 7))
    second = Loader(cfg)
    second.load_state_dict(first.state_dict())
    assert part + keys_of(take(second, 5)) == keys_of(straight)


def test_resume_in_another_setup_restarts_the_epoch(feats, caplog):
    first = Loader(LoaderConfig(str(feats), batch_size=2, seed=0))
    take(first, 4)
    other = Loader(LoaderConfig(str(feats), batch_size=2, seed=0, num_workers=2))
    with caplog.at_level(logging.WARNING, logger="pixart.data"):
        other.load_state_dict(first.state_dict())
    assert "exact data position lost" in caplog.text
    batches = take(other, 3)
    assert [b["step"] for b in batches] == [4, 5, 6] and other.step == 7
    # epoch 0 again from its start, as the new setup reads it (step 4 has the role step 0 has with 2 workers)
    assert keys_of(batches) == keys_of(take(Loader(LoaderConfig(str(feats), batch_size=2, seed=0, num_workers=2)), 3))


def _gloo_rank(rank, shards, init, out):
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        # rank/world from the group; the ranks' own scans would differ: rank 0's counts are broadcast
        loader = Loader(LoaderConfig(shards, batch_size=2, seed=4, scan_samples=None if rank else 9))
        batches = take(loader, 6)
        mine = [(b["bucket"], b["keys"]) for b in batches], loader.state_dict()["schedule"]
        both = [None, None]
        torch.distributed.all_gather_object(both, mine)
        if rank == 0:
            out.put(both)
    finally:
        torch.distributed.destroy_process_group()


def test_real_two_process_gloo(feats, tmp_path):
    ctx = torch.multiprocessing.get_context("spawn")
    out = ctx.SimpleQueue()
    torch.multiprocessing.start_processes(_gloo_rank, args=(str(feats), f"file://{tmp_path}/store", out),
                                          nprocs=2, join=True, start_method="spawn")
    (r0, h0), (r1, h1) = out.get()
    assert h0 == h1  # one schedule
    assert [b for b, _ in r0] == [b for b, _ in r1]  # same bucket each step
    first = [k for _, ks in r0[:3] for k in ks], [k for _, ks in r1[:3] for k in ks]
    assert not set(first[0]) & set(first[1])  # ranks read different samples


def _feature_cache(folder, sizes, shapes, **manifest):
    """Feature shards named like raw shards (web-00000i.tar) with a manifest of pixel-size buckets."""
    folder.mkdir(parents=True, exist_ok=True)
    entries = {}
    for s, n in enumerate(sizes):
        name = f"web-{s:06d}"
        shp = [shapes[(s + i) % len(shapes)] for i in range(n)]
        write_features(folder / f"{name}.tar", [f"{name}_{i:03d}" for i in range(n)], shp, seed=s)
        buckets = {}
        for h, w in shp:
            buckets[f"{h * 8}x{w * 8}"] = buckets.get(f"{h * 8}x{w * 8}", 0) + 1
        entries[name] = (n, buckets)
    write_manifest(folder, entries, **manifest)
    return folder


def test_manifest_gives_scale_shift_and_buckets(tmp_path, monkeypatch, caplog):
    cache = _feature_cache(tmp_path / "c", [6, 6], [(4, 4), (4, 6)], scaling=0.5, shift=0.25)
    import pixart.data.loader as loader_mod
    monkeypatch.setattr(loader_mod, "scan_buckets", lambda *a, **k: pytest.fail("scanned despite the manifest"))
    loader = Loader(LoaderConfig(str(cache), batch_size=2, seed=1))
    assert loader.decoder.latent_scale == 0.5 and loader.decoder.latent_shift == 0.25
    assert loader.stats.populations == {"4x4": 6, "4x6": 6}  # pixel sizes / downsample_factor 8
    got = take(loader, 3)
    same = take(Loader(LoaderConfig(str(cache), batch_size=2, seed=1, latent_scale=0.5, latent_shift=0.25)), 3)
    plain = take(Loader(LoaderConfig(str(cache), batch_size=2, seed=1, latent_scale=1.0, latent_shift=0.0)), 3)
    for a, b, c in zip(got, same, plain, strict=True):
        assert torch.equal(a["latents"], b["latents"])
        assert torch.allclose(a["latents"], (c["latents"] - 0.25) * 0.5, **conditioned(c["latents"].abs() + 0.25))
    # Bare feature shards (no manifest) are scanned and read, with a warning.
    monkeypatch.undo()
    (tmp_path / "bare").mkdir()
    write_features(tmp_path / "bare" / "x.tar", [f"x{i}" for i in range(4)], [(4, 4)] * 4)
    with caplog.at_level(logging.WARNING, logger="pixart.data"):
        bare = Loader(LoaderConfig(str(tmp_path / "bare"), batch_size=2))
    assert "without a manifest.json" in caplog.text and bare.decoder.latent_scale == 1.0


def test_start_up_looks_each_shard_up_in_its_manifest_once(tmp_path, monkeypatch):
    """The manifest's entry of each shard is found by name, not by a scan of every entry: with a scan, start-up
    grew as shards squared (20 s at 8,000 shards, past the collective timeout at about 40,000)."""
    import pixart.data.loader as loader_mod
    cache = _feature_cache(tmp_path / "c", [1] * 40, [(4, 4)])
    calls = []
    monkeypatch.setattr(loader_mod, "shard_name", lambda url: calls.append(url) or shard_name(url))
    loader = Loader(LoaderConfig(str(cache), batch_size=2))
    assert loader.stats.populations == {"4x4": 40} and len(calls) == 40


def test_a_shard_that_breaks_off_counts_its_unread_samples_as_skipped(tmp_path):
    """A feature shard cut after its 3rd sample (as a remote read that kept failing ends it): the manifest says
    it holds 8, so 5 are counted as skipped (the partial 4th among them), once, however many epochs run."""
    cache = _feature_cache(tmp_path / "c", [8, 8], [(4, 4)])
    with tarfile.open(cache / "web-000000.tar") as tar:
        cut = [m for m in tar.getmembers() if m.name.startswith("web-000000_003")][1].offset  # mid-sample 4
    (cache / "web-000000.tar").write_bytes((cache / "web-000000.tar").read_bytes()[:cut])
    loader = Loader(LoaderConfig(str(cache), batch_size=2))
    take(loader, 20)  # over three epochs of the 11 readable samples
    assert loader.stats.skipped == {"unread: the shard broke off": 5}
    assert loader.stats.damaged_shards == {str(cache / "web-000000.tar"): 1}


def test_manifest_refuses_incomplete_mixed_or_unexpected_caches(tmp_path):
    part = _feature_cache(tmp_path / "part", [4, 4, 4], [(4, 4)], done=1)
    with pytest.raises(PixArtError, match=f"{part}.*is incomplete: 1 of 3 shards done; rerun extract-features"):
        Loader(LoaderConfig(str(part), batch_size=2))
    a = _feature_cache(tmp_path / "a", [4], [(4, 4)])
    b = _feature_cache(tmp_path / "b", [4], [(4, 4)], text_dim=16)
    with pytest.raises(PixArtError, match="differ in text_dim"):
        Loader(LoaderConfig([str(a), str(b)], batch_size=2))
    with pytest.raises(PixArtError, match="text_dim 8 != config 16"):
        Loader(LoaderConfig(str(a), batch_size=2, expected={"text_dim": 16}))
    Loader(LoaderConfig(str(a), batch_size=2, expected={"text_dim": 8, "latent_channels": 4}))


def test_a_caption_mix_the_cache_lacks_is_refused_only_when_it_lacks_all_of_it(tmp_path, caplog):
    """Each sample draws among the mix's sources it has: a cache lacking some of them trains (on the others),
    with a warning naming them; one lacking all of them would skip every sample, and is refused up front."""
    cache = _feature_cache(tmp_path / "c", [4], [(4, 4)])  # caption_sources ["txt"]
    for caption in ("llava", {"blip": 0.5, "llava": 0.5}):
        with pytest.raises(PixArtError, match=r"^" + re.escape(
                f"data.caption: none of {list(caption) if isinstance(caption, dict) else [caption]} is in {cache} "
                "(its features hold captions ['txt'])") + "$"):
            Loader(LoaderConfig(str(cache), batch_size=2, caption=caption))
    with caplog.at_level(logging.WARNING, logger="pixart.data"):
        loader = Loader(LoaderConfig(str(cache), batch_size=2, caption={"llava": 0.8, "txt": 0.2}))
    assert f"{cache}: caption sources ['llava'] are not in its features (['txt'])" in caplog.text
    assert sum(len(b["keys"]) for b in take(loader, 2)) == 4  # every sample, on its txt caption
    Loader(LoaderConfig(str(cache), batch_size=2, caption={"txt": 1.0, "llava": 0.0}))  # never drawn


def test_resume_with_another_schedule_is_detected(feats, caplog):
    first = Loader(LoaderConfig(str(feats), batch_size=2, seed=0))
    take(first, 3)
    state = first.state_dict()
    assert "schedule" in state
    other = Loader(LoaderConfig(str(feats), batch_size=2, seed=0, scan_samples=9))  # other bucket counts
    with caplog.at_level(logging.WARNING, logger="pixart.data"):
        other.load_state_dict(state)
    assert "exact data position lost" in caplog.text and "schedule" in caplog.text
    assert other.stats.read == 0 and len(take(other, 2)) == 2


@pytest.mark.parametrize("seed", range(4))
def test_buckets_clustered_by_shard_two_ranks(tmp_path, seed):
    """Shard a all 4x4, shard b all 4x6, two ranks: nobody crashes, reads far ahead or overfills."""
    write_features(tmp_path / "a.tar", [f"a{i}" for i in range(40)], [(4, 4)] * 40)
    write_features(tmp_path / "b.tar", [f"b{i}" for i in range(40)], [(4, 6)] * 40, seed=1)
    runs = []
    for rank in range(2):
        loader = Loader(LoaderConfig(str(tmp_path), batch_size=2, seed=seed, rank=rank, world_size=2))
        batches = []
        for b in itertools.islice(iter(loader), 40):  # two epochs
            batches.append(b)
            buffered = sum(len(q) for w in loader.state_dict()["workers"].values() for q in w["buffered"].values())
            assert buffered <= loader.buffer_size
        runs.append(batches)
        st = loader.stats
        assert st.read <= 1.35 * st.used, (st.read, st.used)  # was ~5x, or a crash
    assert [b["bucket"] for b in runs[0]] == [b["bucket"] for b in runs[1]]
    assert {b["bucket"] for b in runs[0]} == {"4x4", "4x6"}
    for b in runs[0] + runs[1]:
        assert {k[0] for k in b["keys"]} == {"a" if b["bucket"] == "4x4" else "b"}


def test_default_buffer_is_bounded_in_samples(tmp_path):
    for s, shape in enumerate([(2, 2), (2, 3), (3, 2)]):
        write_features(tmp_path / f"s{s}.tar", [f"s{s}_{i}" for i in range(50)], [shape] * 50, seed=s)
    assert Loader(LoaderConfig(str(tmp_path), batch_size=50)).buffer_size == 512  # not 4 * 50 * 3
    assert Loader(LoaderConfig(str(tmp_path), batch_size=2)).buffer_size == 24


def test_aesthetic_selection(tmp_path, caplog):
    cache = _feature_cache(tmp_path / "c", [10, 10], [(4, 4)])
    scores = tmp_path / "scores"
    scores.mkdir()
    for s in range(2):  # sample i scores i; sample 0 has no score
        rows = [{"__key__": f"web-{s:06d}_{i:03d}", "score": float(i)} for i in range(1, 10)]
        (scores / f"web-{s:06d}.aesthetic.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with caplog.at_level(logging.INFO, logger="pixart.data"):
        loader = Loader(LoaderConfig(str(cache), batch_size=2, seed=0, scores_dir=str(scores), min_score=5.0))
    assert "keeps 10 of 20 samples (50.0%)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pixart.data"):
        keys = sum(keys_of(take(loader, 15)), [])  # three epochs of 5 batches
    assert "skipped sample" not in caplog.text  # chosen, and said once above: not a warning per sample
    assert sorted(set(keys)) == sorted(f"web-00000{s}_00{i}" for s in range(2) for i in range(5, 10))
    assert loader.stats.skipped == {"below min_score": 8, "no score": 2}  # each once
    with pytest.raises(PixArtError, match="min_score needs scores_dir"):
        LoaderConfig(str(cache), min_score=5.0)


def test_caption_mix_draws_each_source_at_its_probability(tmp_path):
    """Issue 19: over 600 draws each source's share is within 4 binomial standard deviations of its
    configured probability (a uniform or first-source draw is 8+ away)."""
    mix, lengths = {"txt": 0.2, "metadata": 0.5, "metadata-short": 0.3}, {"txt": 2, "metadata": 9, "metadata-short": 5}
    with wds.TarWriter(str(tmp_path / "m.tar")) as tw:
        for i in range(600):
            tw.write(FeatureSample(f"k{i:03d}", torch.zeros(4, 2, 2), torch.zeros(4, 2, 2),
                                   {n: torch.zeros(k, 8) for n, k in lengths.items()}).to_wds())
    loader = Loader(LoaderConfig(str(tmp_path), batch_size=20, caption=mix))
    drawn = torch.cat([b["mask"].sum(1) for b in take(loader, 30)]).tolist()
    assert len(drawn) == 600
    for name, p in mix.items():
        k, sd = drawn.count(lengths[name]), (600 * p * (1 - p)) ** 0.5
        assert abs(k - 600 * p) <= 4 * sd, (name, k, 600 * p)
