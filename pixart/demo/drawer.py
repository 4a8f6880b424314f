"""Images from the demo's exported pipelines, through diffusers' own PixArtAlphaPipeline."""
from __future__ import annotations

from pathlib import Path

import torch

from .pipeline import FINAL_SIDE, MAX_TOKENS, pixel_autoencoder


class Drawer:
    """One exported pipeline (VAE-less: latents decoded by the pixel autoencoder), its sampling settings, and
    the model's null caption as the unconditional branch when it guides (the official sampler's)."""

    def __init__(self, export_dir: Path, steps: int, cfg: float, timesteps: list[int] | None = None):
        from diffusers import PixArtAlphaPipeline

        from pixart.export.diffusers import load_null_caption

        self.pipe = PixArtAlphaPipeline.from_pretrained(export_dir, vae=None)
        self.pipe.set_progress_bar_config(disable=True)
        self.null = load_null_caption(export_dir)
        self.steps, self.cfg, self.timesteps = steps, cfg, timesteps
        self.decoder = pixel_autoencoder()
        self.latent = FINAL_SIDE // self.decoder.downsample_factor

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        embeds, mask, _, _ = self.pipe.encode_prompt(prompts, do_classifier_free_guidance=False, clean_caption=True,
                                                     max_sequence_length=MAX_TOKENS)
        return embeds, mask

    def denoise(self, embeds: torch.Tensor, mask: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Text features -> latents: the transformer's forwards and the scheduler's steps."""
        guided = self.cfg > 1
        null = self.null[None].expand(len(embeds), -1, -1) if guided else None
        side = self.latent * self.pipe.vae_scale_factor
        return self.pipe(prompt_embeds=embeds, prompt_attention_mask=mask, negative_prompt=None,
                         negative_prompt_embeds=null,
                         negative_prompt_attention_mask=torch.ones(null.shape[:2]) if guided else None,
                         num_inference_steps=self.steps, timesteps=self.timesteps, guidance_scale=self.cfg,
                         height=side, width=side, use_resolution_binning=False, output_type="latent",
                         generator=generator).images

    def predict(self, x: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The transformer's output at timestep t, without the learned variance when there is one (not sampled)."""
        no_micro = {"resolution": None, "aspect_ratio": None}
        out = self.pipe.transformer(x, encoder_hidden_states=embeds, encoder_attention_mask=mask,
                                    timestep=t.expand(len(x)), added_cond_kwargs=no_micro, return_dict=False)[0]
        return out[:, :x.shape[1]]

    @torch.no_grad()
    def denoise_alone(self, embeds: torch.Tensor, mask: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """`denoise` without the pipeline call's own per-call work: the pipeline's components and its loop (the
        transformer's forwards, classifier-free guidance, the scheduler's steps), for timing the denoiser."""
        sched = self.pipe.scheduler
        guided = self.cfg > 1
        if guided:
            null = self.null[None].expand(len(embeds), -1, -1).to(embeds.dtype)
            embeds, mask = torch.cat([null, embeds]), torch.cat([torch.ones(null.shape[:2]).to(mask), mask])
        if self.timesteps:
            sched.set_timesteps(timesteps=self.timesteps)
        else:
            sched.set_timesteps(self.steps)
        latents = noise * sched.init_noise_sigma
        for t in sched.timesteps:
            out = self.predict(torch.cat([latents, latents]) if guided else latents, t, embeds, mask)
            if guided:
                uncond, cond = out.chunk(2)
                out = uncond + self.cfg * (cond - uncond)
            step = sched.step(out, t, latents)
            x0 = getattr(step, "pred_original_sample", None)  # DDPM's; DPM-Solver's one step ends at x0 itself
            latents = x0 if len(sched.timesteps) == 1 and x0 is not None else step.prev_sample
        return latents

    def images(self, prompts: list[str], seed: int, batch: int = 16) -> list:
        """Prompt -> image, end to end: T5, the denoising, the decoder."""
        from pixart.train.validation import to_pil

        generator, out = torch.Generator().manual_seed(seed), []
        for lo in range(0, len(prompts), batch):
            latents = self.denoise(*self.encode(prompts[lo:lo + batch]), generator)
            out += to_pil(self.decoder.decode(latents.float()))
        return out
