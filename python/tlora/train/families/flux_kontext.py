"""FLUX.1 Kontext (FluxKontextPipeline) trained text-to-image, as diffusers'
train_dreambooth_lora_flux_kontext.py trains without condition images: FLUX.1's recipe, its
script's targets (FLUX.1's and the single blocks' proj_mlp). Sampling keeps the asked size (the
pipeline would rescale it to max_area)."""

from __future__ import annotations

from ...options import SAMPLING_DEFAULTS
from .flux import Flux


class FluxKontext(Flux):
    name = "flux_kontext"
    label = "FLUX.1 Kontext"
    pipelines = ("FluxKontextPipeline",)
    default_steps, default_guidance = SAMPLING_DEFAULTS["flux_kontext"]

    def sample(self, pipe, prompt, kwargs):
        call = dict(kwargs)
        if "height" in call and "width" in call:
            call["max_area"] = call["height"] * call["width"]
        return super().sample(pipe, prompt, call)
