"""The distillation config: one typed record per DMD run, read from YAML like a stage config.

    teacher: {init: runs/stage3/checkpoints/latest}
    data: {shards: features/ms64, batch_size: 32, caption: metadata}
    dm: {cfg: 3.0}                          # the losses: each section is one switch (a weight of 0 is off)
    fake: {updates_per_generator: 5}
    regression: {weight: 0.25, kind: lpips, lpips_weights: lpips_vgg.safetensors}
    gan: {generator_weight: 1.0e-3}

The defaults are PixArt-DMD's (PixArt-sigma's train_pixart_dmd.py): start timestep 400, DM timesteps
over [1, 998], real-score CFG 3, one fake update per generator update, AdamW lr 1e-6 for both networks,
weight decay 0.01, gradient clip 10.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pixart.train.config import (
    ConfigFile,
    DataSection,
    DeepSpeedSection,
    EmaSection,
    EncodersSection,
    OptimSection,
    Section,
    TrainSection,
)

T = 1000  # the teacher's training timesteps (PixArt's linear schedule)


class TeacherSection(Section):
    init: str  # the trained model's checkpoint folder: the frozen real score, and both networks' init
    ema: bool = True  # its EMA weights when it has them
    prediction: Literal["auto", "epsilon", "v_prediction"] = "auto"  # auto: the teacher's diffusion.json


class StudentSection(Section):
    # The student maps pure noise labelled with this timestep to x0 in one forward (PixArt-DMD: 400; at 999 the
    # eps -> x0 conversion divides by sqrt(a_999) = 0.006 and amplifies every error 150x).
    start_timestep: int = Field(400, ge=1, le=T - 1)
    grad_checkpointing: bool | int = False  # the generator's and the fake score's blocks: all, none or the first N


class DMSection(Section):
    """Distribution matching: grad = (x0_fake - x0_real) / mean|x - x0_real| on noised student samples."""
    weight: float = Field(1.0, ge=0)
    cfg: float = Field(3.0, ge=1)  # the real score's guidance (PixArt-DMD 3; DMD2 1.75 for SD1.5, 8 for SDXL)
    t_min: int = Field(1, ge=0, le=T - 1)  # DM timesteps, inclusive (PixArt-DMD [1, 998]; DMD2 [20, 980])
    t_max: int = Field(998, ge=0, le=T - 1)


class FakeSection(Section):
    """The fake score: initialised from the teacher, trained on detached student samples with its own loss."""
    updates_per_generator: int = Field(1, ge=1)  # two-time-scale update (DMD2: 5 for SDXL/ImageNet, 10 for SD1.5)
    lr: float | None = Field(None, gt=0)  # None: optim.lr (DMD2 and PixArt-DMD use one lr for both)


class RegressionSection(Section):
    """DMD1's regression on (noise -> teacher sample) pairs made by the teacher's own sampler; the generator's
    batch then is the pairs' noise and captions, so DM and regression share the noise."""
    weight: float = Field(0.0, ge=0)  # 0: off (PixArt-DMD 0.25)
    kind: Literal["mse", "lpips"] = "mse"
    lpips_weights: str | None = None  # lpips: a safetensors of the whole LPIPS(VGG) module; nothing is downloaded
    pairs: int = Field(256, ge=1)  # how many pairs the teacher draws before step 1 (PixArt-DMD: 640,000)
    sampler: Literal["dpm-solver++", "ddim", "ddpm"] = "dpm-solver++"
    steps: int = Field(20, ge=1)
    cfg: float = Field(4.5, ge=1)


class GanSection(Section):
    """DMD2's GAN: a head on the fake network's middle-block features, real and student latents noised first,
    the non-saturating (softplus) loss."""
    generator_weight: float = Field(0.0, ge=0)  # 0: off (DMD2: 1e-3 for SD1.5, 5e-3 for SDXL)
    discriminator_weight: float = Field(1e-2, ge=0)
    max_timestep: int = Field(T, ge=1, le=T)  # real and fake are noised at t ~ U[0, max_timestep)


class DistillOptim(OptimSection):
    lr: float = Field(1e-6, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    eps: float = 1e-8
    warmup_steps: int = Field(0, ge=0)
    grad_clip: float = Field(10.0, ge=0)


class DistillValidation(Section):
    every: int = Field(0, ge=0)  # steps; 0: only at the end
    prompts: list[str] = Field(default_factory=list)
    seed: int = 0
    columns: int = Field(2, ge=1)  # seeds per prompt
    steps: int = Field(20, ge=1)  # the teacher's sampler, drawn once beside the student's one step
    cfg: float = 4.5
    sampler: Literal["dpm-solver++", "ddim", "ddpm"] = "dpm-solver++"
    size: tuple[int, int] | None = None  # latent (h, w); None: the model's input_size square


class DistillConfig(ConfigFile):
    stage: str = "dmd"
    teacher: TeacherSection
    student: StudentSection = Field(default_factory=StudentSection)
    dm: DMSection = Field(default_factory=DMSection)
    fake: FakeSection = Field(default_factory=FakeSection)
    regression: RegressionSection = Field(default_factory=RegressionSection)
    gan: GanSection = Field(default_factory=GanSection)
    data: DataSection
    encoders: EncodersSection = Field(default_factory=EncodersSection)
    optim: DistillOptim = Field(default_factory=DistillOptim)
    train: TrainSection = Field(default_factory=lambda: TrainSection(caption_dropout=0.0))
    ema: EmaSection = Field(default_factory=EmaSection)
    deepspeed: DeepSpeedSection = Field(default_factory=DeepSpeedSection)
    validation: DistillValidation = Field(default_factory=DistillValidation)

    @model_validator(mode="after")
    def _check(self) -> DistillConfig:
        if self.dm.t_min > self.dm.t_max:
            raise ValueError(f"dm.t_min {self.dm.t_min} is above dm.t_max {self.dm.t_max}")
        if self.regression.weight and self.regression.kind == "lpips" and not self.regression.lpips_weights:
            raise ValueError("regression.lpips_weights: needed for kind lpips (a safetensors of LPIPS(VGG)'s "
                             "weights; nothing is downloaded)")
        if not (self.dm.weight or self.regression.weight or self.gan.generator_weight):
            raise ValueError("dm.weight, regression.weight and gan.generator_weight are all 0: nothing trains "
                             "the generator")
        if self.deepspeed.precision != "fp32" and self.deepspeed.zero_stage == 0:
            raise ValueError(f"deepspeed.precision {self.deepspeed.precision} needs zero_stage >= 1")
        if self.optim.grad_accum != 1:
            raise ValueError("optim.grad_accum: distillation updates on one batch at a time; raise data.batch_size")
        return self
