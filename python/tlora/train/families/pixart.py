"""PixArt-Sigma (PixArtSigmaPipeline): DDPM epsilon on the DiT, a T5 encoder's states with their
mask; the transformer also predicts the variance (learned sigma, twice the channels), of which the
epsilon half is regressed, as the pipeline samples with it. No diffusers DreamBooth script:
tlora's default targets (the attention projections)."""

from __future__ import annotations

import torch

from ...options import SAMPLING_DEFAULTS
from .base import Family


class PixArtSigma(Family):
    name = "pixart"
    label = "PixArt-Sigma"
    pipelines = ("PixArtSigmaPipeline",)
    components = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
    denoiser_name = "transformer"
    default_steps, default_guidance = SAMPLING_DEFAULTS["pixart"]

    @torch.no_grad()
    def encode_prompt(self, prompt, resolution):
        embeds, mask, _, _ = self.pipe.encode_prompt(
            prompt, do_classifier_free_guidance=False, device=self.pipe.device, max_sequence_length=300
        )
        return {
            "encoder_hidden_states": embeds.float(),
            "encoder_attention_mask": mask,
            "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
        }

    def predict(self, model, noised, cond):
        out = model(noised.model_input, timestep=noised.timestep, return_dict=False, **cond)[0]
        channels = noised.model_input.shape[1]
        return out[:, :channels] if out.shape[1] == 2 * channels else out

    def sample_kwargs(self, guidance):
        # images at the size asked; prompts as training encodes them (clean_caption needs bs4 and ftfy)
        return {"use_resolution_binning": False, "clean_caption": False}
