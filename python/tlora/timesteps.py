"""Timestep conventions: what each diffusers model class is passed as its `timestep` argument,
and how T-LoRA turns that argument into the noise level t in 0..T (T = num_train_timesteps) that
the rank schedule r(t) is defined on.

A convention is a function of the argument (a number, a 0-d or (B,) tensor of any dtype, on any
device) written with tensor ops only (no `.item()`, no host sync: the adapter's hook runs it on
CUDA tensors every forward). It returns float32 on the argument's device, clamped into [0, T] when
within ROUNDING_SLACK of it (further out is left for the rank schedule's range check to refuse).

    from tlora.timesteps import convention_for
    tlora.inject(pipe.unet, timestep_convention=convention_for(pipe))   # EDM schedulers etc.
    tlora.inject(model, timestep_convention=lambda a: 1000 * (1 - a))     # your own mapping
    tlora.timesteps.register("my_model", fn)                             # a named one, storable

Named conventions (`CONVENTIONS`):
- "timesteps": the argument is t itself (DDPM-style 0..999, or flow matching's sigma * T).
- "unit": t / T is passed (FLUX.1, Flux2, AuraFlow, Chroma, QwenImage, ...): t = T * a.
- "reversed_unit": 1 - t / T is passed (Lumina, Lumina2, Ideogram4): t = T * (1 - a).
- "reversed": T - t is passed (Mochi: inverted sigmas): t = T - a.
- "t_minus_1": t - 1 is passed (GLM-Image): t = a + 1.
- "sana": t * transformer.config.timestep_scale is passed: t = a / timestep_scale.
- "scaled_sigma": sigma * model.config.timestep_scale_multiplier is passed (Sana-WM's LTX-2
  refiner): t = T * a / timestep_scale_multiplier.
- "edm": 0.25 * log(sigma) is passed (EDM schedulers on DDPM-trained UNets: Playground v2.5, SVD):
  sigma = exp(4a), then t is read off the DDPM training schedule the UNet came from (scaled_linear
  betas 0.00085..0.012 over T steps, SD/SD-XL's): sigma_i = sqrt((1 - abar_i) / abar_i) and t
  interpolates i linearly in log sigma, exactly as diffusers' `EulerDiscreteScheduler._sigma_to_t`;
  sigmas beyond the table's ends (EDM's 0.002..80 against SD-XL's 0.029..14.6) clamp to t = 0 / T - 1.
- "edm_flow": 0.25 * log(sigma) is passed to a flow-matching-era model (Cosmos 1): t = T * sigma /
  (1 + sigma), the rectified-flow time Cosmos 2 pipelines pass to the same transformer.
- "scale": t = a * timestep_scale (the `timestep_scale` option of `tlora.inject`).
A callable given to `inject` is stored in adapter files as "custom": register it again
(`register("custom", fn)`) before `tlora.load`, or register it under a name before `inject`.

A user function (`timestep_convention=fn`, or `register(name, fn)`) gets the argument as a float64
tensor (float32 on MPS) of the argument's shape on its device, and must return a real (float or
integer) tensor of exactly that shape on that device: one noise level per timestep value. Anything
else (a Python number, None, a 0-d result for a batch, a tensor of another shape, on another
device such as "meta", boolean or complex) raises one `ConfigError` naming the function and what it
returned. A single t for the whole batch is not guessed from a 0-d result: broadcast it yourself
(`lambda a: torch.full_like(a, 500.0)`), so that a function that loses the batch by mistake (a
`.mean()`, a reduction) is caught instead of running every sample at one rank.

Which argument of the denoiser's `forward` is the timestep is read from its signature
(`timestep_parameter`): `timestep`, `timesteps`, or the names some models use (Z-Image `t`,
Stable Cascade `timestep_ratio`, T5FilmDecoder `decoder_noise_time`, Wuerstchen `r`).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .errors import ConfigError

Mapping = Callable[[torch.Tensor], torch.Tensor]

# ---- the conventions ---------------------------------------------------------------------------
# Each takes (argument as a float tensor, T, model) and returns t before clamping.


def _timesteps(a, T, model):
    return a


def _unit(a, T, model):
    return a * T


def _reversed_unit(a, T, model):
    return (1.0 - a) * T


def _reversed(a, T, model):
    return T - a


def _t_minus_1(a, T, model):
    return a + 1.0


def _sana(a, T, model):
    scale = float(getattr(getattr(model, "config", None), "timestep_scale", 1.0) or 1.0)
    return a / scale


def _scaled_sigma(a, T, model):
    multiplier = float(getattr(getattr(model, "config", None), "timestep_scale_multiplier", 1000) or 1000)
    return a * (T / multiplier)


_DDPM_LOG_SIGMAS: dict[tuple[str, int, torch.dtype], torch.Tensor] = {}


def ddpm_log_sigmas(T: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """log sigma_i, i = 0..T-1, of SD/SD-XL's training schedule (scaled_linear betas 0.00085..0.012),
    built on `device` (no host copy) and cached per device."""
    key = (str(device), T, dtype)
    table = _DDPM_LOG_SIGMAS.get(key)
    if table is None:
        betas = torch.linspace(math.sqrt(0.00085), math.sqrt(0.012), T, device=device, dtype=dtype) ** 2
        abar = torch.cumprod(1.0 - betas, dim=0)
        table = 0.5 * torch.log((1.0 - abar) / abar)
        _DDPM_LOG_SIGMAS[key] = table
    return table


def _edm(a, T, model):
    log_sigma = 4.0 * a
    table = ddpm_log_sigmas(T, a.device, a.dtype)  # increasing in i
    hi = torch.searchsorted(table, log_sigma.contiguous()).clamp(1, T - 1)
    lo = hi - 1
    w = ((log_sigma - table[lo]) / (table[hi] - table[lo])).clamp(0.0, 1.0)
    return lo.to(a.dtype) + w


def _edm_flow(a, T, model):
    sigma = torch.exp(4.0 * a)
    return T * sigma / (1.0 + sigma)


CONVENTIONS: dict[str, Callable[[torch.Tensor, int, Any], torch.Tensor]] = {
    "timesteps": _timesteps,
    "unit": _unit,
    "reversed_unit": _reversed_unit,
    "reversed": _reversed,
    "t_minus_1": _t_minus_1,
    "sana": _sana,
    "scaled_sigma": _scaled_sigma,
    "edm": _edm,
    "edm_flow": _edm_flow,
}
# User-registered mappings (argument tensor -> t), by name; "custom" is what files call a callable.
_USER: dict[str, Mapping] = {}


def register(name: str, fn: Mapping) -> None:
    """Make `fn` (argument tensor -> t in 0..T, tensor ops; see the module docstring for what it
    must return) available as `timestep_convention=name`, so adapter files can name it. Register
    "custom" to load a file saved with a bare callable."""
    if not isinstance(name, str) or not name:
        raise ConfigError(f"register(name, fn): name must be a non-empty string, got {name!r}")
    if not callable(fn):
        raise ConfigError(f"register({name!r}, fn): fn must be callable, got {type(fn).__name__}")
    if name in CONVENTIONS or name == "scale":
        raise ConfigError(f"{name!r} is a built-in timestep convention; register yours under another name")
    _USER[name] = fn


def known_names() -> list[str]:
    return [*CONVENTIONS, "scale", *_USER]


# ---- which model class is passed what (diffusers 0.42, read from each pipeline's denoising loop) -

BY_CLASS: dict[str, str] = {
    # UNets and DiTs of DDPM/DDIM schedules: the scheduler's integer-valued t (0..999).
    **dict.fromkeys(
        (
            "UNet2DConditionModel",
            "UNet2DModel",
            "UNet3DConditionModel",
            "UNetMotionModel",
            "I2VGenXLUNet",
            "UNetControlNetXSModel",
            "ControlNetModel",
            "ControlNetUnionModel",
            "SparseControlNetModel",
            "Kandinsky3UNet",
            "PixArtTransformer2DModel",
            "Transformer2DModel",
            "DiTTransformer2DModel",
            "HunyuanDiT2DModel",
            "HunyuanDiT2DControlNetModel",
            "LatteTransformer3DModel",
            "AllegroTransformer3DModel",
            "CogVideoXTransformer3DModel",
            "ConsisIDTransformer3DModel",
            "CogView3PlusTransformer2DModel",
            # pipeline_audioldm2: self.unet(latent_model_input, t, ...)
            "AudioLDM2UNet2DConditionModel",
            # Kandinsky 2.x / unCLIP / Stable unCLIP priors and Shap-E: self.prior(..., timestep=t, ...)
            # (Shap-E's HeunDiscreteScheduler counts 0..1023: inject with num_train_timesteps=1024)
            "PriorTransformer",
        ),
        "timesteps",
    ),
    # Flow matching whose pipelines pass the scheduler's timesteps, sigma * 1000, unchanged.
    **dict.fromkeys(
        (
            "SD3Transformer2DModel",
            "SD3ControlNetModel",
            "CogView4Transformer2DModel",
            "WanTransformer3DModel",
            "WanVACETransformer3DModel",
            "WanAnimateTransformer3DModel",
            "WanAnimate2Transformer3DModel",
            "ChronoEditTransformer3DModel",
            "SkyReelsV2Transformer3DModel",
            "HunyuanVideoTransformer3DModel",
            "HunyuanVideoFramepackTransformer3DModel",
            "HunyuanVideo15Transformer3DModel",
            "HunyuanImageTransformer2DModel",
            "LTXVideoTransformer3DModel",
            "LTX2VideoTransformer3DModel",
            "HiDreamImageTransformer2DModel",
            "EasyAnimateTransformer3DModel",
            "OmniGenTransformer2DModel",
            "BriaTransformer2DModel",
            "BriaFiboTransformer2DModel",
            "ErnieImageTransformer2DModel",
            "DreamLiteTransformer2DModel",
            "DreamLiteUNetModel",
            "Kandinsky5Transformer3DModel",
            "Kandinsky6Transformer3DModel",
            "MotifVideoTransformer3DModel",
            "HeliosTransformer3DModel",
            "SanaVideoTransformer3DModel",
            "JoyImageEditTransformer3DModel",
            "JoyImageEditPlusTransformer3DModel",
            "Kandinsky6SRTransformer3DModel",
            "SanaWMTransformer3DModel",
            "AnyFlowTransformer3DModel",
            "AnyFlowFARTransformer3DModel",
        ),
        "timesteps",
    ),
    # Multi-ControlNet wrappers get their members' timestep.
    **dict.fromkeys(
        (
            "MultiControlNetModel",
            "MultiControlNetUnionModel",
            "SD3MultiControlNetModel",
            "HunyuanDiT2DMultiControlNetModel",
        ),
        "timesteps",
    ),
    **dict.fromkeys(("FluxMultiControlNetModel", "QwenImageMultiControlNetModel"), "unit"),
    # Flow matching on the 0..1 scale: the pipeline divides by 1000.
    **dict.fromkeys(
        (
            "FluxTransformer2DModel",
            "FluxControlNetModel",
            "Flux2Transformer2DModel",
            "Flux3Transformer2DModel",
            "AuraFlowTransformer2DModel",
            "ChromaTransformer2DModel",
            "QwenImageTransformer2DModel",
            "QwenImageControlNetModel",
            "QwenImage21Transformer2DModel",
            "LongCatImageTransformer2DModel",
            "OvisImageTransformer2DModel",
            "BriaFibo2Transformer2DModel",
            "Krea2Transformer2DModel",
            "NucleusMoEImageTransformer2DModel",
            "PRXTransformer2DModel",
            # pipeline_ace_step: its scheduler has num_train_timesteps=1, so `timestep=` is sigma in 0..1
            "AceStepTransformer1DModel",
            # pipeline_stable_audio_3: `t.expand(...)`, documented "(batch,) in [0, 1]" (rectified flow)
            "StableAudio3DiTModel",
            # pipeline_spectrogram_diffusion: noise_time=t / scheduler.config.num_train_timesteps
            "T5FilmDecoder",
        ),
        "unit",
    ),
    # Continuous time in 0..1 (1 = noise): Stable Cascade and Wuerstchen pass the
    # DDPMWuerstchenScheduler's t (or, on another scheduler, the ratio its alphas_cumprod gives).
    **dict.fromkeys(("StableCascadeUNet", "WuerstchenPrior", "WuerstchenDiffNeXt"), "unit"),
    # 0 = noise, 1 = image: the pipeline passes 1 - t / 1000.
    **dict.fromkeys(
        (
            "Lumina2Transformer2DModel",
            "LuminaNextDiT2DModel",
            "Ideogram4Transformer2DModel",
            # pipeline_z_image*: timestep = (1000 - timestep) / 1000, passed as the argument `t`
            "ZImageTransformer2DModel",
            "ZImageControlNetModel",
            # pipeline_longcat_audio_dit: inverted sigmas (FlowMatchEulerDiscreteScheduler(invert_sigmas=True)),
            # timestep = t / num_train_timesteps, so 0 is pure noise
            "LongCatAudioDiTTransformer",
            # minimax_music3 denoise: the scheduler's t, "flow-matching time in [0, 1], 0 = noise"
            "MiniMaxMusic3Transformer1DModel",
        ),
        "reversed_unit",
    ),
    "MochiTransformer3DModel": "reversed",
    "GlmImageTransformer2DModel": "t_minus_1",
    # (a Sana transformer with a guidance embedding is a Sana-Sprint one: "unit", see class_convention)
    "SanaTransformer2DModel": "sana",
    "SanaControlNetModel": "sana",
    # sana_wm/refiner.py: timestep = sigma * transformer_config.timestep_scale_multiplier, per token
    "SanaWMLTX2RefinerTransformer3DModel": "scaled_sigma",
    # An EDM scheduler (EulerDiscrete with timestep_type="continuous") on an SD 2.1-derived UNet.
    "UNetSpatioTemporalConditionModel": "edm",
}

# Classes whose pipelines disagree: the caller must say which (or use convention_for(pipe)).
AMBIGUOUS: dict[str, str] = {
    **{
        name: (
            "Cosmos 1 pipelines (EDMEulerScheduler) pass 0.25*log(sigma): timestep_convention='edm_flow'; "
            "Cosmos 2 / 2.5 pipelines pass the flow time sigma/(1+sigma) or sigma in 0..1: "
            "timestep_convention='unit'"
        )
        for name in ("CosmosTransformer3DModel", "CosmosControlNetModel")
    },
    "UNet1DModel": (
        "Dance Diffusion (IPNDMScheduler) passes the continuous time atan2(beta, alpha)*2/pi in 0..1: "
        "timestep_convention='unit'; value-guided RL planning (DDPMScheduler) passes t in 0..T-1: "
        "timestep_convention='timesteps'"
    ),
    "StableAudioDiTModel": (
        "with CosineDPMSolverMultistepScheduler the pipeline passes atan(sigma)*2/pi in 0..1: "
        "timestep_convention='unit'; with an EDM scheduler it passes 0.25*log(sigma) of a schedule "
        "that has no training steps to read t from: pass your own function"
    ),
}

# diffusers classes with a timestep argument that no convention describes, and why (README lists them).
REFUSED: dict[str, str] = {
    "UniDiffuserModel": (
        "it takes two noise levels per call (timestep_img, timestep_text); one rank per sample cannot follow both"
    ),
    "UTransformer2DModel": "UniDiffuser's inner transformer, called with UniDiffuser's two noise levels",
    "Cosmos3OmniTransformer": (
        "it takes one noise level per modality (vision_timesteps, sound_timesteps, action_timesteps)"
    ),
    "RFD4ProteinaTransformer": (
        "it takes two noise levels per call (bb_ca_time, local_latents_time) from two schedulers"
    ),
    "MiniMaxH3Transformer3DModel": (
        "its `timestep` holds the distinct timesteps of a packed sequence (indexed by timestep_indices), "
        "not one per sample"
    ),
    "TransformerTemporalModel": (
        "a building block that no pipeline calls with a timestep: adapt the denoiser that contains it"
    ),
    "UNetFlatConditionModel": (
        "Versatile Diffusion never calls it: its blocks run inside image_unet (UNet2DConditionModel), adapt that"
    ),
}

EDM_SCHEDULERS = ("EDMEulerScheduler", "EDMDPMSolverMultistepScheduler")
# Schedulers whose timesteps are the continuous time of v-diffusion, atan(sigma) * 2/pi in 0..1.
VTIME_SCHEDULERS = ("IPNDMScheduler", "CosineDPMSolverMultistepScheduler")
# Sana-Sprint: the SCMScheduler's timesteps are TrigFlow angles s in 0..pi/2, and the Sprint
# pipelines (their denoising loops and diffusers' Sana-Sprint training script alike) pass the
# transformer the flow time sin(s) / (cos(s) + sin(s)) in 0..1 instead: t = T * a ("unit").
SPRINT_PIPELINES = ("SanaSprintPipeline", "SanaSprintImg2ImgPipeline")
SPRINT_SCHEDULERS = ("SCMScheduler",)

# Names diffusers denoisers give their timestep argument (first found wins), and classes whose
# argument has a name too generic to look for in any model.
TIMESTEP_ARGS = ("timestep", "timesteps", "t", "timestep_ratio", "decoder_noise_time")
TIMESTEP_ARG_BY_CLASS = {"WuerstchenPrior": "r", "WuerstchenDiffNeXt": "r"}


def _class_names(model_or_class: Any) -> list[str]:
    cls = model_or_class if isinstance(model_or_class, type) else type(model_or_class)
    return [c.__name__ for c in cls.__mro__]


def _is_sana_sprint(model: Any) -> bool:
    """A Sana transformer built with a guidance embedding: only the Sana-Sprint pipelines can drive
    one (SanaPipeline calls it without `guidance`, which that embedding cannot run without)."""
    return bool(getattr(getattr(model, "config", None), "guidance_embeds", False))


def class_convention(model: nn.Module) -> str | None:
    """The registered convention of the model's class (or a base class), None when not known."""
    for name in _class_names(model):
        if name in BY_CLASS:
            if name == "SanaTransformer2DModel" and _is_sana_sprint(model):
                return "unit"
            return BY_CLASS[name]
        if name in AMBIGUOUS:
            return None
    return None


def timestep_parameter(model: Any) -> tuple[str, int | None] | None:
    """(name, position among the positional parameters after `self`, or None) of the timestep
    argument of `model.forward` (a model or a model class), read from its signature; None when it
    has none of the known names."""
    try:
        params = dict(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):  # a builtin or C-implemented forward
        return None
    if isinstance(model, type):  # the unbound function: drop `self`
        params.pop(next(iter(params), None), None)
    own = next((TIMESTEP_ARG_BY_CLASS[n] for n in _class_names(model) if n in TIMESTEP_ARG_BY_CLASS), None)
    name = next((n for n in ((own,) if own else TIMESTEP_ARGS) if n in params), None)
    if name is None:
        return None
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    positional = [n for n, p in params.items() if p.kind in kinds]
    return name, positional.index(name) if name in positional else None


def is_edm(scheduler: Any) -> bool:
    """True when the scheduler's timesteps are 0.25 * log(sigma) (EDM preconditioning). diffusers'
    EulerDiscreteScheduler switches to them only for timestep_type="continuous" together with
    prediction_type="v_prediction" (its set_timesteps); otherwise it keeps the discrete 0..T-1 t."""
    if type(scheduler).__name__ in EDM_SCHEDULERS:
        return True
    config = getattr(scheduler, "config", {}) or {}
    return (
        type(scheduler).__name__ == "EulerDiscreteScheduler"
        and config.get("timestep_type") == "continuous"
        and config.get("prediction_type") == "v_prediction"
    )


def _ambiguous_choice(names: list[str], scheduler: Any) -> str | None:
    """The convention of an AMBIGUOUS class under `scheduler` (None: the scheduler does not say)."""
    kind = type(scheduler).__name__
    if "CosmosTransformer3DModel" in names or "CosmosControlNetModel" in names:
        return "edm_flow" if is_edm(scheduler) else "unit"
    if "UNet1DModel" in names:
        return "unit" if kind in VTIME_SCHEDULERS else "timesteps" if kind == "DDPMScheduler" else None
    if "StableAudioDiTModel" in names:
        return "unit" if kind in VTIME_SCHEDULERS else None
    return None


def convention_for(pipe_or_scheduler: Any, model: nn.Module | None = None) -> str:
    """The convention a pipeline (or a scheduler driving `model`) implies: Sana-Sprint pipelines
    (and the SCMScheduler) pass the flow time ("unit"); EDM schedulers make UNets "edm" and Cosmos
    transformers "edm_flow"; a class whose pipelines disagree is told apart by the scheduler;
    otherwise the denoiser class's own convention."""
    scheduler = getattr(pipe_or_scheduler, "scheduler", pipe_or_scheduler)
    if model is None:
        model = getattr(pipe_or_scheduler, "transformer", None) or getattr(pipe_or_scheduler, "unet", None)
    if model is None:
        raise ConfigError("convention_for(scheduler) needs the denoiser too: convention_for(scheduler, model=unet)")
    if type(pipe_or_scheduler).__name__ in SPRINT_PIPELINES or type(scheduler).__name__ in SPRINT_SCHEDULERS:
        return "unit"
    names = _class_names(model)
    if any(n in AMBIGUOUS for n in names):
        found = _ambiguous_choice(names, scheduler)
        if found is None:
            raise ConfigError(unknown_class_message(model))
        return found
    if is_edm(scheduler):
        return "edm"
    found = class_convention(model)
    if found is None:
        raise ConfigError(unknown_class_message(model))
    return found


def unknown_class_message(model: nn.Module) -> str:
    name = type(model).__name__
    names = _class_names(model)
    why = next((AMBIGUOUS[n] for n in names if n in AMBIGUOUS), None)
    if why is not None:
        return (
            f"{name}: its timestep argument depends on the pipeline ({why}); pass "
            f"tlora.inject(..., timestep_convention=...) or tlora.timesteps.convention_for(pipe)"
        )
    refused = next((REFUSED[n] for n in names if n in REFUSED), None)
    what = (
        f"tlora has no timestep convention for {name} ({refused})"
        if refused
        else f"tlora does not know what {name}'s pipelines pass as `timestep`"
    )
    return (
        f"{what}, so it cannot tell the noise level t that picks the ranks: pass tlora.inject(..., "
        f"timestep_convention=NAME or a function from the argument to t in 0..T), NAME one of "
        f"{', '.join(known_names())}"
    )


def is_diffusers_class(model: nn.Module) -> bool:
    return type(model).__module__.split(".")[0] == "diffusers"


# ---- resolution --------------------------------------------------------------------------------


def resolve_name(model: nn.Module, convention: str | Mapping | None, timestep_scale: float | None) -> str:
    """The name to store for `model`'s convention; raises for a diffusers class nobody registered.
    A plain nn.Module (your own model, called by your own loop) defaults to "timesteps"."""
    if timestep_scale is not None and convention not in (None, "scale"):
        raise ConfigError(
            f"timestep_scale={timestep_scale!r} is the 'scale' convention; it cannot go with "
            f"timestep_convention={getattr(convention, '__name__', convention)!r}: pass one of them"
        )
    if callable(convention):
        return "custom"
    if convention is not None:
        if not isinstance(convention, str) or (convention not in known_names() and convention != "custom"):
            raise ConfigError(
                f"unknown timestep_convention {convention!r}: one of {', '.join(known_names())}, "
                "or a function from the timestep argument to t in 0..T"
            )
        return convention
    if timestep_scale is not None:
        return "scale"
    found = class_convention(model)
    if found is not None:
        return found
    if is_diffusers_class(model) or any(n in AMBIGUOUS for n in _class_names(model)):
        raise ConfigError(unknown_class_message(model))
    return "timesteps"


def mapping(
    name: str,
    model: nn.Module,
    num_train_timesteps: int,
    timestep_scale: float | None = None,
    fn: Mapping | None = None,
) -> Mapping:
    """The function argument -> t (float32, argument's device, clamped into [0, T]) for a stored name;
    `fn` is the callable behind "custom" (or any user name) when the caller has it at hand."""
    T = num_train_timesteps
    if fn is None and name not in CONVENTIONS and name != "scale":
        fn = _USER.get(name)
        if fn is None:
            hint = (
                "a function given to inject, which adapter files cannot hold"
                if name == "custom"
                else "a user-registered one"
            )
            raise ConfigError(
                f"timestep convention {name!r} ({hint}) is not registered in this process: call "
                f"tlora.timesteps.register({name!r}, fn) with the same function first (e.g. before tlora.load)"
            )
    if fn is not None:
        user = fn

        def mapped(a: Any) -> torch.Tensor:
            x = _as_float(a)
            return _into_range(_checked_output(user(x), x, user, name), T)
    else:
        core = CONVENTIONS.get(name)
        scale = float(timestep_scale) if timestep_scale is not None else 1.0

        def mapped(a: Any) -> torch.Tensor:
            x = _as_float(a)
            return _into_range(x * scale if core is None else core(x, T, model), T)

    mapped.convention = name  # type: ignore[attr-defined]
    return mapped


# Rounding (t/1000 in bf16, sigma*1000 in float32) can land a hair outside [0, T]: clamp that.
# A value further out means a wrong convention (or a wrong call): it is left as it is, so the rank
# schedule's range check reports it instead of every step silently running at the end of the range.
ROUNDING_SLACK = 0.5


def _into_range(t: torch.Tensor, T: int) -> torch.Tensor:
    t = t.to(torch.float32)
    near = (t >= -ROUNDING_SLACK) & (t <= T + ROUNDING_SLACK)
    return torch.where(near, t.clamp(0.0, float(T)), t)


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {str(value.dtype).removeprefix('torch.')} tensor of shape {tuple(value.shape)} on {value.device}"
    shown = repr(value)
    return f"{type(value).__name__} {shown if len(shown) <= 40 else shown[:37] + '...'}"


def _checked_output(out: Any, x: torch.Tensor, fn: Any, name: str) -> torch.Tensor:
    """`out` if a user convention returned what the hook can use for argument `x`: a real tensor
    of x's shape on x's device (metadata only: no host sync). Else one ConfigError saying so."""
    ok = (
        isinstance(out, torch.Tensor)
        and not out.is_complex()
        and out.dtype != torch.bool
        and out.shape == x.shape
        and out.device == x.device
    )
    if ok:
        return out
    label = getattr(fn, "__qualname__", None) or type(fn).__name__
    raise ConfigError(
        f"timestep convention {name!r} ({label}) returned {_describe(out)} for the argument, {_describe(x)}: "
        f"it must return a real tensor of shape {tuple(x.shape)} on {x.device}, the noise level t in 0..T of "
        f"each timestep value, computed with tensor ops (e.g. lambda a: 1000 * (1 - a); one t for the whole "
        f"batch: torch.full_like(a, t))"
    )


def _as_float(a: Any) -> torch.Tensor:
    """The argument as float64 (float32 where the device has no float64, e.g. MPS), same device."""
    t = a.detach() if isinstance(a, torch.Tensor) else torch.as_tensor(a)
    wide = torch.float32 if t.device.type == "mps" else torch.float64
    return t.to(wide)


def scale_of(name: str, num_train_timesteps: int, timestep_scale: float | None) -> float | None:
    """The multiplier a convention amounts to, for files' `timestep_scale`; None when it is not one."""
    return {"timesteps": 1.0, "unit": float(num_train_timesteps), "scale": timestep_scale}.get(name)
