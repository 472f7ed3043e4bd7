"""Ideogram 4 (Ideogram4Pipeline), as train_dreambooth_lora_ideogram4.py trains it: rectified flow
with time reversed (the transformer takes 1 - sigma, 0 = noise, and predicts x0 - noise) on the
Flux2 VAE's posterior mode, cut into 2x2 patches (channels last: (row, column, channel) within a
patch, the inverse of the pipeline's decode), normalised by the VAE's batch-norm statistics and
flattened one token per patch. The transformer sees one packed sequence, the text positions first:
the pipeline's own `encode_prompt` gives the Qwen3-VL layers' features left-padded to
max_sequence_length with the position ids (3-axis), segment ids (block-diagonal attention) and the
per-token role indicator of [padding][text][image]; the image tokens follow zeros in the text
positions, and only the image positions' output is the prediction.

Noise levels: the script's resolution-aware logit-normal density, sigma = sigmoid(mu + 1.5 z) with
mu = log(sqrt(pixels) / 512), drawn as sigma itself (no scheduler grid, no further shift). A logit
mean mu is the shift k = e^mu (sigmoid(mu + x) = k s / (1 + (k - 1) s) for s = sigmoid(x)), so the
default reads "shift by resolution"; --shift gives another k. The script's other densities
(uniform, mode) draw sigma unshifted, and so do they here unless --shift is given.

Only `transformer` is trained (the script's LoRA too); the pipeline's `unconditional_transformer`
(its asymmetric guidance branch, on no text) stays the base model's. Sampling follows the
pipeline's guidance schedule: the guidance scale for all but the last 3 steps, 3.0 for those."""

from __future__ import annotations

import math

import torch

from ...errors import ConfigError
from ...options import SAMPLING_DEFAULTS
from .base import FlowMatching, density_sample

LOGIT_STD = 1.5  # the script's --logit_std (the pipeline's sampling std)
BASE_SIDE = 512  # the resolution whose logit mean is 0 (the pipeline's base_resolution)
MAX_SEQUENCE_LENGTH = 2048  # the script's and the pipeline's text positions
PATCH = 2
# The pipeline's default guidance_schedule: (7.0,) * 45 + (3.0,) * 3, the last steps "polish" steps.
POLISH_STEPS, POLISH_GUIDANCE = 3, 3.0


def guidance_schedule(steps: int, guidance: float) -> list[float]:
    """The pipeline's schedule's shape for `steps`: `guidance`, then POLISH_GUIDANCE for the last
    POLISH_STEPS steps (the pipeline's default at 48 steps, 7.0); `guidance` throughout with fewer steps."""
    if steps <= POLISH_STEPS:
        return [float(guidance)] * steps
    return [float(guidance)] * (steps - POLISH_STEPS) + [POLISH_GUIDANCE] * POLISH_STEPS


class Ideogram4(FlowMatching):
    name = "ideogram4"
    label = "Ideogram4"
    pipelines = ("Ideogram4Pipeline",)
    components = ("transformer", "unconditional_transformer", "vae", "text_encoder", "tokenizer", "scheduler")
    objective = "flow matching, time reversed (target x0 - noise), packed text + image sequence"
    timestep_form = "reversed"
    default_steps, default_guidance = SAMPLING_DEFAULTS["ideogram4"]

    def default_resolution(self):
        return 2048  # the pipeline's default size (the script trains at --resolution 512 unless told)

    def configure_sampling(self, sampling, shift):
        # "auto" needs no use_dynamic_shifting here: the resolution-aware mean is the family's own
        super().configure_sampling(sampling, None if shift == "auto" else shift)
        self.shift = shift

    def _by_resolution(self) -> bool:
        """Whether the shift follows the resolution: --shift auto, or logit_normal's default."""
        return self.shift == "auto" or (self.shift is None and self.sampling == "logit_normal")

    def shift_at(self, resolution):
        if self._by_resolution():
            return (resolution or self.default_resolution()) / BASE_SIDE  # e^mu, mu = 0.5 log(pixels / 512^2)
        return 1.0 if self.shift is None else float(self.shift)

    def sampling_description(self):
        std = f" (std {LOGIT_STD:g})" if self.sampling == "logit_normal" else ""
        shift = f"by resolution (side / {BASE_SIDE})" if self._by_resolution() else f"{self.shift_at(None):g}"
        return f"{self.sampling}{std}, shift {shift}"

    def sample_timesteps(self, gen, n=1, resolution=None):
        k = self.shift_at(resolution)
        if self.sampling == "logit_normal":
            sigma = torch.sigmoid(math.log(k) + LOGIT_STD * torch.randn(n, generator=gen))
        else:
            u = density_sample(self.sampling, n, gen)
            sigma = k * u / (1 + (k - 1) * u)
        return sigma * self.num_train_timesteps

    def _bn(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        vae = self.pipe.vae
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(like.device, torch.float32)
        std = torch.sqrt(vae.bn.running_var.float() + vae.config.batch_norm_eps).view(1, -1, 1, 1).to(like.device)
        return mean, std

    @torch.no_grad()
    def encode_image(self, pixels):
        """The VAE's mode as (B, 4C, h, w) patches: channel (row * 2 + column) * C + c, normalised."""
        vae = self.pipe.vae
        mode = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mode().float()
        b, c, H, W = mode.shape
        patches = mode.view(b, c, H // PATCH, PATCH, W // PATCH, PATCH).permute(0, 3, 5, 1, 2, 4)
        patches = patches.reshape(b, PATCH * PATCH * c, H // PATCH, W // PATCH)
        m, s = self._bn(patches)
        latents = (patches - m) / s
        return latents, torch.zeros_like(latents)

    @torch.no_grad()
    def encode_prompt(self, prompt, resolution):
        grid = resolution // (int(self.pipe.vae_scale_factor) * PATCH)
        embeds, position_ids, segment_ids, indicator = self.pipe.encode_prompt(
            prompt, grid_h=grid, grid_w=grid, max_sequence_length=MAX_SEQUENCE_LENGTH, device=self.pipe.device
        )
        # The image positions' features are zeros: kept as the text positions' only, padded back in predict.
        return {
            "text_features": embeds[:, :MAX_SEQUENCE_LENGTH].float(),
            "position_ids": position_ids,
            "segment_ids": segment_ids,
            "indicator": indicator,
        }

    def layout(self, latents):
        return latents.flatten(2).transpose(1, 2)  # (B, 4C, h, w) -> (B, h * w, 4C), row-major as the ids

    def velocity(self, latents, noise):
        return latents - noise

    def predict(self, model, noised, cond):
        x = noised.model_input
        b, n, c = x.shape
        text = cond["text_features"].to(x.dtype)
        ids = {k: cond[k] for k in ("position_ids", "segment_ids", "indicator")}
        if text.shape[0] != b:
            text = text.expand(b, -1, -1)
            ids = {k: v.expand(b, *v.shape[1:]) for k, v in ids.items()}
        length = text.shape[1]
        hidden = torch.cat([x.new_zeros(b, length, c), x], dim=1)
        features = torch.cat([text, text.new_zeros(b, n, text.shape[2])], dim=1)
        out = model(
            hidden_states=hidden, timestep=noised.timestep, encoder_hidden_states=features, return_dict=False, **ids
        )
        return out[0][:, length:]

    def sample(self, pipe, prompt, kwargs):
        call = dict(kwargs)
        if call.pop("negative_prompt", None):
            raise ConfigError(
                "Ideogram4 takes no negative prompt (its unguided branch is a second transformer that sees no "
                "text): leave --negative-prompt out",
                field="negative_prompt",
            )
        guidance = call.pop("guidance_scale")
        call["guidance_schedule"] = guidance_schedule(call["num_inference_steps"], guidance)
        return pipe(prompt=prompt, **call).images
