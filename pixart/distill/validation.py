"""The distillation's validation grid: per prompt, the teacher's full sampler and the student's one step on
the same seeds, side by side. The teacher's half is drawn once (it is frozen)."""
from __future__ import annotations

from pathlib import Path

import torch

from pixart.train.config import ValidationSection, validated
from pixart.train.validation import Validator, save_grid

from .config import DistillConfig


class DistillValidator:
    def __init__(self, cfg: DistillConfig, model_config, prediction: str, teacher, text_encoder, autoencoder,
                 device: torch.device):
        v = cfg.validation
        common = {"prompts": v.prompts, "seed": v.seed, "size": v.size}
        teacher_v = {**common, "steps": v.steps, "cfg": v.cfg, "sampler": v.sampler}
        student_v = {**common, "one_step": cfg.student.start_timestep}
        make = lambda val: Validator(validated(ValidationSection, val, "distill validation"), prediction,  # noqa: E731
                                     model_config, text_encoder, autoencoder, device, v.columns)
        self.columns, self.rows = v.columns, len(v.prompts)
        self.student = make(student_v)
        teacher_state = {k: t.float().cpu() for k, t in teacher.state_dict().items()}
        self.teacher_images = make(teacher_v).images(teacher_state)

    def grid(self, state: dict, out: Path) -> Path:
        """Rows of [teacher x columns | student x columns], written atomically."""
        student = self.student.images(state)
        c = self.columns
        rows = [torch.cat([self.teacher_images[r * c:(r + 1) * c], student[r * c:(r + 1) * c]])
                for r in range(self.rows)]
        save_grid(torch.cat(rows), 2 * c, out, scale=2)
        return out
