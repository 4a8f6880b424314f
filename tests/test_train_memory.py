"""Activation checkpointing chosen by memory: saved-tensor accounting and the fewest blocks that fit."""
import pytest
import torch
import torch.nn.functional as F

from pixart.errors import PixArtError
from pixart.models import build_model
from pixart.train.memory import blocks_to_checkpoint, measure_block, saved_bytes, state_bytes


def test_saved_bytes_counts_activations_once_and_not_parameters():
    x = torch.randn(8, 16, requires_grad=True)
    w = torch.randn(32, 16, requires_grad=True)
    assert saved_bytes(lambda: F.linear(x, w), exclude=[w]) == x.nbytes  # linear saves its input and weight
    assert saved_bytes(lambda: F.linear(x, w)) == x.nbytes + w.nbytes
    assert saved_bytes(lambda: (x.exp(), x.sin()), exclude=[]) == 2 * x.nbytes  # exp's output, sin's input x
    assert saved_bytes(lambda: (x.sin(), x.cos())) == x.nbytes  # both save x: one storage


def test_one_measured_block_predicts_what_checkpointing_saves_in_the_whole_model():
    torch.manual_seed(0)
    model = build_model("PixArt-S/2", input_size=16, depth=4, hidden_size=64, num_heads=4, caption_channels=32)
    x, t, y = torch.randn(2, 4, 16, 16), torch.tensor([3, 700]), torch.randn(2, 10, 32)
    block, inp = measure_block(model, 2, 64, 10, torch.device("cpu"), torch.float32)
    total = {}
    for k in (0, 3):
        model.set_grad_checkpointing(k)
        total[k] = saved_bytes(lambda: model(x, t, y), exclude=list(model.parameters()))
    assert total[0] - total[3] == pytest.approx(3 * (block - inp), rel=0.05)
    assert block > 10 * inp  # what makes checkpointing pay: a block saves far more than its input


def test_fewest_blocks_that_fit():
    # depth 4, a block saves 10, its input 1: the peak is 4 - k blocks + k inputs (k < 4).
    assert blocks_to_checkpoint(4, 10, 1, budget_bytes=40) == 0
    assert blocks_to_checkpoint(4, 10, 1, budget_bytes=39) == 1  # 31
    assert blocks_to_checkpoint(4, 10, 1, budget_bytes=22) == 2  # 22
    assert blocks_to_checkpoint(4, 10, 1, budget_bytes=13) == 3  # 13; all 4 would keep one more input
    with pytest.raises(PixArtError, match=r"need at least 0.00 GB \(3 of 4 blocks checkpointed\)"):
        blocks_to_checkpoint(4, 10, 1, budget_bytes=12)


def test_state_bytes_follow_zero_sharding():
    # bf16: weights 2 + grads 2 + master 4 + Adam 8 + EMA 4 bytes per parameter on one rank.
    assert state_bytes(1000, "bf16", zero_stage=1, world=1) == 20_000
    assert state_bytes(1000, "bf16", zero_stage=1, world=4) == 1000 * (2 + 2 + 12 / 4 + 4)
    assert state_bytes(1000, "bf16", zero_stage=3, world=4) == 1000 * 20 / 4
    assert state_bytes(1000, "fp32", zero_stage=2, world=2) == 1000 * (4 + 4 / 2 + 8 / 2 + 4)
