"""The adapter file: one .safetensors file, float32 factors under `<module path>.<factor>` keys and
a JSON description under the metadata key "tlora". Only safetensors and JSON are ever read.

Every reader (tlora.load, tlora.read, `tlora info`, `generate --adapter`, `export`, `import`, and
training resumes) goes through `read_adapter` (tlora files) or `read_raw` (any safetensors file):
the file must be a regular file; the metadata must follow the schema below; every tensor must have
the name, shape and dtype the metadata implies, finite values of magnitude <= tlora.layer.factors.MAX_ABS, and the
bytes that the recorded checksum says. Errors are `tlora.errors` types naming the file and the
field or module.

Metadata schema (format version 1), a JSON object:
    format_version  int, == 1
    config          object: the AdapterConfig fields (validated as `inject` validates them)
    scale           number, == lora_alpha / rank (1 without alpha)
    timestep_scale  finite number > 0, or null when the timestep convention is not a multiplier
    base_model      string: the model class the adapter was made for
    modules         non-empty object: module path -> [out_features, in_features] (integers >= 1)
    checksum        "sha256:<hex>" of the description and the tensors (see `adapter_checksum`);
                    files written before it existed load with a warning
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import math
import os
import re
import stat
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import _native
from ..adapter.inject import Adapter, adapter_of, inject_config
from ..adapter.quantized import adaptable_linear, describe
from ..adapter.targets import linear_at
from ..config import AdapterConfig, is_int, rank_limit_error
from ..errors import AdapterFileError, ConfigError, InputError, MissingFileError, ModelMismatchError, TloraError
from ..layer import factors
from ..layer.ops import KERNEL_DEVICES
from .atomic import prepare_target
from .foreign import read_foreign

FORMAT_VERSION = 1
METADATA_KEY = "tlora"
# The adapter's name inside a folder (`tlora.save_pretrained`, accelerate's state folders): beside
# diffusers' pytorch_lora_weights.safetensors, which diffusers' loaders pick over any other file.
FOLDER_FILE = "tlora_adapter.safetensors"
# The settings that make two adapters compute the same function of the same factors: a file loads
# into an existing adapter in place only when these agree.
IN_PLACE_FIELDS = (
    "variant",
    "rank",
    "min_rank",
    "rank_exponent",
    "rank_schedule",
    "rank_boundary",
    "rank_scaling",
    "lora_alpha",
    "num_train_timesteps",
    "timestep_scale",
    "timestep_convention",
)


# ==== writing =====================================================================================


def save(model_or_adapter: nn.Module | Adapter, path: str | os.PathLike, extra: dict[str, Any] | None = None) -> Path:
    """Write the adapter of a model (or an Adapter) to `path`, atomically. `extra` (JSON-able) is
    kept in the metadata, e.g. the concept's token and class. Refuses non-finite factors."""
    adapter = model_or_adapter if isinstance(model_or_adapter, Adapter) else adapter_of(model_or_adapter)
    if adapter is None:
        raise TloraError(f"{type(model_or_adapter).__name__} has no tlora adapter to save: call tlora.inject first")
    path = as_path(path)
    if path.suffix != ".safetensors":
        raise ConfigError(f"adapter files are .safetensors; got {path.name!r}")
    if extra is not None and not isinstance(extra, dict):
        raise ConfigError(f"extra must be a dict (JSON-able), got {type(extra).__name__}")
    c = adapter.config
    tensors = [(k, v.detach().float().cpu().contiguous()) for k, v in adapter.state_dict().items()]
    for k, t in tensors:
        bad = factors.bad_values(t)
        if bad:
            raise TloraError(f"cannot save {path}: adapter factor {k} has {bad} (a diverged training run?)")
    meta = {
        "format_version": FORMAT_VERSION,
        "config": {**c.to_dict(), "extra": {**c.extra, **(extra or {})}},
        "scale": c.scale,
        "timestep_scale": adapter.timestep_scale,
        "base_model": type(adapter.model).__name__,
        "modules": {n: [layer.out_features, layer.in_features] for n, layer in adapter.layers.items()},
    }
    try:
        json.dumps(meta, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"cannot save {path}: the adapter's config or extra is not plain JSON ({e})") from None
    meta["checksum"] = adapter_checksum(tensors, meta)
    return write_tensors(path, tensors, {METADATA_KEY: json.dumps(meta, allow_nan=False)})


def write_tensors(path: str | os.PathLike, items: Iterable[tuple[str, torch.Tensor]], metadata: dict[str, str]) -> Path:
    """The one safetensors writer (adapters, exports, checkpoints): CPU copies of `items` in their
    order and dtype, with string `metadata`, written atomically (into an existing folder)."""
    prepare_target(Path(path))
    _native.save_file(str(path), [(k, v.detach().cpu().contiguous()) for k, v in items], metadata)
    return Path(path)


def adapter_checksum(tensors: Iterable[tuple[str, torch.Tensor]], meta: dict[str, Any]) -> str:
    """sha256 of the description (the metadata without its "checksum", as JSON with sorted keys)
    and of the tensors sorted by name: each one's name, dtype and shape (as JSON), then its bytes
    as stored. Independent of the order in which a writer lays the tensors out or of JSON spacing."""
    h = hashlib.sha256()
    h.update(json.dumps({k: v for k, v in meta.items() if k != "checksum"}, sort_keys=True).encode())
    for name, t in sorted(tensors, key=lambda item: item[0]):
        t = t.detach().cpu().contiguous()
        h.update(json.dumps([name, str(t.dtype).removeprefix("torch."), list(t.shape)]).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return "sha256:" + h.hexdigest()


# ==== reading =====================================================================================


def as_path(path: Any) -> Path:
    """`path` (a str or os.PathLike) as a Path, else a ConfigError."""
    if not isinstance(path, (str, os.PathLike)):
        raise ConfigError(f"an adapter file's path must be a str or os.PathLike, got {type(path).__name__}")
    return Path(path)


def refuse_pickle(path: Path) -> None:
    """Raise (without opening the file) for pickle-based checkpoints, saying how to convert them."""
    if path.suffix in (".pt", ".pth", ".bin", ".ckpt", ".pkl"):
        raise AdapterFileError(
            None,
            f"{path.name} is a pickle-based checkpoint, which tlora never loads (unpickling can run code). "
            "Convert it where you trust it: torch.load(f, weights_only=True), then "
            "safetensors.torch.save_file(state_dict, 'adapter.safetensors')",
        )


def check_regular_file(path: str | os.PathLike, what: str = "adapter file") -> Path:
    """`path` as a Path if it is an existing regular file. A FIFO, device, socket or folder is
    refused before it is opened (reading one could block forever or never end)."""
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise MissingFileError(f"{what} {path} does not exist") from None
    except OSError as e:
        raise AdapterFileError(path, f"cannot read this {what} ({e.strerror})") from None
    if stat.S_ISDIR(st.st_mode):
        raise AdapterFileError(path, f"is a folder, not a regular file: give the {what} itself")
    if not stat.S_ISREG(st.st_mode):
        kind = (
            "a named pipe (FIFO)"
            if stat.S_ISFIFO(st.st_mode)
            else "a character device"
            if stat.S_ISCHR(st.st_mode)
            else "a block device"
            if stat.S_ISBLK(st.st_mode)
            else "a socket"
            if stat.S_ISSOCK(st.st_mode)
            else "not a regular file"
        )
        raise AdapterFileError(path, f"is {kind}, not a regular file: give the {what} itself (a .safetensors file)")
    return path


def read_raw(path: str | os.PathLike) -> tuple[list[tuple[str, torch.Tensor]], dict[str, str]]:
    """Any safetensors file: (tensors in file order, metadata strings), after the pickle and
    regular-file checks. Errors are AdapterFileError (MissingFileError for a missing file)."""
    path = as_path(path)
    refuse_pickle(path)
    check_regular_file(path)
    try:
        tensors, meta = _native.load_file(str(path))
    except FileNotFoundError as e:
        raise MissingFileError(str(e)) from None
    except (ValueError, OSError) as e:
        err = AdapterFileError(None, str(e))
        err.path = os.fspath(path)
        raise err from None
    return tensors, meta


@dataclass
class AdapterHeader:
    """A tlora file's validated metadata."""

    path: Path
    meta: dict[str, Any]
    config: AdapterConfig
    base_model: str
    modules: dict[str, tuple[int, int]]


@dataclass
class AdapterFile(AdapterHeader):
    """A validated tlora file: the header and every factor as a float32 CPU tensor."""

    tensors: dict[str, torch.Tensor]


def read_adapter(
    path: str | os.PathLike,
    before_tensors: Callable[[AdapterHeader], None] | None = None,
    raw: tuple[list[tuple[str, torch.Tensor]], dict[str, str]] | None = None,
) -> AdapterFile:
    """The one validating reader of tlora files. `before_tensors` runs on the validated header
    before the tensors are checked (tlora.load checks the model there, so that a file made for
    another model says so first). `raw`: the file's `read_raw` result, if already read."""
    path = as_path(path)
    tensors, strings = raw if raw is not None else read_raw(path)
    if METADATA_KEY not in strings:
        raise AdapterFileError(
            path, f"has no {METADATA_KEY!r} metadata: it is a safetensors file, but not a tlora adapter"
        )
    header = parse_header(path, strings[METADATA_KEY])
    if before_tensors is not None:
        before_tensors(header)
    checked = _check_tensors(header, tensors)
    return AdapterFile(**vars(header), tensors=checked)


def parse_header(path: Path, text: str) -> AdapterHeader:
    """Validate the "tlora" metadata string against the schema (module docstring)."""

    def fail(field: str | None, message: str):
        raise AdapterFileError(path, message, field=field)

    try:
        meta = json.loads(text, parse_int=_parse_int)
    except json.JSONDecodeError as e:
        fail(None, f"the {METADATA_KEY!r} metadata is not valid JSON ({e})")
    except RecursionError:
        fail(None, f"the {METADATA_KEY!r} metadata is nested too deeply to be an adapter description")
    huge = _find_huge_int(meta)
    if huge is not None:
        where, digits = huge
        fail(where or None, f"holds an integer of {digits} digits, too long to be any setting of an adapter")
    if not isinstance(meta, dict):
        fail(None, f"the {METADATA_KEY!r} metadata must be a JSON object, got {_json_type(meta)}")
    if "format_version" not in meta:
        fail("format_version", "missing: this is not a tlora adapter description")
    version = meta["format_version"]
    if not is_int(version):
        fail("format_version", f"must be an integer, got {version!r}")
    if version != FORMAT_VERSION:
        raise AdapterFileError(
            path,
            f"has adapter format version {version!r}; this tlora reads version {FORMAT_VERSION}: "
            "upgrade tlora (pip install -U tlora) or re-export the adapter",
        )
    for key, kind in (("config", dict), ("modules", dict), ("base_model", str)):
        if key not in meta:
            fail(key, "missing")
        if not isinstance(meta[key], kind):
            fail(key, f"must be a JSON {'object' if kind is dict else 'string'}, got {_json_type(meta[key])}")
    try:
        config = AdapterConfig.from_dict(meta["config"])
    except (ConfigError, TypeError, ValueError, OverflowError) as e:
        fail("config", str(e))
    if "scale" in meta and not _finite_positive(meta["scale"]):
        fail("scale", f"must be a finite number > 0, got {meta['scale']!r}")
    # null: the model's timestep convention is not a plain multiplier (config.timestep_convention says which)
    if meta.get("timestep_scale") is not None and not _finite_positive(meta["timestep_scale"]):
        fail("timestep_scale", f"must be a finite number > 0 or null, got {meta['timestep_scale']!r}")
    if "scale" in meta and not math.isclose(meta["scale"], config.scale, rel_tol=1e-6):
        fail("scale", f"{meta['scale']!r} disagrees with the config (lora_alpha / rank = {config.scale!r})")
    if "checksum" in meta and not (isinstance(meta["checksum"], str) and meta["checksum"].startswith("sha256:")):
        fail("checksum", f"must be a string 'sha256:<hex>', got {meta['checksum']!r}")
    if not meta["modules"]:
        fail("modules", "is empty: the adapter adapts no module")
    modules: dict[str, tuple[int, int]] = {}
    for name, shape in meta["modules"].items():
        if not name:
            fail("modules", "has an empty module name")
        if not (isinstance(shape, list) and len(shape) == 2 and all(is_int(v) and v >= 1 for v in shape)):
            fail(f"modules[{name!r}]", f"must be [out_features, in_features] (two integers >= 1), got {shape!r}")
        out_f, in_f = shape
        too_large = rank_limit_error(config.rank, out_f, in_f, name)
        if too_large:
            fail(f"modules[{name!r}]", too_large)
        modules[name] = (out_f, in_f)
    _check_base_model(path, meta["base_model"], modules)
    return AdapterHeader(path=path, meta=meta, config=config, base_model=meta["base_model"], modules=modules)


class _HugeInt:
    """A JSON integer too long for int() (Python refuses more than sys.get_int_max_str_digits())."""

    def __init__(self, text: str):
        self.digits = len(text.lstrip("-"))


def _parse_int(text: str) -> int | _HugeInt:
    try:
        return int(text)
    except ValueError:
        return _HugeInt(text)


def _find_huge_int(value: Any) -> tuple[str, int] | None:
    """(field path, digits) of the first too-long integer in parsed JSON, None when there is none."""
    stack = [("", value)]
    while stack:
        where, v = stack.pop()
        if isinstance(v, _HugeInt):
            return where, v.digits
        if isinstance(v, dict):
            stack.extend((_field(where, k), x) for k, x in reversed(v.items()))
        elif isinstance(v, list):
            stack.extend((f"{where}[{i}]", x) for i, x in reversed(list(enumerate(v))))
    return None


def _field(where: str, key: str) -> str:
    """The path of `key` in the object at `where`: config.rank, modules['blocks.0.attn.to_q']."""
    if not key.isidentifier():
        return f"{where}[{key!r}]"
    return f"{where}.{key}" if where else key


def _check_base_model(path: Path, base_model: str, modules: dict[str, tuple[int, int]]) -> None:
    """A file whose base_model is a diffusers model class must adapt modules such a model has: the
    first part of every module path is one of the class's submodule names (what `export` and
    `tlora.load` rely on: a FLUX label on UNet modules exports `transformer.down_blocks...` keys
    that no pipeline finds). Other classes (your own models) are not checked."""
    names = _diffusers_submodule_names(base_model)
    if names is None:
        return
    foreign = sorted({name.split(".")[0] for name in modules} - names)
    if foreign:
        example = next(n for n in modules if n.split(".")[0] in foreign)
        raise AdapterFileError(
            path,
            f"{base_model!r} has no submodule {foreign[0]!r}, yet the file adapts {example!r}"
            f"{f' (and {len(foreign) - 1} other top-level names)' if len(foreign) > 1 else ''}: "
            "the file's base_model or its modules are wrong (re-save it from the model it was trained on)",
            field="base_model",
        )


@functools.cache
def _diffusers_submodule_names(class_name: str) -> frozenset[str] | None:
    """Every `self.NAME` a diffusers model class (or a diffusers base class of it) mentions in its
    source: a superset of its top-level submodules, whatever its config (SD-XL's
    add_embedding as well as SD's modules). None when `class_name` is no diffusers model class,
    when diffusers is not installed, or when the class names submodules at run time (setattr)."""
    try:
        import diffusers

        cls = getattr(diffusers, class_name, None)
    except (ImportError, RuntimeError):
        return None
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)) or not cls.__module__.startswith("diffusers.models"):
        return None  # also diffusers' placeholder classes for missing optional packages
    names: set[str] = set()
    for c in cls.__mro__:
        if not c.__module__.startswith("diffusers."):
            continue
        try:
            source = inspect.getsource(c)
        except (OSError, TypeError):
            return None
        if re.search(r"setattr\(\s*self\b|\.add_module\(|\.register_module\(", source):
            return None
        # Every `self.NAME` the source mentions, not only `self.NAME = ...`: a wider superset, so that
        # no assignment form (tuple unpacking, augmented, walrus) can make a real submodule look foreign.
        names.update(re.findall(r"\bself\.(\w+)", source))
    return frozenset(names)


def _check_tensors(header: AdapterHeader, raw: list[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    path, config = header.path, header.config
    tensors = dict(raw)
    keys = factors.names(config.variant)
    checked: dict[str, torch.Tensor] = {}
    for name, (out_f, in_f) in header.modules.items():
        for k in keys:
            key = f"{name}.{k}"
            t = tensors.pop(key, None)
            expected = factors.shape(k, config.rank, out_f, in_f)
            if t is None or tuple(t.shape) != expected:
                got = "missing" if t is None else f"shape {tuple(t.shape)}"
                raise AdapterFileError(path, f"tensor {key} is {got}, expected shape {expected}")
            checked[key] = t
    if tensors:
        raise AdapterFileError(path, f"has tensors that belong to no adapted module: {', '.join(sorted(tensors)[:5])}")
    expected_sum = header.meta.get("checksum")
    if expected_sum is None:
        warnings.warn(
            f"{path} has no checksum (written by an older tlora): its tensors cannot be verified",
            UserWarning,
            stacklevel=3,
        )
    elif adapter_checksum(checked.items(), header.meta) != expected_sum:
        raise AdapterFileError(
            path,
            "the metadata and tensors do not match the file's checksum: the file is "
            "corrupted (or was edited); re-save or re-download it",
            field="checksum",
        )
    return {key: factors.checked(path, key, t) for key, t in checked.items()}


def read(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read and check an adapter file: (float32 tensors, metadata). Raises AdapterFileError (a
    ValueError) naming the file and the problem."""
    f = read_adapter(path)
    return f.tensors, f.meta


def load(
    model: nn.Module,
    path: str | os.PathLike,
    device: torch.device | str | None = None,
    *,
    min_rank: int | None = None,
    rank_exponent: float | None = None,
    num_train_timesteps: int | None = None,
    reconstruct_base: bool = False,
) -> Adapter:
    """Inject the adapter stored at `path` into `model` and load its weights; into the adapter
    `model` already has, in place, when the file's settings and modules are that adapter's.

    `path`: a file, or a folder written by `tlora.save_pretrained` (its tlora_adapter.safetensors).

    A tlora file is read with `read_adapter`. A safetensors file without tlora metadata is read as
    another tool's T-LoRA checkpoint (the reference code's or LyCORIS's: `tlora.files.foreign`), with
    the rank settings `min_rank`, `rank_exponent`, `num_train_timesteps` from these arguments, else
    from its metadata; `reconstruct_base` rebuilds the frozen copies that LyCORIS's save_weights
    leaves out. Factors go to `device` (default: each base layer's device).

    Loading in place keeps every parameter the very object it was (an optimizer built on
    `adapter.parameters()`, or accelerate's prepared model, trains on from the loaded values), on
    its device: resuming a run. It returns the existing Adapter.

    Every name and shape is checked before the model is touched: on any error the model is left
    exactly as it was.
    """
    path = in_folder(as_path(path))
    if device is not None:
        _check_device(path, device)
    raw = read_raw(path)
    options = {"min_rank": min_rank, "rank_exponent": rank_exponent, "num_train_timesteps": num_train_timesteps}
    existing = adapter_of(model)
    if existing is not None:
        given = [k for k, v in {**options, "device": device}.items() if v is not None]
        if given or reconstruct_base:
            raise ConfigError(
                f"{', '.join(given + (['reconstruct_base'] if reconstruct_base else []))}: a load into the adapter "
                f"{type(model).__name__} already has keeps its settings and devices; leave them out"
            )
        return _load_in_place(existing, path, raw)
    modules = dict(model.named_modules())
    if METADATA_KEY not in raw[1]:
        config, per_module = read_foreign(model, modules, path, *raw, reconstruct_base=reconstruct_base, **options)
    else:
        given = [k for k, v in options.items() if v is not None] + (["reconstruct_base"] if reconstruct_base else [])
        if given:
            raise ConfigError(
                f"{', '.join(given)}: these settings are for other tools' T-LoRA files; {path} is a "
                "tlora adapter, which records its own: leave them out"
            )
        config, per_module = _read_for(model, modules, path, raw)
    placed = {
        name: {
            k: t.to(device if device is not None else linear_at(modules, name)[1].weight.device) for k, t in f.items()
        }
        for name, f in per_module.items()
    }
    return inject_config(model, config, module_names=list(placed), factors=placed)


def in_folder(path: Path) -> Path:
    """`path`, or the adapter file in it when it is a folder (what `tlora.save_pretrained` and the
    accelerate hooks write)."""
    if not path.is_dir():
        return path
    inside = path / FOLDER_FILE
    if inside.exists():
        return inside
    static = (
        " (it holds a static diffusers LoRA: load that with pipe.load_lora_weights)"
        if any(path.glob("pytorch_lora_weights*.safetensors"))
        else ""
    )
    raise AdapterFileError(
        path,
        f"is a folder without a tlora adapter ({FOLDER_FILE}){static}: give the adapter file itself, or "
        "a folder written by tlora.save_pretrained",
    )


def _load_in_place(adapter: Adapter, path: Path, raw) -> Adapter:
    """Write a tlora file's factors into `adapter` (see `load`), after checking that the file
    describes this very adapter: its model class, modules and shapes, and settings."""
    model = adapter.model
    if METADATA_KEY not in raw[1]:
        raise ModelMismatchError(
            f"cannot load {path} into the tlora adapter {type(model).__name__} already has: it is another tool's "
            "checkpoint, which loads into a model without an adapter only (tlora.load on a fresh model)"
        )

    def fits_adapter(header: AdapterHeader) -> None:
        why = []
        if header.base_model != type(model).__name__:
            why.append(f"it was made for a {header.base_model}, not a {type(model).__name__}")
        ours = {n: (layer.out_features, layer.in_features) for n, layer in adapter.layers.items()}
        if set(header.modules) != set(ours):
            extra, lacking = sorted(set(header.modules) - set(ours)), sorted(set(ours) - set(header.modules))
            if extra:
                why.append(f"it adapts {_modules(len(extra))} the adapter does not (e.g. {extra[0]!r})")
            if lacking:
                why.append(f"it lacks {_modules(len(lacking))} the adapter has (e.g. {lacking[0]!r})")
        else:
            why += [
                f"module {n!r} is {header.modules[n][0]} x {header.modules[n][1]} in the file, {o} x {i} here"
                for n, (o, i) in ours.items()
                if header.modules[n] != (o, i)
            ][:1]
        mine, theirs = adapter.config.to_dict(), header.config.to_dict()
        why += [f"{k} is {theirs[k]!r} in the file, {mine[k]!r} here" for k in IN_PLACE_FIELDS if theirs[k] != mine[k]]
        if why:
            c = adapter.config
            raise ModelMismatchError(
                f"cannot load {path}: {type(model).__name__} already has a tlora adapter ({c.variant}, rank "
                f"{c.rank}) that the file does not fit: {'; '.join(why)}. A file loads into an existing adapter "
                "(in place, as a resume does) only with its settings and modules; inject with the file's settings "
                "before building the optimizer, or load the file into a model without an adapter"
            )

    f = read_adapter(path, before_tensors=fits_adapter, raw=raw)
    adapter.load_state_dict(f.tensors)
    # The file's record of how its factors began and what it carries (no effect on the computation).
    for name in ("init", "init_from", "seed", "target_modules", "extra"):
        setattr(adapter.config, name, getattr(f.config, name))
    return adapter


def _modules(n: int) -> str:
    return f"{n} module{'s' if n != 1 else ''}"


def _check_device(path: Path, device: Any) -> None:
    """Refuse a device the factors cannot be put on, before the file is read: one the kernels do
    not run on (layer.ops.KERNEL_DEVICES), or one this machine lacks (allocate nothing on it, as
    the load's `.to(device)` would)."""
    try:
        kind = torch.device(device).type
        if kind in KERNEL_DEVICES:
            torch.empty(0, device=device)
    except (RuntimeError, AssertionError, TypeError, ValueError) as e:
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(
            f"cannot load {path} onto device {str(device)!r}: {why}; pass device='cpu', a device this machine "
            "has, or None (each base layer's own device)"
        ) from None
    if kind == "meta":
        raise InputError(f"cannot load {path} onto device 'meta': meta tensors hold no values; use a real device")
    if kind not in KERNEL_DEVICES:
        raise InputError(
            f"cannot load {path} onto device {str(device)!r}: tlora's kernels run on the CPU and CUDA devices "
            "only; pass device='cpu', 'cuda' or 'cuda:N', or None (each base layer's own device)"
        )


def _read_for(
    model: nn.Module, modules: dict[str, nn.Module], path: Path, raw
) -> tuple[AdapterConfig, dict[str, dict[str, torch.Tensor]]]:
    """A tlora file's config and factors, the header checked against `model` (whose
    `named_modules()` are `modules`) before the tensors."""

    def fits_model(header: AdapterHeader) -> None:
        if header.base_model != type(model).__name__:
            raise ModelMismatchError(f"{path} was made for a {header.base_model}, not a {type(model).__name__}")
        for name, (out_f, in_f) in header.modules.items():
            base = linear_at(modules, name)[1]
            if not adaptable_linear(base):
                what = "does not exist" if base is None else f"is a {describe(base)}, not nn.Linear"
                raise ModelMismatchError(f"{path} adapts module {name!r}, which {what} in this {type(model).__name__}")
            if (base.out_features, base.in_features) != (out_f, in_f):
                raise ModelMismatchError(
                    f"{path} was made for a different model: module {name!r} is {base.out_features} x "
                    f"{base.in_features} here but {out_f} x {in_f} in the file"
                )

    f = read_adapter(path, before_tensors=fits_model, raw=raw)
    keys = factors.names(f.config.variant)
    return f.config, {name: {k: f.tensors[f"{name}.{k}"] for k in keys} for name in f.modules}


def _finite_positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _json_type(value: Any) -> str:
    return {
        dict: "an object",
        list: "a list",
        str: "a string",
        bool: "a boolean",
        type(None): "null",
        int: "a number",
        float: "a number",
    }.get(type(value), type(value).__name__)
