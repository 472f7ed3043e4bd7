"""The package's exception types. Every error tlora raises for bad input is one of these.

All subclass `ValueError` (so `except ValueError` keeps working) through `TloraError`:

- `ConfigError`: a setting or argument out of range or of the wrong type (`inject` arguments,
  `target_modules` that match nothing or do not compile, a file's `config`, command-line options,
  a timestep or rank given to an adapter, a timestep convention: unknown, unregistered, or a
  function returning something other than one noise level per timestep).
- `AdapterFileError`: a file that cannot be read as an adapter (not safetensors, malformed
  metadata, wrong tensors, a checksum mismatch, not a regular file). Its message names the file
  and the field or module; `path` and `field` hold them.
- `MissingFileError`: an input that does not exist; also a `FileNotFoundError`.
- `ModelMismatchError`: a well-formed adapter that does not fit the model it is loaded into, or a
  model whose adapter state does not allow the call (injecting into a model that has an adapter,
  removing one that is not there).
- `CheckpointError`: a training checkpoint or output folder that cannot be used as asked.
- `TrainingError`: training stopped (a non-finite loss or factors).
- `InputError`: other bad command-line input (images, model folders, devices).
"""

from __future__ import annotations

import os


class TloraError(ValueError):
    """Base class of tlora's errors."""


class ConfigError(TloraError):
    """A setting or argument that is out of range or of the wrong type."""


class AdapterFileError(TloraError):
    """A file that cannot be read as a (tlora, reference-code or LyCORIS) adapter."""

    def __init__(self, path: str | os.PathLike | None, message: str, field: str | None = None):
        self.path = None if path is None else os.fspath(path)
        self.field = field
        # A message that already starts with the path (as the Rust reader's do) is kept as it is.
        where = f"{self.path}: " if self.path is not None and not message.startswith(self.path) else ""
        what = f"{field}: " if field else ""
        super().__init__(f"{where}{what}{message}")


class MissingFileError(TloraError, FileNotFoundError):
    """An input file or folder that does not exist."""

    def __init__(self, message: str):
        TloraError.__init__(self, message)

    def __str__(self) -> str:
        return str(self.args[0])


class ModelMismatchError(TloraError):
    """An adapter that does not fit the model it is loaded into (or a model that already has one,
    or has none to remove)."""


class CheckpointError(TloraError):
    """A checkpoint or output folder that cannot be used as asked."""


class TrainingError(TloraError):
    """Training stopped because it cannot go on meaningfully (a non-finite loss)."""


class InputError(TloraError):
    """Other bad input: images, model folders, devices, non-regular files."""


__all__ = [
    "AdapterFileError",
    "CheckpointError",
    "ConfigError",
    "InputError",
    "MissingFileError",
    "ModelMismatchError",
    "TloraError",
    "TrainingError",
]
