"""Wan 2.1 / 2.2 text-to-video (WanPipeline), trained on the image as a one-frame clip: rectified
flow on the Wan VAE's latents (B, C, 1, h, w), normalised by its per-channel latents_mean /
latents_std; UMT5 prompt states; the transformer takes sigma * 1000. Sampling renders one frame.
A two-expert pipeline (Wan 2.2 A14B: transformer_2 for the low-noise steps) is refused, from its
model_index.json before anything loads: one adapter would train only the high-noise expert. No
diffusers DreamBooth script: tlora's default
targets (the attention projections); the scheduler's flow_shift as the shift."""

from __future__ import annotations

import torch

from ...errors import InputError
from ...options import SAMPLING_DEFAULTS
from .base import FlowMatching

# Why a Wan 2.2 A14B is refused, and what to train instead.
TWO_EXPERTS = (
    "its WanPipeline has two experts (Wan 2.2 A14B: transformer for the high-noise steps, transformer_2 for "
    "those below boundary_ratio x 1000), and tlora trains one denoiser: the adapter would train the high-noise "
    "expert only and the low-noise steps would sample without it; train a single-transformer Wan (2.1, or "
    "2.2 TI2V-5B) instead"
)


class Wan(FlowMatching):
    name = "wan"
    label = "Wan (one frame)"
    pipelines = ("WanPipeline",)
    components = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
    timestep_form = "timesteps"
    default_steps, default_guidance = SAMPLING_DEFAULTS["wan"]
    refused_components = {"transformer_2": TWO_EXPERTS}

    def __init__(self, pipe):
        if getattr(pipe, "transformer_2", None) is not None:
            raise InputError(f"this pipeline: {TWO_EXPERTS}")
        super().__init__(pipe)

    def default_resolution(self):
        return 480  # the pipeline's default height (its width is 832)

    def default_shift(self):
        cfg = self._scheduler_config()
        if "flow_shift" in cfg and cfg.get("use_flow_sigmas"):
            return float(cfg["flow_shift"])
        return super().default_shift()

    def _stats(self, like):
        cfg = self.pipe.vae.config
        shape = (1, cfg.z_dim, 1, 1, 1)
        mean = torch.tensor(cfg.latents_mean, dtype=torch.float32).view(shape).to(like.device)
        std = torch.tensor(cfg.latents_std, dtype=torch.float32).view(shape).to(like.device)
        return mean, std

    @torch.no_grad()
    def encode_image(self, pixels):
        vae = self.pipe.vae
        dist = vae.encode(pixels.to(vae.device, vae.dtype)[:, :, None]).latent_dist  # (B, 3, 1, H, W)
        m, s = self._stats(dist.mean)
        return ((dist.mean.float() - m) / s), dist.std.float() / s

    @torch.no_grad()
    def encode_prompt(self, prompt, resolution):
        embeds, _ = self.pipe.encode_prompt(
            prompt, do_classifier_free_guidance=False, device=self.pipe.device, max_sequence_length=226
        )
        return {"encoder_hidden_states": embeds.float()}

    def sample(self, pipe, prompt, kwargs):
        call = dict(kwargs)
        call["num_videos_per_prompt"] = call.pop("num_images_per_prompt", 1)
        out = pipe(prompt=prompt, num_frames=1, output_type="pil", **call)
        return [video[0] for video in out.frames]
