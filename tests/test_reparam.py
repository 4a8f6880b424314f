import pytest
import torch
from conftest import perturb_
from tolerance import reordered, rounded

from pixart.errors import PixArtError
from pixart.models import build_model
from pixart.models.reparam import GLOBAL_INITS, dit_to_pixart, infer_dit_config, modulation_error


def trained_like_dit(**kw):
    # DiT's init zeroes every adaLN layer; perturb so the test sees real modulation.
    return perturb_(build_model("DiT-S/2", input_size=8, depth=3, num_classes=10, **kw)).eval()


@pytest.mark.parametrize("global_init", GLOBAL_INITS)
def test_converted_model_reproduces_dit_null_class_at_t500_for_any_caption(global_init):
    dit = trained_like_dit()
    pixart = dit_to_pixart(dit, global_init=global_init, caption_channels=16).eval()
    x, t = torch.randn(3, 4, 8, 8), torch.full((3,), 500)
    ref = dit(x, t, torch.full((3,), 10))
    for caption in (torch.randn(3, 120, 16), torch.randn(3, 7, 16) * 10):
        out = pixart(x, t, caption)
        # float32 rounding: the two nets sum the same terms in a different order
        torch.testing.assert_close(out, ref, **reordered(ref))
    # away from t_ref one shared MLP cannot match every block: close, not equal
    t100 = torch.full((3,), 100)
    ref100 = dit(x, t100, torch.full((3,), 10))
    assert not torch.allclose(pixart(x, t100, caption), ref100, **reordered(ref100))  # more than rounding


def test_modulation_is_exact_at_t_ref_and_mean_init_is_best_over_t():
    dit = trained_like_dit()
    t = torch.arange(1000)
    errors = {}
    for init in GLOBAL_INITS:
        blocks, final = modulation_error(dit, dit_to_pixart(dit, global_init=init, caption_channels=16), t)
        assert blocks[500] < rounded() and final[500] < rounded()  # the tables: float64, then float32
        errors[init] = blocks.square().mean().item()
    assert errors["mean"] <= min(errors.values())


def test_t_ref_is_configurable():
    dit = trained_like_dit()
    blocks, _ = modulation_error(dit, dit_to_pixart(dit, t_ref=200, caption_channels=16), torch.tensor([200, 500]))
    assert blocks[0] < rounded() < blocks[1]


def test_architecture_is_inferred_from_shapes():
    dit = build_model("DiT-B/4", input_size=16, depth=2, num_classes=7, learn_sigma=False)
    cfg = infer_dit_config(dit.state_dict())
    assert (cfg.hidden_size, cfg.num_heads, cfg.patch_size, cfg.depth, cfg.input_size) == (768, 12, 4, 2, 16)
    assert (cfg.num_classes, cfg.learn_sigma, cfg.mlp_ratio) == (7, False, 4.0)


def test_bad_inputs_are_clear_errors():
    state = trained_like_dit().state_dict()
    with pytest.raises(PixArtError, match="num_heads=5 does not divide hidden_size=384"):
        infer_dit_config(state, num_heads=5)
    with pytest.raises(PixArtError, match="not a DiT state dict"):
        infer_dit_config(build_model("PixArt-S/2", depth=1).state_dict())
    odd = build_model("DiT-S/2", depth=1, input_size=8, hidden_size=96, num_heads=4).state_dict()
    with pytest.raises(PixArtError, match="pass --num-heads"):
        infer_dit_config(odd)
    no_null = build_model("DiT-S/2", depth=1, input_size=8, class_dropout_prob=0.0)
    with pytest.raises(PixArtError, match="no null-class embedding"):
        dit_to_pixart(no_null)
