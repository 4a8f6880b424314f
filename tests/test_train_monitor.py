import numpy as np
from PIL import Image

from pixart.train.monitor import save_loss_curve, trailing_mean


def test_trailing_mean_is_numpys_moving_average():
    values = list(np.random.default_rng(0).lognormal(size=1000))
    for k in (1, 7, 50):
        full = np.convolve(values, np.ones(k))[:len(values)]  # sum of each value and the k - 1 before it
        expected = full / np.minimum(np.arange(1, len(values) + 1), k)
        np.testing.assert_allclose(trailing_mean(values, k), expected, rtol=1e-9)


def test_loss_curves_are_one_png(tmp_path):
    rows = [{"step": s, "loss": 1.0 / (1 + s)} for s in range(1, 20_001)]
    save_loss_curve({"stage2": rows, "empty": [{"step": 1}]}, tmp_path / "loss.png")
    assert Image.open(tmp_path / "loss.png").size == (600, 350)
