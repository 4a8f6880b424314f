"""SA-1B ingestion on tiny hand-made tars: resizing, metadata, corrupt images, a truncated tar; then SA-1B as
shipped (shuffled members, the json's frame) on fixtures from the published schema and a real json."""
import argparse
import io
import json
import os
import random
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from conftest import write_tar
from PIL import Image
from pycocotools import mask as mask_utils

from data_pipelines.sam import REPORT, SamConfig, ingest
from pixart.cli import data_sam
from pixart.errors import PixArtError


def _jpg(w, h, color=(200, 30, 30)):
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, "JPEG")
    return buf.getvalue()


def _meta(i, w, h):
    ann = {"id": i, "bbox": [10.0, 20.0, 40.0, 60.0], "area": 2400, "predicted_iou": 0.9,
           "point_coords": [[30.0, 50.0]], "stability_score": 0.95, "crop_box": [0, 0, w, h],
           "segmentation": {"size": [h, w], "counts": "x" * 500}}
    return {"image": {"image_id": i, "width": w, "height": h, "file_name": f"sa_{i}.jpg"},
            "annotations": [ann, dict(ann, id=i + 100)]}


def _sa1b_tar(path, items):
    """items: (i, jpg bytes, w, h) -> sa_i.jpg + sa_i.json, as in SA-1B."""
    with tarfile.open(path, "w") as tar:
        for i, data, w, h in items:
            for name, blob in ((f"sa_{i}.jpg", data), (f"sa_{i}.json", json.dumps(_meta(i, w, h)).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))
    return path


@pytest.fixture()
def srcs(tmp_path):
    good = _jpg(300, 200)
    a = _sa1b_tar(tmp_path / "sa_000000.tar", [(1, good, 300, 200), (2, good[: len(good) // 2], 300, 200),
                                               (3, b"not an image", 300, 200), (4, _jpg(100, 150), 100, 150)])
    b = _sa1b_tar(tmp_path / "sa_000001.tar", [(5, good, 300, 200), (6, good, 300, 200), (7, good, 300, 200)])
    with tarfile.open(b) as tar:  # cut the tar in the middle of sa_6.jpg's bytes
        cut = tar.getmember("sa_6.jpg").offset_data + 100
    b.write_bytes(b.read_bytes()[:cut])
    return [str(a), str(b)]


def test_ingest_resizes_keeps_metadata_and_skips_damage(srcs, tmp_path):
    out = tmp_path / "out"
    report = ingest(srcs, out, SamConfig(max_side=120, shard_size=2), progress=False)
    assert sorted(p.name for p in out.glob("*.tar")) == ["sam-000000.tar", "sam-000001.tar"]
    assert not list(out.glob(".*"))  # no temp files left
    samples = list(wds.WebDataset(str(out / "sam-{000000..000001}.tar"), shardshuffle=False))
    assert [s["__key__"] for s in samples] == ["sa_1", "sa_4", "sa_5"]
    s1 = json.loads(samples[0]["json"])
    img = Image.open(io.BytesIO(samples[0]["jpg"]))
    assert img.size == (120, 80) and (s1["width"], s1["height"]) == (120, 80)
    assert s1["image"]["image_id"] == 1 and s1["image"]["orig_width"] == 300
    assert s1["num_annotations"] == 2 and "segmentation" not in s1["annotations"][0]
    assert s1["annotations"][0]["bbox"] == [4.0, 8.0, 16.0, 24.0]
    assert s1["annotations"][0]["area"] == pytest.approx(2400 * 0.16)
    assert s1["annotations"][0]["point_coords"] == [[12.0, 20.0]]
    assert Image.open(io.BytesIO(samples[1]["jpg"])).size == (80, 120)
    saved = json.loads((out / REPORT).read_text())
    assert saved["written"] == report.written == 3
    assert sorted(s["key"] for s in saved["skipped"]) == ["sa_2", "sa_3"]
    assert all(s["reason"].startswith("bad image") for s in saved["skipped"])
    assert [d["source"] for d in saved["damaged"]] == [srcs[1]] and saved["damaged"][0]["after"] == 1


def test_a_kill_while_the_set_moves_in_is_finished_by_the_rerun(srcs, tmp_path, monkeypatch):
    """The new set replaces the old one shard by shard; a kill half-way is finished, never left half old."""
    ref, out = tmp_path / "ref", tmp_path / "out"
    ingest(srcs, ref, SamConfig(max_side=120, shard_size=1), progress=False)
    ingest(srcs[:1], out, SamConfig(max_side=120, shard_size=1), progress=False)  # an old set
    moved, replace = [], os.replace

    def killed_after_one(src, dst):  # the second shard moved into --out never arrives
        if Path(dst).parent == out:
            if moved:
                raise KeyboardInterrupt  # as a SIGKILL: nothing after it runs
            moved.append(dst)
        replace(src, dst)

    monkeypatch.setattr(os, "replace", killed_after_one)
    with pytest.raises(KeyboardInterrupt):
        ingest(srcs, out, SamConfig(max_side=120, shard_size=1), overwrite=True, progress=False)
    monkeypatch.setattr(os, "replace", replace)
    assert not (out / REPORT).exists()  # a set half moved in has no report
    with pytest.raises(PixArtError, match=r"already holds sam shards \(a killed run's set, now moved in whole\)"):
        ingest(srcs, out, SamConfig(max_side=120, shard_size=1), progress=False)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in ref.iterdir())  # no .sam-new left
    assert all((out / p.name).read_bytes() == p.read_bytes() for p in ref.iterdir())


def test_a_killed_run_goes_on_from_its_last_finished_shard(srcs, tmp_path, monkeypatch):
    """SIGKILL while converting the 5th pair (sa_5, the second tar's first): the rerun re-reads the first tar,
    converts only sa_5, and leaves the set and report a run without the kill writes, byte for byte."""
    import data_pipelines.sam as sam

    cfg = SamConfig(max_side=120, shard_size=1)
    ref, out = tmp_path / "ref", tmp_path / "out"
    ingest(srcs, ref, cfg, progress=False)
    convert, calls, kill_at = sam.convert, [], [5]

    def counted(sample, cfg):
        calls.append(sample["__key__"])
        if len(calls) == kill_at[0]:
            raise KeyboardInterrupt  # as a SIGKILL: nothing after it runs but the writer's abort
        return convert(sample, cfg)

    monkeypatch.setattr(sam, "convert", counted)
    with pytest.raises(KeyboardInterrupt):
        ingest(srcs, out, cfg, progress=False)
    assert calls == ["sa_1", "sa_2", "sa_3", "sa_4", "sa_5"]
    assert sorted(p.name for p in (out / ".sam-new").iterdir()) == [".progress.json", "sam-000000.tar",
                                                                    "sam-000001.tar"]
    (out / ".sam-new" / ".sam-000002.tar.tmp-x").write_bytes(b"half")  # a writer's temp the kill left
    calls.clear()
    ingest(srcs, out, cfg, progress=False)
    assert calls == ["sa_5"]
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in ref.iterdir())
    assert all((out / p.name).read_bytes() == p.read_bytes() for p in ref.iterdir())

    calls.clear()
    with pytest.raises(KeyboardInterrupt):  # killed again, then rerun with other settings: from the start
        ingest(srcs, tmp_path / "o2", cfg, progress=False)
    calls.clear()
    kill_at[0] = None
    ingest(srcs, tmp_path / "o2", SamConfig(max_side=100, shard_size=1), progress=False)
    assert calls == ["sa_1", "sa_2", "sa_3", "sa_4", "sa_5"]


def test_keep_masks_and_small_images_untouched(srcs, tmp_path):
    ingest(srcs[:1], tmp_path / "o", SamConfig(max_side=1024, keep_masks=True), progress=False)
    s = next(iter(wds.WebDataset(str(tmp_path / "o" / "sam-000000.tar"), shardshuffle=False)))
    meta = json.loads(s["json"])
    assert meta["width"] == 300 and meta["annotations"][0]["segmentation"]["size"] == [200, 300]


def test_cli_and_refusals(srcs, tmp_path, capsys):
    out = tmp_path / "cli"
    parser = argparse.ArgumentParser()
    data_sam.add_parser(parser.add_subparsers())
    args = parser.parse_args(["sam", *srcs, "--out", str(out), "--max-side", "64"])
    args.run(args)
    assert "3 images in 1 shards" in capsys.readouterr().out
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    args.run(args)  # a rerun of a finished job, as relabel and extract-features take one
    assert capsys.readouterr().out.strip() == (f"nothing to do: {out} holds the 3 images in 1 shards that these "
                                               "inputs and settings make (--overwrite makes them again)")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert ingest([os.path.relpath(src) for src in srcs], out, SamConfig(max_side=64)).nothing_to_do  # another path
    with pytest.raises(PixArtError, match="--overwrite"):  # other settings would replace the set
        args.run(parser.parse_args(["sam", *srcs, "--out", str(out), "--max-side", "32"]))
    # --overwrite with an input that fails: the old shards and their report stay as they were
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (tmp_path / "junk.tar").write_bytes(b"not a tar" * 100)
    with pytest.raises(PixArtError, match="no SA-1B sample could be read"):
        ingest([str(tmp_path / "junk.tar")], out, overwrite=True, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    args.overwrite = True
    args.run(args)  # and a good one replaces them
    assert sorted(p.name for p in out.iterdir()) == sorted(before)
    with pytest.raises(PixArtError, match="no such shard"):
        ingest([str(tmp_path / "missing.tar")], tmp_path / "x", progress=False)
    (tmp_path / "weights.pth").write_bytes(b"PK\x03\x04 not a tar at all" * 40)  # the wrong file given
    with pytest.raises(PixArtError, match=r"weights.pth: no SA-1B sample could be read"):
        ingest([str(tmp_path / "weights.pth")], tmp_path / "y", progress=False)
    assert not (tmp_path / "y").exists()  # a first run that failed leaves no empty --out
    # a whole tar, but with no image + json pair: an error too, not an empty set of shards
    other = write_tar(tmp_path / "notes.tar", [("readme.txt", b"hello"), ("sa_1.jpg", _jpg(20, 20))])
    with pytest.raises(PixArtError, match=r"^no SA-1B samples \(image \+ json pairs\) in .*notes.tar$"):
        ingest([str(other)], tmp_path / "z", progress=False)
    with pytest.raises(PixArtError, match=r"notes.tar or the 1 other inputs$"):
        ingest([str(other), write_tar(tmp_path / "more.tar", [("a.csv", b"1,2")])], tmp_path / "z", progress=False)
    assert not (tmp_path / "z").exists()
    # an --out that is a file, or lies under one: named as the flag, the file untouched
    (tmp_path / "afile").write_text("mine")
    with pytest.raises(PixArtError, match=r"^--out .*afile is not a folder$"):
        ingest(srcs, tmp_path / "afile", progress=False)
    with pytest.raises(PixArtError, match=r"^--out .*afile/sub is not a folder \(.*afile is a file\)$"):
        ingest(srcs, tmp_path / "afile" / "sub", progress=False)
    assert (tmp_path / "afile").read_text() == "mine"
    # bad settings: each names its flag and value, before anything is read or written
    for cfg, message in ((SamConfig(max_side=-5), r"^--max-side -5: must be positive$"),
                         (SamConfig(shard_size=0), r"^--shard-size 0: must be positive$"),
                         (SamConfig(hold_mb=float("nan")), r"^--hold-mb nan: must be a number of megabytes"),
                         (SamConfig(hold_mb=float("inf")), r"^--hold-mb inf: must be a number of megabytes")):
        with pytest.raises(PixArtError, match=message):
            ingest(srcs, tmp_path / "w", cfg, progress=False)
    assert not (tmp_path / "w").exists()


def test_overwrite_with_tars_of_another_dataset_keeps_the_old_set(srcs, tmp_path):
    """img2dataset's jpg + json + txt samples pair up, but none is an SA-1B sample: an error naming the input and
    why its samples were skipped, and the old shards stay (rather than 0 images written in their place)."""
    out = tmp_path / "out"
    ingest(srcs, out, SamConfig(max_side=64), progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    laion = write_tar(tmp_path / "laion-000000.tar", [
        m for i in range(20) for m in ((f"{i:09d}.jpg", _jpg(64, 48)), (f"{i:09d}.txt", b"a red square"),
                                       (f"{i:09d}.json", json.dumps({"url": "https://example.com/a.jpg",
                                                                     "caption": "a red square", "width": 64,
                                                                     "height": 48}).encode()))])
    with pytest.raises(PixArtError, match=r"^no SA-1B sample in .*laion-000000.tar: all 20 skipped "
                                          r"\(20: json has no image.width/height\)$"):
        ingest([str(laion)], out, overwrite=True, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_a_damaged_input_is_named_in_the_summary(srcs, tmp_path, capsys):
    (tmp_path / "empty.tar").write_bytes(b"")
    parser = argparse.ArgumentParser()
    data_sam.add_parser(parser.add_subparsers())
    args = parser.parse_args(["sam", srcs[0], str(tmp_path / "empty.tar"), "--out", str(tmp_path / "o")])
    args.run(args)
    assert f"wrote 2 images in 1 shards to {tmp_path / 'o'}; " in (out := capsys.readouterr().out)
    assert f"damaged tars 1: {tmp_path / 'empty.tar'} (see " in out


# --- SA-1B as shipped: members in random order, coordinates in the json's frame -------------------------
#
# The json follows SA-1B's published schema (facebookresearch/segment-anything, README.md, "Dataset":
# image {image_id, width, height, file_name}; annotations [{id, segmentation {size, counts}, bbox [x,y,w,h],
# area, predicted_iou, stability_score, crop_box, point_coords}]). REAL_ANNOTATIONS are copied verbatim from
# tensorflow/datasets, tensorflow_datasets/datasets/segment_anything/dummy_data/sa_000020/sa_226381.json
# (a real SA-1B file): float boxes and points, int areas equal to the decoded RLE's, bbox w/h = last pixel
# minus first (pycocotools' toBbox minus 1), crop_box XYWH. _annotation builds more of them the same way.

REAL_IMAGE = {"image_id": 226381, "width": 2000, "height": 1500, "file_name": "sa_226381.jpg"}
REAL_ANNOTATIONS = [
    {"bbox": [1500.0, 219.0, 28.0, 43.0], "area": 914,
     "segmentation": {"size": [1500, 2000],
                      "counts": "T`eT29a^14L3N2M2O1N3L3E<N10000010O100O2O0O0001O00000001O001N1K8XOcgae0"},
     "predicted_iou": 0.8991881608963013, "point_coords": [[1520.75, 248.0625]],
     "crop_box": [872.0, 0.0, 692.0, 567.0], "id": 333521564, "stability_score": 0.9751351475715637},
    {"bbox": [1173.0, 0.0, 60.0, 59.0], "area": 3186,
     "segmentation": {"size": [1500, 2000],
                      "counts": "_Xfe1o0j]15N2N1O2N1O2N1O2N1O1O1O1O1O1O1O001O1O001O001O00001O0000001O000000O100000000"
                                "O10000000000O1000000O100O1O100O1O1N2O1N3M6]Oe0FQRRS1"},
     "predicted_iou": 0.9833251237869263, "point_coords": [[1174.75, 35.4375]],
     "crop_box": [872.0, 0.0, 692.0, 567.0], "id": 333521566, "stability_score": 0.9896939396858215},
    {"bbox": [29.0, 1077.0, 55.0, 73.0], "area": 2123,
     "segmentation": {"size": [1500, 2000],
                      "counts": "Rc[15b^17K4L4L3M3M3M3N2N2N2O1N1O2O0O2O1O0O101N10001O00000O11O000000000O101O000O101O0"
                                "0001N1O2O1O0O2N2N1O3M2N2N2L5L4K8FnSdg2"},
     "predicted_iou": 0.9671431183815002, "point_coords": [[43.25, 1110.1875]],
     "crop_box": [0.0, 933.0, 692.0, 567.0], "id": 333521579, "stability_score": 0.9808946847915649},
]
FRAME = (1500, 2250)  # most SA-1B photos: 1500 x 2250, shortest side 1500


def _annotation(ann_id, x0, y0, x1, y1, point, crop_box, frame=FRAME):
    """An SA-1B annotation of the rectangle of pixels x0..x1, y0..y1 (inclusive) made as the real ones are."""
    w, h = frame
    m = np.zeros((h, w), np.uint8, order="F")
    m[y0:y1 + 1, x0:x1 + 1] = 1
    rle = mask_utils.encode(m)
    x, y, bw, bh = mask_utils.toBbox(rle).tolist()
    return {"bbox": [x, y, bw - 1, bh - 1], "area": int(mask_utils.area(rle)),
            "segmentation": {"size": [h, w], "counts": rle["counts"].decode()}, "predicted_iou": 0.9712,
            "point_coords": [list(point)], "crop_box": list(crop_box), "id": ann_id, "stability_score": 0.9803}


@pytest.fixture(scope="module")
def frame_annotations():
    """Two masks in the 1500 x 2250 frame: one inside the full-image crop, one in the bottom-right corner."""
    return [_annotation(1, 100, 200, 400, 600, (249.75, 399.5625), (0.0, 0.0, 1500.0, 2250.0)),
            _annotation(2, 1400, 2150, 1499, 2249, (1499.75, 2249.75), (750.0, 1125.0, 750.0, 1125.0))]


def _sa1b_json(i, annotations, frame=FRAME):
    image = {"image_id": i, "width": frame[0], "height": frame[1], "file_name": f"sa_{i}.jpg"}
    return json.dumps({"image": image, "annotations": annotations}).encode()


def _color(i):
    return (i % 256, 255 - i % 256, (37 * i) % 256)


@pytest.fixture(scope="module")
def shuffled(tmp_path_factory, frame_annotations):
    """200 SA-1B samples (24x36 jpgs, the 1500x2250 frame's json) with members in random order, as Meta ships."""
    members = [m for i in range(200) for m in ((f"sa_{i}.jpg", _jpg(24, 36, _color(i))),
                                               (f"sa_{i}.json", _sa1b_json(i, frame_annotations)))]
    random.Random(0).shuffle(members)
    return write_tar(tmp_path_factory.mktemp("shuffled") / "sa_000000.tar", members)


def _samples(out):
    return list(wds.WebDataset(sorted(str(p) for p in out.glob("sam-*.tar")), shardshuffle=False))


def _hand(bbox=None, area=None, point=None, crop=None):
    return {"bbox": pytest.approx(bbox, abs=0.01), "area": pytest.approx(area, abs=0.01),
            "point_coords": [pytest.approx(point, abs=0.01)], "crop_box": pytest.approx(crop, abs=0.01)}


def test_real_fixture_is_consistent():
    """The copied annotations decode to their own area and (SA-1B's) bbox: no typo in the fixture."""
    for ann in REAL_ANNOTATIONS:
        x, y, w, h = mask_utils.toBbox(ann["segmentation"]).tolist()
        assert mask_utils.area(ann["segmentation"]) == ann["area"] and [x, y, w - 1, h - 1] == ann["bbox"]


@pytest.mark.parametrize("via", ["file", "pipe"])
def test_shuffled_members_pair_by_name(shuffled, tmp_path, via):
    src = str(shuffled) if via == "file" else f"pipe:cat {shuffled}"
    report = ingest([src], tmp_path / "o", SamConfig(shard_size=64), progress=False)
    assert (report.written, len(report.skipped), report.damaged) == (200, 0, [])
    assert report.spilled == 0  # 256 MB holds this tar
    samples = _samples(tmp_path / "o")
    assert sorted(s["__key__"] for s in samples) == sorted(f"sa_{i}" for i in range(200))
    for s in samples:  # each jpg went with its own json
        i = int(s["__key__"][3:])
        assert json.loads(s["json"])["image"]["file_name"] == f"sa_{i}.jpg"
        pixel = Image.open(io.BytesIO(s["jpg"])).getpixel((12, 18))
        assert max(abs(a - b) for a, b in zip(pixel, _color(i), strict=True)) <= 6


def test_stream_spills_past_the_memory_bound(shuffled, tmp_path):
    local = ingest([str(shuffled)], tmp_path / "local", progress=False)
    streamed = ingest([f"pipe:cat {shuffled}"], tmp_path / "pipe", SamConfig(hold_mb=0.004), progress=False)
    assert streamed.spilled > 100 and (streamed.written, streamed.skipped) == (200, [])
    assert not list((tmp_path / "pipe").glob(".*"))  # the spill folder is gone
    assert (tmp_path / "pipe" / local.shards[0]).read_bytes() == (tmp_path / "local" / local.shards[0]).read_bytes()


@pytest.mark.parametrize("jpg_size", [(750, 1125), (1500, 2250)], ids=["pre-shrunk", "full-size"])
def test_scaled_from_the_json_frame_one_factor_per_axis(tmp_path, frame_annotations, jpg_size):
    """1500x2250 -> 683x1024 whatever size the jpg was stored at: sx = 683/1500, sy = 1024/2250."""
    write_tar(tmp_path / "sa.tar", [("sa_7.json", _sa1b_json(7, frame_annotations)), ("sa_7.jpg", _jpg(*jpg_size))])
    ingest([str(tmp_path / "sa.tar")], tmp_path / "o", SamConfig(max_side=1024, keep_masks=True), progress=False)
    (s,) = _samples(tmp_path / "o")
    meta = json.loads(s["json"])
    assert Image.open(io.BytesIO(s["jpg"])).size == (683, 1024) and (meta["width"], meta["height"]) == (683, 1024)
    assert (meta["image"]["orig_width"], meta["image"]["orig_height"]) == (1500, 2250)
    a, b = meta["annotations"]
    # a: bbox 100*sx, 200*sy, 300*sx, 400*sy; area 120701*sx*sy; point 249.75*sx, 399.5625*sy; the full crop
    assert a == dict(a, **_hand([45.53, 91.02, 136.60, 182.04], 25012.54, [113.72, 181.85], [0, 0, 683, 1024]))
    # b: bbox 1400*sx, 2150*sy, 99*sx, 99*sy; area 10000*sx*sy; point 1499.75*sx, 2249.75*sy; crop 750*sx, 1125*sy
    assert b == dict(b, **_hand([637.47, 978.49, 45.08, 45.06], 2072.27, [682.89, 1023.89], [341.5, 512, 341.5, 512]))
    assert a["segmentation"] == frame_annotations[0]["segmentation"]  # masks stay in the json's frame


@pytest.mark.parametrize("jpg_size, out_size, f", [((1000, 750), (1000, 750), 0.5), ((2000, 1500), (1024, 768), 0.512)])
def test_real_sa1b_json_pre_shrunk_and_full_size(tmp_path, jpg_size, out_size, f):
    meta_in = json.dumps({"image": REAL_IMAGE, "annotations": REAL_ANNOTATIONS}).encode()
    write_tar(tmp_path / "sa.tar", [("sa_226381.jpg", _jpg(*jpg_size)), ("sa_226381.json", meta_in)])
    ingest([str(tmp_path / "sa.tar")], tmp_path / "o", SamConfig(max_side=1024), progress=False)
    (s,) = _samples(tmp_path / "o")
    meta = json.loads(s["json"])
    assert (meta["width"], meta["height"]) == out_size and meta["num_annotations"] == 3
    assert (meta["image"]["orig_width"], meta["image"]["orig_height"]) == (2000, 1500)
    a = meta["annotations"][0]  # bbox [1500, 219, 28, 43], area 914, point [1520.75, 248.0625], crop [872, 0, 692, 567]
    want = {0.5: _hand([750, 109.5, 14, 21.5], 228.5, [760.375, 124.03125], [436, 0, 346, 283.5]),
            0.512: _hand([768, 112.128, 14.336, 22.016], 239.6, [778.624, 127.008], [446.464, 0, 354.304, 290.304])}
    assert a == dict(a, **want[f]) and "segmentation" not in a


def test_aspect_mismatch_is_skipped_with_its_reason(tmp_path, frame_annotations):
    sizes = {1: (751, 1125), 2: (1125, 750), 3: (760, 1125)}  # 751: within a pixel of 750.0; the others not
    write_tar(tmp_path / "sa.tar", [m for i, wh in sizes.items()
                                     for m in ((f"sa_{i}.jpg", _jpg(*wh)), (f"sa_{i}.json", _sa1b_json(i, [])))])
    report = ingest([str(tmp_path / "sa.tar")], tmp_path / "o", progress=False)
    assert report.written == 1 and [s["key"] for s in report.skipped] == ["sa_2", "sa_3"]
    assert report.skipped[0]["reason"] == "aspect mismatch: jpg 1125x750, json frame 1500x2250"


def test_a_json_frame_that_is_no_size_skips_its_sample(tmp_path):
    """Python's json reads Infinity and NaN: no int, so no frame; a side below 1 is none either."""
    widths = {1: float("inf"), 2: float("nan"), 3: -1500, 4: 0, 5: "wide", 6: 1500}
    write_tar(tmp_path / "sa.tar", [m for i, w in widths.items() for m in (
        (f"sa_{i}.jpg", _jpg(24, 36)), (f"sa_{i}.json", _sa1b_json(i, [], frame=(w, 2250))))])
    report = ingest([str(tmp_path / "sa.tar")], tmp_path / "o", progress=False)
    assert report.written == 1 and [(s["key"], s["reason"]) for s in report.skipped] == [
        ("sa_1", "json has no image.width/height"), ("sa_2", "json has no image.width/height"),
        ("sa_3", "json frame -1500x2250 is empty"), ("sa_4", "json frame 0x2250 is empty"),
        ("sa_5", "json has no image.width/height")]


@pytest.mark.parametrize("via", ["file", "pipe"])
def test_tar_cut_between_samples_keeps_the_last_complete_one(tmp_path, via):
    members = [(f"sa_{i}.{ext}", _jpg(24, 36) if ext == "jpg" else _sa1b_json(i, []))
               for i in (1, 2, 3) for ext in (("jpg", "json") if i != 2 else ("json", "jpg"))]
    path = write_tar(tmp_path / "sa.tar", members)
    with tarfile.open(path) as tar:
        cut = tar.getmember("sa_3.jpg").offset  # right after sa_2's last member
    path.write_bytes(path.read_bytes()[:cut])
    report = ingest([str(path) if via == "file" else f"pipe:cat {path}"], tmp_path / "o", progress=False)
    assert [s["__key__"] for s in _samples(tmp_path / "o")] == ["sa_1", "sa_2"] and report.skipped == []
    assert len(report.damaged) == 1 and report.damaged[0]["after"] == 2


def test_unpaired_members_are_reported(tmp_path, capsys):
    members = [("sa_1.json", _sa1b_json(1, [])), ("sa_4.jpg", _jpg(24, 36)), ("sa_2.jpg", _jpg(24, 36)),
               ("sa_1.jpg", _jpg(24, 36)), ("sa_3.json", _sa1b_json(3, []))]
    src = str(write_tar(tmp_path / "sa.tar", members))
    parser = argparse.ArgumentParser()
    data_sam.add_parser(parser.add_subparsers())
    args = parser.parse_args(["sam", src, "--out", str(tmp_path / "o")])
    args.run(args)
    out = capsys.readouterr().out
    assert "wrote 1 images in 1 shards" in out and "skipped 3 (3 unpaired members)" in out
    report = json.loads((tmp_path / "o" / REPORT).read_text())
    assert [(s["key"], s["reason"]) for s in report["skipped"]] == [("sa_4", "no json"), ("sa_2", "no json"),
                                                                   ("sa_3", "no image")]
    assert report["unpaired"] == 3 and report["damaged"] == []


def test_repacked_tar_names_lose_their_dot_slash(tmp_path):
    """eminorhan/sa1b-downloader's repack.py sorts with `tar -C DIR .`, so members are named ./sa_N.jpg."""
    write_tar(tmp_path / "sa.tar", [("./sa_1.jpg", _jpg(24, 36)), ("./sa_1.json", _sa1b_json(1, []))])
    ingest([str(tmp_path / "sa.tar")], tmp_path / "o", progress=False)
    assert [s["__key__"] for s in _samples(tmp_path / "o")] == ["sa_1"]


def test_an_annotation_of_another_shape_skips_its_sample(tmp_path, frame_annotations):
    """SA-1B's annotations (its README: bbox a list of 4 numbers, area a number, point_coords a list of [x, y])
    written wrong are one bad sample, counted with its reason; the others are still converted."""
    good = frame_annotations[0]
    bad = {1: dict(good, bbox=None), 2: dict(good, area="914"), 3: dict(good, point_coords=[[1.0]]), 4: "an annotation"}
    members = [m for i, ann in bad.items()
               for m in ((f"sa_{i}.jpg", _jpg(750, 1125)), (f"sa_{i}.json", _sa1b_json(i, [ann])))]
    members += [("sa_5.jpg", _jpg(750, 1125)), ("sa_5.json", _sa1b_json(5, [good]))]
    write_tar(tmp_path / "sa.tar", members)
    report = ingest([str(tmp_path / "sa.tar")], tmp_path / "o", progress=False)
    assert report.written == 1 and [s["key"] for s in report.skipped] == ["sa_1", "sa_2", "sa_3", "sa_4"]
    assert all(s["reason"].startswith("bad annotation (") for s in report.skipped)
