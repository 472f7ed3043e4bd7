"""Lumina-Image 2.0 (Lumina2Pipeline): flow matching with time reversed, 0 = noise: the
transformer takes 1 - sigma and predicts x0 - noise (the pipeline negates it); a Gemma 2 text
encoder (penultimate states and their mask, behind the pipeline's system prompt); AutoencoderKL
with shift and scale."""

from __future__ import annotations

import torch

from ...options import SAMPLING_DEFAULTS
from .base import FlowMatching


class Lumina2(FlowMatching):
    name = "lumina2"
    label = "Lumina2"
    pipelines = ("Lumina2Pipeline",)
    components = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
    objective = "flow matching, time reversed (target x0 - noise)"
    timestep_form = "reversed"
    default_steps, default_guidance = SAMPLING_DEFAULTS["lumina2"]

    @torch.no_grad()
    def encode_prompt(self, prompt, resolution):
        embeds, mask, _, _ = self.pipe.encode_prompt(
            prompt, do_classifier_free_guidance=False, device=self.pipe.device, max_sequence_length=256
        )
        return {"encoder_hidden_states": embeds.float(), "encoder_attention_mask": mask}

    def velocity(self, latents, noise):
        return latents - noise
