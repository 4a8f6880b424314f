"""`pixart import` of official PixArt-alpha `.pth` files: the resolution comes from the file's `pos_embed`.

The reference table is the official code's, restated here from PixArt-alpha/PixArt-alpha
diffusion/model/nets/PixArt.py (`get_2d_sincos_pos_embed`, called in `initialize_weights` with
`base_size = input_size // patch_size` and the model's `lewei_scale`): positions
`arange(G) / (G / base_size) / lewei_scale`, sin then cos of pos x 10000^(-2i/(D/2)), the h half first.
The buffer is registered persistent there, so every official `.pth` carries it.
"""
import pickle
import warnings

import numpy as np
import pytest
import torch
from conftest import perturb_

from pixart.errors import PixArtError
from pixart.export.official import import_official
from pixart.models import build_model

TINY = dict(depth=1, hidden_size=64, num_heads=4, caption_channels=16, model_max_length=8)


def official_pos_embed(dim: int, grid: int, base_size: int, lewei_scale: float) -> np.ndarray:
    def one_axis(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    coords = np.arange(grid, dtype=np.float32) / (grid / base_size) / lewei_scale
    w, h = np.meshgrid(coords, coords)  # w first, as the official code
    return np.concatenate([one_axis(dim // 2, w), one_axis(dim // 2, h)], axis=1)


def official_file(tmp_path, pixels: int, lewei_scale: float = 1.0):
    """An official-layout checkpoint ({'state_dict': ...}) trained at `pixels`, pos_embed included."""
    latent, patch = pixels // 8, 2
    model = perturb_(build_model("PixArt-S/2", input_size=latent, **TINY))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    table = official_pos_embed(64, latent // patch, latent // patch, lewei_scale)
    state["pos_embed"] = torch.from_numpy(table).float()[None]
    path = tmp_path / f"PixArt-tiny-{pixels}.pth"
    torch.save({"state_dict": state}, path)
    return path, model


@pytest.mark.parametrize("pixels", [256, 512])
def test_an_official_file_imports_at_the_resolution_its_pos_embed_records(tmp_path, pixels):
    path, original = official_file(tmp_path, pixels)
    model = import_official(str(path), num_heads=4)[0]
    assert model.config.input_size == pixels // 8 and model.config.pe_interpolation == 1.0
    file_table = torch.load(path, weights_only=True)["state_dict"]["pos_embed"]
    torch.testing.assert_close(model.pos_embed.float(), file_table, atol=1e-6, rtol=0)
    if pixels == 512:  # 32 x 32 patches at positions 0 ... 31, not 0, 0.5, ..., 15.5 (a 256 px table stretched)
        stretched = official_pos_embed(64, 32, 16, 1.0)
        assert not np.allclose(model.pos_embed[0].numpy(), stretched, atol=1e-3)
    x, t = torch.randn(1, 4, pixels // 8, pixels // 8), torch.tensor([500])
    y, mask = torch.randn(1, 8, 16), torch.ones(1, 8, dtype=torch.long)
    torch.testing.assert_close(model(x, t, y, mask), original(x, t, y, mask), atol=0, rtol=0)


def test_a_pos_embed_that_is_no_pixart_table_is_refused(tmp_path):
    path, _ = official_file(tmp_path, 512, lewei_scale=2.0)  # a 512 px grid made with 1024 px's lewei_scale
    with pytest.raises(PixArtError, match=r"PixArt-tiny-512.pth: pos_embed \(1, 1024, 64\) is not PixArt's"):
        import_official(str(path), num_heads=4)


@pytest.mark.parametrize("content,reason", [
    (b"hello world\n", "t.pth: not a PyTorch checkpoint (zip or pickle) file"),  # torch said "(101)"
    (b"", "t.pth: the file is empty"),
    (pickle.dumps({"w": [1.0]}, protocol=4),  # torch warned twice, then said "Unsupported operand 149"
     "t.pth: a plain Python pickle, not a torch.save checkpoint; it may hold Python objects other than tensors, "
     "so it is refused without unpickling (weights_only)"),
    (pickle.dumps({"w": [1.0]}, protocol=2), "t.pth: a plain Python pickle"),  # torch: "Invalid magic number"
], ids=["text", "empty", "pickle4", "pickle2"])
def test_a_file_that_is_no_torch_checkpoint_says_why_in_words(tmp_path, content, reason):
    (tmp_path / "t.pth").write_bytes(content)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's pickle-protocol warnings never reach the user
        with pytest.raises(PixArtError) as e:
            import_official(str(tmp_path / "t.pth"), num_heads=4)
    assert str(e.value).startswith(f"{tmp_path}/{reason}")
    assert "\n" not in str(e.value)


def test_a_legacy_torch_save_file_still_imports(tmp_path):
    path, original = official_file(tmp_path, 256)
    torch.save(torch.load(path, weights_only=True), path, _use_new_zipfile_serialization=False)
    model = import_official(str(path), num_heads=4)[0]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in original.state_dict().items())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_half_precision_copy_of_an_official_file_imports(tmp_path, dtype):
    """fp16/bf16 copies of the official files are common; their pos_embed is the table rounded to that dtype (fp16
    off by up to 5e-4, bf16 by 4e-3), which must not read as another table."""
    path, original = official_file(tmp_path, 512)
    state = torch.load(path, weights_only=True)["state_dict"]
    torch.save({"state_dict": {k: v.to(dtype) for k, v in state.items()}}, path)
    model = import_official(str(path), num_heads=4)[0]
    assert model.config.input_size == 64
    for k, v in original.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v.to(dtype).float(), atol=0, rtol=0)


def test_a_file_without_pos_embed_needs_the_input_size(tmp_path):
    """Nothing else in the file says its resolution, and a guess runs but draws noise at any other."""
    path, original = official_file(tmp_path, 512)
    state = torch.load(path, weights_only=True)["state_dict"]
    del state["pos_embed"]
    torch.save({"state_dict": state}, path)
    with pytest.raises(PixArtError, match="PixArt-tiny-512.pth: has no pos_embed, so its resolution is unknown; "
                                          "pass --input-size"):
        import_official(str(path), num_heads=4)
    assert import_official(str(path), num_heads=4, input_size=64)[0].config.input_size == 64


def test_a_weights_file_of_a_model_folder_says_to_pass_the_folder(tmp_path):
    from pixart.checkpoint import save_checkpoint

    model = build_model("PixArt-S/2", input_size=8, **TINY)
    save_checkpoint(tmp_path / "ck", model.config, model.state_dict())  # its model.safetensors has no pos_embed
    with pytest.raises(PixArtError, match=f"config.json lies beside it: a file of a model folder; pass the folder "
                                          f"{tmp_path / 'ck'}$"):
        import_official(str(tmp_path / "ck" / "model.safetensors"), num_heads=4)


def test_the_import_says_which_weights_of_a_training_state_it_took(tmp_path, capsys):
    """PixArt-alpha's train.py saves {'state_dict', 'state_dict_ema', 'optimizer', 'scheduler', 'epoch'}
    (diffusion/utils/checkpoint.py, save_checkpoint); the released .pth files hold 'state_dict' alone."""
    from pixart.checkpoint import load_model
    from pixart.cli.main import main

    path, _ = official_file(tmp_path, 256)
    state = torch.load(path, weights_only=True)["state_dict"]
    ema = {k: v if k == "pos_embed" else v + 1 for k, v in state.items()}
    torch.save({"state_dict": state, "state_dict_ema": ema, "epoch": 3}, path)
    assert main(["import", str(path), "--out", str(tmp_path / "ck"), "--num-heads", "4"]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {tmp_path / 'ck'} (epsilon, state_dict_ema (EMA) weights)"
    assert torch.equal(load_model(tmp_path / "ck").t_block[1].weight, ema["t_block.1.weight"])
    torch.save({"state_dict": state}, path)
    assert import_official(str(path), num_heads=4)[1] == "state_dict"
