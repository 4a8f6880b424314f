import numpy as np
import pytest
import torch
from conftest import perturb_
from diffusers import PixArtTransformer2DModel
from pickles import RunsCode
from tolerance import reimplemented, rel_err

from pixart.checkpoint import save_checkpoint
from pixart.errors import PixArtError
from pixart.export.diffusers import export, import_diffusers, load_null_caption
from pixart.export.keymap import from_diffusers, to_diffusers
from pixart.models import build_model

CAP = 32


def tiny(name, **kw):
    return perturb_(build_model(name, depth=2, caption_channels=CAP, **kw)).eval()


def diffusers_forward(transformer, x, t, y, mask, info=None):
    added = None if info is None else {"resolution": info["img_hw"], "aspect_ratio": info["aspect_ratio"]}
    return transformer(x, encoder_hidden_states=y, timestep=t, encoder_attention_mask=mask,
                       added_cond_kwargs=added, return_dict=False)[0]


CASES = [  # (model, input_size, pe_interpolation, latent H x W fed in)
    ("PixArt-S/2", 8, 1.0, (8, 8)),
    ("PixArt-S/2", 16, 1.0, (16, 24)),
    ("PixArtMS-S/2", 16, 1.0, (16, 16)),
    ("PixArtMS-S/2", 16, 2.0, (12, 20)),
]


@pytest.mark.parametrize("name,size,scale,hw", CASES)
def test_exported_transformer_matches_ours(tmp_path, name, size, scale, hw):
    model = tiny(name, input_size=size, pe_interpolation=scale)
    export(model, tmp_path / "out")
    transformer = PixArtTransformer2DModel.from_pretrained(tmp_path / "out", subfolder="transformer").eval()
    assert transformer.config.interpolation_scale == scale
    assert transformer.config.use_additional_conditions == model.config.micro_conditions
    x, t = torch.randn(2, 4, *hw), torch.tensor([10, 900])
    y, mask = torch.randn(2, 12, CAP), torch.ones(2, 12)
    mask[0, 5:] = 0
    info = None
    if model.config.micro_conditions:
        info = dict(img_hw=torch.tensor([[hw[0] * 8.0, hw[1] * 8.0], [hw[1] * 4.0, hw[0] * 4.0]]),
                    aspect_ratio=torch.tensor([[hw[0] / hw[1]], [hw[1] / hw[0]]]))
    with torch.no_grad():
        ours = model(x, t, y, mask, data_info=info)
        theirs = diffusers_forward(transformer, x, t, y, mask, info)
    assert rel_err(ours, theirs) <= reimplemented()
    torch.testing.assert_close(load_null_caption(tmp_path / "out"), model.y_embedder.y_embedding)


def test_key_mapping_round_trips():
    state = tiny("PixArtMS-S/2", input_size=8).state_dict()
    back = from_diffusers(to_diffusers(state))
    assert set(back) == set(state) - {"y_embedder.y_embedding"}
    for k, v in back.items():
        assert torch.equal(v, state[k]), k


def test_import_of_our_export_gives_back_the_same_model(tmp_path):
    model = tiny("PixArtMS-S/2", input_size=16, pe_interpolation=2.0, model_max_length=77)
    export(model, tmp_path / "out")
    for folder in (tmp_path / "out", tmp_path / "out" / "transformer"):
        again = import_diffusers(folder)
        assert again.config == model.config
        for k, v in model.state_dict().items():
            assert torch.equal(again.state_dict()[k], v), k


def test_import_of_a_plain_diffusers_folder(tmp_path):
    transformer = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                           num_layers=1, cross_attention_dim=16, sample_size=8, caption_channels=CAP)
    transformer.save_pretrained(tmp_path / "t")
    config = tmp_path / "t" / "config.json"  # as the official PixArt-alpha repos (diffusers 0.22) name the class
    config.write_text(config.read_text().replace('"PixArtTransformer2DModel"', '"Transformer2DModel"'))
    model = import_diffusers(tmp_path / "t").eval()
    assert (model.config.hidden_size, model.config.micro_conditions, model.config.pe_interpolation) == (16, False, 1.0)
    x, t, y = torch.randn(1, 4, 8, 8), torch.tensor([3]), torch.randn(1, 4, CAP)
    with torch.no_grad():
        theirs = diffusers_forward(transformer.eval(), x, t, y, torch.ones(1, 4))
        assert rel_err(model(x, t, y), theirs) <= reimplemented()
    config.write_text(config.read_text().replace('"num_layers": 1', '"num_layers": "x"'))  # was a TypeError
    with pytest.raises(PixArtError, match=r"t: cannot load \('str' object cannot be interpreted as an integer\)$"):
        import_diffusers(tmp_path / "t")


def test_export_refuses_what_diffusers_cannot_hold(tmp_path):
    with pytest.raises(PixArtError, match="DiT"):
        export(build_model("DiT-S/2", depth=1, input_size=8), tmp_path / "o")
    with pytest.raises(PixArtError, match="mlp ratio 4"):
        export(build_model("PixArt-S/2", depth=1, input_size=8, mlp_ratio=2.0), tmp_path / "o")
    assert not (tmp_path / "o").exists()
    with pytest.raises(PixArtError, match="not a diffusers PixArt folder"):
        import_diffusers(tmp_path)
    from pixart.encoders.tiny import make_tiny_t5

    t5 = make_tiny_t5(tmp_path / "t5", d_model=CAP)  # config.json and model.safetensors, as our checkpoints have
    with pytest.raises(PixArtError, match="t5: not a diffusers PixArt folder .its config.json describes t5"):
        import_diffusers(t5)
    model = build_model("PixArt-S/2", depth=1, input_size=8)
    save_checkpoint(tmp_path / "ours", model.config, model.state_dict())
    with pytest.raises(PixArtError, match="already a pixart checkpoint folder"):
        import_diffusers(tmp_path / "ours")


@pytest.fixture(scope="module")
def tiny_parts(tmp_path_factory):
    from pixart.encoders.tiny import make_tiny_t5, make_tiny_vae

    root = tmp_path_factory.mktemp("parts")
    return make_tiny_t5(root / "t5", d_model=CAP), make_tiny_vae(root / "vae")


def test_full_pipeline_folder_loads_and_generates(tmp_path, tiny_parts):
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline

    from pixart.export.diffusers import PipelineParts

    t5, vae = tiny_parts
    model = tiny("PixArt-S/2", input_size=8)
    export(model, tmp_path / "pipe", PipelineParts(str(t5), str(t5), str(vae)))
    pipe = PixArtAlphaPipeline.from_pretrained(tmp_path / "pipe")
    assert isinstance(pipe.scheduler, DPMSolverMultistepScheduler)
    assert pipe.scheduler.config.beta_schedule == "linear" and pipe.scheduler.config.prediction_type == "epsilon"
    # the pipeline's transformer is ours: same output on the pipeline's own text features
    embeds, mask, _, _ = pipe.encode_prompt(["a red cat"], do_classifier_free_guidance=False)
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([400])
    with torch.no_grad():
        theirs = diffusers_forward(pipe.transformer, x, t, embeds, mask)
        assert rel_err(model(x, t, embeds, mask), theirs) <= reimplemented()
    images = pipe("a red cat", num_inference_steps=3, height=16, width=16, use_resolution_binning=False,
                  output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 16, 16, 3) and np.isfinite(images).all()


def test_a_pipeline_keeps_a_sentencepiece_tokenizer_as_the_hub_folders_hold_it(tmp_path, tiny_parts):
    """The hub's PixArt-alpha/PixArt-XL-2-1024-MS tokenizer/ (and DeepFloyd/t5-v1_1-xxl) is spiece.model,
    special_tokens_map.json and tokenizer_config.json ("tokenizer_class": "T5Tokenizer"), read by transformers 4
    and 5. transformers 5's re-save keeps only tokenizer.json and a config that 4.x cannot parse: the export
    copies the source's files instead."""
    import json

    import sentencepiece
    from diffusers import PixArtAlphaPipeline
    from transformers import AutoTokenizer

    from pixart.export.diffusers import PipelineParts

    source = tmp_path / "tokenizer"
    source.mkdir()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(["a red circle in the top left corner", "a blue square at the bottom right"] * 20),
        model_prefix=str(source / "spiece"), vocab_size=32, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
        hard_vocab_limit=False, minloglevel=2)
    (source / "spiece.vocab").unlink()
    tokens = {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    (source / "special_tokens_map.json").write_text(json.dumps(tokens))
    (source / "tokenizer_config.json").write_text(json.dumps({**tokens, "extra_ids": 0, "model_max_length": 512,
                                                              "tokenizer_class": "T5Tokenizer"}))
    t5, vae = tiny_parts
    export(tiny("PixArt-S/2", input_size=8), tmp_path / "pipe", PipelineParts(str(t5), str(source), str(vae)))
    copied = tmp_path / "pipe" / "tokenizer"
    assert sorted(p.name for p in copied.iterdir()) == ["special_tokens_map.json", "spiece.model",
                                                        "tokenizer_config.json"]
    for file in copied.iterdir():
        assert file.read_bytes() == (source / file.name).read_bytes(), file.name
    assert json.loads((tmp_path / "pipe" / "model_index.json").read_text())["tokenizer"] == ["transformers",
                                                                                           "T5Tokenizer"]
    pipe = PixArtAlphaPipeline.from_pretrained(tmp_path / "pipe")
    prompt = "a red square at the top left"
    assert pipe.tokenizer(prompt).input_ids == AutoTokenizer.from_pretrained(source)(prompt).input_ids


def test_pipeline_export_checks_the_text_encoder_width_and_the_vae_channels(tmp_path, tiny_parts):
    from pixart.export.diffusers import PipelineParts

    t5, vae = tiny_parts
    model = build_model("PixArt-S/2", depth=1, input_size=8, caption_channels=64)
    with pytest.raises(PixArtError, match="has width 32; the model expects caption_channels=64"):
        export(model, tmp_path / "pipe", PipelineParts(str(t5), str(t5), str(vae)))
    model = build_model("PixArt-S/2", depth=1, input_size=8, caption_channels=CAP, in_channels=48)
    with pytest.raises(PixArtError, match="has 4 latent channels; the model takes in_channels=48"):
        export(model, tmp_path / "pipe", PipelineParts(str(t5), str(t5), str(vae)))
    assert not (tmp_path / "pipe").exists()


def test_pipeline_export_of_a_micro_conditioned_model_needs_sample_size_128(tmp_path, tiny_parts):
    """diffusers' PixArtAlphaPipeline builds the resolution and aspect-ratio conditions only when the
    transformer's sample_size is 128 (pipeline_pixart_alpha.py, "Prepare micro-conditions"): any other
    PixArtMS pipeline fails at its first step, so the export refuses to write one."""
    from diffusers import PixArtAlphaPipeline, PixArtTransformer2DModel
    from transformers import AutoTokenizer, T5EncoderModel

    from pixart.diffusion import NoiseSchedule, make_scheduler
    from pixart.export.diffusers import PipelineParts, to_diffusers_transformer

    t5, vae = tiny_parts
    model = tiny("PixArtMS-S/2", input_size=8)
    tokenizer, text_encoder = AutoTokenizer.from_pretrained(t5), T5EncoderModel.from_pretrained(t5)
    pipe = PixArtAlphaPipeline(tokenizer=tokenizer, text_encoder=text_encoder,
                               vae=None, transformer=to_diffusers_transformer(model),
                               scheduler=make_scheduler("dpm-solver++", NoiseSchedule.linear(), "epsilon"))
    with pytest.raises(AttributeError):  # diffusers itself: the conditions it did not build are None
        pipe("a red cat", num_inference_steps=1, height=64, width=64, use_resolution_binning=False,
             output_type="latent")
    with pytest.raises(PixArtError, match="only at sample_size 128"):
        export(model, tmp_path / "pipe", PipelineParts(str(t5), str(t5), str(vae)))
    assert not (tmp_path / "pipe").exists()
    export(model, tmp_path / "transformer-only")  # the transformer alone, called with added_cond_kwargs
    assert isinstance(PixArtTransformer2DModel.from_pretrained(tmp_path / "transformer-only", subfolder="transformer"),
                      PixArtTransformer2DModel)


def test_the_null_caption_snippet_of_the_export_page_runs(tmp_path, tiny_parts):
    """docs/export.md's call with the exported null caption, on a tiny pipeline (diffusers refuses a prompt
    beside negative_prompt_embeds, so the page passes embeddings for both)."""
    import re
    from pathlib import Path

    from pixart.encoders import TextEncoder, TextEncoderConfig
    from pixart.export.diffusers import PipelineParts

    t5, vae = tiny_parts
    model = tiny("PixArt-S/2", input_size=8, model_max_length=64)  # the demo's caption length, not PixArt's 120
    export(model, tmp_path / "pipe", PipelineParts(str(t5), str(t5), str(vae)))
    page = (Path(__file__).parents[1] / "docs" / "export.md").read_text()
    snippet = next(b for b in re.findall(r"```python\n(.*?)```", page, re.S) if "null_caption" in b)
    prompt = "A RED Star in the <b>top left</b> corner"  # as trained, the pipeline sees it cleaned: lowercase, no tags
    snippet = snippet.replace('"export/pixart-xl2"', repr(str(tmp_path / "pipe"))).replace(
        "num_inference_steps=20", "num_inference_steps=2, height=16, width=16, use_resolution_binning=False").replace(
        '"a red star in the top left corner"', repr(prompt))
    scope = {}
    exec(snippet, scope)  # noqa: S102 (our own docs)
    assert scope["image"].size == (16, 16)
    trained, _ = TextEncoder(TextEncoderConfig(str(t5), max_length=64, dtype="fp32")).encode([prompt])
    assert torch.allclose(scope["embeds"], trained, atol=1e-6)


def test_a_pipeline_folder_names_its_own_text_encoder_and_vae(tmp_path, tiny_parts):
    """diffusers' save_pretrained lays a pipeline out as model_index.json beside text_encoder/, tokenizer/ and
    vae/: our loaders read that folder by its path alone, as they read a T5 or a VAE folder."""
    from pixart.encoders import ImageAutoencoder, TextEncoder, TextEncoderConfig, VAEConfig
    from pixart.export.diffusers import PipelineParts

    t5, vae = tiny_parts
    export(tiny("PixArt-S/2", input_size=8), tmp_path / "pipe", PipelineParts(str(t5), str(t5), str(vae)))
    ours, theirs = (TextEncoder(TextEncoderConfig(str(p), dtype="fp32")) for p in (tmp_path / "pipe", t5))
    assert torch.equal(ours.encode(["a red cat"])[0], theirs.encode(["a red cat"])[0])
    ae = ImageAutoencoder(VAEConfig(str(tmp_path / "pipe")))
    assert ae.latent_channels == 4 and ae.scale_factor == ImageAutoencoder(VAEConfig(str(vae))).scale_factor


def test_an_imported_export_samples_as_the_checkpoint_it_came_from(tmp_path, tiny_parts):
    """export-diffusers, then import: the imported checkpoint names the pipeline's own text encoder and keeps what
    the pipeline folder cannot say (the pixel autoencoder, the latents' scale, the caption length) and the
    Perfusion covariance, so that `pixart sample` needs no flags and draws what the original draws (a scale of 1
    had oversaturated it)."""
    import json

    from PIL import Image

    from pixart.checkpoint import ENCODERS_FILE
    from pixart.cli.main import main

    t5, _ = tiny_parts
    model = tiny("PixArt-S/2", input_size=4, patch_size=1, in_channels=48, model_max_length=16)
    record = {"text_encoder": str(t5), "max_length": 16, "dtype": "fp32", "image_encoder": "pixel:8:4",
              "scaling_factor": 3.0}
    save_checkpoint(tmp_path / "ckpt", model.config, model.state_dict(),
                    extra={ENCODERS_FILE: json.dumps(record)})
    covariance = tmp_path / "ckpt" / "perfusion-covariance-0123abcd.safetensors"  # what `personalize` leaves there
    covariance.write_bytes(b"C")
    main(["export-diffusers", str(tmp_path / "ckpt"), "--out", str(tmp_path / "pipe"), "--text-encoder", str(t5),
          "--vae", "none"])
    main(["import", str(tmp_path / "pipe"), "--out", str(tmp_path / "imported")])
    imported = json.loads((tmp_path / "imported" / ENCODERS_FILE).read_text())
    assert imported == {**record, "text_encoder": str((tmp_path / "pipe").resolve())}
    assert (tmp_path / "imported" / covariance.name).read_bytes() == b"C"  # so `sample --concept` needs no flag
    grids = []
    for ckpt in ("ckpt", "imported"):
        out = tmp_path / f"{ckpt}.png"
        main(["sample", str(tmp_path / ckpt), "--prompt", "a red circle", "--steps", "2", "--out", str(out)])
        grids.append(np.asarray(Image.open(out)))
    assert np.array_equal(*grids)


def hub_layout(folder, scheduler: dict | None = None, safetensors: bool = True):
    """A pipeline folder as the hub's PixArt-alpha repos lay it out: transformer/ (and scheduler/), no
    null_caption.safetensors. diffusers' scripts/convert_pixart_alpha_to_diffusers.py (and PixArt-alpha's
    tools/convert_pixart_alpha_to_diffusers.py) drop `y_embedder.y_embedding`: the transformer has no slot for it."""
    import json

    transformer = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                           num_layers=1, cross_attention_dim=16, sample_size=8, caption_channels=CAP)
    transformer.save_pretrained(folder / "transformer", safe_serialization=safetensors)
    config = folder / "transformer" / "config.json"  # as the official repos (diffusers 0.22) name the class
    config.write_text(config.read_text().replace('"PixArtTransformer2DModel"', '"Transformer2DModel"'))
    if scheduler is not None:
        (folder / "scheduler").mkdir()
        (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler))
    return folder


def test_a_folder_without_a_null_caption_warns_and_its_made_up_one_is_never_exported(tmp_path):
    """The made-up null caption is what `pixart sample` guides against: the import says so in one line, records
    it, and an export of that checkpoint leaves it out rather than ship it as if the model had learned it."""
    import subprocess
    import sys

    hub_layout(tmp_path / "hub")
    run = [sys.executable, "-m", "pixart"]
    result = subprocess.run([*run, "import", tmp_path / "hub", "--out", tmp_path / "ck"], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == (
        f"{tmp_path / 'hub'}: no null_caption.safetensors (diffusers keeps no null caption): the imported model's is "
        "freshly initialised, so its classifier-free guidance is not the original model's until fine-tuning with "
        "caption dropout teaches it this one")
    assert result.stdout.strip() == f"wrote {tmp_path / 'ck'} (epsilon, null caption freshly initialised)"
    assert (tmp_path / "ck" / "fresh_null_caption.json").is_file()
    result = subprocess.run([*run, "export-diffusers", tmp_path / "ck", "--out", tmp_path / "again"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "no null caption: the import made one up" in result.stdout
    assert not (tmp_path / "again" / "null_caption.safetensors").exists()
    assert load_null_caption(tmp_path / "again") is None


def test_the_released_one_step_student_imports_from_its_torch_pickle(tmp_path, capsys):
    """huggingface.co/PixArt-alpha/PixArt-Alpha-DMD-XL-2-512x512 ships transformer/ as config.json (class
    Transformer2DModel, out_channels 8) and diffusion_pytorch_model.bin only, beside a DDPMScheduler config
    (epsilon, clip_sample false); PixArt-sigma's app/app_pixart_dmd.py samples it with timesteps=[400],
    guidance_scale=1, num_inference_steps=1. It imported as "no file named diffusion_pytorch_model.safetensors"."""
    import json
    import pickle

    from pixart.cli.main import main

    hub = hub_layout(tmp_path / "hub", {"_class_name": "DDPMScheduler", "beta_end": 0.02, "beta_schedule": "linear",
                                        "beta_start": 0.0001, "clip_sample": False, "num_train_timesteps": 1000,
                                        "prediction_type": "epsilon"}, safetensors=False)
    assert sorted(p.name for p in (hub / "transformer").iterdir()) == ["config.json", "diffusion_pytorch_model.bin"]
    main(["import", str(hub), "--out", str(tmp_path / "ck"), "--start-timestep", "400"])
    assert capsys.readouterr().out.strip() == (f"wrote {tmp_path / 'ck'} (epsilon, null caption freshly initialised, "
                                               "one-step student)")
    assert json.loads((tmp_path / "ck" / "student.json").read_text()) == {"start_timestep": 400}
    assert json.loads((tmp_path / "ck" / "diffusion.json").read_text()) == {"prediction_type": "epsilon"}
    model = import_diffusers(hub).eval()
    transformer = PixArtTransformer2DModel.from_pretrained(hub / "transformer", use_safetensors=False).eval()
    x, t, y = torch.randn(1, 4, 8, 8), torch.tensor([400]), torch.randn(1, 4, CAP)
    with torch.no_grad():
        assert rel_err(model(x, t, y), diffusers_forward(transformer, x, t, y, torch.ones(1, 4))) <= reimplemented()

    with pytest.raises(SystemExit):
        main(["import", str(hub), "--out", str(tmp_path / "bad"), "--start-timestep", "1000"])
    assert "error: argument --start-timestep: 1000 is not a timestep from 1 to 999" in capsys.readouterr().err
    weights = hub / "transformer" / "diffusion_pytorch_model.bin"
    state = torch.load(weights, weights_only=True)
    shards = {"diffusion_pytorch_model-00001-of-00002.bin": dict(list(state.items())[:5]),
              "diffusion_pytorch_model-00002-of-00002.bin": dict(list(state.items())[5:])}
    for name, part in shards.items():  # diffusers' sharded layout, with the index naming each weight's file
        torch.save(part, hub / "transformer" / name)
    weights.rename(tmp_path / "whole.bin")
    (hub / "transformer" / "diffusion_pytorch_model.bin.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: name for name, part in shards.items() for k in part}}))
    again = import_diffusers(hub)
    assert all(torch.equal(again.state_dict()[k], v) for k, v in model.state_dict().items()
               if k != "y_embedder.y_embedding")  # the null caption is made up: the hub keeps none
    for name in shards:
        (hub / "transformer" / name).unlink()
    (hub / "transformer" / "diffusion_pytorch_model.bin.index.json").unlink()
    del state["proj_out.weight"]
    torch.save(state, weights)
    with pytest.raises(PixArtError, match=r"transformer: its weights do not fit its config.json \(no proj_out.weight; "
                                          r"1 missing, 0 unknown\)$"):
        import_diffusers(hub)
    torch.save({"w": RunsCode(f"touch {tmp_path / 'ran'}")}, weights)  # code in a pickle is never run
    with pytest.raises(PixArtError, match=r"diffusion_pytorch_model.bin: not a readable checkpoint \(it holds objects "
                                          r"other than tensors"):
        import_diffusers(hub)
    assert not (tmp_path / "ran").exists()
    weights.write_bytes(pickle.dumps({"w": print}))
    with pytest.raises(PixArtError, match=r"diffusion_pytorch_model.bin: a plain Python pickle, not a torch.save "
                                          r"checkpoint; .* refused without unpickling"):
        import_diffusers(hub)


def test_a_scheduler_predicting_what_pixart_does_not_is_refused(tmp_path):
    from pixart.export.diffusers import import_sampling

    hub = hub_layout(tmp_path / "hub", {"_class_name": "DDPMScheduler", "prediction_type": "sample"})
    with pytest.raises(PixArtError, match=r"scheduler_config.json: prediction_type 'sample'; a PixArt model "
                                          r"predicts one of \('epsilon', 'v_prediction'\)"):
        import_sampling(hub)


def test_a_full_out_is_refused_before_the_pipeline_parts_load(tmp_path):
    """Loading T5-XXL takes minutes: the refusal the final write would give comes first."""
    from pixart.export.diffusers import PipelineParts

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("x")
    missing = str(tmp_path / "no-such-t5")
    with pytest.raises(PixArtError, match="already exists and is not empty; pass --overwrite"):
        export(tiny("PixArt-S/2", input_size=8), tmp_path / "out", PipelineParts(missing, missing, missing))


def test_exporting_a_file_says_to_import_it(tmp_path):
    from pixart.export.diffusers import export_checkpoint

    (tmp_path / "PixArt-XL-2-512x512.pth").write_bytes(b"PK\x03\x04")
    with pytest.raises(PixArtError, match=r"PixArt-XL-2-512x512.pth: a file, not a checkpoint folder; an official "
                                          r"PixArt-alpha .pth comes in with `pixart import .*PixArt-XL-2-512x512.pth "
                                          r"--out DIR` first"):
        export_checkpoint(tmp_path / "PixArt-XL-2-512x512.pth", tmp_path / "out")
    model = tiny("PixArt-S/2", input_size=8)
    save_checkpoint(tmp_path / "ckpt", model.config, model.state_dict())
    with pytest.raises(PixArtError, match=r"ckpt/model.safetensors: a file of the checkpoint folder .*ckpt; pass the "
                                          r"folder$"):  # not `pixart import`, which says to pass the folder here
        export_checkpoint(tmp_path / "ckpt" / "model.safetensors", tmp_path / "out")
