import os

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def perturb_(model, std=0.05, seed=0):
    """Give a freshly initialised model non-trivial weights (inits zero many layers)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * std)
    return model


@pytest.fixture(scope="session")
def tiny_feature_cache(tmp_path_factory):
    """ROOT/feats: 32 one-object shapes at 32 px as features (tiny T5 of width 32, pixel autoencoder
    f=4: 48 x 8 x 8 latents, `txt` captions); ROOT/raw the shards, ROOT/t5 the encoder."""
    from data_pipelines.features import FeatureConfig, extract_features
    from data_pipelines.shapes import write_shapes
    from pixart.encoders.tiny import make_tiny_t5

    root = tmp_path_factory.mktemp("tiny_cache")
    write_shapes(root / "raw", 32, seed=0, resolution=32, shard_size=8, max_objects=1, sizes=("large",))
    t5 = make_tiny_t5(root / "t5")
    extract_features(root / "raw", root / "feats", FeatureConfig(text_encoder=str(t5), pixel_autoencoder=4,
                                                                  resolution=32, captions=("txt",)), progress=False)
    return root
