import os

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def write_tar(path, members):
    """A tar of (name, bytes) members in the order given, names as they are (duplicates, upper case, ...),
    which webdataset's TarWriter would not write."""
    import io
    import tarfile

    with tarfile.open(path, "w") as tar:
        for name, blob in members:
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return path


def turned_photo(orientation: int, w: int = 24, h: int = 16) -> bytes:
    """A JPEG stored as a phone stores a photo it took turned: w x h pixels as the sensor saw them, and an EXIF
    orientation tag saying how to turn them for display (6 and 8: a quarter turn, shown h wide and w high)."""
    import io

    import numpy as np
    from PIL import ExifTags, Image

    px = np.random.default_rng(orientation).integers(0, 256, (h, w, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    buf = io.BytesIO()
    Image.fromarray(px).save(buf, "JPEG", exif=exif)
    return buf.getvalue()


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


@pytest.fixture(scope="session")
def tiny_concept_setup(tmp_path_factory):
    """A tiny trained-looking PixArt checkpoint folder (encoders.json: a tiny T5 and pixel:2), three concept images
    with masks and captions, and a varied caption corpus: ROOT/ckpt, ROOT/images, ROOT/captions.txt."""
    import json
    import random

    import numpy as np
    from PIL import Image

    from pixart.checkpoint import save_checkpoint
    from pixart.encoders.tiny import make_tiny_t5
    from pixart.models import ModelConfig, model_from_config

    root = tmp_path_factory.mktemp("concept")
    words = ("a red blue green circle square star in the top left right bottom center large small photo of on "
             "plain background image shape").split()
    t5 = make_tiny_t5(root / "t5", corpus=[" ".join(words)])
    cfg = ModelConfig(arch="pixart", input_size=8, patch_size=2, in_channels=12, hidden_size=32, depth=2,
                      num_heads=2, learn_sigma=False, caption_channels=32, model_max_length=16)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = perturb_(model_from_config(cfg), 0.1)
    save_checkpoint(root / "ckpt", cfg, model.state_dict(), extra={
        "encoders.json": json.dumps({"text_encoder": str(t5), "image_encoder": "pixel:2", "max_length": 16,
                                     "scaling_factor": 1.0}),
        "diffusion.json": json.dumps({"prediction_type": "v_prediction"})})
    (root / "images" / "masks").mkdir(parents=True)
    for i in range(3):
        image = np.full((16, 16, 3), 128, np.uint8)
        image[4:12, 2 + i:10 + i] = (120, 125, 0)
        mask = np.zeros((16, 16), np.uint8)
        mask[4:12, 2 + i:10 + i] = 255
        Image.fromarray(image).save(root / "images" / f"{i}.png")
        Image.fromarray(mask).save(root / "images" / "masks" / f"{i}.png")
        (root / "images" / f"{i}.txt").write_text(f"a photo of a zork on the {('left', 'center', 'right')[i]}")
    rng = random.Random(0)
    (root / "captions.txt").write_text("\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(3, 10)))
                                                 for _ in range(300)))
    return root
