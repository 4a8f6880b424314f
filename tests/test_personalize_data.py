"""A concept's images, masks and captions: a folder, or shards with the shapes world's or SA-1B's json."""
import io
import json

import numpy as np
import pytest
from conftest import turned_photo, write_tar
from PIL import Image

from pixart.errors import PixArtError
from pixart.personalize.data import caption_for, read_concept_images, rle_decode


def test_rle_decode_matches_pycocotools():
    """SA-1B's masks are COCO RLE (segment-anything's README: `segmentation` is "Mask saved in COCO RLE format");
    pycocotools, the format's reference codec, encodes them and our decoder must give the mask back."""
    mask_util = pytest.importorskip("pycocotools.mask")
    rng = np.random.default_rng(0)
    for h, w in ((7, 5), (40, 60), (123, 77)):
        mask = np.zeros((h, w), dtype=np.uint8)
        for _ in range(4):  # a few blobs, with runs long enough for multi-group counts
            y, x = rng.integers(h), rng.integers(w)
            mask[max(0, y - h // 4):y + h // 3, max(0, x - w // 5):x + w // 3] = 1
        mask[rng.random((h, w)) < 0.05] ^= 1
        rle = mask_util.encode(np.asfortranarray(mask))
        rle = {"size": rle["size"], "counts": rle["counts"].decode()}  # as SA-1B's JSON stores it
        assert np.array_equal(rle_decode(rle), mask.astype(bool))
        assert int(rle_decode(rle).sum()) == int(mask_util.area(mask_util.encode(np.asfortranarray(mask))))
    assert np.array_equal(rle_decode({"size": [2, 3], "counts": [1, 2, 3]}),  # uncompressed runs, column-major
                          np.array([[0, 1, 0], [1, 0, 0]], dtype=bool))


def _tar(path, samples):
    write_tar(path, [(f"{key}.{ext}", data) for key, files in samples.items() for ext, data in files.items()])


def _png(w, h):
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (100, 100, 100)).save(buf, "PNG")
    return buf.getvalue()


def test_shards_with_sa1b_and_shapes_json(tmp_path):
    mask_util = pytest.importorskip("pycocotools.mask")
    full = np.zeros((40, 60), dtype=np.uint8)  # the JSON's frame: 60 x 40; the image is pre-shrunk to 30 x 20
    full[10:30, 30:60] = 1
    rle = mask_util.encode(np.asfortranarray(full))
    sa1b = {"image": {"width": 60, "height": 40},
            "annotations": [{"area": 3.0, "bbox": [0.0, 0.0, 2.0, 1.5], "segmentation": {"size": [40, 60],
                                                                                           "counts": "PP0"}},
                            {"area": 600.0, "bbox": [30.0, 10.0, 30.0, 20.0],
                             "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()}}]}
    shapes = {"width": 16, "height": 16, "objects": [{"bbox": [4, 4, 8, 12]}]}
    _tar(tmp_path / "a.tar", {"0": {"png": _png(30, 20), "json": json.dumps(sa1b).encode(), "txt": b"a zork"},
                              "1": {"png": _png(16, 16), "json": json.dumps(shapes).encode()}})
    first, second = read_concept_images(str(tmp_path / "a.tar"))
    assert first.mask.shape == (20, 30) and first.mask[5:15, 15:].min() == 1 and first.mask[:, :15].max() == 0
    assert second.mask[4:12, 4:8].min() == 1 and second.mask.sum() == 32
    assert caption_for(first, "zork", 0) == "a zork" and caption_for(second, "zork", 0) == "a photo of a zork"


def test_a_folder_and_its_bad_masks(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "masks").mkdir()
    Image.new("L", (8, 8), 0).save(tmp_path / "masks" / "a.png")
    with pytest.raises(PixArtError, match=r"masks/a.png: the mask is empty"):
        read_concept_images(str(tmp_path))
    (tmp_path / "masks" / "a.png").unlink()
    (item,) = read_concept_images(str(tmp_path))
    assert item.mask is None and item.caption is None


def test_a_phones_photo_of_the_concept_is_read_upright_as_diffusers_dreambooth_reads_it(tmp_path):
    """diffusers' DreamBooth scripts `exif_transpose` every instance photo, as its `load_image` does."""
    from diffusers.utils import load_image

    (tmp_path / "dog.jpg").write_bytes(turned_photo(6))
    (item,) = read_concept_images(str(tmp_path))
    assert np.array_equal(np.asarray(item.image), np.asarray(load_image(str(tmp_path / "dog.jpg"))))
    assert item.image.size == (16, 24)  # shown 16 wide and 24 high


def test_bad_samples_of_shards_are_skipped_and_said_and_a_folder_of_shards_is_read(tmp_path, capsys):
    shards = tmp_path / "shards"
    shards.mkdir()
    _tar(shards / "a.tar", {"0": {"png": _png(8, 8), "txt": b"a zork"},
                            "1": {"png": b"not a png"},
                            "2": {"png": _png(8, 8), "json": b"{not json"},
                            "3": {"png": _png(8, 8), "json": b'{"objects": [{"bbox": "x"}], "width": 8, "height": 8}'}})
    write_tar(shards / "b.tar", [("4.png", _png(8, 8)), ("4.png", _png(8, 8))])  # which image is meant is unknown
    (item,) = read_concept_images(str(shards))  # a folder of shards, not of images
    assert item.caption == "a zork"
    out = capsys.readouterr().out
    assert [line.split(" skipped ")[1].split(" ")[0] for line in out.splitlines()] == ["1", "2", "3", "4"]
    assert "cannot read image" in out and "JSONDecodeError" in out and "duplicate file name 4.png" in out
