"""Sampling loops over diffusers' schedulers, so training, sampling and exported pipelines share one schedule."""
from __future__ import annotations

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from torch import Tensor
from tqdm.auto import tqdm

from pixart.errors import PixArtError

from .guidance import classifier_free_guidance
from .schedule import NoiseSchedule

SAMPLERS = ("dpm-solver++", "ddim", "ddpm")


def make_scheduler(name: str, schedule: NoiseSchedule, prediction_type: str = "epsilon", *,
                   learn_sigma: bool = False):
    """Build a diffusers scheduler for `schedule`. Choices that differ from diffusers' defaults:
    clip_sample=False (latents are not confined to [-1, 1]); DDPM uses "linspace" spacing, which is exactly
    IDDPM's respacing (first step t=T-1, last step t=0, where no noise is added)."""
    cfg = schedule.to_diffusers_config() | dict(prediction_type=prediction_type)
    if name == "dpm-solver++":  # defaults: "linspace" from t=T-1, a first-order last step to sigma=0
        return DPMSolverMultistepScheduler(**cfg, algorithm_type="dpmsolver++", solver_order=2)
    if name == "ddim":  # default "leading": the only spacing its prev = t - T // steps always matches
        return DDIMScheduler(**cfg, clip_sample=False)
    if name == "ddpm":
        return DDPMScheduler(**cfg, clip_sample=False, timestep_spacing="linspace",
                             variance_type="learned_range" if learn_sigma else "fixed_small")
    raise PixArtError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")


@torch.no_grad()
def sample(model, noise: Tensor, y: Tensor, mask: Tensor | None, null_y: Tensor, *, sampler: str = "dpm-solver++",
           steps: int = 20, cfg_scale: float = 4.5, schedule: NoiseSchedule, data_info: dict[str, Tensor] | None = None,
           prediction_type: str = "epsilon", progress: bool = False,
           generator: torch.Generator | None = None) -> Tensor:
    """Denoise `noise` (B, C, H, W) into latents. DDPM uses a learned variance when the model outputs 2C channels;
    the ODE samplers only get the first C (diffusers' DPM-Solver would slice a hard-coded 3 channels)."""
    C = noise.shape[1]
    sched = make_scheduler(sampler, schedule, prediction_type)
    sched.set_timesteps(steps, device=noise.device)
    x = noise * sched.init_noise_sigma
    for i, t in enumerate(tqdm(sched.timesteps, disable=not progress)):
        out = classifier_free_guidance(model, x, t.expand(x.shape[0]), y, mask, null_y, cfg_scale, data_info,
                                       keep_rest=sampler == "ddpm")
        if i == 0 and out.shape[1] == 2 * C and sampler == "ddpm":  # learned sigma: only now do we know
            sched = make_scheduler(sampler, schedule, prediction_type, learn_sigma=True)
            sched.set_timesteps(steps, device=noise.device)
        if sampler == "ddpm":
            x = sched.step(out, t, x, generator=generator).prev_sample
        else:
            x = sched.step(out[:, :C], t, x).prev_sample
    return x


@torch.no_grad()
def sample_one_step(model, noise: Tensor, y: Tensor, mask: Tensor | None, *, timestep: int, schedule: NoiseSchedule,
                    prediction_type: str = "epsilon", data_info: dict[str, Tensor] | None = None) -> Tensor:
    """A one-step (distilled) student's latents: pure noise labelled `timestep`, one forward, its x_0. This is what
    diffusers' PixArtAlphaPipeline returns for num_inference_steps=1 (the scheduler's pred_original_sample)."""
    t = torch.full((noise.shape[0],), timestep, device=noise.device, dtype=torch.long)
    mask = torch.ones(y.shape[:2], device=y.device, dtype=torch.long) if mask is None else mask
    out = model(noise, t, y, mask=mask, data_info=data_info)
    return schedule.predict_x0(noise, t, out[:, :noise.shape[1]].float(), prediction_type)
