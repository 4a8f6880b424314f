import pytest
import torch
from conftest import perturb_
from tolerance import conditioned, lower_precision, reordered

from pixart.errors import PixArtError
from pixart.models import MODEL_NAMES, build_model, model_config
from pixart.models.layers import sincos_pos_embed

CAP = 32


def tiny(name="PixArt-S/2", **kw):
    kw = dict(dict(input_size=8, depth=2, caption_channels=CAP, model_max_length=120), **kw)
    if name.startswith("DiT"):
        kw = {k: v for k, v in kw.items() if k not in ("caption_channels", "model_max_length")} | {"num_classes": 10}
    return perturb_(build_model(name, **kw)).eval()


@pytest.mark.parametrize("name,total,trainable", [
    ("PixArt-XL/2", 610_856_096, 610_856_096),
    ("PixArtMS-XL/2", 611_349_152, 611_349_152),
    ("DiT-XL/2", 675_129_632, 674_834_720),
])
def test_parameter_counts_match_the_paper_models(name, total, trainable):
    with torch.device("meta"):
        model = build_model(name)
    assert sum(p.numel() for p in model.parameters()) == total
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == trainable


def test_all_names_build_and_overrides_apply():
    assert len(MODEL_NAMES) == 36
    cfg = model_config("PixArt-B/4", input_size=16, caption_channels=64)
    assert (cfg.depth, cfg.hidden_size, cfg.num_heads, cfg.patch_size) == (12, 768, 12, 4)
    assert (cfg.input_size, cfg.caption_channels) == (16, 64)
    assert model_config("PixArtMS-XL/2").micro_conditions


@pytest.mark.parametrize("name,message", [
    ("PixArt-XXL/2", "unknown model name 'PixArt-XXL/2'"),
    ("Foo", "unknown model name 'Foo'"),
])
def test_unknown_names_are_one_clear_error(name, message):
    with pytest.raises(PixArtError, match=message):
        build_model(name)


def test_bad_overrides_are_clear_errors():
    with pytest.raises(PixArtError, match="build_model: unknown key 'depht'"):
        build_model("PixArt-S/2", depht=3)
    for key, value, message in (("depth", "6", "depth must be an integer, got '6'"),
                                ("depth", 6.0, "depth must be an integer, got 6.0"),
                                ("hidden_size", True, "hidden_size must be an integer, got True"),
                                ("learn_sigma", 1, "learn_sigma must be true or false, got 1"),
                                ("mlp_ratio", "4", "mlp_ratio must be a number, got '4'"),
                                ("model_max_length", 0, "model_max_length must be positive, got 0"),
                                ("caption_channels", -1, "caption_channels must be positive, got -1"),
                                ("mlp_ratio", float("nan"), "mlp_ratio must be a finite number, got nan"),
                                ("pe_interpolation", 0, "pe_interpolation must be positive, got 0"),
                                ("class_dropout_prob", 1.5, "must be a probability from 0 to 1, got 1.5")):
        with pytest.raises(PixArtError, match=message):
            build_model("PixArt-S/2", **{key: value})
    assert build_model("PixArt-S/2", depth=1, mlp_ratio=4).config.mlp_ratio == 4.0  # an int where a float goes
    with pytest.raises(PixArtError, match="num_heads=5 does not divide hidden_size=384"):
        build_model("PixArt-S/2", num_heads=5)


def test_dit_state_dict_has_the_official_keys():
    keys = set(build_model("DiT-S/2", depth=1, input_size=8).state_dict())
    official = {  # facebookresearch/DiT models.py, depth 1
        "pos_embed", "x_embedder.proj.weight", "x_embedder.proj.bias",
        "t_embedder.mlp.0.weight", "t_embedder.mlp.0.bias", "t_embedder.mlp.2.weight", "t_embedder.mlp.2.bias",
        "y_embedder.embedding_table.weight",
        "blocks.0.attn.qkv.weight", "blocks.0.attn.qkv.bias", "blocks.0.attn.proj.weight", "blocks.0.attn.proj.bias",
        "blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc1.bias", "blocks.0.mlp.fc2.weight", "blocks.0.mlp.fc2.bias",
        "blocks.0.adaLN_modulation.1.weight", "blocks.0.adaLN_modulation.1.bias",
        "final_layer.linear.weight", "final_layer.linear.bias",
        "final_layer.adaLN_modulation.1.weight", "final_layer.adaLN_modulation.1.bias",
    }
    assert keys == official


def test_pos_embed_matches_diffusers_for_square_and_non_square_grids():
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    for (h, w), base, scale in [((8, 8), 8, 1.0), ((6, 10), 8, 1.0), ((16, 12), 8, 2.0)]:
        ref = get_2d_sincos_pos_embed(64, (h, w), base_size=base, interpolation_scale=scale, output_type="pt")
        pos = max((g - 1) * base / g / scale for g in (h, w))  # diffusers' float32 positions: sin errs by eps pos
        torch.testing.assert_close(sincos_pos_embed(64, h, w, base, scale), ref.float(), **conditioned(pos))


def test_forward_shapes_and_learned_sigma():
    model = tiny()
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([1, 999])
    assert model(x, t, torch.randn(2, 7, CAP)).shape == (2, 8, 8, 8)
    assert tiny(learn_sigma=False)(x, t, torch.randn(2, 7, CAP)).shape == (2, 4, 8, 8)
    # other resolutions work too: positions are rebuilt by PixArt's base_size rule
    assert model(torch.randn(2, 4, 12, 8), t, torch.randn(2, 7, CAP)).shape == (2, 8, 12, 8)


@pytest.mark.parametrize("backend_name", ["PixArt-S/2", "PixArtMS-S/2"])
def test_padding_tokens_do_not_change_the_output(backend_name):
    model = tiny(backend_name)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([3, 700])
    info = dict(img_hw=torch.tensor([[64.0, 64.0]] * 2), aspect_ratio=torch.tensor([[1.0]] * 2))
    caption = torch.randn(2, 20, CAP)
    mask20 = torch.zeros(2, 20)
    mask20[0, :5], mask20[1, :20] = 1, 1
    padded = torch.cat([caption, torch.randn(2, 100, CAP) * 50], dim=1)  # garbage in the padding
    mask120 = torch.cat([mask20, torch.zeros(2, 100)], dim=1)
    out20 = model(x, t, caption, mask20, data_info=info)
    out120 = model(x, t, padded, mask120, data_info=info)
    torch.testing.assert_close(out120, out20, **reordered(out20))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # trimming (the loader's) is exact in bf16 too
        bf20, bf120 = model(x, t, caption, mask20, data_info=info), model(x, t, padded, mask120, data_info=info)
    torch.testing.assert_close(bf120.float(), bf20.float(), **lower_precision(bf20))
    torch.testing.assert_close(bf20.float(), out20, **lower_precision(out20))
    # and the caption does matter where it is not padding
    other = caption.clone()
    other[0, :5] += 1
    assert not torch.allclose(model(x, t, other, mask20, data_info=info), out20, **reordered(out20))


def test_pixart_ms_uses_size_and_aspect_micro_conditions():
    model = tiny("PixArtMS-S/2")
    x, t, y = torch.randn(1, 4, 8, 12), torch.tensor([10]), torch.randn(1, 4, CAP)
    a = model(x, t, y, data_info=dict(img_hw=torch.tensor([[64.0, 96.0]]), aspect_ratio=torch.tensor([[1.5]])))
    b = model(x, t, y, data_info=dict(img_hw=torch.tensor([[96.0, 64.0]]), aspect_ratio=torch.tensor([[0.67]])))
    assert a.shape == (1, 8, 8, 12) and not torch.allclose(a, b, **reordered(b))
    with pytest.raises(PixArtError, match="data_info"):
        model(x, t, y)


def test_dropped_captions_use_the_whole_null_caption():
    model = tiny()
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([5, 5])
    short = torch.randn(2, 6, CAP)
    dropped = model(x, t, short, torch.ones(2, 6), force_drop_ids=torch.tensor([1, 0]))
    null = model.y_embedder.y_embedding[None]
    alone_null, alone_short = model(x[:1], t[:1], null), model(x[1:], t[1:], short[1:])
    torch.testing.assert_close(dropped[:1], alone_null, **reordered(alone_null))
    torch.testing.assert_close(dropped[1:], alone_short, **reordered(alone_short))


def test_training_mode_drops_captions_with_the_configured_probability():
    model = tiny(class_dropout_prob=0.5).train()
    y, mask = torch.randn(1000, 3, CAP), torch.ones(1000, 3, dtype=torch.bool)
    _, new_mask = model.y_embedder(y, mask, train=True)
    dropped = new_mask.sum(1) == 120
    assert 400 < dropped.sum() < 600


@pytest.mark.parametrize("name", ["PixArt-S/2", "DiT-S/2"])
def test_gradient_checkpointing_gives_the_same_gradients(name):
    model = tiny(name).train()
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([1, 2])
    cond = torch.randn(2, 5, CAP) if name.startswith("PixArt") else torch.tensor([1, 2])

    def grads(checkpointing):
        model.zero_grad()
        model.set_grad_checkpointing(checkpointing)
        model(x, t, cond, force_drop_ids=torch.zeros(2)).square().mean().backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    plain = grads(False)
    for partial in (True, 1):  # all blocks, or just the first
        for a, b in zip(plain, grads(partial), strict=True):
            torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="grad_checkpointing: 9 blocks, but the model has"):
        model.set_grad_checkpointing(9)


def test_xformers_is_never_a_silent_fallback():
    try:
        import xformers  # noqa: F401
    except ImportError:
        with pytest.raises(PixArtError, match="xformers is not installed"):
            build_model("PixArt-S/2", depth=1, attn_backend="xformers")
    else:
        a = tiny(attn_backend="xformers")
        b = tiny()
        b.load_state_dict(a.state_dict())
        x, t, y = torch.randn(1, 4, 8, 8), torch.tensor([1]), torch.randn(1, 5, CAP)
        ref = b(x, t, y)
        torch.testing.assert_close(a(x, t, y), ref, **reordered(ref))


def test_dit_forward_and_null_class():
    model = tiny("DiT-S/2")
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([1, 2])
    out = model(x, t, torch.tensor([3, 10]))
    assert out.shape == (2, 8, 8, 8)
    torch.testing.assert_close(model(x, t, torch.tensor([3, 4]), force_drop_ids=torch.tensor([0, 1]))[1], out[1])


def test_a_caption_with_no_tokens_adds_nothing():
    model = tiny()
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([5, 600]), torch.randn(2, 6, CAP)
    out = model(x, t, y, torch.zeros(2, 6))
    for block in model.blocks:
        torch.nn.init.zeros_(block.cross_attn.proj.weight)
        torch.nn.init.zeros_(block.cross_attn.proj.bias)
    torch.testing.assert_close(out, model(x, t, y))


def test_official_input_layouts_are_accepted():
    model = tiny()
    x, t, y, mask = torch.randn(2, 4, 8, 8), torch.tensor([5, 6]), torch.randn(2, 6, CAP), torch.ones(2, 6)
    mask[0, 3:] = 0
    ref = model(x, t, y, mask)
    torch.testing.assert_close(model(x, t, y[:, None], mask[:, None, None]), ref)  # (B, 1, L, C), (B, 1, 1, L)


def test_bad_micro_condition_shapes_are_clear_errors():
    model = tiny("PixArtMS-S/2")
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([5, 6]), torch.randn(2, 6, CAP)
    with pytest.raises(PixArtError, match="data_info: img_hw"):
        model(x, t, y, data_info=dict(img_hw=torch.ones(3, 2), aspect_ratio=torch.ones(2, 1)))
    shared = model(x, t, y, data_info=dict(img_hw=torch.tensor([[64.0, 64.0]]), aspect_ratio=torch.tensor([[1.0]])))
    per_row = model(x, t, y, data_info=dict(img_hw=torch.tensor([[64.0, 64.0]] * 2), aspect_ratio=torch.ones(2, 1)))
    torch.testing.assert_close(shared, per_row)


@pytest.mark.parametrize("name,input_size,scale", [
    ("PixArt-XL/2", 32, 1.0), ("PixArt-XL/2", 64, 1.0), ("PixArt-XL/2", 128, 2.0), ("PixArtMS-XL/2", 64, 1.0),
    ("PixArtMS-XL/2", None, 2.0),
])
def test_position_interpolation_follows_the_official_rule(name, input_size, scale):
    overrides = {} if input_size is None else {"input_size": input_size}
    assert model_config(name, **overrides).pe_interpolation == scale
    assert model_config(name, pe_interpolation=3.0).pe_interpolation == 3.0
