"""Stable Diffusion 3 / 3.5 (StableDiffusion3Pipeline): rectified flow on the MMDiT, three text
encoders (two CLIP, pooled and per token, and T5), the scheduler's static shift (3.0).

As train_dreambooth_lora_sd3.py trains by default (--precondition_outputs 1): the prediction is
preconditioned, x0_hat = x_s - s * v_hat, and regressed on the clean latents, which is the
velocity loss weighted by s^2; noise levels logit-normal."""

from __future__ import annotations

import torch

from ...options import SAMPLING_DEFAULTS
from .base import FlowMatching, Noised


class StableDiffusion3(FlowMatching):
    name = "sd3"
    label = "SD3/3.5"
    pipelines = ("StableDiffusion3Pipeline",)
    components = (
        "transformer",
        "vae",
        "text_encoder",
        "tokenizer",
        "text_encoder_2",
        "tokenizer_2",
        "scheduler",
    )
    objective = "flow matching, preconditioned (x0 target, weight sigma^2)"
    timestep_form = "timesteps"
    default_steps, default_guidance = SAMPLING_DEFAULTS["sd3"]

    @torch.no_grad()
    def encode_prompt(self, prompt, resolution):
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt, None, None, device=self.pipe.device, do_classifier_free_guidance=False, max_sequence_length=77
        )
        return {"encoder_hidden_states": embeds.float(), "pooled_projections": pooled.float()}

    def noise(self, latents, noise, t):
        noised = super().noise(latents, noise, t)
        return Noised(noised.model_input, noised.timestep, latents)

    def predict(self, model, noised, cond):
        velocity = super().predict(model, noised, cond)
        s = (noised.timestep / self.num_train_timesteps).view(-1, *([1] * (velocity.dim() - 1)))
        return noised.model_input - s.to(velocity.dtype) * velocity
