"""Flux2 [dev] (Flux2Pipeline, a Mistral 3 text encoder) and Flux2 [klein] (Flux2KleinPipeline,
Qwen3): rectified flow on the Flux2 VAE's latents patchified 2x2 into channels and normalised by
the VAE's batch-norm statistics, then packed one token per position with 4-axis position ids; the
text encoder's stacked intermediate layers as the prompt. As diffusers' scripts train it, the
image latents are the VAE posterior's mode (no sampling). The transformer takes sigma (0..1);
[dev] embeds the guidance scale."""

from __future__ import annotations

import torch

from ...options import SAMPLING_DEFAULTS
from .base import FlowMatching


class Flux2(FlowMatching):
    name = "flux2"
    label = "Flux2"
    pipelines = ("Flux2Pipeline", "Flux2KleinPipeline")
    components = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
    default_steps, default_guidance = SAMPLING_DEFAULTS["flux2"]

    def _bn(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        vae = self.pipe.vae
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(like.device, torch.float32)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1).float() + vae.config.batch_norm_eps).to(like.device)
        return mean, std

    @torch.no_grad()
    def encode_image(self, pixels):
        vae = self.pipe.vae
        mode = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mode().float()
        patches = self.pipe._patchify_latents(mode)
        m, s = self._bn(patches)
        latents = (patches - m) / s
        return latents, torch.zeros_like(latents)

    @torch.no_grad()
    def encode_prompt(self, prompt, resolution):
        embeds, text_ids = self.pipe.encode_prompt(prompt, device=self.pipe.device, max_sequence_length=512)
        cond = {"encoder_hidden_states": embeds.float(), "txt_ids": text_ids}
        if self.denoiser.config.guidance_embeds:
            cond["guidance"] = torch.tensor([self.default_guidance], device=embeds.device)
        return cond

    def layout(self, latents):
        self._ids = self.pipe._prepare_latent_ids(latents)
        return self.pipe._pack_latents(latents)

    def predict(self, model, noised, cond):
        b = noised.model_input.shape[0]
        cond = dict(cond)
        if "guidance" in cond:
            cond["guidance"] = cond["guidance"].expand(b)
        img_ids = self._ids.to(noised.model_input.device).expand(b, -1, -1)
        return model(
            hidden_states=noised.model_input, timestep=noised.timestep, img_ids=img_ids, return_dict=False, **cond
        )[0]
