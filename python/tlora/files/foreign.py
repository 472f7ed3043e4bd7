"""Other tools' T-LoRA checkpoints: the layouts `tlora.load` reads besides its own.

- the reference implementation's attention-processor checkpoints (SD-XL `pytorch_lora_weights`):
  `<attention>.processor.to_q_lora.q_layer.weight`, `.p_layer.weight`, `.lambda_layer`,
  `.base_q.weight`, `.base_p.weight`, `.base_lambda` (T-LoRA), or `...to_q_lora.down.weight` /
  `.up.weight` (LoRA with timestep ranks); `to_out_lora` is `to_out.0`;
- LyCORIS `tlora` networks: `lycoris_<module with . as _>.q_layer.weight`, `.p_layer.weight`,
  `.lambda_layer`, `.alpha` and the frozen copies `.base_q`, `.base_p`, `.base_lambda`.

`read_foreign` turns such a file's tensors and metadata into a tlora config and per-module factors
for `tlora.files.io.load` to inject; it reads nothing itself and never touches the model.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..adapter.targets import linear_at
from ..config import AdapterConfig, rank_limit_error
from ..errors import AdapterFileError, ConfigError, ModelMismatchError
from ..layer import factors

# Rank-schedule settings an imported file may carry in its safetensors metadata (plain keys, or
# inside sd-scripts' JSON `ss_network_args`): our names, SimpleTuner's and the reference code's.
_MIN_RANK_KEYS = ("min_rank", "tlora_min_rank")
_EXPONENT_KEYS = ("rank_exponent", "tlora_alpha", "alpha_rank_scale")
_T_KEYS = ("num_train_timesteps",)

_REF_PROJ = {"to_q_lora": "to_q", "to_k_lora": "to_k", "to_v_lora": "to_v", "to_out_lora": "to_out.0"}
_REF_KEY = re.compile(
    r"^(?:(?:unet|transformer)\.)?(?P<attn>.+)\.processor\.(?P<proj>to_q_lora|to_k_lora|to_v_lora|to_out_lora)\.(?P<param>.+)$"
)
_REF_PARAMS = {
    "q_layer.weight": "q",
    "p_layer.weight": "p",
    "lambda_layer": "lam",
    "base_q.weight": "q0",
    "base_p.weight": "p0",
    "base_lambda": "lam0",
    "down.weight": "down",
    "up.weight": "up",
}
_LYCO_PARAMS = {
    "q_layer.weight": "q",
    "p_layer.weight": "p",
    "lambda_layer": "lam",
    "base_q": "q0",
    "base_q.weight": "q0",
    "base_p": "p0",
    "base_p.weight": "p0",
    "base_lambda": "lam0",
    "alpha": "alpha",
}


def read_foreign(
    model: nn.Module,
    model_modules: dict[str, nn.Module],
    path: Path,
    raw_tensors: list[tuple[str, torch.Tensor]],
    raw_meta: dict[str, str],
    min_rank: int | None = None,
    rank_exponent: float | None = None,
    num_train_timesteps: int | None = None,
    reconstruct_base: bool = False,
) -> tuple[AdapterConfig, dict[str, dict[str, torch.Tensor]]]:
    """The config and the float32 CPU factors (by module path) of another tool's T-LoRA file,
    read with `tlora.files.io.read_raw`, for `model` (whose `named_modules()` are `model_modules`).

    The rank is read from the shapes; `min_rank`, `rank_exponent` and `num_train_timesteps` from
    the arguments, else from the file's metadata, else the paper's defaults (r_min = r // 2, with
    a warning: the file does not say).

    LyCORIS's own `save_weights` leaves out the frozen copies base_q, base_p, base_lambda, without
    which the update cannot be computed: such a file is refused, unless `reconstruct_base=True`,
    which rebuilds them as LyCORIS's loader does (the top-r singular triplets of the model's
    weight: right only for LyCORIS's default init, use_data_init=True, sig_type="principal").
    """
    tensors = dict(raw_tensors)
    linear = {n: m for n in model_modules if type(m := linear_at(model_modules, n)[1]) is nn.Linear}

    if any(_REF_KEY.match(k) for k in tensors):
        source = "reference T-LoRA code"
        modules, variant, alpha = _parse_reference(path, tensors)
    elif any(k.startswith("lycoris_") for k in tensors):
        source = "LyCORIS"
        modules, variant, alpha = _parse_lycoris(path, tensors, [n for n in model_modules if n])
    else:
        raise AdapterFileError(path, _unknown_layout(path, tensors))

    # Shapes: one rank for every module, factors that fit the model's layers.
    ranks = {}
    for name, f in modules.items():
        base = linear.get(name)
        if base is None:
            other = model_modules.get(name)
            what = "does not exist" if other is None else f"is a {type(other).__name__}, not nn.Linear"
            raise ModelMismatchError(
                f"{path} ({source}) adapts module {name!r}, which {what} in this {type(model).__name__}"
            )
        ranks[name] = _check_factors(path, name, f, variant, base)
    distinct = sorted(set(ranks.values()))
    if len(distinct) != 1:
        example = ", ".join(f"{n}: {r}" for n, r in list(ranks.items())[:4])
        raise AdapterFileError(
            path, f"{path} uses several ranks ({distinct}; {example}); a tlora adapter has one rank for all modules"
        )
    r = distinct[0]

    if variant == "tlora" and any("p0" not in f for f in modules.values()):
        if source != "LyCORIS":
            raise AdapterFileError(
                path,
                f"{path} ({source}) has no frozen base copies (base_q, base_p, base_lambda): the file is incomplete",
            )
        if not reconstruct_base:
            raise AdapterFileError(
                path,
                f"{path} ({source}) has no frozen base copies (base_q, base_p, base_lambda), without which a T-LoRA "
                "update cannot be computed: LyCORIS's save_weights() leaves them out. Save them with the "
                "trained factors, e.g. {f'{m.lora_name}.{k}': v for m in network.loras for k, v in "
                "torch.nn.Module.state_dict(m).items()}, or pass reconstruct_base=True if the network was "
                "trained with LyCORIS's default init (use_data_init=True, sig_type='principal')",
            )
        for name, f in modules.items():
            if "p0" not in f:
                f.update(_principal_base(linear[name], r))

    settings = _rank_settings(path, raw_meta, min_rank, rank_exponent, num_train_timesteps)
    if settings.get("min_rank") is None and variant != "lora":
        settings["min_rank"] = max(1, r // 2)
        warnings.warn(
            f"{path.name} does not say its minimum rank: using the paper's r_min = r // 2 = {settings['min_rank']} "
            "(pass min_rank=... to tlora.load if it was trained with another)",
            UserWarning,
            stacklevel=3,  # the caller of tlora.load
        )
    names = sorted(modules)
    try:
        config = AdapterConfig(
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
    keys = factors.names(variant)
    return config, {name: {k: modules[name][k].float().contiguous() for k in keys} for name in names}


def _parse_reference(path: Path, tensors: dict[str, torch.Tensor]):
    modules: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, t in tensors.items():
        m = _REF_KEY.match(key)
        param = _REF_PARAMS.get(m.group("param")) if m else None
        if param is None:
            unknown.append(key)
            continue
        name = f"{m.group('attn')}.{_REF_PROJ[m.group('proj')]}"
        modules.setdefault(name, {})[param] = t
    if unknown:
        raise AdapterFileError(
            path, f"{path}: keys that are not part of the reference T-LoRA layout: {', '.join(sorted(unknown)[:5])}"
        )
    _check_foreign_tensors(path, "reference T-LoRA code", modules)
    variant = _variant_of(path, modules, "reference T-LoRA code")
    return modules, variant, None  # the reference code has no alpha: scale 1


def _parse_lycoris(path: Path, tensors: dict[str, torch.Tensor], all_names: list[str]):
    """LyCORIS names a module `lycoris_` + its path with dots as underscores: map back through the
    model's own module paths (refusing a name that two paths share)."""
    by_lyco_name: dict[str, list[str]] = {}
    for n in all_names:
        by_lyco_name.setdefault("lycoris_" + n.replace(".", "_"), []).append(n)
    modules: dict[str, dict[str, torch.Tensor]] = {}
    alphas: dict[str, float] = {}
    for key, t in tensors.items():
        lyco_name, _, param = key.partition(".")
        if lyco_name not in by_lyco_name:
            raise AdapterFileError(path, f"{path} (LyCORIS) has {key!r}, which names no module of this model")
        if len(by_lyco_name[lyco_name]) > 1:
            raise AdapterFileError(path, f"{path} (LyCORIS): {lyco_name!r} could be any of {by_lyco_name[lyco_name]}")
        name = by_lyco_name[lyco_name][0]
        factor = _LYCO_PARAMS.get(param)
        if factor is None:
            if param in ("lora_down.weight", "lora_up.weight", "hada_w1_a", "lokr_w1", "oft_blocks", "oft_diag"):
                raise AdapterFileError(
                    path,
                    f"{path} is a LyCORIS network of another algorithm ({param!r} in {key!r}), not T-LoRA "
                    "(algo='tlora'): load it with LyCORIS or with pipe.load_lora_weights",
                )
            raise AdapterFileError(path, f"{path} (LyCORIS): unexpected tensor {key!r} for a T-LoRA module")
        if factor == "alpha":
            value = t.double().reshape(-1) if t.is_floating_point() or t.dtype in (torch.int32, torch.int64) else None
            if value is None or value.numel() != 1 or not bool(torch.isfinite(value).all()) or float(value[0]) < 0:
                raise AdapterFileError(
                    path,
                    f"{path} (LyCORIS): {key!r} must hold one finite number >= 0, got "
                    f"{'a ' + str(t.dtype) if value is None else value.tolist()}",
                )
            alphas[name] = float(value[0])
        else:
            modules.setdefault(name, {})[factor] = t
    conv = next((n for n, f in modules.items() if any(t.dim() > 2 for t in f.values())), None)
    if conv is not None:
        raise AdapterFileError(
            path, f"{path} (LyCORIS) adapts a convolution ({conv}); tlora adapts nn.Linear layers only"
        )
    _check_foreign_tensors(path, "LyCORIS", modules)
    variant = _variant_of(path, modules, "LyCORIS")
    # LyCORIS: scale = alpha / lora_dim, alpha = 0 or missing meaning lora_dim (scale 1).
    values = set()
    for name, f in modules.items():
        r = f["q"].shape[0] if "q" in f else 0
        a = alphas.get(name, 0.0)
        values.add(float(r) if a == 0 else a)
    if len(values) > 1:
        raise AdapterFileError(
            path, f"{path} (LyCORIS) uses several alphas ({sorted(values)}); a tlora adapter has one scale"
        )
    return modules, variant, values.pop() if values else None


def _check_foreign_tensors(path: Path, source: str, modules: dict[str, dict[str, torch.Tensor]]) -> None:
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


def _variant_of(path: Path, modules: dict[str, dict[str, torch.Tensor]], source: str) -> str:
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


def _check_factors(path: Path, name: str, f: dict[str, torch.Tensor], variant: str, base: nn.Linear) -> int:
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


def _principal_base(base: nn.Linear, r: int) -> dict[str, torch.Tensor]:
    """LyCORIS's init with use_data_init=True, sig_type='principal': the top-r SVD triplets of W."""
    u, s, vh = torch.linalg.svd(base.weight.detach().float().cpu(), full_matrices=False)
    return {"p0": u[:, :r].contiguous(), "lam0": s[:r].contiguous(), "q0": vh[:r].contiguous()}


def _rank_settings(path: Path, meta: dict[str, str], min_rank, rank_exponent, num_train_timesteps) -> dict[str, Any]:
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
    return out


def _unknown_layout(path: Path, tensors: dict[str, torch.Tensor]) -> str:
    keys = sorted(tensors)
    head = f"{path} has no 'tlora' metadata: it is a safetensors file, but not a tlora adapter"
    if any(k.endswith((".lora_A.weight", ".lora_B.weight", ".lora_down.weight", ".lora_up.weight")) for k in keys):
        return (
            f"{head}; it holds a static LoRA (lora_A/lora_B or lora_down/lora_up keys), which has no "
            "timestep ranks: load it with pipe.load_lora_weights(file)"
        )
    return (
        f"{head}, nor a T-LoRA checkpoint of the reference code (<attention>.processor.to_q_lora.q_layer.weight "
        f"...) or of LyCORIS (lycoris_<module>.q_layer.weight ...). First keys: {', '.join(keys[:4]) or '(none)'}"
    )
