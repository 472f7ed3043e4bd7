"""Loading a diffusers pipeline (hub id or local folder, one code path) of a family tlora trains
(train/families/), its denoiser alone, and the checks of devices, dtypes and image sides."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .config import check_int
from .errors import ConfigError, InputError, MissingFileError, about
from .options import DTYPES as DTYPE_NAMES
from .options import MAX_SIDE, SIDE_STRIDE
from .train.families import REFUSED_COMPONENTS, REQUIRED_COMPONENTS, SUPPORTED, family_of

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


def check_model_folder(path: str) -> dict | None:
    """For a local diffusers folder, name any component that model_index.json lists but the
    folder lacks (diffusers' own error for this is hard to read); returns its model_index.json
    (None for a hub id)."""
    root = Path(path)
    if not root.exists():
        if path.startswith((".", "/", "~")) or path.count("/") != 1:
            raise MissingFileError(
                f"model folder {path} does not exist (and it is not a hub id like 'org/name')", field="model"
            )
        return None  # a hub id: diffusers resolves it
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
        if not all(v is None or isinstance(v, str) for v in value):
            continue  # a list-valued option (Krea 2's text_encoder_select_layers), not [library, class]
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
    return spec


def not_cached(model: str) -> InputError:
    """The error for a hub id that cannot be loaded: offline (HF_HUB_OFFLINE=1, or no network)
    with the model not in the local Hugging Face cache, or an id that does not exist. diffusers'
    own message for this points at a stack trace the CLI does not show."""
    return InputError(
        f"model {model} is not a local folder and not in the local Hugging Face cache, and it could not be "
        f"fetched: the machine is offline (or HF_HUB_OFFLINE=1) or {model} is not a hub id; download it "
        "once with network access or give a local diffusers folder",
        field="model",
    )


def _in_cache(model: str) -> bool:
    """Whether the local Hugging Face cache holds a snapshot of hub id `model` (no network)."""
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(model, local_files_only=True)
    except (OSError, ValueError):  # LocalEntryNotFoundError is an OSError; a malformed id a ValueError
        return False
    return True


def load_pipeline(
    model: str,
    dtype: torch.dtype = torch.float32,
    quantize: str | None = None,
    revision: str | None = None,
    variant: str | None = None,
    vae: str | None = None,
):
    """Load a supported pipeline from a local folder or a hub id, through `from_pretrained`;
    `quantize` ("int8", "int4", "nf4": see tlora.adapter.quantized) quantizes the denoiser's Linear
    layers; `revision` and `variant` are from_pretrained's (a hub revision; weights NAME.<variant>.safetensors);
    `vae`: another autoencoder's folder or hub id in place of the model's."""
    from diffusers import DiffusionPipeline

    spec = check_model_folder(model)
    for name, why in REFUSED_COMPONENTS[spec["_class_name"]].items() if spec else ():
        if isinstance(spec.get(name), list) and spec[name][0] is not None:  # refused before the weights load
            raise InputError(f"{model}: {why}", field="model")
    kwargs = {k: v for k, v in (("revision", revision), ("variant", variant)) if v is not None}
    if vae is not None:
        kwargs["vae"] = _load_vae(vae, dtype)
    if quantize is not None:
        from diffusers import PipelineQuantizationConfig

        from .adapter.quantized import quantization_config

        q = quantization_config(quantize)
        kwargs["quantization_config"] = PipelineQuantizationConfig(quant_mapping={"unet": q, "transformer": q})
    try:
        pipe = DiffusionPipeline.from_pretrained(model, dtype=dtype, **kwargs)
    except OSError:
        if Path(model).exists():
            raise
        raise not_cached(model) from None
    except (TypeError, ValueError, KeyError, AttributeError, IndexError, RecursionError) as e:
        # A folder whose components do not fit its pipeline class; diffusers' own error is raw.
        raise InputError(
            f"cannot load model {model}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        ) from None
    family_of(pipe)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _load_vae(path: str, dtype: torch.dtype):
    from diffusers import AutoencoderKL

    try:
        return AutoencoderKL.from_pretrained(path, torch_dtype=dtype)
    except OSError:
        if Path(path).exists():
            raise InputError(
                f"pretrained_vae {path} is not an AutoencoderKL folder (config.json and weights)",
                field="pretrained_vae",
            ) from None
        raise not_cached(path) from None
    except (TypeError, ValueError, KeyError) as e:
        raise InputError(
            f"cannot load pretrained_vae {path}: {type(e).__name__}: {e}"[:300], field="pretrained_vae"
        ) from None


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
        except OSError as e:  # a hub id without this subfolder, or one that cannot be fetched
            errors.append(str(e).splitlines()[0])
    if not local and not _in_cache(model):
        raise not_cached(model)
    raise InputError(f"{model} has no unet/ or transformer/ denoiser" + (f" ({errors[-1]})" if errors else ""))
