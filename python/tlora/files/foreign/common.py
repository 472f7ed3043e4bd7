"""What the foreign layouts' parsers share: the checks of the factors they found (float32, finite,
the shapes a model's layers take, one variant) and the rank settings from the file's metadata."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...config import AdapterConfig, rank_limit_error
from ...errors import AdapterFileError, ConfigError, ModelMismatchError
from ...layer import factors

# Rank-schedule settings an imported file may carry in its safetensors metadata (plain keys, or
# inside sd-scripts' JSON `ss_network_args`): our names, SimpleTuner's and the reference code's.
_MIN_RANK_KEYS = ("min_rank", "tlora_min_rank")
_EXPONENT_KEYS = ("rank_exponent", "tlora_alpha", "alpha_rank_scale")
_T_KEYS = ("num_train_timesteps",)
# The schedule's shape and scaling under tlora's names (other tools store neither: their files are
# the paper's power law without rank scaling, the defaults); checked by AdapterConfig.
_NAME_KEYS = ("rank_schedule", "rank_scaling")
_BOUNDARY_KEYS = ("rank_boundary",)


def check_tensors(path: Path, source: str, modules: dict[str, dict[str, torch.Tensor]]) -> None:
    """Every factor as float32 with finite values (see tlora.layer.factors.checked), lambdas 1-D (or
    (1, r) as the reference code stores them), the others 2-D; in place."""
    for name, f in modules.items():
        for k, t in list(f.items()):
            dims_ok = (t.dim() == 1 or (t.dim() == 2 and t.shape[0] == 1)) if k in ("lam", "lam0") else t.dim() == 2
            if not dims_ok or t.numel() == 0:
                want = "1-D (r,) or (1, r)" if k in ("lam", "lam0") else "2-D"
                raise AdapterFileError(
                    path,
                    f"{path} ({source}): module {name!r} has factor {k} of shape "
                    f"{tuple(t.shape)}; it must be {want} and not empty",
                )
            f[k] = factors.checked(path, f"{name}.{k}", t)


def variant_of(path: Path, modules: dict[str, dict[str, torch.Tensor]], source: str) -> str:
    variants = set()
    for name, f in modules.items():
        if {"p", "lam", "q"} <= f.keys():
            variants.add("tlora")
            partial = [k for k in factors.FROZEN if k in f]
            if partial and len(partial) != 3:
                missing = sorted(set(factors.FROZEN) - set(partial))
                raise AdapterFileError(
                    path, f"{path} ({source}): module {name!r} has only some frozen base copies (missing {missing})"
                )
            extra = set(f) - set(factors.TLORA)
        elif {"down", "up"} <= f.keys():
            variants.add("vanilla")  # LoRA factors with the timestep mask, as the reference code's "lora"
            extra = set(f) - {"down", "up"}
        else:
            raise AdapterFileError(
                path, f"{path} ({source}): module {name!r} has an incomplete set of factors ({sorted(f)})"
            )
        if extra:
            raise AdapterFileError(
                path, f"{path} ({source}): module {name!r} mixes T-LoRA and LoRA factors ({sorted(f)})"
            )
    if len(variants) != 1:
        raise AdapterFileError(path, f"{path} ({source}) mixes T-LoRA and LoRA modules; tlora adapters use one variant")
    return variants.pop()


def check_factors(path: Path, name: str, f: dict[str, torch.Tensor], variant: str, base: nn.Linear) -> int:
    """Normalize lambda to (r,) in place and check every shape; returns the module's rank."""
    out_f, in_f = base.out_features, base.in_features
    for k in ("lam", "lam0"):
        if k in f and f[k].dim() == 2 and f[k].shape[0] == 1:
            f[k] = f[k].reshape(-1)
    r = f["q"].shape[0] if variant == "tlora" else f["down"].shape[0]
    for k, t in f.items():
        expected = factors.shape(k, r, out_f, in_f)
        if tuple(t.shape) != expected:
            raise AdapterFileError(
                path,
                f"{path}: module {name!r} ({out_f} x {in_f} in this model) has factor {k} of shape "
                f"{tuple(t.shape)}, expected {expected}: the file was made for another model",
            )
    too_large = rank_limit_error(r, out_f, in_f, name)
    if too_large:
        raise AdapterFileError(path, f"{path}: {too_large}")
    return r


def rank_settings(path: Path, meta: dict[str, str], min_rank, rank_exponent, num_train_timesteps) -> dict[str, Any]:
    found: dict[str, str] = dict(meta)
    unreadable = None  # why ss_network_args could not be read, if it could not
    if "ss_network_args" in meta:
        try:
            args = json.loads(meta["ss_network_args"])
            if isinstance(args, dict):
                found = {**{k: str(v) for k, v in args.items()}, **found}
        except (ValueError, RecursionError) as e:  # ValueError: also integers of over 4300 digits
            unreadable = str(e)[:120]

    def pick(value, keys, cast):
        if value is not None:
            return value
        for k in keys:
            if k in found:
                try:
                    number = float(found[k])
                except (TypeError, ValueError):
                    number = math.nan
                if not math.isfinite(number) or (cast is int and not number.is_integer()):
                    kind = "an integer" if cast is int else "a finite number"
                    shown = found[k] if len(found[k]) <= 40 else f"{found[k][:20]}... ({len(found[k])} characters)"
                    raise AdapterFileError(path, f"metadata {k}={shown!r} is not {kind}", field=k)
                return int(number) if cast is int else number
        if unreadable is not None:
            raise AdapterFileError(
                path,
                f"cannot be read as JSON ({unreadable}), so the rank settings it may hold ({', '.join(keys)}) are "
                "unknown: pass them to tlora.load (min_rank=..., rank_exponent=..., num_train_timesteps=...)",
                field="ss_network_args",
            )
        return None

    out = {"min_rank": pick(min_rank, _MIN_RANK_KEYS, int)}
    exponent = pick(rank_exponent, _EXPONENT_KEYS, float)
    if exponent is not None:
        out["rank_exponent"] = exponent
    t = pick(num_train_timesteps, _T_KEYS, int)
    if t is not None:
        out["num_train_timesteps"] = t
    out.update({k: found[k] for k in _NAME_KEYS if k in found})
    if any(k in found for k in _BOUNDARY_KEYS):
        out["rank_boundary"] = pick(None, _BOUNDARY_KEYS, float)
    return out


def one_rank(
    path: Path,
    source: str,
    model: nn.Module,
    model_modules: dict[str, nn.Module],
    linear: dict[str, nn.Linear],
    modules: dict[str, dict[str, torch.Tensor]],
    variant: str,
) -> int:
    """The rank of the parsed `modules`: one for every module, with factors that fit the model's
    layers (`linear`: the model's nn.Linear modules by path)."""
    ranks = {}
    for name, f in modules.items():
        base = linear.get(name)
        if base is None:
            other = model_modules.get(name)
            what = "does not exist" if other is None else f"is a {type(other).__name__}, not nn.Linear"
            raise ModelMismatchError(
                f"{path} ({source}) adapts module {name!r}, which {what} in this {type(model).__name__}"
            )
        ranks[name] = check_factors(path, name, f, variant, base)
    distinct = sorted(set(ranks.values()))
    if len(distinct) != 1:
        example = ", ".join(f"{n}: {r}" for n, r in list(ranks.items())[:4])
        raise AdapterFileError(
            path, f"{path} uses several ranks ({distinct}; {example}); a tlora adapter has one rank for all modules"
        )
    return distinct[0]


def adapter_config(
    path: Path, source: str, r: int, variant: str, alpha: float | None, names: list[str], settings: dict[str, Any]
) -> AdapterConfig:
    """The AdapterConfig of an imported file of rank `r` adapting `names`, with the rank `settings`
    (from `rank_settings`); a missing minimum rank is the paper's r // 2, with a warning."""
    if settings.get("min_rank") is None and variant != "lora":
        settings["min_rank"] = max(1, r // 2)
        warnings.warn(
            f"{path.name} does not say its minimum rank: using the paper's r_min = r // 2 = {settings['min_rank']} "
            "(pass min_rank=... to tlora.load if it was trained with another)",
            UserWarning,
            stacklevel=4,  # the caller of tlora.load (above read_foreign and load)
        )
    try:
        return AdapterConfig(
            rank=r,
            variant=variant,
            target_modules=names,
            lora_alpha=alpha,
            extra={"imported_from": source, "source_file": path.name},
            **settings,
        )
    except ConfigError as e:
        raise AdapterFileError(
            path,
            f"{path} ({source}): the rank settings from the arguments and the file's metadata "
            f"do not form a valid adapter: {e}",
        ) from None
