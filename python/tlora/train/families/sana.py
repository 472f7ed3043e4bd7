"""Sana (SanaPipeline): rectified flow on the linear-attention DiT, a Gemma 2 text encoder (the
per-token states and their attention mask), the deep-compression autoencoder (DC-AE: latents
without a distribution, scaled). The transformer takes sigma * 1000 * config.timestep_scale, as
the pipeline passes it."""

from __future__ import annotations

import torch

from ...options import SAMPLING_DEFAULTS
from .base import FlowMatching, Noised


class Sana(FlowMatching):
    name = "sana"
    label = "Sana"
    pipelines = ("SanaPipeline",)
    components = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
    timestep_form = "timesteps"
    default_steps, default_guidance = SAMPLING_DEFAULTS["sana"]

    def default_resolution(self):
        return int(self.denoiser.config.sample_size) * int(self.pipe.vae_scale_factor)

    @torch.no_grad()
    def encode_image(self, pixels):
        vae = self.pipe.vae
        latents = vae.encode(pixels.to(vae.device, vae.dtype)).latent * vae.config.scaling_factor
        return latents.float(), torch.zeros_like(latents, dtype=torch.float32)

    @torch.no_grad()
    def encode_prompt(self, prompt, resolution):
        # train_dreambooth_lora_sana.py encodes without the "complex human instruction" (its
        # --complex_human_instruction is None by default), and samples so: see sample_kwargs.
        embeds, mask, _, _ = self.pipe.encode_prompt(
            prompt,
            do_classifier_free_guidance=False,
            device=self.pipe.device,
            max_sequence_length=300,
            complex_human_instruction=None,
        )
        return {"encoder_hidden_states": embeds.float(), "encoder_attention_mask": mask}

    def noise(self, latents, noise, t):
        noised = super().noise(latents, noise, t)
        scale = float(getattr(self.denoiser.config, "timestep_scale", 1.0) or 1.0)
        return Noised(noised.model_input, noised.timestep * scale, noised.target)

    def sample_kwargs(self, guidance):
        # No resolution binning: images come at the size asked (binning renders at the nearest
        # of its trained aspect ratios and resizes back).
        return {"complex_human_instruction": None, "use_resolution_binning": False}
