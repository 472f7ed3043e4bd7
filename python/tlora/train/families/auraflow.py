"""AuraFlow (AuraFlowPipeline): rectified flow on the MMDiT with a UMT5 text encoder; the
transformer takes sigma (0..1). No diffusers DreamBooth script: tlora's default targets (the
attention projections)."""

from __future__ import annotations

import torch

from ...options import SAMPLING_DEFAULTS
from .base import FlowMatching


class AuraFlow(FlowMatching):
    name = "auraflow"
    label = "AuraFlow"
    pipelines = ("AuraFlowPipeline",)
    components = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
    default_steps, default_guidance = SAMPLING_DEFAULTS["auraflow"]

    def default_resolution(self):
        return int(self.denoiser.config.sample_size) * int(self.pipe.vae_scale_factor)

    @torch.no_grad()
    def encode_prompt(self, prompt, resolution):
        embeds, _, _, _ = self.pipe.encode_prompt(
            prompt, do_classifier_free_guidance=False, device=self.pipe.device, max_sequence_length=256
        )
        return {"encoder_hidden_states": embeds.float()}
