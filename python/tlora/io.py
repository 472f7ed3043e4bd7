"""The adapter file: one .safetensors file, float32 factors under `<module path>.<factor>` keys and
a JSON description under the metadata key "tlora". Only safetensors and JSON are ever read."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import _native
from .adapter import Adapter, adapter_of, inject_config
from .config import AdapterConfig
from .quantized import adaptable_linear, describe
from .targets import linear_at

FORMAT_VERSION = 1
METADATA_KEY = "tlora"


def save(model_or_adapter: nn.Module | Adapter, path: str | os.PathLike, extra: dict[str, Any] | None = None) -> Path:
    """Write the adapter of a model (or an Adapter) to `path`, atomically. `extra` (JSON-able) is
    kept in the metadata, e.g. the concept's token and class."""
    adapter = model_or_adapter if isinstance(model_or_adapter, Adapter) else adapter_of(model_or_adapter)
    if adapter is None:
        raise ValueError(f"{type(model_or_adapter).__name__} has no tlora adapter to save: call tlora.inject first")
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"adapter files are .safetensors; got {path.name!r}")
    c = adapter.config
    meta = {
        "format_version": FORMAT_VERSION,
        "config": {**c.to_dict(), "extra": {**c.extra, **(extra or {})}},
        "scale": c.scale,
        "timestep_scale": adapter.timestep_scale,
        "base_model": type(adapter.model).__name__,
        "modules": {n: [layer.out_features, layer.in_features] for n, layer in adapter.layers.items()},
    }
    tensors = [(k, v.detach().float().cpu().contiguous()) for k, v in adapter.state_dict().items()]
    _native.save_file(str(path), tensors, {METADATA_KEY: json.dumps(meta)})
    return path


def refuse_pickle(path: Path) -> None:
    """Raise (without opening the file) for pickle-based checkpoints, saying how to convert them."""
    if path.suffix in (".pt", ".pth", ".bin", ".ckpt", ".pkl"):
        raise ValueError(
            f"{path.name} is a pickle-based checkpoint, which tlora never loads (unpickling can run code). "
            "Convert it where you trust it: torch.load(f, weights_only=True), then "
            "safetensors.torch.save_file(state_dict, 'adapter.safetensors')"
        )


def read(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read and check an adapter file: (tensors, metadata). Raises ValueError naming the problem."""
    path = Path(path)
    refuse_pickle(path)
    tensors, raw = _native.load_file(str(path))
    return _checked(path, tensors, raw)


def _checked(path: Path, tensors, raw: dict[str, str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    if METADATA_KEY not in raw:
        raise ValueError(f"{path} has no {METADATA_KEY!r} metadata: it is a safetensors file, but not a tlora adapter")
    try:
        meta = json.loads(raw[METADATA_KEY])
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: the {METADATA_KEY!r} metadata is not valid JSON ({e})") from None
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{path} has adapter format version {version!r}; this tlora reads version {FORMAT_VERSION}: "
            "upgrade tlora (pip install -U tlora) or re-export the adapter"
        )
    return dict(tensors), meta


def load(model: nn.Module, path: str | os.PathLike, device: torch.device | str | None = None) -> Adapter:
    """Inject the adapter stored at `path` into `model` and load its weights.

    Every name and shape is checked before the model is touched: on any error the model is left
    exactly as it was. A safetensors file without tlora metadata is read as another tool's T-LoRA
    checkpoint (the reference code's or LyCORIS's) by `tlora.interop.import_adapter`.
    """
    path = Path(path)
    refuse_pickle(path)
    tensors, raw = _native.load_file(str(path))
    if METADATA_KEY not in raw:
        from .interop import import_adapter

        return import_adapter(model, path, device=device)
    tensors, meta = _checked(path, tensors, raw)
    config = AdapterConfig.from_dict(meta["config"])
    made_for = meta.get("base_model")
    if made_for != type(model).__name__:
        raise ValueError(f"{path} was made for a {made_for}, not a {type(model).__name__}")
    modules = dict(model.named_modules())
    names = list(meta["modules"])
    keys = ("p", "lam", "q", "p0", "lam0", "q0") if config.variant == "tlora" else ("down", "up")
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for name in names:
        base = linear_at(modules, name)[1]
        if not adaptable_linear(base):
            what = "does not exist" if base is None else f"is a {describe(base)}, not nn.Linear"
            raise ValueError(f"{path} adapts module {name!r}, which {what} in this {type(model).__name__}")
        out_f, in_f = meta["modules"][name]
        if (base.out_features, base.in_features) != (out_f, in_f):
            raise ValueError(
                f"{path} was made for a different model: module {name!r} is {base.out_features} x "
                f"{base.in_features} here but {out_f} x {in_f} in the file"
            )
        dev = device if device is not None else base.weight.device
        factors[name] = {}
        for k in keys:
            t = tensors.pop(f"{name}.{k}", None)
            expected = _factor_shape(k, config.rank, out_f, in_f)
            if t is None or tuple(t.shape) != expected:
                got = "missing" if t is None else f"shape {tuple(t.shape)}"
                raise ValueError(f"{path}: tensor {name}.{k} is {got}, expected shape {expected}")
            factors[name][k] = t.to(dev)
    if tensors:
        raise ValueError(f"{path} has tensors that belong to no adapted module: {', '.join(sorted(tensors)[:5])}")
    return inject_config(model, config, module_names=names, factors=factors)


def _factor_shape(key: str, r: int, out_f: int, in_f: int) -> tuple[int, ...]:
    return {"p": (out_f, r), "p0": (out_f, r), "up": (out_f, r), "lam": (r,), "lam0": (r,),
            "q": (r, in_f), "q0": (r, in_f), "down": (r, in_f)}[key]
