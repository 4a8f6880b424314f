"""Reading tars as webdataset does: our samples are checked against webdataset's own grouping
(`wds.WebDataset`, whose `group_by_keys` splits `dir/key.ext` at the first dot of the file name and
lowercases the extension) on member names found in public shards."""
import io

import numpy as np
import pytest
import webdataset as wds
from conftest import turned_photo, write_tar
from PIL import Image

from pixart.data.tars import decode_image, displayed_size, read_tar


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(buf, "JPEG")
    return buf.getvalue()


def _plain(sample: dict) -> dict:
    """The key and the members (webdataset also adds where it read the sample from)."""
    return {k: v for k, v in sample.items() if k == "__key__" or not k.startswith("__")}


def test_samples_are_grouped_as_webdataset_groups_them(tmp_path):
    jpg = _jpeg()
    path = str(write_tar(tmp_path / "s.tar", [
        ("000001.JPG", jpg), ("000001.TXT", b"a red square"),  # upper-case extensions, as cameras write them
        ("dir.v1/000002.jpg", jpg), ("dir.v1/000002.txt", b"x"),  # a dot in the folder name
        ("000003.seg.png", jpg), ("000003.jpg", jpg),  # an extension with a dot
    ]))
    ours = [_plain(s) for s in read_tar(path)]
    theirs = [_plain(s) for s in wds.WebDataset(path, shardshuffle=False)]
    assert ours == theirs
    assert [s["__key__"] for s in ours] == ["000001", "dir.v1/000002", "000003"]
    assert ours[0]["txt"] == b"a red square"
    assert decode_image(ours[0]).size == (8, 8)  # KEY.JPG is an image, not "no image"


def test_samples_not_kept_come_as_their_keys_with_no_member_read(tmp_path, monkeypatch):
    import tarfile
    path = str(write_tar(tmp_path / "s.tar", [(f"{k:06d}.{ext}", f"{k}{ext}".encode())
                                               for k in range(6) for ext in ("txt", "cls")]))
    reads = []
    extract = tarfile.TarFile.extractfile
    monkeypatch.setattr(tarfile.TarFile, "extractfile", lambda tar, m: reads.append(m.name) or extract(tar, m))
    got = list(read_tar(path, keep=lambda i: i % 3 == 1))
    assert [s["__key__"] for s in got] == [f"{k:06d}" for k in range(6)]  # every sample keeps its index
    assert [sorted(s) for s in got] == [["__key__", "__url__"], ["__key__", "__url__", "cls", "txt"],
                                        ["__key__", "__url__"]] * 2
    assert got[4]["txt"] == b"4txt" and reads == ["000001.txt", "000001.cls", "000004.txt", "000004.cls"]


def test_a_sample_with_two_members_of_one_name_is_refused(tmp_path):
    jpg = _jpeg()
    path = str(write_tar(tmp_path / "d.tar", [("a.jpg", jpg), ("a.jpg", jpg), ("a.txt", b"x"), ("b.jpg", jpg)]))
    with pytest.raises(ValueError, match="duplicate"):  # webdataset refuses the whole stream
        list(wds.WebDataset(path, shardshuffle=False))
    first, second = read_tar(path)  # we refuse the sample and read on
    with pytest.raises(ValueError, match="duplicate file name a.jpg"):
        decode_image(first)
    assert decode_image(second).size == (8, 8)


def test_two_writers_of_one_shard_never_rename_each_others_half(tmp_path):
    """A killed run's leftover worker and its rerun write the same shard: each renames only its own file, and
    a writer whose file the rerun deleted as stale fails rather than publishing another's."""
    import stat

    from pixart.atomic import file_mode
    from pixart.data.tars import ShardWriter

    path = tmp_path / "s.tar"
    orphan = ShardWriter(path)
    orphan.write({"__key__": "a", "txt": b"from the orphan"})
    for stale in tmp_path.glob(".s.tar.tmp*"):  # what a rerun does first
        stale.unlink()
    rerun = ShardWriter(path)
    rerun.write({"__key__": "a", "txt": b"from the rerun"})
    with pytest.raises(FileNotFoundError):
        orphan.close()
    assert not path.exists()
    rerun.close()
    assert [s["txt"] for s in read_tar(str(path))] == [b"from the rerun"]
    assert stat.S_IMODE(path.stat().st_mode) == file_mode()  # the team's, not mkstemp's 0600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.tar"]



@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_a_photo_is_read_turned_as_its_exif_orientation_says_as_diffusers_reads_it(tmp_path, orientation):
    """diffusers' `load_image` (its pipelines' image inputs; its DreamBooth scripts apply the same
    `exif_transpose` to every instance photo) is the reference for how a photo is seen."""
    from diffusers.utils import load_image

    data = turned_photo(orientation)
    (tmp_path / "photo.jpg").write_bytes(data)
    want = np.asarray(load_image(str(tmp_path / "photo.jpg")))
    assert want.shape[:2] == ((24, 16) if orientation in (6, 8) else (16, 24))  # a quarter turn swaps the sides
    assert np.array_equal(np.asarray(decode_image({"jpg": data})), want)
    assert displayed_size(data) == want.shape[:2]  # from the header alone, for bucketing before decoding
