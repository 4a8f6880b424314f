import io
import json
import tarfile

import torch
import webdataset as wds

from pixart.data.schema import FEATURES_EXT, FeatureSample


def test_feature_sample_round_trips_through_a_real_tar(tmp_path):
    sample = FeatureSample(
        key="img-0001",
        latent_mean=torch.randn(4, 8, 6),
        latent_std=torch.rand(4, 8, 6),
        text={"txt": torch.randn(3, 16).bfloat16(), "metadata": torch.randn(11, 16).bfloat16()},
        meta={"width": 48, "height": 64, "captions": {"txt": "shapes"}},
    )
    with wds.TarWriter(str(tmp_path / "f.tar")) as sink:
        sink.write(sample.to_wds())
    names = tarfile.open(tmp_path / "f.tar").getnames()
    assert names == [f"img-0001.{FEATURES_EXT}", "img-0001.json"]
    raw = next(iter(wds.WebDataset(str(tmp_path / "f.tar"), shardshuffle=False)))
    back = FeatureSample.from_wds(raw)
    assert back.key == "img-0001" and back.meta == sample.meta
    assert torch.equal(back.latent_mean, sample.latent_mean) and torch.equal(back.latent_std, sample.latent_std)
    assert back.text.keys() == sample.text.keys()
    assert all(torch.equal(back.text[k], v) and back.text[k].dtype == torch.bfloat16 for k, v in sample.text.items())
    assert json.loads(io.BytesIO(raw["json"]).read()) == sample.meta


def test_all_zero_std_is_not_stored_and_reads_back_as_zeros():
    mean = torch.randn(12, 4, 4)
    zero = FeatureSample("k", mean, torch.zeros_like(mean), {"txt": torch.randn(2, 8)}).to_wds()
    none = FeatureSample("k", mean, None, {"txt": torch.randn(2, 8)}).to_wds()
    full = FeatureSample("k", mean, torch.rand(12, 4, 4), {"txt": torch.randn(2, 8)}).to_wds()
    assert len(full[FEATURES_EXT]) - len(zero[FEATURES_EXT]) >= mean.numel() * 4
    assert len(none[FEATURES_EXT]) == len(zero[FEATURES_EXT])
    for wds_sample in (zero, none):
        back = FeatureSample.from_wds(wds_sample)
        assert torch.equal(back.latent_mean, mean) and back.latent_std.shape == mean.shape
        assert back.latent_std.dtype == torch.float32 and not back.latent_std.any()
