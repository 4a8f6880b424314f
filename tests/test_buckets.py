"""Aspect-ratio bucket tables, nearest bucket, resize-crop."""
import numpy as np
import pytest
from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import ASPECT_RATIO_1024_BIN
from PIL import Image

from pixart.data.buckets import (
    ASPECT_RATIO_256,
    ASPECT_RATIO_512,
    ASPECT_RATIO_1024,
    bucket_spec,
    nearest_bucket,
    resize_crop,
    scaled_table,
    table_for,
)
from pixart.errors import PixArtError


def test_pixart_tables_have_40_ratios_from_quarter_to_four():
    for side, table in ((1024, ASPECT_RATIO_1024), (512, ASPECT_RATIO_512), (256, ASPECT_RATIO_256)):
        ratios = [float(k) for k in table]
        assert len(table) == 40 and ratios == sorted(ratios) and ratios[0] == 0.25 and ratios[-1] == 4.0
        assert table["1.0"] == (side, side)
        for key, (h, w) in table.items():
            assert abs(h / w - float(key)) < 0.02 and h % (side // 16) == 0 and w % (side // 16) == 0
            assert 0.9 * side ** 2 < h * w < 1.06 * side ** 2  # about the same pixel count everywhere
    # diffusers' inference table is a subset: its numbers are reused, not retyped.
    assert all(ASPECT_RATIO_1024[k] == (int(h), int(w)) for k, (h, w) in ASPECT_RATIO_1024_BIN.items())
    assert all(ASPECT_RATIO_512[k] == (h // 2, w // 2) for k, (h, w) in ASPECT_RATIO_1024.items())


def test_nearest_bucket():
    assert nearest_bucket(1024, 1024, ASPECT_RATIO_1024) == ("1.0", (1024, 1024))
    assert nearest_bucket(600, 1000, ASPECT_RATIO_1024) == ("0.6", (768, 1280))
    assert nearest_bucket(100, 1000, ASPECT_RATIO_512) == ("0.25", (256, 1024))  # beyond the table: the end
    assert nearest_bucket(5000, 1000, ASPECT_RATIO_256)[0] == "4.0"


def test_scaled_tables_for_small_sides():
    for side in (32, 64, 128):
        t = scaled_table(ASPECT_RATIO_1024, side, multiple=16)
        sizes = list(t.values())
        assert len(set(sizes)) == len(sizes) and t["1.0"] == (side, side)  # duplicates collapsed
        assert all(h % 16 == 0 and w % 16 == 0 for h, w in sizes)
        assert all(abs(h / w - float(k)) < 0.01 for k, (h, w) in t.items())  # keyed by the real ratio
        assert min(float(k) for k in t) == 0.25 and max(float(k) for k in t) == 4.0
    assert 4 < len(scaled_table(ASPECT_RATIO_1024, 32)) < len(scaled_table(ASPECT_RATIO_1024, 128)) < 40
    assert table_for(512) is ASPECT_RATIO_512 and table_for(64) == scaled_table(ASPECT_RATIO_1024, 64)


def test_resize_crop_covers_then_centers():
    rgb = np.zeros((100, 300, 3), dtype=np.uint8)
    rgb[:, 100:200] = 255  # a white middle third
    out = resize_crop(Image.fromarray(rgb), (64, 64), multi_aspect=False)
    assert out.size == (64, 64)
    a = np.asarray(out)
    assert a[:, 8:56].min() > 200  # the centre is the white band, scaled to cover the height
    tall = resize_crop(Image.fromarray(rgb), (96, 32), multi_aspect=True)
    assert tall.size == (32, 96)


def test_resize_crop_makes_the_pixels_pixarts_transforms_make():
    """Against torchvision's transforms as PixArt-alpha composes them. One resolution: tools/extract_features.py's
    `extract_img_vae` and diffusion/data/transforms.py's `default_train`, `T.Resize(side)` (bilinear) then
    `T.CenterCrop(side)`. Buckets: diffusion/data/datasets/InternalData_ms.py's `getdata`, its `resize_size` rule,
    `T.Resize(resize_size, InterpolationMode.BICUBIC)`, then `T.CenterCrop(closest_size)`."""
    import torchvision.transforms as T
    from torchvision.transforms import InterpolationMode

    rng = np.random.default_rng(0)
    sizes = [tuple(int(x) for x in hw) for hw in rng.integers(17, 400, (30, 2))]
    for h, w in sizes + [(300, 300), (100, 301), (301, 100), (427, 640), (257, 255)]:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        want = T.Compose([T.Resize(64), T.CenterCrop(64)])(img)
        assert np.array_equal(np.asarray(resize_crop(img, (64, 64), multi_aspect=False)), np.asarray(want)), (h, w)
        closest_size = list(nearest_bucket(h, w, ASPECT_RATIO_256)[1])
        if closest_size[0] / h > closest_size[1] / w:  # InternalData_ms.py, as written there
            resize_size = closest_size[0], int(w * closest_size[0] / h)
        else:
            resize_size = int(h * closest_size[1] / w), closest_size[1]
        want = T.Compose([T.Resize(resize_size, interpolation=InterpolationMode.BICUBIC),
                          T.CenterCrop(closest_size)])(img)
        got = resize_crop(img, tuple(closest_size), multi_aspect=True)
        assert np.array_equal(np.asarray(got), np.asarray(want)), (h, w)


def test_bucket_table_names_and_typos():
    """PixArt-alpha names its tables ASPECT_RATIO_256, _512 and _1024 (diffusion/data/datasets/utils.py); a side of
    ours is ms<side> or <side>, and <side>/24 for sizes in multiples of 24. A typo is refused rather than read as
    another side."""
    assert [bucket_spec(n) for n in ("ASPECT_RATIO_512", "ms512", "512", " Ms64 ", "72/24", "ms72/24", "64/16")] == [
        (512, 16), (512, 16), (512, 16), (64, 16), (72, 24), (72, 24), (64, 16)]
    with pytest.raises(PixArtError, match=r"--buckets 'ASPECT_RATIO_51': PixArt's tables are ASPECT_RATIO_256, _512 "
                                          r"and _1024; for another side use ms<side>"):
        bucket_spec("ASPECT_RATIO_51")
    with pytest.raises(PixArtError, match=r"--buckets 'ASPECT_RATIO_512/24': PixArt's tables are"):
        bucket_spec("ASPECT_RATIO_512/24")
    for typo in ("ms65", "8", "foo", "ms", "72", "64/24", "72/8"):
        with pytest.raises(PixArtError, match=rf"--buckets '{typo}': unknown bucket table; .*multiple of 16"):
            bucket_spec(typo)
