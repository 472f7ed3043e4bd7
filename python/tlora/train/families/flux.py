"""FLUX.1 (FluxPipeline): rectified flow on the packed 2x2 latent patches, CLIP pooled + T5
embeddings, the guidance embedding of the distilled models; the transformer takes sigma (0..1)."""

from __future__ import annotations

import torch

from ...options import SAMPLING_DEFAULTS
from .base import FlowMatching


class Flux(FlowMatching):
    name = "flux"
    label = "FLUX"
    pipelines = ("FluxPipeline",)
    components = ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler")
    default_steps, default_guidance = SAMPLING_DEFAULTS["flux"]

    @torch.no_grad()
    def encode_prompt(self, prompt, resolution):
        embeds, pooled, text_ids = self.pipe.encode_prompt(
            prompt, prompt_2=None, device=self.pipe.device, max_sequence_length=self._max_seq()
        )
        cond = {"encoder_hidden_states": embeds.float(), "pooled_projections": pooled.float(), "txt_ids": text_ids}
        if self.denoiser.config.guidance_embeds:
            cond["guidance"] = torch.tensor([self.default_guidance], device=embeds.device)
        return cond

    def _max_seq(self) -> int:
        return min(512, int(getattr(self.pipe.tokenizer_2, "model_max_length", 512)))

    def layout(self, latents):
        b, c, h, w = latents.shape
        return self.pipe._pack_latents(latents, b, c, h, w)

    def predict(self, model, noised, cond):
        b, n, _ = noised.model_input.shape
        side = int(round(n**0.5))
        img_ids = self.pipe._prepare_latent_image_ids(
            b, side, side, noised.model_input.device, noised.model_input.dtype
        )
        cond = dict(cond)
        if "guidance" in cond:
            cond["guidance"] = cond["guidance"].expand(b)
        return model(noised.model_input, timestep=noised.timestep, img_ids=img_ids, return_dict=False, **cond)[0]
