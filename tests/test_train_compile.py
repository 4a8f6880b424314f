"""Compiled blocks: no recompilation across aspect buckets and caption lengths, same outputs as eager."""
import pytest
import torch
from conftest import perturb_
from tolerance import adam_steps, reordered

from pixart.models import build_model
from pixart.train.compile import compile_blocks

BUCKETS = [((8, 8), 9), ((6, 10), 12), ((10, 6), 5), ((8, 8), 3)]  # latent (h, w) and caption length


def _model(seed=0):
    """Perturbed (PixArt zero-initialises its output layers, which would make every output and gradient 0)
    and without caption dropout (random in training mode), so eager and compiled runs see the same math."""
    torch.manual_seed(seed)
    model = build_model("PixArt-S/2", input_size=8, depth=2, hidden_size=48, num_heads=2, caption_channels=16,
                        model_max_length=20, in_channels=4, class_dropout_prob=0.0)
    return perturb_(model, seed=seed)


def _step(model, opt, hw, length, seed):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(3, 4, *hw, generator=g), torch.randn(3, length, 16, generator=g)
    mask = torch.ones(3, length, dtype=torch.bool)
    mask[0, length // 2:] = False
    out = model(x, torch.tensor([1, 500, 999]), y, mask)
    out.square().mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return out.detach()


@pytest.mark.parametrize("dynamic", [True, False])
def test_changing_bucket_does_not_recompile(dynamic):
    torch._dynamo.reset()
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    model = _model()
    if dynamic:
        compile_blocks(model, backend=counting_backend)
    else:  # the control: static shapes recompile per bucket, so the count below can fail
        for block in model.blocks:
            block.compile(backend=counting_backend, dynamic=False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for i in range(2):  # warm-up: the first two steps compile (grads appear after the first backward)
        _step(model, opt, (8, 8), 7, i)
    warm = len(graphs)
    assert warm >= 1
    for i, (hw, length) in enumerate(BUCKETS):
        _step(model, opt, hw, length, 10 + i)
    added = len(graphs) - warm
    if dynamic:  # both blocks share one graph, and three other buckets with other caption lengths add none
        assert added == 0
    else:
        assert added >= 3
    assert list(model.state_dict()) == list(_model().state_dict())  # in place: checkpoint names unchanged


def test_inductor_blocks_match_eager_training():
    torch._dynamo.reset()
    eager, compiled = _model(), _model()
    compile_blocks(compiled)
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-3) for m in (eager, compiled)]
    for i, (hw, length) in enumerate(BUCKETS[:3]):
        want, got = (_step(m, o, hw, length, i) for m, o in zip((eager, compiled), opts, strict=True))
        assert want.abs().max() > 0.1  # the comparison means something
        torch.testing.assert_close(got, want, **reordered(want))  # fp32; fused kernels reorder sums
    start = dict(_model().named_parameters())
    moved = max((a - start[name]).abs().max().item() for name, a in eager.named_parameters())
    assert moved > 5 * adam_steps(1e-3, 3)["atol"]  # the weights trained, beyond the tolerance below
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters(), strict=True):
        torch.testing.assert_close(b, a, **adam_steps(1e-3, 3), msg=name)
