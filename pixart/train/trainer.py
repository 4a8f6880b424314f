"""One training stage on DeepSpeed: the loop, and what makes it resumable bit for bit.

Determinism without saved RNG state: each sample's timestep, noise and caption drop come from a
generator seeded by (seed, step, sample key), so they do not depend on how the global batch is
split over ranks or on where a run was resumed. The data position is the loader's state; the
optimizer, LR schedule and fp32 master weights are DeepSpeed's checkpoint; the EMA is saved whole.

Fault injection for tests: PIXART_FAULT=after-step:N kills the process (SIGKILL) after step N
(and its checkpoint, if one is due); mid-save:N kills it inside the save of step N, after every
file is written and before the rename.
"""
from __future__ import annotations

import json
import logging
import math
import os
import signal
import time
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from pixart.atomic import atomic_write
from pixart.checkpoint import (
    CONFIG_FILE,
    DIFFUSION_FILE,
    EMA_FILE,
    ENCODERS_FILE,
    MODEL_FILE,
    checkpoint_folder,
    load_config,
    load_into,
    read_json,
    read_state_dict,
)
from pixart.data.loader import Loader, LoaderConfig
from pixart.data.loader_samples import detect_kind, stable_seed
from pixart.data.remote import CACHE_ENV, CACHE_GB_ENV
from pixart.data.shards import resolve_shards
from pixart.diffusion import NoiseSchedule, diffusion_loss
from pixart.encoders.loading import DTYPES
from pixart.errors import PixArtError
from pixart.models import ModelConfig, model_config, model_from_config

from . import checkpoints, memory
from .compile import compile_blocks
from .config import TrainConfig
from .ema import EMA
from .encoders import cache_manifest, check_named, load_autoencoder, load_text_encoder
from .engine import build_engine, check_deepspeed, init_distributed
from .master import frozen_state, gather, master_fragments, scatter_into
from .monitor import Monitor, peak_flops, read_log, train_flops_per_sample
from .preemption import Preempted, StopSignals
from .watchdog import StepWatchdog, watching_peers

log = logging.getLogger("pixart.train")
DONE_FILE = "DONE.json"
NEW_MODULES = ("csize_embedder.", "ar_embedder.")  # micro-conditions a stage may add (PixArtMS at 1024 px)


def resolve_model(cfg: TrainConfig) -> tuple[ModelConfig, dict | None]:
    """The architecture (the init's, with `model.arch` over it) and the init weights, if any."""
    m = cfg.model
    if m.init is None:
        return model_config(m.name, **m.arch), None
    init = checkpoint_folder(m.init)
    base = load_config(init).to_dict()
    unknown = sorted(set(m.arch) - set(base))
    if unknown:
        raise PixArtError(f"model.arch: unknown key {unknown[0]!r}")
    path = init / (EMA_FILE if m.init_ema else MODEL_FILE)
    return ModelConfig.from_dict({**base, **m.arch}, source="model.arch"), read_state_dict(path)


def load_init(model: torch.nn.Module, state: dict, source: str) -> None:
    """Strict loading, except what a new stage legitimately changes: the fixed sin-cos `pos_embed`
    (rebuilt for a new resolution) and micro-condition embedders the init did not have."""
    own = model.state_dict()
    state = dict(state)
    if "pos_embed" in state and "pos_embed" in own and state["pos_embed"].shape != own["pos_embed"].shape:
        state["pos_embed"] = own["pos_embed"]
    for k in own:
        if k.startswith(NEW_MODULES) and not any(s.startswith(k.split(".")[0] + ".") for s in state):
            state[k] = own[k]
    load_into(model, state, source)


class Trainer:
    """`Trainer(cfg, run_dir).run()` trains to `train.max_steps` (resuming from `run_dir`) and returns
    the last checkpoint. `batches` replaces the shard loader (e.g. a fixed list in tests)."""

    def __init__(self, cfg: TrainConfig, run_dir: str | os.PathLike, batches: Iterable[dict] | None = None):
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.device = init_distributed(cfg.train.collective_timeout_s)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.main = self.rank == 0

        self.model_config, init_state = resolve_model(cfg)
        self.manifest = cache_manifest(cfg) if batches is None else None  # missing shards: before building the model
        self._check_manifest()
        torch.manual_seed(cfg.train.seed)  # the same fresh init on every rank
        model = model_from_config(self.model_config)
        if init_state is not None:
            load_init(model, init_state, f"model.init {cfg.model.init}")
        self.dtype = DTYPES[cfg.deepspeed.precision]
        self._set_checkpointing(model)
        if cfg.model.compile:
            log.info("torch.compile: %d blocks, dynamic shapes", compile_blocks(model))
        fp32_init = {k: v.detach().clone() for k, v in model.named_parameters()}
        self.block_params = sum(p.numel() for n, p in model.named_parameters() if n.startswith("blocks."))

        self.batches = batches if batches is not None else build_loader(cfg, self.model_config.arch, self.device)
        self.settings = checkpoints.resume_settings(cfg, self.run_dir)
        check_deepspeed(cfg, self.world)  # an unreadable deepspeed.config file or precision, before the run folder
        if self._draws_grids():
            check_named(cfg.encoders, self.manifest or cache_manifest(cfg), text=self.model_config.arch == "pixart")
        # only now: a bad init or shard, or a config that cannot resume the run, writes nothing
        checkpoints.open_run(self.run_dir, cfg.resolved_yaml(), self.world, self.settings, self.model_config,
                             cfg.train.elastic)
        self.engine, self.optimizer, self.scheduler = build_engine(
            model, cfg, self.world, checkpoints.needs_universal(self.run_dir, self.world))
        self.fragments = master_fragments(self.engine.module)
        # DeepSpeed builds bf16/fp16 masters from the low-precision copy: give them the exact fp32 init.
        scatter_into(self.fragments, [f.view for f in self.fragments], fp32_init, "init")
        self.ema = EMA(self.fragments, cfg.ema.decay, cfg.ema.warmup)
        self.schedule = NoiseSchedule.linear()
        self.step, self.samples = 0, 0

    # -- set-up ---------------------------------------------------------------------------------
    def _set_checkpointing(self, model) -> None:
        """`model.grad_checkpointing`; "auto" measures one block at this run's batch shape (square buckets'
        token count; buckets keep about the same area) and checkpoints the fewest blocks that fit."""
        cfg, blocks = self.cfg, self.cfg.model.grad_checkpointing
        if blocks == "auto":
            if cfg.model.activation_memory_gb is not None:
                budget = cfg.model.activation_memory_gb * memory.GB
            else:
                params = sum(p.numel() for p in model.parameters())
                budget = memory.free_memory_bytes(self.device) * 0.9 - memory.state_bytes(
                    params, cfg.deepspeed.precision, cfg.deepspeed.zero_stage, self.world)
            mc = self.model_config
            plan = memory.plan_checkpointing(
                model, batch=cfg.data.batch_size, tokens=(mc.input_size // mc.patch_size) ** 2,
                caption_tokens=cfg.encoders.max_length, device=self.device, dtype=self.dtype, budget_bytes=budget)
            log.info(plan.describe())
            blocks = plan.blocks
        try:
            model.set_grad_checkpointing(blocks)
        except ValueError as e:
            raise PixArtError(f"model.{e}") from None

    def _check_manifest(self) -> None:
        """The cache must fit the model before step 1 (the loader checks `data.expected` itself)."""
        m, mc = self.manifest, self.model_config
        if m is None:
            return
        where = f"{getattr(m, 'folder', 'feature cache')}/manifest.json"
        if m.latent_channels != mc.in_channels:
            raise PixArtError(f"{where}: latent_channels {m.latent_channels} != model in_channels {mc.in_channels}")
        if mc.arch == "pixart" and m.text_dim != mc.caption_channels:
            raise PixArtError(f"{where}: text_dim {m.text_dim} != model caption_channels {mc.caption_channels}")

    def _draws_grids(self) -> bool:
        """A class-conditional stage draws its classes; a text-conditional one its validation prompts, if any."""
        return self.model_config.arch == "dit" or bool(self.cfg.validation.prompts)

    def _validator(self):
        from .validation import Validator

        v, arch = self.cfg.validation, self.model_config.arch
        if not self.main or not self._draws_grids():
            return None
        manifest = self.manifest or cache_manifest(self.cfg)
        enc = self.cfg.encoders
        text = load_text_encoder(enc, manifest) if arch == "pixart" else None
        return Validator(v, self.cfg.diffusion.prediction, self.model_config, text, load_autoencoder(enc, manifest),
                         self.device)

    # -- one step -------------------------------------------------------------------------------
    def loss(self, batch: dict, step: int) -> torch.Tensor:
        """The mean diffusion loss of this rank's micro-batch (per-sample noise seeded by key)."""
        cfg, dev = self.cfg, self.device
        x0 = batch["latents"].float()
        B = x0.shape[0]
        t, noise, drop = [], [], []
        for key in batch["keys"]:
            g = torch.Generator().manual_seed(stable_seed(cfg.train.seed, "train", step, key))
            t.append(self.schedule.sample_timestep(g, cfg.diffusion.timesteps))
            noise.append(torch.randn(x0.shape[1:], generator=g))
            drop.append(torch.rand(1, generator=g) < cfg.train.caption_dropout)
        t, noise, drop = torch.cat(t).to(dev), torch.stack(noise).to(dev), torch.cat(drop).to(dev)
        x0 = x0.to(dev)
        xt = self.schedule.q_sample(x0, t, noise)
        if self.model_config.arch == "dit":
            labels = batch["labels"].to(dev)
            bad = (labels < 0) | (labels >= self.model_config.num_classes)
            if bad.any():
                i = int(bad.nonzero()[0])
                raise PixArtError(f"data: sample {batch['keys'][i]} has class {int(labels[i])}; a class-conditional "
                                  f"stage needs each sample's class in 0..{self.model_config.num_classes - 1}, as a "
                                  f"`cls` member or a `label` in its json")
            out = self.engine(xt.to(self.dtype), t, labels, force_drop_ids=drop)
        else:
            info = {k: v.to(dev) for k, v in batch["data_info"].items()} if "data_info" in batch else None
            out = self.engine(xt.to(self.dtype), t, batch["y"].to(dev, self.dtype), mask=batch["mask"].to(dev),
                              data_info=info, force_drop_ids=drop)
        terms = diffusion_loss(out, x0, xt, t, noise, self.schedule, learn_sigma=self.model_config.learn_sigma,
                               prediction_type=cfg.diffusion.prediction, min_snr_gamma=cfg.diffusion.min_snr_gamma)
        assert terms.loss.shape == (B,)
        return terms.loss.mean()

    # -- saving ---------------------------------------------------------------------------------
    def full_weights(self, ema: bool) -> dict | None:
        """The whole fp32 model (or EMA) with its buffers, on rank 0 (None elsewhere). Collective."""
        pieces = self.ema.shadow if ema else [f.view for f in self.fragments]
        state = gather(self.fragments, pieces, to_rank0_only=True)
        frozen = frozen_state(self.engine.module)
        return {**state, **frozen} if self.main else None

    def save(self) -> Path:
        files = {CONFIG_FILE: self.model_config.to_json(),
                 DIFFUSION_FILE: json.dumps({"prediction_type": self.cfg.diffusion.prediction}, indent=2),
                 ENCODERS_FILE: json.dumps(encoders_record(self.cfg, self.manifest), indent=2)}
        return checkpoints.save(self.run_dir, self.step, {checkpoints.DS_TAG: self.engine}, files,
                                self.full_weights(ema=False), self.full_weights(ema=True),
                                self.batches.state_dict() if hasattr(self.batches, "state_dict") else {},
                                {"samples": self.samples, "stage": self.cfg.stage, **self.settings},
                                self.cfg.train.keep_last)

    def _resume(self) -> None:
        state = checkpoints.restore(self.run_dir, {checkpoints.DS_TAG: self.engine}, self.ema, self.batches)
        if state is not None:
            self.step, self.samples = int(state["step"]), int(state.get("samples", 0))

    # -- the loop -------------------------------------------------------------------------------
    def run(self) -> Path:
        self._resume()
        return run_to_end(self, ema=self.cfg.validation.ema)

    def _loop(self, max_steps: int, monitor: Monitor, bar, watchdog: StepWatchdog, stop: StopSignals) -> None:
        cfg = self.cfg
        validator = self._validator()
        batches = iter(self.batches)
        keys = _KeyLog(self.run_dir, self.rank, self.world, self.step) if cfg.train.record_keys else None
        window = _Window()
        while self.step < max_steps:
            for _ in range(cfg.optim.grad_accum):
                batch = next(batches)
                if keys:
                    keys.write(self.step + 1, batch["keys"])
                loss = self.loss(batch, self.step)
                check_finite(self, loss)
                self.engine.backward(loss)
                self.engine.step()
                window.add(batch, loss.item() / cfg.optim.grad_accum, self.world, self.model_config.patch_size)
            self.step += 1
            self.samples += window.last_samples * cfg.optim.grad_accum
            self.ema.update(self.step)
            window.steps += 1
            bar.update(1)
            if self.step % cfg.train.log_every == 0 or self.step == max_steps:
                scalars = self._scalars(window)
                monitor.log(self.step, scalars)
                bar.set_postfix(loss=f"{scalars['loss']:.4f}", lr=f"{scalars['lr']:.2e}")
                window = _Window()
            end_step(self, max_steps, validator, monitor, watchdog, stop, cfg.validation.ema)

    def _scalars(self, w: _Window) -> dict[str, float]:
        mean = torch.tensor([w.loss / w.steps], device=self.device)
        dist.all_reduce(mean)
        rate = w.samples / max(time.time() - w.start, 1e-9)
        scalars = {"loss": mean.item() / self.world, "lr": self.scheduler.get_last_lr()[0],
                   "samples_per_s": rate, "tokens_per_s": rate * w.tokens}
        norm = self.engine.get_global_grad_norm()  # the last step's, before clipping; None without clipping
        if norm is not None:
            scalars["grad_norm"] = float(norm)
        peak = peak_flops(self.cfg.train.peak_tflops)
        if peak:
            flops = train_flops_per_sample(self.block_params, self.model_config, w.tokens, w.text_tokens)
            scalars["mfu"] = flops * rate / (peak * self.world)
        return scalars


def run_to_end(trainer, curve_keys: tuple[str, ...] = (), ema: bool = True) -> Path:
    """A resumed trainer's (`Trainer`'s or `DistillTrainer`'s) `_loop` to `train.max_steps`, watched for lost
    peers, with a progress bar; then loss.png and DONE.json. Returns the last checkpoint. `ema`: whether the
    validation grids draw the EMA weights."""
    t, cfg = trainer, trainer.cfg
    monitor = Monitor(t.run_dir, t.step, t.main)
    bar = tqdm(total=cfg.train.max_steps, initial=t.step, desc=cfg.stage, disable=not t.main, dynamic_ncols=True)
    try:
        with watching_peers(cfg.train.collective_timeout_s, t.rank, t.run_dir, lambda: t.step) as dog, \
                StopSignals() as stop:
            if t.step >= cfg.train.max_steps:  # resumed at the end: killed between the last save and its grid?
                validator = t._validator()  # rank 0's; None elsewhere
                grid = t.run_dir / "samples" / f"{checkpoints.step_name(t.step)}.png"
                if any_rank(validator is not None and not grid.is_file(), t.device):
                    validate(t, validator, monitor, ema)
            t._loop(cfg.train.max_steps, monitor, bar, dog, stop)
    finally:
        bar.close()
        monitor.close()
    final = checkpoints.latest_checkpoint(t.run_dir)
    data = data_report(t.batches, t.world, t.main)
    if t.main:
        monitor.loss_curve(t.run_dir / "loss.png", cfg.stage, keys=curve_keys)
        done = {"checkpoint": str(final.absolute()), "steps": t.step, "stage": cfg.stage, "data": data,
                **t.settings}
        atomic_write(t.run_dir / DONE_FILE, json.dumps(done, indent=2))
    dist.barrier()
    checkpoints.release_run(t.run_dir)
    return final


def end_step(trainer, max_steps: int, validator, monitor: Monitor, watchdog: StepWatchdog, stop: StopSignals,
             ema: bool) -> None:
    """After each step of a trainer's `_loop`, on every rank (collective): the checkpoint when due; when a stop
    signal reached any rank, this step's checkpoint (unless just written) and Preempted; the validation grid when
    due; tests' fault point; the watchdog's beat."""
    t, cfg = trainer, trainer.cfg
    saved = t.step % cfg.train.ckpt_every == 0 or t.step == max_steps
    if saved:
        t.save()
    if any_rank(stop.received is not None, t.device):
        if not saved:
            t.save()
        by = signal.Signals(stop.received).name if stop.received else "another rank's stop signal"
        raise Preempted(f"rank {t.rank}: {cfg.stage} stopped by {by} after step {t.step}, checkpoint "
                        f"{checkpoints.latest_checkpoint(t.run_dir)} written; rerun the same command to resume from "
                        "it", stop.received or signal.SIGTERM)
    if (cfg.validation.every and t.step % cfg.validation.every == 0) or t.step == max_steps:
        validate(t, validator, monitor, ema)
    checkpoints.fault_point("after-step", t.step)
    watchdog.beat()


def check_finite(trainer, loss: torch.Tensor, which: str = "") -> None:
    """Stop every rank before an update whose loss is not finite on any, naming the last good checkpoint."""
    if any_rank(not torch.isfinite(loss), trainer.device):
        latest = checkpoints.latest_checkpoint(trainer.run_dir)
        raise PixArtError(f"step {trainer.step + 1}: the {which + ' ' if which else ''}loss is {loss.item()} (not "
                          f"finite); stopped before the update. Last good checkpoint, intact: {latest or 'none yet'}")


def validate(trainer, validator, monitor: Monitor, ema: bool) -> None:
    """The validation grid of the current weights (or EMA), on rank 0. Collective: every rank gathers."""
    weights = trainer.full_weights(ema=ema)
    if validator is not None:
        out = trainer.run_dir / "samples" / f"{checkpoints.step_name(trainer.step)}.png"
        validator.grid(weights, out)
        monitor.image("validation", trainer.step, out)
    dist.barrier()


def build_loader(cfg, arch: str, device: torch.device) -> Loader:
    """The shard loader of a stage (or distillation) config: feature shards, or raw shards encoded by the
    frozen encoders in the training process."""
    d = cfg.data
    if d.shard_cache:  # through the environment, so that loader workers (and any subprocess) read it too
        os.environ.update({CACHE_ENV: str(d.shard_cache), CACHE_GB_ENV: str(d.shard_cache_gb)})
    text = vae = None
    if detect_kind(resolve_shards(d.shards)) == "raw":
        text = load_text_encoder(cfg.encoders, None, str(device)) if arch == "pixart" else None
        vae = load_autoencoder(cfg.encoders, None, str(device))
    caption = d.caption if arch == "pixart" else None  # a class-conditional stage reads no captions
    return Loader(LoaderConfig(shards=d.shards, batch_size=d.batch_size, seed=cfg.train.seed, caption=caption,
                               buckets=d.buckets, resolution=d.resolution, num_workers=d.num_workers,
                               scores_dir=d.scores_dir, min_score=d.min_score, expected=d.expected,
                               scan_samples=d.scan_samples),
                  text_encoder=text, autoencoder=vae)


def encoders_record(cfg, manifest) -> dict:
    """What `pixart sample` needs to turn prompts into images with a checkpoint (its encoders.json)."""
    m, e = manifest, cfg.encoders
    return {"text_encoder": e.text_encoder or (m.text_encoder if m else None),
            "max_length": e.max_length if e.text_encoder or not m else m.max_length,
            "dtype": e.dtype if e.text_encoder or not m else m.dtype,  # of the text features it learned from
            "image_encoder": e.vae or (m.image_encoder if m else None),
            "scaling_factor": m.scaling_factor if m and not e.vae else None}


def any_rank(flag: bool, device: torch.device) -> bool:
    """Whether `flag` holds on some rank: a collective, so that every rank takes the same branch."""
    count = torch.tensor([float(flag)], device=device)
    dist.all_reduce(count)
    return count.item() > 0


def data_report(batches, world: int, main: bool) -> dict:
    """What the loaders skipped (corrupt samples, damaged shards), summed over ranks and printed."""
    stats = getattr(batches, "stats", None)
    mine = {"skipped": dict(stats.skipped), "damaged_shards": sorted(stats.damaged_shards)} if stats else {}
    every = [None] * world
    dist.all_gather_object(every, mine)
    report = {"skipped": {}, "damaged_shards": []}
    for r in every:
        for reason, n in (r or {}).get("skipped", {}).items():
            report["skipped"][reason] = report["skipped"].get(reason, 0) + n
        report["damaged_shards"] += (r or {}).get("damaged_shards", [])
    if main and (report["skipped"] or report["damaged_shards"]):
        log.warning("data: skipped samples %s; damaged shards %s", report["skipped"] or "none",
                    report["damaged_shards"] or "none")
    return report


class _Window:
    """Loss and throughput since the last log line."""

    def __init__(self):
        self.loss, self.steps, self.samples, self.start = 0.0, 0, 0, time.time()
        self.tokens = self.text_tokens = self.last_samples = 0

    def add(self, batch: dict, loss: float, world: int, patch: int) -> None:
        self.loss += loss
        self.last_samples = batch["latents"].shape[0] * world
        self.samples += self.last_samples
        self.tokens = math.prod(batch["latents"].shape[-2:]) // patch ** 2
        self.text_tokens = batch["y"].shape[1] if "y" in batch else 0


class _KeyLog:
    """keys-rank<R>.jsonl: {"step", "keys"} per micro-batch, cut back to the resumed step on restart; rank 0 also
    cuts the logs of ranks a run resumed on fewer processes (`train.elastic`) no longer has."""

    def __init__(self, run_dir: Path, rank: int, world: int, resume_step: int):
        self.path = run_dir / f"keys-rank{rank}.jsonl"
        ranks = {p: p.stem.removeprefix("keys-rank") for p in run_dir.glob("keys-rank*.jsonl")}
        gone = [p for p, r in ranks.items() if r.isdigit() and int(r) >= world]
        for path in [self.path, *(gone if rank == 0 else [])]:
            if path.is_file():
                rows = [r for r in read_log(path) if r["step"] <= resume_step]
                atomic_write(path, "".join(json.dumps(r) + "\n" for r in rows))

    def write(self, step: int, keys: list[str]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, "keys": list(keys)}) + "\n")


def is_done(run_dir: str | os.PathLike, max_steps: int) -> Path | None:
    """The stage's final checkpoint when `run_dir` finished at least `max_steps`; else None. The checkpoint is
    found by its step name in this run folder's checkpoints/, not by the recorded path, so a moved or copied
    run folder chains on from its own checkpoints, not the original's."""
    path = Path(run_dir) / DONE_FILE
    if not path.is_file():
        return None
    done = read_json(path)
    return Path(run_dir) / "checkpoints" / Path(done["checkpoint"]).name if done.get("steps", 0) >= max_steps else None
