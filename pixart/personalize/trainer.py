"""Training one concept: only its value targets and token embedding learn; every weight of the base model and
the text encoder stays frozen (and bitwise unchanged). A state file in the run folder makes a rerun resume."""
from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from pixart.atomic import atomic_write
from pixart.checkpoint import (
    EMA_FILE,
    ENCODERS_FILE,
    checkpoint_folder,
    load_encoders,
    load_model,
    load_prediction_type,
    read_safetensors,
    safetensors_bytes,
)
from pixart.errors import PixArtError

from .concept import Concept, pixart_identity


@dataclass
class PersonalizeConfig:
    ckpt: str  # the base model's checkpoint folder
    data: str  # a folder of images (+ masks/, + captions) or webdataset shards
    concept: str  # the concept's word in prompts
    super_word: str  # its super-category word: one token the model knows
    out: str  # the concept file (.safetensors)
    captions: str | None = None  # corpus for C when the base model has none yet
    covariance: str | None = None  # a C file to use instead of the one beside the checkpoint
    steps: int = 400  # Perfusion: 400 steps at batch 16
    batch: int = 16
    lr_value: float = 0.03  # Perfusion's learning rates: o*_V 0.03, the embedding 0.006
    lr_embedding: float = 0.006
    beta: float = 0.75  # the training gate (inference defaults to 0.7 / 0.15)
    tau: float = 0.1
    input_decay: float = 0.99  # EMA of i*
    mask_floor: float = 0.0  # the loss weight outside the object (lucidrains' normalized_mask_min_value)
    timesteps: str = "uniform"  # or "logit_normal" (as the demo's stages train)
    seed: int = 0
    ema: bool | None = None  # the checkpoint's EMA weights (default: when it has them)
    save_every: int = 50
    precision: str = "fp16"  # of the stored concept
    run_dir: str | None = None  # default: OUT with `.run` appended
    device: str = "cpu"
    overwrite: bool = False  # replace an --out that no run of this run folder wrote
    text_encoder: str | None = None  # instead of the checkpoint's encoders.json's (which a bare import lacks)
    vae: str | None = None

    def __post_init__(self) -> None:
        if not self.out.endswith(".safetensors"):
            raise PixArtError(f"--out {self.out}: a concept file ends in .safetensors")
        for key in ("steps", "batch", "lr_value", "lr_embedding"):
            if not (math.isfinite(getattr(self, key)) and getattr(self, key) > 0):
                raise PixArtError(f"--{key.replace('_', '-')} must be positive and finite, got {getattr(self, key)}")
        if not 0 <= self.mask_floor <= 1:
            raise PixArtError(f"--mask-floor must be in [0, 1], got {self.mask_floor}")
        if self.timesteps not in ("uniform", "logit_normal"):
            raise PixArtError(f"--timesteps {self.timesteps!r}: choose uniform or logit_normal")
        if self.precision not in ("fp16", "fp32", "bf16"):
            raise PixArtError(f"--precision {self.precision!r}: choose fp16, bf16 or fp32")

    @property
    def run_path(self) -> Path:
        return Path(self.run_dir or self.out + ".run")


STATE_FILE = "state.safetensors"  # in the run folder: what a rerun resumes from
STATE_TENSORS = ("value_targets", "embedding", "i_star", "i_super")


def read_state(path: Path) -> tuple[dict[str, str], dict[str, Tensor]]:
    """A run folder's state file: (metadata, tensors); a damaged one (a full disk, a copy cut short) in one line
    that says what to do."""
    advice = "; delete it to start the run over, or pass another --run-dir"
    meta, t = read_safetensors(path, "run state", advice)
    missing = [k for k in ("step", "history", "seconds", "concept", "super", "base_model") if k not in meta]
    missing += [k for k in STATE_TENSORS if k not in t]
    if missing:
        raise PixArtError(f"{path}: not a readable run state (missing {', '.join(missing)}){advice}")
    return meta, t


def _check_writable(label: str, folder: Path) -> None:
    """A file can be made in `folder`, or in its nearest existing parent (the rest is made when written)."""
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise PixArtError(f"{label}: cannot write in {existing} ({e.strerror or e})") from None


def check_outputs(cfg: PersonalizeConfig) -> None:
    """The concept file and the run folder, checked before a model loads and named by their flags (not an OSError
    after the training). An existing --out is replaced only by the run that wrote it (its state records it) or
    with --overwrite: a --run-dir of another run must not replace it."""
    out, run = Path(cfg.out), cfg.run_path
    if out.is_dir():
        raise PixArtError(f"--out {cfg.out} is a folder; name the concept file (.safetensors)")
    _check_writable(f"--out {cfg.out}", out.absolute().parent)
    _check_writable(f"--run-dir {run}" if cfg.run_dir else f"--out {cfg.out} (its run folder {run})", run.absolute())
    if out.exists() and not cfg.overwrite:
        state, mine = run / STATE_FILE, out_in_run(cfg)
        # a state written before runs recorded their --out is trusted, as it was then
        if not state.is_file() or read_state(state)[0].get("out", mine) != mine:
            raise PixArtError(f"--out {cfg.out} already exists and no run in {run} wrote it; pass --overwrite to "
                              "replace it")


def out_in_run(cfg: PersonalizeConfig) -> str:
    """--out relative to the run folder: what a state records, so a run folder moved with its concept still
    owns it."""
    return os.path.relpath(Path(cfg.out).resolve(), cfg.run_path.resolve())


def draw_timesteps(kind: str, n: int, num_steps: int, generator: torch.Generator) -> Tensor:
    """n training timesteps: uniform (DDPM's, Perfusion's) or logit-normal (t / T = sigmoid(N(0, 1)))."""
    if kind == "uniform":
        return torch.randint(0, num_steps, (n,), generator=generator)
    u = torch.sigmoid(torch.randn(n, generator=generator, dtype=torch.float64))
    return (u * num_steps).long().clamp_(0, num_steps - 1)


def data_identity(spec: str) -> str:
    """A concept's images as a short hash of their files' names and sizes (a folder), or the shard spec: the same
    images in a moved folder are the same data."""
    import hashlib

    folder = Path(spec)
    if not folder.is_dir():
        return spec
    files = sorted((str(p.relative_to(folder)), p.stat().st_size) for p in folder.rglob("*") if p.is_file())
    return hashlib.sha256(json.dumps(files).encode()).hexdigest()[:16]


def masked_loss(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Mean squared error weighted by the object mask (B, 1, h, w) in [0, 1] (Perfusion's masked loss)."""
    weight = mask.expand_as(pred)
    return ((pred - target) ** 2 * weight).sum() / weight.sum().clamp_min(1e-8)


def _positions(ids: Tensor, token_id: int, what: str) -> Tensor:
    hits = ids == token_id
    if not bool(hits.any(dim=1).all()):
        raise PixArtError(f"a training caption lost its {what} token (truncated past max_length?)")
    return hits


class ConceptTrainer:
    def __init__(self, cfg: PersonalizeConfig):
        from pixart.encoders.text import TextEncoder, TextEncoderConfig
        from pixart.train.config import EncodersSection
        from pixart.train.encoders import load_autoencoder

        from .covariance import load_or_estimate
        from .data import caption_for, read_concept_images
        from .tokens import add_concept_token, as_super, check_new_name, super_token

        check_new_name(cfg.concept)
        check_outputs(cfg)
        self.cfg, ckpt = cfg, checkpoint_folder(cfg.ckpt)
        dev = self.device = torch.device(cfg.device)
        self.items = read_concept_images(cfg.data)
        self.default_ema = (ckpt / EMA_FILE).is_file()
        self.ema = cfg.ema if cfg.ema is not None else self.default_ema  # what a resumed run must match
        self.model = load_model(ckpt, ema=self.ema).to(dev).eval().requires_grad_(False)
        if self.model.config.arch != "pixart":
            raise PixArtError(f"{ckpt}: a {self.model.config.arch} checkpoint has no text cross-attention to edit")
        self.prediction = load_prediction_type(ckpt)
        enc = load_encoders(ckpt)
        text, vae = cfg.text_encoder or enc.get("text_encoder"), cfg.vae or enc.get("image_encoder")
        if not text or not vae:
            raise PixArtError(f"{ckpt}: no {ENCODERS_FILE} names the text encoder and the VAE it was trained with; "
                              "pass --text-encoder and --vae")
        self.text = TextEncoder(TextEncoderConfig(text, max_length=enc.get("max_length") or 120,
                                                  dtype="fp32", device=cfg.device))
        self.text.model.requires_grad_(False)
        decoder = load_autoencoder(EncodersSection(vae=vae), None, device=cfg.device, scale=enc.get("scaling_factor"))
        self.model.config.check_encoders(self.text.model.config.d_model, decoder.latent_channels, text, vae)
        self.super_id = super_token(self.text.tokenizer, cfg.super_word)
        self.token_id = add_concept_token(self.text.tokenizer, self.text.model, cfg.concept)
        self.captions = [caption_for(item, cfg.concept, i) for i, item in enumerate(self.items)]
        unnamed = sum(1 for it, c in zip(self.items, self.captions, strict=True) if it.caption and it.caption != c)
        if unnamed:  # the user wrote them: say why they are not what trains
            print(f"personalize: {unnamed} of {len(self.items)} captions do not name {cfg.concept!r}; a template "
                  "that does replaces each")
        self.super_captions = [as_super(caption, {cfg.concept: cfg.super_word}) for caption in self.captions]
        self._check_captions()
        self.identity = pixart_identity(self.model)
        self.c_inv = load_or_estimate(ckpt, self.identity, self.model, self.text, cfg.captions,
                                      Path(cfg.covariance) if cfg.covariance else None).to(dev)
        side = self.model.config.input_size * decoder.downsample_factor
        self.latents, self.masks = self._encode_images(decoder, side)

    def _check_captions(self) -> None:
        """Each caption keeps the concept's word (and its super-category copy the super word) within the text
        encoder's max_length: found here, naming the caption's file, before anything is written."""
        concept_ids, _ = self.text.tokenize(self.captions)
        super_ids, _ = self.text.tokenize(self.super_captions)
        for item, caption, c, s in zip(self.items, self.captions, concept_ids, super_ids, strict=True):
            if not ((c == self.token_id).any() and (s == self.super_id).any()):
                where = item.source if item.source and caption == item.caption else f"the caption {caption!r}"
                raise PixArtError(f"{where}: the concept's word {self.cfg.concept!r} falls past the text encoder's "
                                  f"max_length ({self.text.config.max_length} tokens); shorten the caption, or "
                                  f"name {self.cfg.concept!r} earlier in it")

    @torch.no_grad()
    def _encode_images(self, decoder, side: int) -> tuple[Tensor, Tensor]:
        """Latents of the images, centre-cropped to squares of the model's size, and their masks pooled to the
        latent grid (max 1; `mask_floor` outside the object)."""
        from PIL import Image

        images, masks = [], []
        for it in self.items:
            w, h = it.image.size
            k = min(w, h)
            box = ((w - k) // 2, (h - k) // 2, (w - k) // 2 + k, (h - k) // 2 + k)
            square = it.image.crop(box).resize((side, side), Image.BICUBIC)
            images.append(torch.from_numpy(np.asarray(square, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1)
            mask = torch.ones(k, k) if it.mask is None else torch.from_numpy(it.mask[box[1]:box[3], box[0]:box[2]])
            masks.append(mask)
        dist = decoder.encode(torch.stack(images).to(self.device))
        latents = decoder.sample_latents(dist.mean, dist.std, torch.Generator(device=self.device).manual_seed(0))
        floor = self.cfg.mask_floor
        pooled = []
        for m in masks:
            m = F.adaptive_avg_pool2d(m[None, None].float(), latents.shape[-2:])[0]
            pooled.append(floor + (1 - floor) * m / m.max().clamp_min(1e-8))
        return latents.float(), torch.stack(pooled).to(self.device)

    def encode(self, captions: list[str], embedding: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """T5 features (B, L, C) (with grad into `embedding`), mask, and the caption-projected encodings (B, D) at
        the concept's token (the super word's when `embedding` is None)."""
        from .tokens import embed_with

        ids, mask = self.text.tokenize(captions)
        ids, mask = ids.to(self.device), mask.to(self.device)
        if embedding is None:
            inputs = self.text.model.get_input_embeddings()(ids)
            where = _positions(ids, self.super_id, f"super-category ({self.cfg.super_word!r})")
        else:
            inputs = embed_with(self.text.model, ids, self.token_id, embedding)
            where = _positions(ids, self.token_id, f"concept ({self.cfg.concept!r})")
        feats = self.text.model(inputs_embeds=inputs, attention_mask=mask).last_hidden_state
        proj = self.model.y_embedder.y_proj(feats.detach())
        first = where.float().argmax(dim=1)
        return feats, mask, proj[torch.arange(len(ids)), first]

    def initial_state(self) -> dict[str, Tensor]:
        """Perfusion's init: the embedding is the super word's, i* = i_super is the super word's encoding over the
        training captions, o*_V starts at W_V i_super in every block."""
        with torch.no_grad():
            _, _, e_super = self.encode(self.super_captions, None)
            i_super = e_super.mean(0)
            dim = self.model.config.hidden_size
            values = torch.stack([b.cross_attn.kv_linear.weight[dim:] @ i_super for b in self.model.blocks])
            emb = self.text.model.get_input_embeddings().weight[self.super_id].clone()
        return {"value_targets": values, "embedding": emb, "i_star": i_super.clone(), "i_super": i_super}

    def train(self, log=print) -> tuple[Concept, dict]:
        from pixart.diffusion.schedule import NoiseSchedule
        from pixart.train.monitor import save_loss_curve

        from .apply import apply_concepts, remove_concepts

        cfg, run = self.cfg, self.cfg.run_path
        state_file = run / STATE_FILE
        state, step, history, seconds = self.initial_state(), 0, [], 0.0
        opt_state = None
        if state_file.is_file():
            state, step, history, seconds, opt_state = self._load_state(state_file)
            if step > cfg.steps:
                raise PixArtError(f"--steps {cfg.steps}: {state_file} is already at step {step}; give --steps "
                                  f"{step} or more, or another --run-dir")
            log(f"resuming {cfg.concept!r} from step {step} ({state_file})")
        run.mkdir(parents=True, exist_ok=True)  # only now: a refused run leaves no folder behind
        state = {k: v.to(self.device, torch.float32) for k, v in state.items()}  # a resumed state is on the CPU
        values = torch.nn.Parameter(state["value_targets"].clone())
        embedding = torch.nn.Parameter(state["embedding"].clone())
        i_star, i_super = state["i_star"].clone(), state["i_super"].clone()
        concept = Concept(cfg.concept, cfg.super_word, values, i_star, i_super, embedding, self.identity)
        opt = torch.optim.Adam([{"params": [values], "lr": cfg.lr_value},
                                {"params": [embedding], "lr": cfg.lr_embedding}])
        if opt_state is not None:
            saved = opt.state_dict()
            saved["state"] = opt_state
            opt.load_state_dict(saved)
        edits = apply_concepts(self.model, [concept], self.c_inv, beta=cfg.beta, tau=cfg.tau, check=False)
        schedule = NoiseSchedule.linear()
        bar = tqdm(range(step, cfg.steps), initial=step, total=cfg.steps, desc=f"personalize {cfg.concept}")
        start = time.perf_counter()
        for step in bar:
            g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)  # a step's draws depend on it alone
            idx = torch.randint(len(self.items), (cfg.batch,), generator=g)
            x0, mask = self.latents[idx], self.masks[idx]
            noise = torch.randn(x0.shape, generator=g).to(self.device)
            t = draw_timesteps(cfg.timesteps, cfg.batch, schedule.num_steps, g).to(self.device)
            feats, tmask, e_concept = self.encode([self.captions[i] for i in idx], embedding)
            with torch.no_grad():  # i*: an EMA of the concept token's encoding (no gradient through it)
                i_star.mul_(cfg.input_decay).add_(e_concept.mean(0), alpha=1 - cfg.input_decay)
                for edit in edits:
                    edit.edit.set_encodings(i_star[None])
            xt = schedule.q_sample(x0, t, noise)
            out = self.model(xt, t, feats, mask=tmask)[:, :x0.shape[1]]
            target = noise if self.prediction == "epsilon" else schedule.v_target(x0, noise, t)
            loss = masked_loss(out.float(), target, mask)
            if not torch.isfinite(loss):
                raise PixArtError(f"personalize: loss is {loss.item()} at step {step}; lower --lr-value or "
                                  "--lr-embedding")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            history.append({"step": step + 1, "loss": loss.item()})
            bar.set_postfix(loss=f"{loss.item():.4f}")
            if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
                self._save_state(state_file, concept, opt, step + 1, history,
                                 seconds + time.perf_counter() - start)
        seconds += time.perf_counter() - start
        save_loss_curve({cfg.concept: history}, run / "loss.png")
        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        size = concept.save(cfg.out, cfg.precision)
        remove_concepts(self.model)
        log(f"wrote {cfg.out}: {size:,} bytes ({cfg.precision}), {cfg.steps} steps in {seconds:.1f} s; "
            f"loss curve {run / 'loss.png'}")
        return Concept.load(cfg.out), {"bytes": size, "train_seconds": round(seconds, 1), "steps": cfg.steps,
                                       "final_loss": float(np.mean([h["loss"] for h in history[-20:]]))}

    def _settings(self) -> dict:
        """What a run's result depends on besides the concept and the base model: a resumed run must have the same
        (more --steps only continue it)."""
        c = self.cfg
        return {"data": data_identity(c.data), "covariance": c.covariance, "batch": c.batch,
                "lr_value": c.lr_value, "lr_embedding": c.lr_embedding, "beta": c.beta, "tau": c.tau,
                "input_decay": c.input_decay, "mask_floor": c.mask_floor, "timesteps": c.timesteps, "seed": c.seed,
                "ema": self.ema, "device": torch.device(c.device).type}  # the latents' noise is drawn on it

    def _save_state(self, path: Path, concept: Concept, opt, step: int, history: list, seconds: float) -> None:
        tensors = {k: getattr(concept, k).detach().cpu().contiguous()
                   for k in ("value_targets", "embedding", "i_star", "i_super")}
        for name, group in zip(("value", "embedding"), opt.param_groups, strict=True):
            st = opt.state.get(group["params"][0], {})
            for k in ("exp_avg", "exp_avg_sq", "step"):
                if k in st:
                    tensors[f"adam.{name}.{k}"] = st[k].detach().cpu().reshape(-1 if k == "step" else st[k].shape)
        meta = {"step": str(step), "seconds": repr(seconds), "history": json.dumps(history),
                "concept": concept.name, "super": concept.super_word, "base_model": concept.base_model,
                "settings": json.dumps(self._settings()), "out": out_in_run(self.cfg)}
        atomic_write(path, safetensors_bytes(tensors, meta))

    def _load_state(self, path: Path):
        meta, t = read_state(path)
        if (meta["concept"], meta["super"], meta["base_model"]) != (self.cfg.concept, self.cfg.super_word,
                                                                     self.identity):
            raise PixArtError(f"{path}: a run of concept {meta['concept']!r} ({meta['super']}) on base model "
                              f"{meta['base_model']}; use another --run-dir or delete it")
        saved, now = json.loads(meta.get("settings", "{}")), self._settings()
        if saved.get("ema", False) is None:  # older runs stored --ema as given, None for the default
            saved["ema"] = self.default_ema
        for key, value in saved.items():
            if now.get(key) != value:
                flag = f"--{key.replace('_', '-')}"
                what = "on other --data images" if key == "data" else f"with {flag} {value}, not {now.get(key)}"
                raise PixArtError(f"{path}: a run {what}; resume it with the same settings, or use another "
                                  "--run-dir or delete it")
        state = {k: t[k] for k in STATE_TENSORS}
        opt_state = None
        if "adam.value.step" in t:
            opt_state = {i: {k: t[f"adam.{name}.{k}"].reshape(()) if k == "step" else t[f"adam.{name}.{k}"]
                             for k in ("exp_avg", "exp_avg_sq", "step")}
                         for i, name in enumerate(("value", "embedding"))}
        return state, int(meta["step"]), json.loads(meta["history"]), float(meta["seconds"]), opt_state
