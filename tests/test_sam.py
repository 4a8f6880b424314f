"""SA-1B ingestion on tiny hand-made tars: resizing, metadata, corrupt images, a truncated tar."""
import argparse
import io
import json
import tarfile

import pytest
import webdataset as wds
from PIL import Image

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
    with pytest.raises(PixArtError, match="--overwrite"):
        args.run(args)
    with pytest.raises(PixArtError, match="no such shard"):
        ingest([str(tmp_path / "missing.tar")], tmp_path / "x", progress=False)
