"""Qwen-Image (QwenImagePipeline): rectified flow on 2x2-packed latents of the Qwen-Image VAE (a
video VAE: one frame; latents normalised by its per-channel latents_mean / latents_std), prompt
states of the Qwen2.5-VL text encoder behind the pipeline's chat template, with their mask; the
transformer takes sigma (0..1) and the latent grid (img_shapes). Sampling uses true CFG
(true_cfg_scale, with a blank negative prompt), as Qwen-Image is not guidance-distilled."""

from __future__ import annotations

import torch

from ...options import SAMPLING_DEFAULTS
from .base import FlowMatching


class QwenImage(FlowMatching):
    name = "qwenimage"
    label = "Qwen-Image"
    pipelines = ("QwenImagePipeline",)
    components = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
    default_steps, default_guidance = SAMPLING_DEFAULTS["qwenimage"]

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.pipe.vae.config
        shape = (1, cfg.z_dim, 1, 1)
        mean = torch.tensor(cfg.latents_mean, dtype=torch.float32).view(shape).to(like.device)
        std = torch.tensor(cfg.latents_std, dtype=torch.float32).view(shape).to(like.device)
        return mean, std

    @torch.no_grad()
    def encode_image(self, pixels):
        vae = self.pipe.vae
        dist = vae.encode(pixels.to(vae.device, vae.dtype)[:, :, None]).latent_dist  # one frame
        mean, std = dist.mean[:, :, 0].float(), dist.std[:, :, 0].float()
        m, s = self._stats(mean)
        return (mean - m) / s, std / s

    @torch.no_grad()
    def encode_prompt(self, prompt, resolution):
        embeds, mask = self.pipe.encode_prompt(prompt, device=self.pipe.device, max_sequence_length=512)
        return {"encoder_hidden_states": embeds.float(), "encoder_hidden_states_mask": mask}

    def layout(self, latents):
        b, c, h, w = latents.shape
        self._grid = (h // 2, w // 2)
        return self.pipe._pack_latents(latents, b, c, h, w)

    def predict(self, model, noised, cond):
        b = noised.model_input.shape[0]
        img_shapes = [[(1, *self._grid)]] * b
        return model(
            hidden_states=noised.model_input,
            timestep=noised.timestep,
            img_shapes=img_shapes,
            return_dict=False,
            **cond,
        )[0]

    def sample_kwargs(self, guidance):
        return {"guidance_scale": None, "true_cfg_scale": guidance, "negative_prompt": " "}
