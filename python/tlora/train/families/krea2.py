"""Krea 2 (Krea2Pipeline): rectified flow on the Qwen-Image VAE's one-frame latents (normalised
per channel) packed in 2x2 patches, with (0, h, w) rotary coordinates after the text tokens; the
prompt is the Qwen3-VL encoder's selected layers (text_encoder_select_layers) of the templated,
fixed-length prompt, with its mask; the transformer takes sigma (0..1)."""

from __future__ import annotations

import torch

from ...options import SAMPLING_DEFAULTS
from .qwenimage import QwenImage


class Krea2(QwenImage):
    name = "krea2"
    label = "Krea 2"
    pipelines = ("Krea2Pipeline",)
    default_steps, default_guidance = SAMPLING_DEFAULTS["krea2"]

    def default_resolution(self):
        return 1024

    @torch.no_grad()
    def encode_prompt(self, prompt, resolution):
        embeds, mask = self.pipe.encode_prompt(prompt, device=self.pipe.device, max_sequence_length=512)
        return {"encoder_hidden_states": embeds.float(), "encoder_attention_mask": mask}

    def predict(self, model, noised, cond):
        x = noised.model_input
        text_len = cond["encoder_hidden_states"].shape[1]
        position_ids = self.pipe.prepare_position_ids(text_len, *self._grid, x.device)
        return model(hidden_states=x, timestep=noised.timestep, position_ids=position_ids, return_dict=False, **cond)[0]

    def sample_kwargs(self, guidance):
        return {}
