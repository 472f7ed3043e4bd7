"""tlora: T-LoRA (timestep-dependent low-rank adaptation) for diffusers models.

import tlora
adapter = tlora.inject(pipe.unet, rank=64)   # ranks follow each forward's timestep
tlora.save(pipe.unet, "concept.safetensors")
tlora.load(other_unet, "concept.safetensors")
adapter.remove()
"""

# torch must be imported before the native module: wrapping a tensor needs torch's Python types.
import torch  # noqa: F401

from . import _native as _native  # noqa: E402  (loaded here, after torch)
from .adapter import Adapter, adapter_of, inject, rank_schedule, remove  # noqa: E402
from .config import AdapterConfig  # noqa: E402
from .errors import (  # noqa: E402
    AdapterFileError,
    CheckpointError,
    ConfigError,
    InputError,
    MissingFileError,
    ModelMismatchError,
    TloraError,
    TrainingError,
)
from .io import load, read, save  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "Adapter",
    "AdapterConfig",
    "adapter_of",
    "inject",
    "load",
    "rank_schedule",
    "read",
    "remove",
    "save",
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
