"""Chroma (ChromaPipeline): FLUX.1's recipe (rectified flow on packed 2x2 latent patches, image
and text position ids) with one T5 encoder and no pooled or guidance input; the prompt's
attention mask is extended over the image tokens, as the pipeline does. diffusers ships no Chroma
DreamBooth script: the default targets are FLUX.1's script's."""

from __future__ import annotations

import torch

from ...options import SAMPLING_DEFAULTS
from .flux import Flux


class Chroma(Flux):
    name = "chroma"
    label = "Chroma"
    pipelines = ("ChromaPipeline",)
    components = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
    default_steps, default_guidance = SAMPLING_DEFAULTS["chroma"]

    @torch.no_grad()
    def encode_prompt(self, prompt, resolution):
        embeds, text_ids, mask, *_ = self.pipe.encode_prompt(
            prompt, device=self.pipe.device, do_classifier_free_guidance=False, max_sequence_length=self._max_seq()
        )
        return {"encoder_hidden_states": embeds.float(), "txt_ids": text_ids, "prompt_mask": mask}

    def _max_seq(self) -> int:
        return min(512, int(getattr(self.pipe.tokenizer, "model_max_length", 512)))

    def predict(self, model, noised, cond):
        cond = dict(cond)
        mask = cond.pop("prompt_mask")
        b, n, _ = noised.model_input.shape
        cond["attention_mask"] = self.pipe._prepare_attention_mask(b, n, noised.model_input.dtype, mask)
        return super().predict(model, noised, cond)
