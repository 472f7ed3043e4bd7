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

The library names settings as its API does (`steps`, `lr`, `clip`), never by command-line flag.
A `ConfigError`, `InputError` or `MissingFileError` about settings carries their names in `fields`
(`field`: the first, the one at fault), each named in the message by that name, first where it
means the setting; `tlora`'s command line shows those names as the flags the user typed.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator


class TloraError(ValueError):
    """Base class of tlora's errors."""


class _SettingError(TloraError):
    """An error about settings: `field` names the one at fault, or a tuple names it first and
    the others the message mentions."""

    def __init__(self, message: str = "", field: str | tuple[str, ...] | None = None):
        super().__init__(message)
        self.fields: tuple[str, ...] = (field,) if isinstance(field, str) else tuple(field or ())
        self.field = self.fields[0] if self.fields else None


class ConfigError(_SettingError):
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


class MissingFileError(_SettingError, FileNotFoundError):
    """An input file or folder that does not exist."""

    def __init__(self, message: str, field: str | tuple[str, ...] | None = None):
        _SettingError.__init__(self, message, field)

    def __str__(self) -> str:
        return str(self.args[0])


@contextlib.contextmanager
def about(*fields: str) -> Iterator[None]:
    """A ConfigError, InputError or MissingFileError raised inside that names no settings is
    about `fields` (e.g. `config.check_int(name, ...)`'s, which names the setting by `name`)."""
    try:
        yield
    except _SettingError as e:
        if not e.fields:
            e.fields, e.field = fields, fields[0]
        raise


class ModelMismatchError(TloraError):
    """An adapter that does not fit the model it is loaded into (or a model that already has one,
    or has none to remove)."""


class CheckpointError(TloraError):
    """A checkpoint or output folder that cannot be used as asked."""


class TrainingError(TloraError):
    """Training stopped because it cannot go on meaningfully (a non-finite loss)."""


class InputError(_SettingError):
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
