"""Z-Image (ZImagePipeline): flow matching with time reversed (the transformer takes 1 - sigma as
its argument `t`, and its output is the negated velocity, as the pipeline and diffusers' script
negate it); latents one frame per sample, passed as a list, and so are the prompts: the Qwen3
encoder's penultimate states of the chat-templated prompt, its padding dropped; AutoencoderKL
with shift and scale."""

from __future__ import annotations

import torch

from ...options import SAMPLING_DEFAULTS
from .base import FlowMatching


class ZImage(FlowMatching):
    name = "zimage"
    label = "Z-Image"
    pipelines = ("ZImagePipeline",)
    components = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
    timestep_form = "reversed"
    default_steps, default_guidance = SAMPLING_DEFAULTS["zimage"]

    def default_resolution(self):
        return 1024  # the pipeline's default size (it has no default_sample_size)

    @torch.no_grad()
    def encode_prompt(self, prompt, resolution):
        embeds, _ = self.pipe.encode_prompt(
            prompt, device=self.pipe.device, do_classifier_free_guidance=False, max_sequence_length=512
        )
        return {"prompt_embeds": [e.float() for e in embeds]}

    def predict(self, model, noised, cond):
        frames = list(noised.model_input.unsqueeze(2).unbind(0))  # (C, 1, H, W) each
        b = len(frames)
        embeds = cond["prompt_embeds"] * b if len(cond["prompt_embeds"]) == 1 else cond["prompt_embeds"]
        out = model(frames, noised.timestep, embeds, return_dict=False)[0]
        return -torch.stack(out, dim=0).squeeze(2)
