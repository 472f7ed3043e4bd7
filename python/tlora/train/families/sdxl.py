"""SD-XL (StableDiffusionXLPipeline): DDPM on the UNet with two CLIP text encoders, the pooled
embedding and the size / crop micro-conditioning."""

from __future__ import annotations

import torch

from ...options import SAMPLING_DEFAULTS
from .base import Family


class StableDiffusionXL(Family):
    name = "sdxl"
    label = "SD-XL"
    pipelines = ("StableDiffusionXLPipeline",)
    components = ("unet", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler")
    default_steps, default_guidance = SAMPLING_DEFAULTS["sdxl"]

    @torch.no_grad()
    def encode_prompt(self, prompt, resolution):
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt, device=self.pipe.device, do_classifier_free_guidance=False
        )
        # original size, crop top-left, target size: the centre-cropped training image.
        time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], dtype=torch.float32)
        return {
            "encoder_hidden_states": embeds.float(),
            "added_cond_kwargs": {"text_embeds": pooled.float(), "time_ids": time_ids.to(embeds.device)},
        }
