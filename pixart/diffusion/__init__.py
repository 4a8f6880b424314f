"""Diffusion process: IDDPM schedule, learned-sigma loss, classifier-free guidance, diffusers-backed samplers."""
from .guidance import classifier_free_guidance
from .loss import LossTerms, diffusion_loss
from .sampler import SAMPLERS, make_scheduler, sample, sample_one_step
from .schedule import NoiseSchedule

__all__ = ["NoiseSchedule", "LossTerms", "diffusion_loss", "classifier_free_guidance", "SAMPLERS",
           "make_scheduler", "sample", "sample_one_step"]
