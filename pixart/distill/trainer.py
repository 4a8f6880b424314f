"""DMD distillation on DeepSpeed: a one-step generator and a fake score, each its own ZeRO engine, beside
the frozen teacher (the real score), in one process per rank as DeepSpeed-Chat runs its four networks.

One step is one generator update, then `fake.updates_per_generator` fake-score updates (DMD2's two-time-scale
update; DMD2's loop updates the generator every ratio-th iteration and the fake score every iteration, in this
order). The first fake update learns from the generator's samples of that step, detached; later ones draw
fresh samples. Resume is exact as in a training stage: each sample's noise and timesteps come from generators
seeded by (seed, role, step, key), the loader's position, both engines and the generator's EMA are saved.
"""
from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

from pixart.checkpoint import (
    CONFIG_FILE,
    DIFFUSION_FILE,
    EMA_FILE,
    ENCODERS_FILE,
    FRESH_NULL_FILE,
    MODEL_FILE,
    STUDENT_FILE,
    checkpoint_folder,
    load_config,
    load_into,
    load_prediction_type,
    load_student,
    read_state_dict,
)
from pixart.data.loader_samples import stable_seed
from pixart.diffusion import NoiseSchedule, classifier_free_guidance, diffusion_loss
from pixart.encoders.loading import DTYPES
from pixart.errors import PixArtError
from pixart.models import model_from_config
from pixart.train import checkpoints
from pixart.train.ema import EMA
from pixart.train.encoders import cache_manifest, check_named, load_autoencoder, load_text_encoder
from pixart.train.engine import build_engine, check_deepspeed, init_distributed
from pixart.train.master import frozen_state, gather, master_fragments, scatter_into
from pixart.train.monitor import Monitor
from pixart.train.preemption import StopSignals
from pixart.train.trainer import (
    build_loader,
    check_finite,
    encoders_record,
    end_step,
    run_to_end,
)
from pixart.train.watchdog import StepWatchdog

from . import losses
from .config import DistillConfig
from .networks import FakeScore
from .pairs import PAIRS_FILE, Pairs, load_pairs, make_pairs

log = logging.getLogger("pixart.distill")
GENERATOR, FAKE = "generator", "fake"  # the engines' tags in a checkpoint's deepspeed/ folder


def load_teacher(cfg: DistillConfig) -> tuple:
    """(model config, prediction type, teacher weights, its fresh_null_caption.json or None), checked against the
    config, all from the one folder `teacher.init` names now (a run's `latest` may move on)."""
    t = cfg.teacher
    folder = checkpoint_folder(t.init)
    if not (folder / CONFIG_FILE).is_file():
        raise PixArtError(f"teacher.init: {folder} is not a checkpoint folder (no {CONFIG_FILE})")
    mc = load_config(folder)
    if mc.arch != "pixart":
        raise PixArtError(f"teacher.init: {folder} holds a class-conditional DiT; distillation needs a text-to-image "
                          "PixArt model")
    if load_student(folder) is not None:
        raise PixArtError(f"teacher.init: {folder} is already a one-step student")
    prediction = load_prediction_type(folder)
    if t.prediction != "auto" and t.prediction != prediction:
        raise PixArtError(f"teacher.prediction: {t.prediction}, but the teacher predicts {prediction} "
                          f"({folder / DIFFUSION_FILE})")
    use_ema = t.ema and (folder / EMA_FILE).is_file()
    made_up = folder / FRESH_NULL_FILE  # an import's null caption: the student never trains on the empty caption
    return (mc, prediction, read_state_dict(folder / (EMA_FILE if use_ema else MODEL_FILE)),
            made_up.read_text() if made_up.is_file() else None)


class DistillTrainer:
    """`DistillTrainer(cfg, run_dir).run()` distills to `train.max_steps` generator updates (resuming from
    `run_dir`) and returns the last checkpoint: a PixArt checkpoint folder marked as a one-step student."""

    def __init__(self, cfg: DistillConfig, run_dir: str | os.PathLike, batches: Iterable[dict] | None = None):
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.model_config, self.prediction, teacher_state, self.made_up_null = load_teacher(cfg)
        self.device = init_distributed(cfg.train.collective_timeout_s)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.main = self.rank == 0
        self.dtype = DTYPES[cfg.deepspeed.precision]

        source = f"teacher.init {cfg.teacher.init}"
        self.teacher = load_into(model_from_config(self.model_config), teacher_state, source)
        self.teacher.requires_grad_(False).eval().to(self.device, self.dtype)
        torch.manual_seed(cfg.train.seed)  # the GAN head's init, the same on every rank
        generator = load_into(model_from_config(self.model_config), teacher_state, source)
        fake = FakeScore(load_into(model_from_config(self.model_config), teacher_state, source),
                         gan=cfg.gan.generator_weight > 0)
        del teacher_state
        for model in (generator, fake.model):
            try:
                model.set_grad_checkpointing(cfg.student.grad_checkpointing)
            except ValueError as e:
                raise PixArtError(f"student.{e}") from None
        fp32 = {tag: {n: p.detach().clone() for n, p in net.named_parameters()}  # DeepSpeed's masters start here
                for tag, net in ((GENERATOR, generator), (FAKE, fake))}

        self.manifest = cache_manifest(cfg) if batches is None else None
        self.batches = batches if batches is not None else build_loader(cfg, "pixart", self.device)
        self.settings = {**checkpoints.resume_settings(cfg, self.run_dir), "gan.head": cfg.gan.generator_weight > 0}
        r = cfg.regression
        if r.weight:  # the run's pairs are drawn once, before step 1: a resume must not relabel them
            self.settings["regression.pairs"] = f"{r.pairs} by {r.sampler}, {r.steps} steps, CFG {r.cfg}"
        # only now: a bad teacher or shard, or a config that cannot resume the run, writes nothing
        check_deepspeed(cfg, self.world)  # an unreadable deepspeed.config file or precision, before the run folder
        if cfg.validation.prompts or (r.weight and r.kind == "lpips"):  # grids, or LPIPS on decoded images
            check_named(cfg.encoders, self.manifest or cache_manifest(cfg), text=bool(cfg.validation.prompts))
        self.lpips = load_lpips(r.lpips_weights, self.device) if r.weight and r.kind == "lpips" else None
        checkpoints.open_run(self.run_dir, cfg.resolved_yaml(), self.world, self.settings, self.model_config,
                             cfg.train.elastic)
        fake_cfg = cfg.model_copy(update={"optim": cfg.optim.model_copy(update={"lr": cfg.fake.lr or cfg.optim.lr})})
        universal = checkpoints.needs_universal(self.run_dir, self.world)
        self.engines = {GENERATOR: build_engine(generator, cfg, self.world, universal)[0],
                        FAKE: build_engine(fake, fake_cfg, self.world, universal)[0]}
        self.fragments = {}
        for tag, engine in self.engines.items():
            engine.module.eval()  # no caption dropout: the student and the fake score see every caption
            self.fragments[tag] = master_fragments(engine.module)
            scatter_into(self.fragments[tag], [f.view for f in self.fragments[tag]], fp32[tag], "init")
        self.ema = EMA(self.fragments[GENERATOR], cfg.ema.decay, cfg.ema.warmup)
        self.schedule = NoiseSchedule.linear()
        self.null_y = self.teacher.y_embedder.y_embedding
        self.step = 0
        self.pairs: Pairs | None = None
        self.decoder = None

    # -- randomness ------------------------------------------------------------------------------------
    def _draws(self, keys: list[str], role: str, shape, t_range: tuple[int, int] | None = None) -> dict:
        """Per sample, from a generator seeded by (seed, role, step, key): noise of `shape` and, with `t_range`,
        a timestep in it (inclusive). Independent of how the ranks split the batch."""
        t, noise = [], []
        for key in keys:
            g = torch.Generator().manual_seed(stable_seed(self.cfg.train.seed, role, self.step, key))
            if t_range is not None:
                t.append(torch.randint(t_range[0], t_range[1] + 1, (1,), generator=g))
            noise.append(torch.randn(shape, generator=g))
        out = {"noise": torch.stack(noise).to(self.device)}
        if t_range is not None:
            out["t"] = torch.cat(t).to(self.device)
        return out

    # -- the networks ----------------------------------------------------------------------------------
    def student(self, z: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, info) -> torch.Tensor:
        """x0 of the one-step generator: pure noise labelled with the start timestep."""
        t = torch.full((z.shape[0],), self.cfg.student.start_timestep, device=self.device, dtype=torch.long)
        out = self.engines[GENERATOR](z.to(self.dtype), t, y.to(self.dtype), mask=mask, data_info=info)
        return self.schedule.predict_x0(z, t, out[:, :z.shape[1]].float(), self.prediction)

    def _x0(self, model, xt, t, y, mask, info, cfg_scale: float | None = None) -> torch.Tensor:
        C = xt.shape[1]
        x, y = xt.to(self.dtype), y.to(self.dtype)
        if cfg_scale is None:
            out = model(x, t, y, mask=mask, data_info=info)[:, :C]
        else:
            out = classifier_free_guidance(model, x, t, y, mask, self.null_y, cfg_scale, info)
        return self.schedule.predict_x0(xt, t, out.float(), self.prediction)

    @contextmanager
    def _frozen_fake(self):
        """The fake score passes gradients to the generator's sample, none to its own weights."""
        module = self.engines[FAKE].module
        module.requires_grad_(False)
        try:
            yield module
        finally:
            module.requires_grad_(True)

    # -- one step --------------------------------------------------------------------------------------
    def _inputs(self, batch: dict) -> tuple:
        y, mask = batch["y"].to(self.device), batch["mask"].to(self.device)
        info = {k: v.to(self.device) for k, v in batch["data_info"].items()} if "data_info" in batch else None
        return y, mask, info

    def generator_turn(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        """One generator update; returns its samples (detached) and its losses."""
        cfg = self.cfg
        y, mask, info = self._inputs(batch)
        if "target" in batch:  # a regression pair: its noise, shared by the DM loss
            z = batch["noise"].to(self.device)
        else:
            z = self._draws(batch["keys"], "z", batch["latents"].shape[1:])["noise"]
        x = self.student(z, y, mask, info)
        terms = {}
        if cfg.dm.weight:
            d = self._draws(batch["keys"], "dm", x.shape[1:], (cfg.dm.t_min, cfg.dm.t_max))
            xt = self.schedule.q_sample(x.detach(), d["t"], d["noise"])
            with torch.no_grad():
                x0_real = self._x0(self.teacher, xt, d["t"], y, mask, info, cfg.dm.cfg)
                x0_fake = self._x0(self.engines[FAKE].module, xt, d["t"], y, mask, info)
            terms["dm"] = (cfg.dm.weight, losses.dm_loss(x, x0_real, x0_fake))
        if cfg.regression.weight:
            terms["regression"] = (cfg.regression.weight, losses.regression_loss(
                x, batch["target"].to(self.device), cfg.regression.kind, self.lpips,
                self.decoder.decode if self.decoder else None))
        if cfg.gan.generator_weight:
            d = self._draws(batch["keys"], "gan-g", x.shape[1:], (0, cfg.gan.max_timestep - 1))
            xt = self.schedule.q_sample(x, d["t"], d["noise"])
            with self._frozen_fake() as fake:
                _, logits = fake(xt.to(self.dtype), d["t"], y.to(self.dtype), mask=mask, data_info=info, gan=True)
            terms["gan_g"] = (cfg.gan.generator_weight, losses.generator_gan_loss(logits))
        loss = sum(w * v for w, v in terms.values())
        check_finite(self, loss, "generator")
        self.engines[GENERATOR].backward(loss)
        self.engines[GENERATOR].step()
        return x.detach(), {"loss_g": loss.item(), **{k: v.item() for k, (_, v) in terms.items()}}

    def fake_turn(self, batch: dict, x: torch.Tensor, turn: int) -> dict[str, float]:
        """One fake-score update on detached generator samples `x`: the teacher's own denoising loss over all
        timesteps, plus (GAN) the discriminator loss on noised real latents against noised samples."""
        cfg, engine = self.cfg, self.engines[FAKE]
        y, mask, info = self._inputs(batch)
        d = self._draws(batch["keys"], f"fake-{turn}", x.shape[1:], (0, self.schedule.num_steps - 1))
        xt = self.schedule.q_sample(x, d["t"], d["noise"])
        B = x.shape[0]
        if not cfg.gan.generator_weight:
            out = engine(xt.to(self.dtype), d["t"], y.to(self.dtype), mask=mask, data_info=info)
        else:  # one forward over [denoising samples | noised samples | noised real latents]
            g = self._draws(batch["keys"], f"gan-d-{turn}", x.shape[1:], (0, cfg.gan.max_timestep - 1))
            r = self._draws(batch["keys"], f"gan-r-{turn}", x.shape[1:], (0, cfg.gan.max_timestep - 1))
            real = batch["latents"].to(self.device).float()
            xs = torch.cat([xt, self.schedule.q_sample(x, g["t"], g["noise"]),
                            self.schedule.q_sample(real, r["t"], r["noise"])])
            info3 = None if info is None else {k: torch.cat([v] * 3) for k, v in info.items()}
            out, logits = engine(xs.to(self.dtype), torch.cat([d["t"], g["t"], r["t"]]), torch.cat([y] * 3).to(
                self.dtype), mask=torch.cat([mask] * 3), data_info=info3, gan=True)
            out = out[:B]
        terms = {"fake": diffusion_loss(out, x, xt, d["t"], d["noise"], self.schedule,
                                        learn_sigma=self.model_config.learn_sigma,
                                        prediction_type=self.prediction).loss.mean()}
        loss = terms["fake"]
        if cfg.gan.generator_weight:
            terms["gan_d"] = losses.discriminator_gan_loss(logits[2 * B:], logits[B:2 * B])
            loss = loss + cfg.gan.discriminator_weight * terms["gan_d"]
        check_finite(self, loss, "fake score")
        engine.backward(loss)
        engine.step()
        return {k: v.item() for k, v in terms.items()}

    def train_step(self, batches) -> dict[str, float]:
        """One generator update and `fake.updates_per_generator` fake-score updates."""
        cfg = self.cfg
        if self.pairs is not None:
            batch = self.pairs.batch(self.step, self.rank, self.world, cfg.data.batch_size, cfg.train.seed)
        else:
            batch = next(batches)
        x, scalars = self.generator_turn(batch)
        fake_terms: dict[str, list[float]] = {}
        for turn in range(cfg.fake.updates_per_generator):
            if turn or self.pairs is not None:  # a fresh batch and fresh samples (pairs carry no real latents)
                batch = next(batches)
                y, mask, info = self._inputs(batch)
                z = self._draws(batch["keys"], f"z-{turn}", batch["latents"].shape[1:])["noise"]
                with torch.no_grad():
                    x = self.student(z, y, mask, info)
            for k, v in self.fake_turn(batch, x, turn).items():
                fake_terms.setdefault(k, []).append(v)
        scalars.update({k: sum(v) / len(v) for k, v in fake_terms.items()})
        scalars["samples"] = x.shape[0] * self.world
        return scalars

    # -- set-up before step 1 ----------------------------------------------------------------------------
    def _regression_setup(self) -> None:
        cfg, r = self.cfg, self.cfg.regression
        if not r.weight:
            return
        if r.kind == "lpips":
            self.decoder = load_autoencoder(cfg.encoders, self.manifest or cache_manifest(cfg), str(self.device))
        path = self.run_dir / PAIRS_FILE
        if self.main and not path.is_file():
            side = self.model_config.input_size
            seed_cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"seed": cfg.train.seed + 1})})
            log.info("regression: the teacher draws %d pairs (%s, %d steps, CFG %s)", r.pairs, r.sampler, r.steps,
                     r.cfg)
            make_pairs(self.teacher, iter(build_loader(seed_cfg, "pixart", self.device)), r.pairs, (side, side),
                       prediction_type=self.prediction, sampler=r.sampler, steps=r.steps, cfg=r.cfg,
                       seed=cfg.train.seed, device=self.device, dtype=self.dtype, out=path)
        dist.barrier()
        self.pairs = load_pairs(self.run_dir)

    # -- saving and resuming -----------------------------------------------------------------------------
    def full_weights(self, ema: bool) -> dict | None:
        """The whole fp32 generator (or its EMA) with buffers, on rank 0 (None elsewhere). Collective."""
        fragments = self.fragments[GENERATOR]
        state = gather(fragments, self.ema.shadow if ema else [f.view for f in fragments], to_rank0_only=True)
        frozen = frozen_state(self.engines[GENERATOR].module)
        return {**state, **frozen} if self.main else None

    def save(self) -> Path:
        cfg = self.cfg
        student = {"start_timestep": cfg.student.start_timestep, "teacher": str(Path(cfg.teacher.init).resolve()),
                   "method": "dmd"}
        files = {CONFIG_FILE: self.model_config.to_json(),
                 DIFFUSION_FILE: json.dumps({"prediction_type": self.prediction}, indent=2),
                 ENCODERS_FILE: json.dumps(encoders_record(cfg, self.manifest), indent=2),
                 STUDENT_FILE: json.dumps(student, indent=2)}
        if self.made_up_null is not None:
            files[FRESH_NULL_FILE] = self.made_up_null
        loader = self.batches.state_dict() if hasattr(self.batches, "state_dict") else {}
        return checkpoints.save(self.run_dir, self.step, self.engines, files, self.full_weights(ema=False),
                                self.full_weights(ema=True), loader, {"stage": cfg.stage, **self.settings},
                                cfg.train.keep_last)

    def _resume(self) -> None:
        state = checkpoints.restore(self.run_dir, self.engines, self.ema, self.batches)
        if state is not None:
            self.step = int(state["step"])

    # -- the loop ----------------------------------------------------------------------------------------
    def run(self) -> Path:
        self._resume()
        self._regression_setup()
        return run_to_end(self, curve_keys=("dm", "fake", "regression", "gan_g"), ema=True)

    def _loop(self, max_steps: int, monitor: Monitor, bar, watchdog: StepWatchdog, stop: StopSignals) -> None:
        cfg = self.cfg
        validator = self._validator()
        batches = iter(self.batches)
        sums: dict[str, float] = {}
        count, start = 0, time.time()
        while self.step < max_steps:
            scalars = self.train_step(batches)
            self.step += 1
            self.ema.update(self.step)
            bar.update(1)
            count += 1
            for k, v in scalars.items():
                sums[k] = sums.get(k, 0.0) + v
            if self.step % cfg.train.log_every == 0 or self.step == max_steps:
                row = self._scalars(sums, count, time.time() - start)
                monitor.log(self.step, row)
                bar.set_postfix(dm=f"{row.get('dm', 0):.4f}", fake=f"{row['fake']:.4f}")
                sums, count, start = {}, 0, time.time()
            end_step(self, max_steps, validator, monitor, watchdog, stop, ema=True)

    def _scalars(self, sums: dict[str, float], count: int, seconds: float) -> dict[str, float]:
        """Means over the window (and over ranks), learning rates and gradient norms, samples per second."""
        names = sorted(k for k in sums if k != "samples")
        mean = torch.tensor([sums[k] / count for k in names], device=self.device, dtype=torch.float64)
        dist.all_reduce(mean)
        row = {k: v / self.world for k, v in zip(names, mean.tolist(), strict=True)}
        for tag, engine in self.engines.items():
            row[f"lr_{tag}"] = engine.get_lr()[0]
            norm = engine.get_global_grad_norm()
            if norm is not None:
                row[f"grad_norm_{tag}"] = float(norm)
        row["samples_per_s"] = sums["samples"] / max(seconds, 1e-9)
        return row

    def _validator(self):
        from .validation import DistillValidator

        v = self.cfg.validation
        if not self.main or not v.prompts:
            return None
        manifest = self.manifest or cache_manifest(self.cfg)
        return DistillValidator(self.cfg, self.model_config, self.prediction, self.teacher,
                                load_text_encoder(self.cfg.encoders, manifest),
                                load_autoencoder(self.cfg.encoders, manifest),
                                self.device)


def load_lpips(path: str, device: torch.device):
    """LPIPS (VGG) with every weight from `path`, a safetensors that `safetensors.torch.save_model(lpips.LPIPS(
    net="vgg"), path)` writes where there is internet: the `lpips` package itself would download VGG from
    torchvision and unpickle its linear layers; here nothing is downloaded or unpickled."""
    import lpips
    from safetensors.torch import load_model

    metric = lpips.LPIPS(net="vgg", pretrained=False, pnet_rand=True, verbose=False)
    try:
        load_model(metric, path, strict=True)
    except Exception as e:  # a missing or foreign file: safetensors' and torch's messages span lines
        raise PixArtError(f"regression.lpips_weights {path}: not LPIPS(VGG) weights "
                          f"({str(e).strip().splitlines()[0][:200]})") from None
    return metric.requires_grad_(False).eval().to(device)
