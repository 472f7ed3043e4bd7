"""An output folder that diffusers' loaders and tlora both read: `save_pretrained` writes the
adapter as tlora's file (FOLDER_FILE, every factor: r(t) kept) and, beside it, the static LoRA
that `pipe.load_lora_weights(folder)` finds (pytorch_lora_weights.safetensors, the adapter baked
at full rank: r(t) lost). `tlora.load(model, folder)` reads tlora's file back.

Why the two never mix: diffusers' loader, given a folder, takes the file whose name ends in
pytorch_lora_weights.safetensors whenever there is one; and tlora's keys (`<module>.p`, `.lam`,
`.down`, ...) hold no "lora", so a loader handed tlora's file alone refuses it as no LoRA
checkpoint rather than loading part of it.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..adapter.inject import Adapter
from ..errors import ConfigError
from .export import export
from .io import FOLDER_FILE, read_raw, save

STATIC_FILE = "pytorch_lora_weights.safetensors"  # the name diffusers' loaders look for first


def save_pretrained(
    model_or_adapter: nn.Module | Adapter, folder: str | os.PathLike, extra: dict[str, Any] | None = None
) -> dict[str, torch.Tensor]:
    """Write the adapter into `folder` (created if missing): tlora's file FOLDER_FILE and the
    static diffusers LoRA STATIC_FILE beside it (with a warning that it loses r(t)). Returns the
    static LoRA's layers, `<module>.lora_A.weight` / `.lora_B.weight` -> tensor: what diffusers'
    `save_lora_weights(unet_lora_layers=..., transformer_lora_layers=...)` takes, for scripts that
    write STATIC_FILE themselves together with a text encoder's LoRA."""
    if not isinstance(folder, (str, os.PathLike)):
        raise ConfigError(f"save_pretrained writes into a folder (a str or os.PathLike), got {type(folder).__name__}")
    folder = Path(folder)
    if folder.suffix == ".safetensors":
        raise ConfigError(
            f"save_pretrained writes a folder, got the file name {folder.name!r}: use tlora.save for one file"
        )
    folder.mkdir(parents=True, exist_ok=True)
    save(model_or_adapter, folder / FOLDER_FILE, extra=extra)
    result = export(model_or_adapter, folder / STATIC_FILE, format="diffusers")
    warnings.warn(
        f"{folder / STATIC_FILE} is a static LoRA for pipe.load_lora_weights: {result.note}; "
        f"tlora.load(pipe.{'unet' if 'UNet' in _model_class(model_or_adapter) else 'transformer'}, "
        f"{str(folder)!r}) keeps them",
        UserWarning,
        stacklevel=2,
    )
    tensors, _ = read_raw(result.path)
    return {key.split(".", 1)[1]: t for key, t in tensors}


def _model_class(model_or_adapter: nn.Module | Adapter) -> str:
    model = model_or_adapter.model if isinstance(model_or_adapter, Adapter) else model_or_adapter
    return type(model).__name__
