"""The interface every family's recipe implements (`Family`), and the two objectives the recipes
share: DDPM noising (epsilon or v targets, `Family` itself) and rectified flow (`FlowMatching`).

A recipe says how a denoiser is trained on one image: the prompt through the pipeline's own
`encode_prompt` (once), the image through its VAE (scaling, shift, packing), the noise level a
step trains at (`sample_timesteps`: the family's diffusers DreamBooth script's default sampling,
or `--timestep-sampling` / `--shift`), the noising and the regression target, and the
denoiser's call. Noise levels are on the training scale t in [0, T] (T = num_train_timesteps):
the scale T-LoRA's rank schedule r(t) is defined on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...errors import ConfigError
from ...options import FAMILY_SAMPLINGS, FAMILY_TARGETS, MODE_SCALE, SAMPLING_DEFAULTS, TIMESTEP_SAMPLINGS


@dataclass
class Noised:
    model_input: torch.Tensor
    timestep: torch.Tensor  # what the denoiser's timestep argument receives
    target: torch.Tensor


def density_sample(sampling: str, n: int, gen: torch.Generator) -> torch.Tensor:
    """u in [0, 1), n draws of `sampling` (the SD3 paper's densities, under the names diffusers'
    training scripts give them): uniform; logit_normal and sigmoid, sigmoid of a standard normal;
    mode, the mode-heavy density with scale MODE_SCALE."""
    if sampling in ("logit_normal", "sigmoid"):
        return torch.sigmoid(torch.randn(n, generator=gen))
    u = torch.rand(n, generator=gen)
    if sampling == "mode":
        return 1 - u - MODE_SCALE * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    return u


class Family:
    """One model family; this base is the DDPM/DDIM objective of UNet families (epsilon or v
    prediction, from the scheduler's config). Subclasses name their pipeline classes, components
    and defaults, and fill in conditioning, noising and the denoiser call."""

    name = ""
    label = ""  # what the README and --help call the family
    pipelines: tuple[str, ...] = ()  # diffusers pipeline classes this recipe trains
    components: tuple[str, ...] = ()  # what such a folder cannot do without
    # Components whose presence the recipe cannot train (-> why, and what to train instead): a
    # folder listing one is refused from its model_index.json, before anything loads.
    refused_components: dict[str, str] = {}
    denoiser_name = "unet"
    objective = "DDPM (epsilon / v, the scheduler's prediction_type)"
    default_steps, default_guidance = SAMPLING_DEFAULTS["sdxl"]

    def __init__(self, pipe):
        self.pipe = pipe
        self.sampling = self.default_sampling
        self.shift: float | str | None = None

    # ---- the defaults of its diffusers DreamBooth LoRA script (options.py: --help shows them) --
    @property
    def default_sampling(self) -> str:
        return FAMILY_SAMPLINGS.get(self.name, "uniform")

    @property
    def default_targets(self) -> tuple[str, ...] | None:
        """None: tlora's DEFAULT_TARGETS (the attention projections)."""
        return FAMILY_TARGETS.get(self.name)

    # ---- what the loop reads -------------------------------------------------------------------
    @property
    def denoiser(self) -> nn.Module:
        return getattr(self.pipe, self.denoiser_name)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.pipe.scheduler.config.get("num_train_timesteps", 1000))

    def default_resolution(self) -> int:
        return int(self.denoiser.config.sample_size) * int(self.pipe.vae_scale_factor)

    def configure_sampling(self, sampling: str | None, shift: float | str | None) -> None:
        """Choose the timestep density (None: the family's default) and, for flow matching, the
        shift (None: the family's default); a ConfigError names what does not apply."""
        if sampling is not None and sampling not in TIMESTEP_SAMPLINGS:
            raise ConfigError(
                f"timestep_sampling must be one of {', '.join(TIMESTEP_SAMPLINGS)}, got {sampling!r}",
                field="timestep_sampling",
            )
        if shift is not None:
            raise ConfigError(
                f"shift applies to flow-matching families; {self.label} trains on the DDPM schedule: leave it out",
                field="shift",
            )
        self.sampling = sampling or self.default_sampling

    def sample_timesteps(self, gen: torch.Generator, n: int = 1, resolution: int | None = None) -> torch.Tensor:
        """n noise levels t in [0, T) (float32, CPU), drawn from `gen`: integers on the DDPM schedule."""
        T = self.num_train_timesteps
        if self.sampling == "uniform":
            return torch.randint(0, T, (n,), generator=gen).float()
        return (density_sample(self.sampling, n, gen) * T).long().clamp(0, T - 1).float()

    def sampling_description(self) -> str:
        return self.sampling

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
        """t: noise levels in [0, T), one per sample (integer-valued for DDPM families)."""
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

    def sample(self, pipe, prompt: str, kwargs: dict[str, Any]) -> list:
        """The stock pipeline's images for `prompt` under `kwargs` (steps, guidance_scale,
        num_images_per_prompt, generator, height / width) and the family's `sample_kwargs`."""
        call = {**kwargs, **self.sample_kwargs(kwargs.get("guidance_scale"))}
        return pipe(prompt=prompt, **call).images  # (by name: some pipelines take an image first)

    def sample_kwargs(self, guidance: float) -> dict[str, Any]:
        """Arguments of the stock pipeline's call for sampling beyond steps, guidance_scale, size
        and seed (none for most families); they replace those of the same name."""
        return {}

    def _ddpm(self):
        if not hasattr(self, "_train_sched"):
            from diffusers import DDPMScheduler

            self._train_sched = DDPMScheduler.from_config(self.pipe.scheduler.config)
        return self._train_sched


class FlowMatching(Family):
    """Rectified flow: x_s = (1 - s) x0 + s eps at sigma s = t / T, target eps - x0 (the velocity);
    s drawn as diffusers' scripts draw it: u from the density, the scheduler's training grid
    sigma = 1 - floor(u T) / T, then the shift s -> k s / (1 + (k - 1) s)."""

    denoiser_name = "transformer"
    objective = "flow matching (target noise - x0)"
    # Which argument values the denoiser takes: "sigma" (0..1), "timesteps" (sigma * T) or
    # "reversed" (1 - sigma: 0 = noise).
    timestep_form = "sigma"

    def default_resolution(self) -> int:
        return int(self.pipe.default_sample_size) * int(self.pipe.vae_scale_factor)

    @property
    def num_train_timesteps(self) -> int:
        return 1000

    def _scheduler_config(self) -> dict:
        return dict(self.pipe.scheduler.config)

    def default_shift(self) -> float:
        """The shift diffusers' script trains with: its scheduler's static shift; none (1.0) when
        the scheduler shifts by resolution at sampling only (use_dynamic_shifting)."""
        cfg = self._scheduler_config()
        if cfg.get("use_dynamic_shifting"):
            return 1.0
        return float(cfg.get("shift", 1.0))

    def configure_sampling(self, sampling, shift):
        if sampling is not None and sampling not in TIMESTEP_SAMPLINGS:
            raise ConfigError(
                f"timestep_sampling must be one of {', '.join(TIMESTEP_SAMPLINGS)}, got {sampling!r}",
                field="timestep_sampling",
            )
        if shift == "auto" and not self._scheduler_config().get("use_dynamic_shifting"):
            raise ConfigError(
                f"shift auto (by resolution) needs a scheduler with use_dynamic_shifting; {self.label}'s has "
                "none: give a number",
                field="shift",
            )
        self.sampling = sampling or self.default_sampling
        self.shift = shift

    def shift_at(self, resolution: int | None) -> float:
        """The shift in use: --shift, or "auto" (the pipeline's resolution-dependent mu: shift
        exp(mu) for the image's token count), or the family's default."""
        if self.shift is None:
            return self.default_shift()
        if self.shift != "auto":
            return float(self.shift)
        cfg = self._scheduler_config()
        side = (resolution or self.default_resolution()) // int(self.pipe.vae_scale_factor)
        tokens = (side // 2) ** 2
        lo, hi = cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096)
        b, m = cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15)
        mu = b + (m - b) * (tokens - lo) / (hi - lo)
        return math.exp(mu)

    def sampling_description(self) -> str:
        return f"{self.sampling}, shift {self.shift if self.shift is not None else self.default_shift():g}"

    def sample_timesteps(self, gen, n=1, resolution=None):
        T = self.num_train_timesteps
        u = density_sample(self.sampling, n, gen)
        sigma = 1.0 - (u * T).long().clamp(0, T - 1).float() / T
        k = self.shift_at(resolution)
        sigma = k * sigma / (1 + (k - 1) * sigma)
        return sigma * T

    def noise(self, latents, noise, t):
        s = (t.float() / self.num_train_timesteps).view(-1, *([1] * (latents.dim() - 1))).to(latents.dtype)
        noisy = (1 - s) * latents + s * noise
        arg = s.view(-1)
        if self.timestep_form == "timesteps":
            arg = arg * self.num_train_timesteps
        elif self.timestep_form == "reversed":
            arg = 1 - arg
        return Noised(self.layout(noisy), arg, self.layout(self.velocity(latents, noise)))

    def velocity(self, latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return noise - latents

    def predict(self, model, noised, cond):
        return model(hidden_states=noised.model_input, timestep=noised.timestep, return_dict=False, **cond)[0]
