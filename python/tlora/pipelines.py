"""Model families: how to load a diffusers pipeline (hub id or local folder, one code path) and
how its denoiser is trained: prompt conditioning, noising and the regression target."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import check_int
from .errors import ConfigError, InputError, MissingFileError, about
from .options import DTYPES as DTYPE_NAMES
from .options import MAX_SIDE, SIDE_STRIDE

SUPPORTED = {
    "StableDiffusionPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl",
    "FluxPipeline": "flux",
}
# Components each supported pipeline cannot do without: a folder whose model_index.json names the
# class but lacks them is another model mislabelled (e.g. an SD 1.x folder called SD-XL).
REQUIRED_COMPONENTS = {
    "StableDiffusionPipeline": ("unet", "vae", "text_encoder", "tokenizer", "scheduler"),
    "StableDiffusionXLPipeline": (
        "unet",
        "vae",
        "text_encoder",
        "tokenizer",
        "text_encoder_2",
        "tokenizer_2",
        "scheduler",
    ),
    "FluxPipeline": ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler"),
}
DTYPES = {name: getattr(torch, dtype) for name, dtype in DTYPE_NAMES.items()}


def resolve_device(name: str | None = None) -> torch.device:
    """The device to run on: "auto" / None (CUDA when available, else the CPU), "cpu", "cuda" or
    "cuda:N" (the kernels' devices, `layer.ops.KERNEL_DEVICES`); one that is not there is refused
    with what is available (an InputError about the setting `device`)."""
    name = "auto" if name is None else str(name).strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise InputError(f"device {name!r} is unknown: use auto, cpu, cuda or cuda:N", field="device") from None
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise InputError(
                f"device {name!r} is not available: this machine has no CUDA GPU that torch can use (use cpu)",
                field="device",
            )
        if dev.index is not None and dev.index >= count:
            raise InputError(
                f"device {name!r} is not available: this machine has {count} CUDA GPU(s), cuda:0..cuda:{count - 1}",
                field="device",
            )
        return dev
    raise InputError(
        f"device {name!r} is not supported: tlora's kernels run on the CPU and CUDA (use auto, cpu, cuda or cuda:N)",
        field="device",
    )


def check_dtype(dtype: str, device: torch.device, field: str = "dtype") -> torch.dtype:
    """The torch dtype for "fp32" / "fp16" / "bf16" ("no" = fp32) on `device`: float16 runs on GPUs
    only (the CPU has no float16 matrix kernels for every layer a pipeline uses). `field`: the
    setting `dtype` came from ("dtype", or training's "mixed_precision")."""
    key = "fp32" if dtype == "no" else dtype
    if key not in DTYPES:
        raise InputError(f"{field} must be one of {', '.join(DTYPES)}, got {dtype!r}", field=field)
    if key == "fp16" and device.type == "cpu":
        raise InputError(
            f"{field} {dtype} needs a CUDA GPU (tlora does not run float16 on the CPU): use bf16 or "
            f"{'no' if field == 'mixed_precision' else 'fp32'} with device cpu",
            field=(field, "device"),
        )
    return DTYPES[key]


def check_side(field: str, value: int) -> int:
    """An image side (setting `field`): an integer in SIDE_STRIDE..MAX_SIDE, a multiple of
    SIDE_STRIDE; a ConfigError about `field` otherwise."""
    with about(field):
        check_int(field, value, SIDE_STRIDE, MAX_SIDE)
    if value % SIDE_STRIDE:
        raise ConfigError(
            f"{field} must be a multiple of {SIDE_STRIDE} (the autoencoder's stride), got {value}", field=field
        )
    return int(value)


def check_model_folder(path: str) -> None:
    """For a local diffusers folder, name any component that model_index.json lists but the
    folder lacks (diffusers' own error for this is hard to read)."""
    root = Path(path)
    if not root.exists():
        if path.startswith((".", "/", "~")) or path.count("/") != 1:
            raise MissingFileError(
                f"model folder {path} does not exist (and it is not a hub id like 'org/name')", field="model"
            )
        return  # a hub id: diffusers resolves it
    if not root.is_dir():
        raise InputError(
            f"model {root} is not a folder: give a diffusers model folder (with model_index.json) or a hub id",
            field="model",
        )
    index = root / "model_index.json"
    if not index.is_file():
        raise InputError(f"{root} is not a diffusers model folder: it has no model_index.json (as a regular file)")
    try:
        spec = json.loads(index.read_text())
    except (UnicodeDecodeError, RecursionError, json.JSONDecodeError) as e:
        raise InputError(f"{index} is not valid JSON ({type(e).__name__}: {e})") from None
    if not isinstance(spec, dict):
        raise InputError(f"{index} must be a JSON object with _class_name and components, got a {type(spec).__name__}")
    cls = spec.get("_class_name")
    if not isinstance(cls, str):
        raise InputError(f"{index}: _class_name must be a pipeline class name (a string), got {cls!r}")
    if cls not in SUPPORTED:
        raise InputError(f"{root} holds a {cls}; tlora trains {', '.join(SUPPORTED)}")
    for name, value in spec.items():
        if name.startswith("_") or not isinstance(value, list):  # other values are pipeline options
            continue
        if len(value) != 2:
            raise InputError(f"{index}: component {name!r} must be [library, class], got {value!r}")
        if value[0] is None:
            continue
        if not (root / name).is_dir():
            raise InputError(
                f"{root} is missing component {name!r} (model_index.json lists it as {value[1]}): "
                f"copy the {name}/ folder from the original model"
            )
    missing = [c for c in REQUIRED_COMPONENTS[cls] if not (isinstance(spec.get(c), list) and spec[c][0] is not None)]
    if missing:
        raise InputError(
            f"{index} says {cls} but lists no {', '.join(missing)}: the folder holds another kind of "
            "model (is _class_name right?)"
        )


def load_pipeline(model: str, dtype: torch.dtype = torch.float32, quantize: str | None = None):
    """Load a supported pipeline from a local folder or a hub id, through `from_pretrained`;
    `quantize` ("int8", "int4", "nf4": see tlora.adapter.quantized) quantizes the denoiser's Linear layers."""
    from diffusers import DiffusionPipeline

    check_model_folder(model)
    kwargs = {}
    if quantize is not None:
        from diffusers import PipelineQuantizationConfig

        from .adapter.quantized import quantization_config

        q = quantization_config(quantize)
        kwargs["quantization_config"] = PipelineQuantizationConfig(quant_mapping={"unet": q, "transformer": q})
    try:
        pipe = DiffusionPipeline.from_pretrained(model, dtype=dtype, **kwargs)
    except (TypeError, ValueError, KeyError, AttributeError, IndexError, RecursionError) as e:
        # A folder whose components do not fit its pipeline class; diffusers' own error is raw.
        raise InputError(
            f"cannot load model {model}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        ) from None
    family_of(pipe)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_denoiser(model: str) -> nn.Module:
    """Only the denoiser (`unet/` or `transformer/`) of a local diffusers folder or hub id, float32."""
    from diffusers import AutoModel

    check_model_folder(model)
    local = Path(model).exists()
    errors = []
    for sub in ("unet", "transformer"):
        if local and not (Path(model) / sub).is_dir():
            continue
        try:
            return AutoModel.from_pretrained(model, subfolder=sub).eval()
        except OSError as e:  # a hub id without this subfolder
            errors.append(str(e).splitlines()[0])
    raise InputError(f"{model} has no unet/ or transformer/ denoiser" + (f" ({errors[-1]})" if errors else ""))


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
    default_steps = 25
    default_guidance = 5.0

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
    default_guidance = 7.5

    @torch.no_grad()
    def encode_prompt(self, prompt, resolution):
        embeds, _ = self.pipe.encode_prompt(prompt, self.pipe.device, 1, False)
        return {"encoder_hidden_states": embeds.float()}


class StableDiffusionXL(Family):
    name = "sdxl"

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
    default_steps = 28
    default_guidance = 3.5

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
