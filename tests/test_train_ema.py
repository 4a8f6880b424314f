"""EMA decay, with and without warmup (sharded correctness is in test_train_distributed.py)."""
import torch

from pixart.train.ema import EMA
from pixart.train.master import Fragment


def fragment(values):
    t = torch.tensor(values, dtype=torch.float32)
    return Fragment("w", t.shape, 0, t, owner=True), t


def test_fixed_decay_is_pixarts_update():
    frag, w = fragment([0.0, 0.0])
    ema = EMA([frag], decay=0.9)
    w.fill_(1.0)
    ema.update(1)
    assert torch.allclose(ema.shadow[0], torch.full((2,), 0.1))
    assert ema.decay_at(10 ** 6) == 0.9


def test_warmup_lets_a_short_run_forget_its_init():
    frag, w = fragment([0.0])
    ema = EMA([frag], decay=0.999, warmup=True)
    assert ema.decay_at(1) == 2 / 11 and ema.decay_at(10 ** 6) == 0.999
    w.fill_(1.0)
    for step in range(1, 101):
        ema.update(step)
    fixed = EMA([fragment([0.0])[0]], decay=0.999)
    fixed.fragments[0].view.fill_(1.0)
    for step in range(1, 101):
        fixed.update(step)
    assert ema.shadow[0].item() > 0.99 and fixed.shadow[0].item() < 0.1  # 0.999^100 of the init remains
