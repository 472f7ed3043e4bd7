"""tlora: T-LoRA (timestep-dependent low-rank adaptation) for diffusers models.

import tlora
adapter = tlora.inject(pipe.unet, rank=64)   # ranks follow each forward's timestep
tlora.save(pipe.unet, "concept.safetensors")
tlora.load(other_unet, "concept.safetensors")
adapter.remove()

In a training script of your own (diffusers' DreamBooth LoRA scripts, README "Using tlora in your
own training script"):
tlora.register_accelerate_hooks(accelerator, tlora.inject(unet, lora_config))  # a peft.LoraConfig
tlora.save_pretrained(unet, out_dir)   # tlora's file + the static LoRA pipe.load_lora_weights reads
tlora.export(unet, "lora.safetensors", format="kohya")   # a static LoRA at one rank
"""

# The exports load lazily (PEP 562): `import tlora` and `tlora --help` import no torch; the first
# use of `tlora.inject` (or any name below, or a submodule as `tlora.files.io`) imports what it needs.

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING

from .errors import (
    AdapterFileError,
    CheckpointError,
    ConfigError,
    InputError,
    MissingFileError,
    ModelMismatchError,
    TloraError,
    TrainingError,
)

if TYPE_CHECKING:
    from .adapter.inject import Adapter, adapter_of, inject, rank_schedule, remove
    from .config import AdapterConfig
    from .files.accelerate_hooks import register_accelerate_hooks
    from .files.export import export
    from .files.folder import save_pretrained
    from .files.io import load, read, save

__version__ = "0.1.0"

# Name -> the submodule that defines it.
_LAZY = {
    "Adapter": "adapter.inject",
    "adapter_of": "adapter.inject",
    "inject": "adapter.inject",
    "rank_schedule": "adapter.inject",
    "remove": "adapter.inject",
    "AdapterConfig": "config",
    "export": "files.export",
    "register_accelerate_hooks": "files.accelerate_hooks",
    "save_pretrained": "files.folder",
    "load": "files.io",
    "read": "files.io",
    "save": "files.io",
}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    if name == "_native":
        # The extension links libtorch_python: `import torch` must run before it is imported.
        # Modules import it as `from . import _native`, which asks this function first.
        import torch  # noqa: F401
    if not name.startswith("__") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f".{name}", __name__)  # a submodule: `tlora.files.io`, `tlora.testing.tiny`
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = [
    "Adapter",
    "AdapterConfig",
    "adapter_of",
    "export",
    "inject",
    "load",
    "rank_schedule",
    "read",
    "register_accelerate_hooks",
    "remove",
    "save",
    "save_pretrained",
    "AdapterFileError",
    "CheckpointError",
    "ConfigError",
    "InputError",
    "MissingFileError",
    "ModelMismatchError",
    "TloraError",
    "TrainingError",
    "__version__",
]
