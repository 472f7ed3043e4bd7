"""Stable Diffusion 1.x / 2.x (StableDiffusionPipeline): DDPM epsilon / v on the UNet, one CLIP
text encoder; diffusers' train_dreambooth_lora.py adapts the attention projections."""

from __future__ import annotations

import torch

from ...options import SAMPLING_DEFAULTS
from .base import Family


class StableDiffusion(Family):
    name = "sd"
    label = "SD 1.x/2.x"
    pipelines = ("StableDiffusionPipeline",)
    components = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
    default_steps, default_guidance = SAMPLING_DEFAULTS["sd"]

    @torch.no_grad()
    def encode_prompt(self, prompt, resolution):
        embeds, _ = self.pipe.encode_prompt(prompt, self.pipe.device, 1, False)
        return {"encoder_hidden_states": embeds.float()}
