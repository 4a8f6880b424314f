"""Our PixArt <-> diffusers' `PixArtTransformer2DModel` and `PixArtAlphaPipeline` folders.

The null caption. Our models are trained with PixArt's fixed null-caption buffer as
the unconditional input, while diffusers' pipeline uses T5("") as its default
negative prompt. The export writes the buffer to `null_caption.safetensors` next to
the components; `load_null_caption` reads it so a pipeline call can pass it as
`negative_prompt_embeds` and reproduce the official sampler. Without it the
pipeline's T5("") default still works, but is a condition the model was never
trained on as "unconditional".

A diffusers folder that did not come from us has no null caption (diffusers' and PixArt-alpha's conversion
scripts drop `y_embedder.y_embedding`): the import makes one up and records it in
`fresh_null_caption.json`, and an export of that checkpoint leaves `null_caption.safetensors` out rather than
hand on a null caption the model never learned.
"""
from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pixart.atomic import atomic_dir, check_out_dir
from pixart.checkpoint import (
    ENCODERS_FILE,
    FRESH_NULL_FILE,
    STUDENT_FILE,
    load_into,
    load_student,
    read_json,
    read_state_dict,
)
from pixart.errors import PixArtError
from pixart.export.keymap import from_diffusers, to_diffusers
from pixart.models import ModelConfig, PixArt

NULL_CAPTION_FILE = "null_caption.safetensors"
TORCH_WEIGHTS = "diffusion_pytorch_model.bin"  # the weights of a folder saved without safetensors
PREDICTION_TYPES = ("epsilon", "v_prediction")

log = logging.getLogger(__name__)


def diffusers_config(config: ModelConfig) -> dict:
    if config.arch != "pixart":
        raise PixArtError("export: only PixArt models export to diffusers (this checkpoint is a DiT)")
    if config.mlp_ratio != 4:
        raise PixArtError(f"export: diffusers' PixArt blocks have mlp ratio 4, this model has {config.mlp_ratio}")
    scale = config.pe_interpolation
    return dict(
        num_attention_heads=config.num_heads,
        attention_head_dim=config.hidden_size // config.num_heads,
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        num_layers=config.depth,
        cross_attention_dim=config.hidden_size,
        attention_bias=True,
        sample_size=config.input_size,
        patch_size=config.patch_size,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
        # Written explicitly: diffusers would otherwise guess both from sample_size.
        interpolation_scale=int(scale) if float(scale).is_integer() else scale,
        use_additional_conditions=config.micro_conditions,
        caption_channels=config.caption_channels,
    )


def to_diffusers_transformer(model: PixArt):
    from diffusers import PixArtTransformer2DModel

    transformer = PixArtTransformer2DModel(**diffusers_config(model.config))
    transformer.load_state_dict(to_diffusers(model.state_dict()), strict=True)
    return transformer.eval()


def config_from_diffusers(dconfig: dict, model_max_length: int = 120) -> ModelConfig:
    if dconfig.get("norm_type", "ada_norm_single") != "ada_norm_single":
        raise PixArtError(f"import: norm_type {dconfig['norm_type']!r} is not PixArt's adaLN-single")
    heads, head_dim = dconfig["num_attention_heads"], dconfig["attention_head_dim"]
    sample_size = dconfig["sample_size"]
    use_extra = dconfig.get("use_additional_conditions")
    scale = dconfig.get("interpolation_scale")
    in_channels = dconfig["in_channels"]
    out_channels = dconfig.get("out_channels") or in_channels
    return ModelConfig(
        arch="pixart", input_size=sample_size, patch_size=dconfig["patch_size"], in_channels=in_channels,
        hidden_size=heads * head_dim, depth=dconfig["num_layers"], num_heads=heads,
        learn_sigma=out_channels == 2 * in_channels, caption_channels=dconfig["caption_channels"],
        model_max_length=model_max_length,
        # diffusers' own defaults when the config leaves these out:
        micro_conditions=(sample_size == 128) if use_extra is None else bool(use_extra),
        pe_interpolation=float(scale if scale is not None else max(sample_size // 64, 1)),
    )


@dataclass
class PipelineParts:
    """Paths (or hub ids) of the frozen parts a full pipeline folder needs."""

    text_encoder: str
    tokenizer: str
    vae: str | None  # None: a pixel-space model; load with from_pretrained(..., vae=None), decode yourself


# the official PixArt-alpha repos were written by diffusers 0.22, before the PixArt class had a name of its own
DIFFUSERS_CLASSES = ("PixArtTransformer2DModel", "Transformer2DModel")
PIPELINE_MS_SIZE = 128  # PixArtAlphaPipeline computes resolution/aspect_ratio conditions only for this sample_size


def one_step_scheduler(prediction_type: str):
    """A one-step student's scheduler, as the released PixArt-DMD ships: DDPM, whose step returns the
    pred_original_sample that PixArtAlphaPipeline takes for num_inference_steps=1 (DPM-Solver's does not);
    without clipping, since latents are not confined to [-1, 1]."""
    from pixart.diffusion import NoiseSchedule, make_scheduler

    return make_scheduler("ddpm", NoiseSchedule.linear(), prediction_type)


def export(model: PixArt, out: str | Path, parts: PipelineParts | None = None, scheduler=None,
           overwrite: bool = False, sources: tuple = (), prediction_type: str = "epsilon",
           student: dict | None = None, files: tuple = (), encoders: dict | None = None,
           null_caption: bool = True) -> Path:
    """Write `out/transformer` (and with `parts`, a whole `PixArtAlphaPipeline` folder), atomically, with
    copies of `files` (a checkpoint's Perfusion covariance). The default scheduler is DPM-Solver++ for the model's
    `prediction_type`; a one-step `student` ({"start_timestep"}) gets a DDPM scheduler and `out/student.json`,
    the call that samples it:
    pipe(prompt, num_inference_steps=1, timesteps=[start], guidance_scale=1).
    `encoders` (a checkpoint's encoders.json) goes to `out/encoders.json` for `pixart import`, less the parts
    the pipeline folder holds itself. `null_caption=False` leaves out a null caption the model never learned (see
    the module's doc)."""
    check_out_dir(out, overwrite, sources)
    if parts is not None and model.config.micro_conditions and model.config.input_size != PIPELINE_MS_SIZE:
        raise PixArtError(
            f"export: a pipeline of a size/aspect-conditioned (PixArtMS) model at input_size "
            f"{model.config.input_size}: diffusers' PixArtAlphaPipeline passes those conditions only at "
            f"sample_size {PIPELINE_MS_SIZE} (1024 px) and fails without them; export the transformer alone "
            "(no --text-encoder, --tokenizer, --vae) and call it with added_cond_kwargs, or use `pixart sample`")
    transformer = to_diffusers_transformer(model)
    null = {"y_embedding": model.y_embedder.y_embedding.detach().float().contiguous()}
    if parts is not None:
        from diffusers import PixArtAlphaPipeline

        from pixart.encoders import ImageAutoencoder, TextEncoder, TextEncoderConfig, VAEConfig

        text = TextEncoder(TextEncoderConfig(parts.text_encoder, tokenizer_path=parts.tokenizer, dtype="fp32"))
        text_encoder, tokenizer = text.model, text.tokenizer
        vae = ImageAutoencoder(VAEConfig(parts.vae)).vae if parts.vae else None
        model.config.check_encoders(text_encoder.config.d_model, vae and vae.config.latent_channels,
                                    parts.text_encoder, parts.vae)
    if scheduler is None and student is not None:
        scheduler = one_step_scheduler(prediction_type)
    elif scheduler is None:
        from pixart.diffusion import NoiseSchedule, make_scheduler

        scheduler = make_scheduler("dpm-solver++", NoiseSchedule.linear(), prediction_type)
    if parts is not None:
        pipeline = PixArtAlphaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae,
                                       transformer=transformer, scheduler=scheduler)
    with atomic_dir(out, overwrite, sources) as tmp:
        if parts is None:  # the scheduler too: it records the prediction type that `pixart import` reads back
            transformer.save_pretrained(tmp / "transformer")
            scheduler.save_pretrained(tmp / "scheduler")
        else:
            pipeline.save_pretrained(tmp)
            copy_tokenizer_files(text.tokenizer_files(), tmp / "tokenizer")
        if null_caption:
            save_file(null, tmp / NULL_CAPTION_FILE)
        for file in files:
            shutil.copyfile(file, tmp / Path(file).name)
        if encoders:
            (tmp / ENCODERS_FILE).write_text(json.dumps(exported_encoders(encoders, parts), indent=2))
        if student is not None:
            call = {"num_inference_steps": 1, "timesteps": [student["start_timestep"]], "guidance_scale": 1.0}
            (tmp / STUDENT_FILE).write_text(json.dumps({**student, "call": call}, indent=2))
    return Path(out)


def copy_tokenizer_files(files: list[str], folder: Path) -> None:
    """The source tokenizer's files in place of the pipeline's re-save of it (see TextEncoder.tokenizer_files),
    when its source has a tokenizer config to copy."""
    if not any(Path(f).name == "tokenizer_config.json" for f in files):
        return
    shutil.rmtree(folder)
    folder.mkdir()
    for file in files:
        shutil.copyfile(file, folder / Path(file).name)


def exported_encoders(encoders: dict, parts: PipelineParts | None) -> dict:
    """What a pipeline folder does not say itself: the caption length, dtype and latent scale the model learned
    with (and a pixel autoencoder's id). The text encoder and a VAE are the folder's own, so not named."""
    if parts is None:
        return dict(encoders)
    return {**encoders, "text_encoder": None, "image_encoder": None if parts.vae else encoders.get("image_encoder")}


def export_checkpoint(ckpt: str | Path, out: str | Path, parts: PipelineParts | None = None,
                      ema: bool | None = None, overwrite: bool = False) -> tuple[Path, bool, str]:
    """`export` of a checkpoint folder: its EMA weights when it has them (unless `ema` says), and the
    prediction type it was trained with in the scheduler. Returns (out, ema used, prediction type)."""
    from pixart.checkpoint import (
        EMA_FILE,
        MODEL_FILE,
        checkpoint_folder,
        load_encoders,
        load_model,
        load_prediction_type,
        load_student,
    )
    from pixart.personalize.covariance import COVARIANCE_GLOB

    typed, ckpt = ckpt, checkpoint_folder(ckpt)
    check_out_dir(out, overwrite, (typed, ckpt))
    if ckpt.is_file() and (ckpt.parent / MODEL_FILE).is_file():  # a file of one of our checkpoint folders
        raise PixArtError(f"{typed}: a file of the checkpoint folder {ckpt.parent}; pass the folder")
    if ckpt.is_file():
        raise PixArtError(f"{typed}: a file, not a checkpoint folder; an official PixArt-alpha .pth comes in with "
                          f"`pixart import {typed} --out DIR` first")
    ema = (ckpt / EMA_FILE).is_file() if ema is None else ema
    prediction = load_prediction_type(ckpt)
    model = load_model(ckpt, ema=ema).eval()
    export(model, out, parts, overwrite=overwrite, sources=(typed, ckpt), prediction_type=prediction,
           student=load_student(ckpt), files=tuple(sorted(ckpt.glob(COVARIANCE_GLOB))), encoders=load_encoders(ckpt),
           null_caption=not (ckpt / FRESH_NULL_FILE).is_file())
    return Path(out), ema, prediction


def load_null_caption(folder: str | Path) -> torch.Tensor | None:
    path = Path(folder) / NULL_CAPTION_FILE
    return load_file(path)["y_embedding"] if path.is_file() else None


def pipeline_root(folder: str | Path) -> Path:
    """The folder holding a diffusers transformer folder's scheduler and parts (itself unless it is transformer/)."""
    folder = Path(folder)
    return folder.parent if (folder / "config.json").is_file() and folder.name == "transformer" else folder


def import_sampling(folder: str | Path) -> tuple[str, dict | None]:
    """What a diffusers folder says about sampling its transformer: the prediction type of its scheduler
    ("epsilon" without one, as PixArt-alpha's) and, for an exported one-step student, its student.json."""
    top = pipeline_root(folder)
    path = top / "scheduler" / "scheduler_config.json"
    prediction = str(read_json(path).get("prediction_type", "epsilon")) if path.is_file() else "epsilon"
    if prediction not in PREDICTION_TYPES:
        raise PixArtError(f"{path}: prediction_type {prediction!r}; a PixArt model predicts one of {PREDICTION_TYPES}")
    student = load_student(top)
    if student is not None:
        student.pop("call", None)
    return prediction, student


def import_encoders(folder: str | Path) -> dict:
    """An imported folder's encoders.json: the pipeline's own text_encoder/ and vae/ where it has them (read
    through the pipeline folder, see encoders.loading.pipeline_part), and what our export recorded beside them
    (caption length, dtype, latent scale, a pixel autoencoder); {} when neither says anything."""
    top = pipeline_root(folder)
    record = read_json(top / ENCODERS_FILE) if (top / ENCODERS_FILE).is_file() else {}
    if (top / "text_encoder").is_dir():
        record["text_encoder"] = str(top.resolve())
    if (top / "vae").is_dir():
        record["image_encoder"] = str(top.resolve())
    return record


def torch_weights(root: Path) -> list[Path]:
    """The torch pickle files of a diffusers folder saved without safetensors: one, or the shards its index names."""
    index = root / f"{TORCH_WEIGHTS}.index.json"
    if index.is_file():
        described = read_json(index)
        shards = described.get("weight_map", {}).values() if isinstance(described, dict) else []
        return [root / name for name in sorted(set(map(str, shards)))]
    return [root / TORCH_WEIGHTS] if (root / TORCH_WEIGHTS).is_file() else []


def import_diffusers(folder: str | Path, seed: int = 0) -> PixArt:
    """A diffusers transformer folder (or a pipeline folder holding `transformer/`) -> our PixArt.

    diffusers keeps no null caption: ours comes from `null_caption.safetensors` when
    the folder was exported by us, else it is freshly initialised from `seed`, with a warning: guidance
    against it is not the original model's.
    """
    from diffusers import PixArtTransformer2DModel

    folder = Path(folder)
    root = folder if (folder / "config.json").is_file() else folder / "transformer"
    if not (root / "config.json").is_file():
        raise PixArtError(f"{folder}: not a diffusers PixArt folder (no config.json or transformer/config.json)")
    described = read_json(root / "config.json")
    if "arch" in described:
        raise PixArtError(f"{folder}: already a pixart checkpoint folder, nothing to import")
    if described.get("_class_name") not in DIFFUSERS_CLASSES:
        what = described.get("_class_name") or described.get("model_type") or "something else"
        raise PixArtError(f"{root}: not a diffusers PixArt folder (its config.json describes {what})")
    pickled = torch_weights(root)
    try:
        if pickled and not any(root.glob("*.safetensors")):
            # released as torch pickles only (PixArt-Alpha-DMD-XL-2-512x512): read without running their code
            transformer = PixArtTransformer2DModel.from_config(PixArtTransformer2DModel.load_config(root))
            state = {k: v for path in pickled for k, v in read_state_dict(path).items()}
            missing, unexpected = transformer.load_state_dict(state, strict=False)
            if missing or unexpected:
                first = f"no {missing[0]}" if missing else f"an unknown {unexpected[0]}"
                raise PixArtError(f"{root}: its weights do not fit its config.json ({first}; {len(missing)} missing, "
                                  f"{len(unexpected)} unknown)")
        else:
            transformer = PixArtTransformer2DModel.from_pretrained(root, use_safetensors=True)
    except PixArtError:
        raise
    except (OSError, ValueError, RuntimeError, TypeError) as e:  # TypeError: a config.json value of another type
        raise PixArtError(f"{root}: cannot load ({str(e).splitlines()[0]})") from None
    null = load_null_caption(pipeline_root(folder))  # we write it beside `transformer/`
    if null is None:
        log.warning("%s: no %s (diffusers keeps no null caption): the imported model's is freshly initialised, so "
                    "its classifier-free guidance is not the original model's until fine-tuning with caption dropout "
                    "teaches it this one", folder, NULL_CAPTION_FILE)
    config = config_from_diffusers(dict(transformer.config), 120 if null is None else null.shape[0])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = PixArt(config)
    state = from_diffusers(transformer.state_dict())
    state["y_embedder.y_embedding"] = null if null is not None else model.y_embedder.y_embedding
    return load_into(model, state, str(root))
