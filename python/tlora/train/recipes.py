"""The training recipe of each model family tlora trains (`Family`): how a denoiser is trained on
one image: prompt conditioning through the pipeline's own encoder, latents through its VAE, the
noising and the regression target, and the denoiser's call; plus its sampling defaults."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import InputError
from ..options import SAMPLING_DEFAULTS

SUPPORTED = {
    "StableDiffusionPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl",
    "FluxPipeline": "flux",
}


def family_of(pipe) -> Family:
    name = type(pipe).__name__
    key = SUPPORTED.get(name)
    if key is None:
        raise InputError(f"{name} is not supported: tlora trains {', '.join(SUPPORTED)}")
    return {"sd": StableDiffusion, "sdxl": StableDiffusionXL, "flux": Flux}[key](pipe)


@dataclass
class Noised:
    model_input: torch.Tensor
    timestep: torch.Tensor  # what the denoiser's `timestep` argument receives
    target: torch.Tensor


class Family:
    """One model family. Subclasses fill in conditioning, noising and the denoiser call."""

    name = ""
    default_steps, default_guidance = SAMPLING_DEFAULTS["sdxl"]

    def __init__(self, pipe):
        self.pipe = pipe

    @property
    def denoiser(self) -> nn.Module:
        return self.pipe.unet

    @property
    def num_train_timesteps(self) -> int:
        return int(self.pipe.scheduler.config.get("num_train_timesteps", 1000))

    def default_resolution(self) -> int:
        return int(self.denoiser.config.sample_size) * int(self.pipe.vae_scale_factor)

    @torch.no_grad()
    def encode_image(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std of the scaled latent distribution of images in [-1, 1] (B, 3, H, W)."""
        vae = self.pipe.vae
        dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        sf = vae.config.scaling_factor
        return ((dist.mean - shift) * sf).float(), (dist.std * sf).float()

    def encode_prompt(self, prompt: str, resolution: int) -> dict[str, Any]:
        raise NotImplementedError

    def noise(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> Noised:
        """t: integer-valued timesteps in [0, T), one per sample."""
        sched = self._ddpm()
        noisy = sched.add_noise(latents, noise, t.long())
        kind = sched.config.prediction_type
        target = noise if kind == "epsilon" else sched.get_velocity(latents, noise, t.long())
        return Noised(noisy, t.long(), target)

    def layout(self, latents: torch.Tensor) -> torch.Tensor:
        """Latent-shaped tensors (B, C, H, W) in the layout of the denoiser's input and target."""
        return latents

    def predict(self, model: nn.Module, noised: Noised, cond: dict[str, Any]) -> torch.Tensor:
        return model(noised.model_input, noised.timestep, return_dict=False, **cond)[0]

    def _ddpm(self):
        if not hasattr(self, "_train_sched"):
            from diffusers import DDPMScheduler

            self._train_sched = DDPMScheduler.from_config(self.pipe.scheduler.config)
        return self._train_sched


class StableDiffusion(Family):
    name = "sd"
    default_steps, default_guidance = SAMPLING_DEFAULTS["sd"]

    @torch.no_grad()
    def encode_prompt(self, prompt, resolution):
        embeds, _ = self.pipe.encode_prompt(prompt, self.pipe.device, 1, False)
        return {"encoder_hidden_states": embeds.float()}


class StableDiffusionXL(Family):
    name = "sdxl"
    default_steps, default_guidance = SAMPLING_DEFAULTS["sdxl"]

    @torch.no_grad()
    def encode_prompt(self, prompt, resolution):
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt, device=self.pipe.device, do_classifier_free_guidance=False
        )
        # original size, crop top-left, target size: the centre-cropped training image.
        time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], dtype=torch.float32)
        return {
            "encoder_hidden_states": embeds.float(),
            "added_cond_kwargs": {"text_embeds": pooled.float(), "time_ids": time_ids.to(embeds.device)},
        }


class Flux(Family):
    name = "flux"
    default_steps, default_guidance = SAMPLING_DEFAULTS["flux"]

    @property
    def denoiser(self):
        return self.pipe.transformer

    def default_resolution(self) -> int:
        return int(self.pipe.default_sample_size) * int(self.pipe.vae_scale_factor)

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

    def noise(self, latents, noise, t):
        # Rectified flow: x_s = (1 - s) x0 + s eps with s = t / T, target eps - x0; the transformer
        # takes s (t / 1000), which the adapter scales back to 0..T for its ranks.
        s = (t.float() / self.num_train_timesteps).view(-1, 1, 1, 1)
        noisy = (1 - s) * latents + s * noise
        return Noised(self.layout(noisy), s.view(-1), self.layout(noise - latents))

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

    @property
    def num_train_timesteps(self) -> int:
        return 1000
