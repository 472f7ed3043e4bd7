"""HiDream-I1 (HiDreamImagePipeline): rectified flow on the sparse-MoE DiT (argument `timesteps`,
sigma * 1000; its output is the negated velocity, as the pipeline and diffusers' script negate
it); four text encoders: two CLIPs' pooled embeddings (concatenated), T5's states and every
Llama 3.1 layer's states; the scheduler's static shift (the script sets 3.0)."""

from __future__ import annotations

import torch

from ...options import SAMPLING_DEFAULTS
from .base import FlowMatching


class HiDream(FlowMatching):
    name = "hidream"
    label = "HiDream-I1"
    pipelines = ("HiDreamImagePipeline",)
    components = (
        "transformer",
        "vae",
        "text_encoder",
        "tokenizer",
        "text_encoder_2",
        "tokenizer_2",
        "text_encoder_3",
        "tokenizer_3",
        "text_encoder_4",
        "tokenizer_4",
        "scheduler",
    )
    timestep_form = "timesteps"
    default_steps, default_guidance = SAMPLING_DEFAULTS["hidream"]

    @torch.no_grad()
    def encode_prompt(self, prompt, resolution):
        t5, _, llama, _, pooled, _ = self.pipe.encode_prompt(
            prompt=prompt, device=self.pipe.device, do_classifier_free_guidance=False, max_sequence_length=128
        )
        return {
            "encoder_hidden_states_t5": t5.float(),
            "encoder_hidden_states_llama3": llama.float(),
            "pooled_embeds": pooled.float(),
        }

    def predict(self, model, noised, cond):
        out = model(hidden_states=noised.model_input, timesteps=noised.timestep, return_dict=False, **cond)[0]
        return -out
