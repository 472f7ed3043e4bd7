"""Interop with other LoRA tools.

`export` bakes a T-LoRA adapter at one rank into a standard, static LoRA that stock loaders read:

- "diffusers": `<unet|transformer>.<module>.lora_A.weight` / `.lora_B.weight`, one .safetensors
  file for `pipe.load_lora_weights(file)`;
- "peft": `base_model.model.<module>.lora_A.weight` / `.lora_B.weight` in `adapter_model.safetensors`
  plus `adapter_config.json`, a folder for `peft.PeftModel.from_pretrained(denoiser, folder)`;
- "kohya": `lora_unet_<module with . as _>.lora_down.weight` / `.lora_up.weight` / `.alpha`, the
  sd-scripts layout (SD 1.x/2.x and SD-XL UNets) that `pipe.load_lora_weights(file)` converts.

The export is exact: at rank k a T-LoRA update `s (P_k diag(lam_k) Q_k - P0_k diag(lam0_k) Q0_k)`
is the rank-2k LoRA in difference form, A = [c1 Q_k; c2 (Q_k - Q0_k)] and
B = s [(P_k diag(lam_k) - P0_k diag(lam0_k)) / c1, P0_k diag(lam0_k) / c2]
(B A = s (PΛ - P0Λ0) Q + s P0Λ0 (Q - Q0)), the two small differences formed in float64 and stored
in float32, each block balanced (c = sqrt(||B block|| / ||A block||)) so that no entry sinks into
float16's subnormal range: a loader that casts A and B to
float16 / bfloat16 then multiplies small terms, instead of subtracting two nearly equal products
(the form [Q; Q0], [PΛ, -P0Λ0] loses the update to cancellation in half precision once training
has moved the factors only a little). A LoRA update `s up_k down_k` is A = down_k, B = s up_k. The scale s is folded into B and the file's
alpha equals its rank, so every loader's alpha / rank is 1. What is lost: a static LoRA applies
the same rank at every timestep, not T-LoRA's r(t).

`import_adapter` (also reached by `tlora.load` for a safetensors file without tlora metadata)
reads T-LoRA checkpoints written by other code into a tlora adapter:

- the reference implementation's attention-processor checkpoints (SD-XL `pytorch_lora_weights`):
  `<attention>.processor.to_q_lora.q_layer.weight`, `.p_layer.weight`, `.lambda_layer`,
  `.base_q.weight`, `.base_p.weight`, `.base_lambda` (T-LoRA), or `...to_q_lora.down.weight` /
  `.up.weight` (LoRA with timestep ranks); `to_out_lora` is `to_out.0`;
- LyCORIS `tlora` networks: `lycoris_<module with . as _>.q_layer.weight`, `.p_layer.weight`,
  `.lambda_layer`, `.alpha` and the frozen copies `.base_q`, `.base_p`, `.base_lambda`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import _native
from .adapter import Adapter, adapter_of, inject_config, rank_schedule
from .config import AdapterConfig
from .errors import AdapterFileError, ConfigError, ModelMismatchError, TloraError
from .targets import linear_at

FORMATS = ("diffusers", "peft", "kohya")
EXPORT_METADATA_KEY = "tlora_export"
LOSS_NOTE = (
    "a static LoRA applies one rank at every timestep: T-LoRA's per-timestep ranks r(t) are lost "
    "(this export uses rank {k} of {r} at every denoising step)"
)

# Rank-schedule settings an imported file may carry in its safetensors metadata (plain keys, or
# inside sd-scripts' JSON `ss_network_args`): our names, SimpleTuner's and the reference code's.
_MIN_RANK_KEYS = ("min_rank", "tlora_min_rank")
_EXPONENT_KEYS = ("rank_exponent", "tlora_alpha", "alpha_rank_scale")
_T_KEYS = ("num_train_timesteps",)


# ==== export =======================================================================================

@dataclasses.dataclass
class ExportResult:
    """What `export` wrote: the weights file (and PEFT's config), the rank k of the T-LoRA adapter
    it baked, the rank of the written LoRA (2k for variant tlora, k otherwise) and the note on
    what a static LoRA loses."""

    path: Path
    format: str
    rank: int
    lora_rank: int
    modules: int
    note: str
    config_path: Path | None = None


def export(adapter_path: str | os.PathLike | Adapter | nn.Module, out_path: str | os.PathLike,
           format: str = "diffusers", timestep: float | None = None, rank: int | None = None,
           prefix: str | None = None) -> ExportResult:
    """Bake an adapter (a tlora file, an `Adapter`, or a model with one) into a static LoRA.

    - `rank`: the T-LoRA rank k to bake (1..r); `timestep`: bake r(t) instead, t on the training
      scale 0..num_train_timesteps (the paper's t, e.g. 0..1000 for FLUX too). Default: full rank
      r, the rank at t = 0. Variant "lora" has no timestep ranks and is always baked at rank r.
    - `format`: "diffusers" (a .safetensors file), "peft" (a folder, or a .safetensors path with
      adapter_config.json written beside it) or "kohya" (a .safetensors file; UNets only).
    - `prefix`: the pipeline component in diffusers keys, default "unet" for UNets and
      "transformer" otherwise.

    Files are written atomically. Returns an `ExportResult`; its `note` says that the per-timestep
    ranks are lost.
    """
    if format not in FORMATS:
        raise ConfigError(f"unknown export format {format!r}: choose one of {', '.join(FORMATS)}")
    tensors, config, base_model = _export_source(adapter_path)
    k = _export_rank(config, timestep, rank)
    if prefix is None:
        prefix = "unet" if "UNet" in base_model else "transformer"
    if format == "kohya" and "UNet" not in base_model:
        raise ConfigError(
            f"the kohya format names UNet modules (lora_unet_...); this adapter was made for a {base_model}: "
            "export it as format='diffusers' (pipe.load_lora_weights) or format='peft'"
        )
    names = sorted({key.rsplit(".", 1)[0] for key in tensors})
    if format == "kohya":
        _check_kohya_names(names)
    factors = {name: _bake(tensors, name, config, k) for name in names}
    lora_rank = next(iter(factors.values()))[0].shape[0]
    note = LOSS_NOTE.format(k=k, r=config.rank) if config.masked else (
        "variant 'lora' has no per-timestep ranks: the static LoRA is the same update at every timestep")
    info = {"variant": config.variant, "rank": k, "adapter_rank": config.rank, "lora_rank": lora_rank,
            "timestep": timestep, "base_model": base_model, "note": note}
    meta = {EXPORT_METADATA_KEY: json.dumps(info)}
    out = Path(out_path)
    config_path = None

    if format == "diffusers":
        _check_suffix(out, format)
        items = [(f"{prefix}.{n}.lora_{ab}.weight", t) for n, (a, b) in factors.items() for ab, t in (("A", a), ("B", b))]
        _save(out, items, meta)
    elif format == "peft":
        if out.suffix == ".safetensors":
            weights, config_path = out, out.parent / "adapter_config.json"
        else:
            weights, config_path = out / "adapter_model.safetensors", out / "adapter_config.json"
        items = [(f"base_model.model.{n}.lora_{ab}.weight", t) for n, (a, b) in factors.items() for ab, t in (("A", a), ("B", b))]
        peft_config = {
            "peft_type": "LORA", "task_type": None, "base_model_name_or_path": None, "inference_mode": True,
            "r": lora_rank, "lora_alpha": lora_rank, "lora_dropout": 0.0, "bias": "none",
            "target_modules": names, "fan_in_fan_out": False, "init_lora_weights": True,
            "use_rslora": False, "use_dora": False, "modules_to_save": None,
        }
        weights.parent.mkdir(parents=True, exist_ok=True)
        _save(weights, items, meta)
        _write_text_atomic(config_path, json.dumps(peft_config, indent=2) + "\n")
        out = weights
    else:  # kohya
        _check_suffix(out, format)
        items = []
        for n, (a, b) in factors.items():
            key = "lora_unet_" + n.replace(".", "_")
            items += [(f"{key}.lora_down.weight", a), (f"{key}.lora_up.weight", b),
                      (f"{key}.alpha", torch.tensor(float(lora_rank)))]
        meta.update(ss_network_module="networks.lora", ss_network_dim=str(lora_rank), ss_network_alpha=str(lora_rank))
        _save(out, items, meta)
    return ExportResult(path=out, format=format, rank=k, lora_rank=lora_rank, modules=len(names), note=note,
                        config_path=config_path)


def _export_source(source) -> tuple[dict[str, torch.Tensor], AdapterConfig, str]:
    if isinstance(source, nn.Module):
        adapter = adapter_of(source)
        if adapter is None:
            raise TloraError(f"{type(source).__name__} has no tlora adapter to export")
        source = adapter
    if isinstance(source, Adapter):
        from .io import checked_factor

        tensors = {k: checked_factor(None, k, v.detach().float().cpu()) for k, v in source.state_dict().items()}
        return tensors, source.config, type(source.model).__name__
    from .io import read_adapter

    f = read_adapter(source)
    return f.tensors, f.config, f.base_model


def _export_rank(config: AdapterConfig, timestep: float | None, rank: int | None) -> int:
    if timestep is not None and rank is not None:
        raise ConfigError("give timestep or rank, not both")
    r = config.rank
    if rank is not None:
        if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= r:
            raise ConfigError(f"rank must be an integer in 1..{r} (the adapter's rank), got {rank!r}")
        if not config.masked and rank != r:
            raise ConfigError(f"variant 'lora' has no timestep ranks: it always uses all {r} ranks; leave rank unset")
        return rank
    if timestep is not None:
        T = config.num_train_timesteps
        if not 0 <= float(timestep) <= T:
            raise ConfigError(f"timestep must be in 0..{T} (the training scale), got {timestep!r}")
        if not config.masked:
            return r
        return int(rank_schedule(torch.tensor([float(timestep)], dtype=torch.float64), r, config.min_rank,
                                 config.rank_exponent, T)[0])
    return r


def _bake(tensors: dict[str, torch.Tensor], name: str, config: AdapterConfig, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of module `name` at rank k: the LoRA with B @ A = the adapter's update, scale included."""
    s = config.scale
    if config.variant == "tlora":
        p, lam, q, p0, lam0, q0 = (tensors[f"{name}.{f}"].double() for f in ("p", "lam", "q", "p0", "lam0", "q0"))
        frozen = p0[:, :k] * lam0[:k]
        blocks = [(q[:k], s * (p[:, :k] * lam[:k] - frozen)), (q[:k] - q0[:k], s * frozen)]
        # Balance each block's magnitudes (A c, B / c: the same product) so that neither factor's
        # entries sink into float16's subnormal range when a loader casts them.
        blocks = [(a_ * c, b_ / c) for a_, b_ in blocks for c in [_balance(a_, b_)]]
        return (torch.cat([blocks[0][0], blocks[1][0]], dim=0).float().contiguous(),
                torch.cat([blocks[0][1], blocks[1][1]], dim=1).float().contiguous())
    else:
        a = tensors[f"{name}.down"].float()[:k]
        b = tensors[f"{name}.up"].float()[:, :k]
    if s != 1.0:
        b = b * s
    return a.contiguous(), b.contiguous()


def _balance(a: torch.Tensor, b: torch.Tensor) -> float:
    """c with ||c a|| = ||b / c|| (1 for a zero block)."""
    na, nb = float(a.norm()), float(b.norm())
    return (nb / na) ** 0.5 if na > 0 and nb > 0 else 1.0


def _check_kohya_names(names: list[str]) -> None:
    """kohya keys replace every '.' of a module path by '_', and loaders guess the dots back. Run
    diffusers' own conversion (when diffusers is installed) and refuse modules it would misplace."""
    try:
        from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lora_to_diffusers
        from diffusers.utils import convert_unet_state_dict_to_peft
    except ImportError:
        return
    dummy = torch.zeros(1)
    sd = {}
    for n in names:
        key = "lora_unet_" + n.replace(".", "_")
        sd.update({f"{key}.lora_down.weight": dummy, f"{key}.lora_up.weight": dummy})
    try:
        converted, _ = _convert_non_diffusers_lora_to_diffusers(sd)
        peft_keys = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in converted.items()})
    except (AttributeError, TypeError, KeyError, ValueError):  # another diffusers version: no check
        return
    loaded = {k.rsplit(".lora_", 1)[0] for k in peft_keys}
    lost = [n for n in names if n not in loaded]
    if lost:
        raise ConfigError(
            "the kohya format cannot name these modules so that diffusers finds them again (dots become "
            f"underscores): {', '.join(lost[:5])}{' ...' if len(lost) > 5 else ''}; export as format='diffusers'"
        )


def _check_suffix(out: Path, format: str) -> None:
    if out.suffix != ".safetensors":
        raise ConfigError(f"a {format} export is one .safetensors file; got {out.name!r}")


def _save(path: Path, items: list[tuple[str, torch.Tensor]], meta: dict[str, str]) -> None:
    _native.save_file(str(path), [(k, v.detach().float().cpu().contiguous()) for k, v in items], meta)


def _write_text_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# ==== import =======================================================================================

_REF_PROJ = {"to_q_lora": "to_q", "to_k_lora": "to_k", "to_v_lora": "to_v", "to_out_lora": "to_out.0"}
_REF_KEY = re.compile(r"^(?:(?:unet|transformer)\.)?(?P<attn>.+)\.processor\.(?P<proj>to_q_lora|to_k_lora|to_v_lora|to_out_lora)\.(?P<param>.+)$")
_REF_PARAMS = {"q_layer.weight": "q", "p_layer.weight": "p", "lambda_layer": "lam", "base_q.weight": "q0",
               "base_p.weight": "p0", "base_lambda": "lam0", "down.weight": "down", "up.weight": "up"}
_LYCO_PARAMS = {"q_layer.weight": "q", "p_layer.weight": "p", "lambda_layer": "lam", "base_q": "q0",
                "base_q.weight": "q0", "base_p": "p0", "base_p.weight": "p0", "base_lambda": "lam0", "alpha": "alpha"}
_TLORA = ("p", "lam", "q", "p0", "lam0", "q0")


def import_adapter(model: nn.Module, path: str | os.PathLike, device: torch.device | str | None = None,
                   min_rank: int | None = None, rank_exponent: float | None = None,
                   num_train_timesteps: int | None = None, reconstruct_base: bool = False,
                   raw: tuple[list[tuple[str, torch.Tensor]], dict[str, str]] | None = None) -> Adapter:
    """Inject a T-LoRA adapter read from another implementation's safetensors file into `model`.

    Reads the reference code's attention-processor layout and LyCORIS `tlora` state dicts (see the
    module docstring); a tlora file is loaded with `tlora.load`. The rank is read from the shapes;
    `min_rank`, `rank_exponent` and `num_train_timesteps` from the arguments, else from the file's
    metadata, else the paper's defaults (r_min = r // 2, with a warning: the file does not say).

    LyCORIS's own `save_weights` leaves out the frozen copies base_q, base_p, base_lambda, without
    which the update cannot be computed: such a file is refused, unless `reconstruct_base=True`,
    which rebuilds them as LyCORIS's loader does (the top-r singular triplets of the model's
    weight: right only for LyCORIS's default init, use_data_init=True, sig_type="principal").

    Every name, shape, dtype and value is checked before the model is touched (`raw`: the file's
    `tlora.io.read_raw` result, if already read).
    """
    from .io import METADATA_KEY, load, read_raw

    path = Path(path)
    raw_tensors, raw_meta = raw if raw is not None else read_raw(path)
    if METADATA_KEY in raw_meta:
        return load(model, path, device=device)
    existing = adapter_of(model)
    if existing is not None:
        raise ModelMismatchError(
            f"{type(model).__name__} already has a tlora adapter ({existing.config.variant}, rank "
            f"{existing.config.rank}); call adapter.remove() before importing another"
        )
    tensors = dict(raw_tensors)
    all_modules = dict(model.named_modules())
    linear = {n: m for n in all_modules if type(m := linear_at(all_modules, n)[1]) is nn.Linear}

    if any(_REF_KEY.match(k) for k in tensors):
        source = "reference T-LoRA code"
        modules, variant, alpha = _parse_reference(path, tensors)
    elif any(k.startswith("lycoris_") for k in tensors):
        source = "LyCORIS"
        modules, variant, alpha = _parse_lycoris(path, tensors, [n for n, _ in model.named_modules() if n])
    else:
        raise AdapterFileError(path, _unknown_layout(path, tensors))

    # Shapes: one rank for every module, factors that fit the model's layers.
    ranks = {}
    for name, f in modules.items():
        base = linear.get(name)
        if base is None:
            other = dict(model.named_modules()).get(name)
            what = "does not exist" if other is None else f"is a {type(other).__name__}, not nn.Linear"
            raise ModelMismatchError(f"{path} ({source}) adapts module {name!r}, which {what} in this {type(model).__name__}")
        ranks[name] = _check_factors(path, name, f, variant, base)
    distinct = sorted(set(ranks.values()))
    if len(distinct) != 1:
        example = ", ".join(f"{n}: {r}" for n, r in list(ranks.items())[:4])
        raise AdapterFileError(path, f"{path} uses several ranks ({distinct}; {example}); a tlora adapter has one rank for all modules")
    r = distinct[0]

    if variant == "tlora" and any("p0" not in f for f in modules.values()):
        if source != "LyCORIS":
            raise AdapterFileError(path, f"{path} ({source}) has no frozen base copies (base_q, base_p, base_lambda): the file is incomplete")
        if not reconstruct_base:
            raise AdapterFileError(
                path, f"{path} ({source}) has no frozen base copies (base_q, base_p, base_lambda), without which a T-LoRA "
                "update cannot be computed: LyCORIS's save_weights() leaves them out. Save them with the "
                "trained factors, e.g. {f'{m.lora_name}.{k}': v for m in network.loras for k, v in "
                "torch.nn.Module.state_dict(m).items()}, or pass reconstruct_base=True if the network was "
                "trained with LyCORIS's default init (use_data_init=True, sig_type='principal')"
            )
        for name, f in modules.items():
            if "p0" not in f:
                f.update(_principal_base(linear[name], r))

    settings = _rank_settings(path, raw_meta, min_rank, rank_exponent, num_train_timesteps)
    if settings.get("min_rank") is None and variant != "lora":
        settings["min_rank"] = max(1, r // 2)
        warnings.warn(
            f"{path.name} does not say its minimum rank: using the paper's r_min = r // 2 = {settings['min_rank']} "
            "(pass min_rank=... to tlora.interop.import_adapter if it was trained with another)",
            UserWarning, stacklevel=2,
        )
    names = sorted(modules)
    try:
        config = AdapterConfig(
            rank=r, variant=variant, target_modules=names, lora_alpha=alpha,
            extra={"imported_from": source, "source_file": path.name}, **settings,
        )
    except ConfigError as e:
        raise AdapterFileError(path, f"{path} ({source}): the rank settings from the arguments and the file's metadata "
                               f"do not form a valid adapter: {e}") from None
    factors: dict[str, dict[str, torch.Tensor]] = {}
    keys = _TLORA if variant == "tlora" else ("down", "up")
    for name in names:
        dev = device if device is not None else linear[name].weight.device
        factors[name] = {k: modules[name][k].float().contiguous().to(dev) for k in keys}
    return inject_config(model, config, module_names=names, factors=factors)


def import_file(adapter_path: str | os.PathLike, model: str | nn.Module, out_path: str | os.PathLike,
                **options: Any) -> tuple[Adapter, Path]:
    """Convert another tool's T-LoRA file into a tlora adapter file (what `tlora import` runs).

    `model`: the base denoiser, or a diffusers folder / hub id whose `unet/` or `transformer/` is
    loaded. `options` go to `import_adapter`. The adapter is written to `out_path` and stays
    injected in the model; returns (adapter, path written).
    """
    from .io import save

    out = Path(out_path)
    if out.suffix != ".safetensors":
        raise ConfigError(f"adapter files are .safetensors; got {out.name!r}")
    if not isinstance(model, nn.Module):
        from .pipelines import load_denoiser

        model = load_denoiser(str(model))
    adapter = import_adapter(model, adapter_path, **options)
    return adapter, save(adapter, out)


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
        raise AdapterFileError(path, f"{path}: keys that are not part of the reference T-LoRA layout: {', '.join(sorted(unknown)[:5])}")
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
                    path, f"{path} is a LyCORIS network of another algorithm ({param!r} in {key!r}), not T-LoRA "
                    "(algo='tlora'): load it with LyCORIS or with pipe.load_lora_weights"
                )
            raise AdapterFileError(path, f"{path} (LyCORIS): unexpected tensor {key!r} for a T-LoRA module")
        if factor == "alpha":
            value = t.double().reshape(-1) if t.is_floating_point() or t.dtype in (torch.int32, torch.int64) else None
            if value is None or value.numel() != 1 or not bool(torch.isfinite(value).all()) or float(value[0]) < 0:
                raise AdapterFileError(path, f"{path} (LyCORIS): {key!r} must hold one finite number >= 0, got "
                                       f"{'a ' + str(t.dtype) if value is None else value.tolist()}")
            alphas[name] = float(value[0])
        else:
            modules.setdefault(name, {})[factor] = t
    conv = next((n for n, f in modules.items() if any(t.dim() > 2 for t in f.values())), None)
    if conv is not None:
        raise AdapterFileError(path, f"{path} (LyCORIS) adapts a convolution ({conv}); tlora adapts nn.Linear layers only")
    _check_foreign_tensors(path, "LyCORIS", modules)
    variant = _variant_of(path, modules, "LyCORIS")
    # LyCORIS: scale = alpha / lora_dim, alpha = 0 or missing meaning lora_dim (scale 1).
    values = set()
    for name, f in modules.items():
        r = f["q"].shape[0] if "q" in f else 0
        a = alphas.get(name, 0.0)
        values.add(float(r) if a == 0 else a)
    if len(values) > 1:
        raise AdapterFileError(path, f"{path} (LyCORIS) uses several alphas ({sorted(values)}); a tlora adapter has one scale")
    return modules, variant, values.pop() if values else None


def _check_foreign_tensors(path: Path, source: str, modules: dict[str, dict[str, torch.Tensor]]) -> None:
    """Every factor as float32 with finite values (see tlora.io.checked_factor), lambdas 1-D (or
    (1, r) as the reference code stores them), the others 2-D; in place."""
    from .io import checked_factor

    for name, f in modules.items():
        for k, t in list(f.items()):
            dims_ok = (t.dim() == 1 or (t.dim() == 2 and t.shape[0] == 1)) if k in ("lam", "lam0") else t.dim() == 2
            if not dims_ok or t.numel() == 0:
                want = "1-D (r,) or (1, r)" if k in ("lam", "lam0") else "2-D"
                raise AdapterFileError(path, f"{path} ({source}): module {name!r} has factor {k} of shape "
                                       f"{tuple(t.shape)}; it must be {want} and not empty")
            f[k] = checked_factor(path, f"{name}.{k}", t)


def _variant_of(path: Path, modules: dict[str, dict[str, torch.Tensor]], source: str) -> str:
    variants = set()
    for name, f in modules.items():
        if {"p", "lam", "q"} <= f.keys():
            variants.add("tlora")
            partial = [k for k in ("p0", "lam0", "q0") if k in f]
            if partial and len(partial) != 3:
                missing = sorted({"p0", "lam0", "q0"} - set(partial))
                raise AdapterFileError(path, f"{path} ({source}): module {name!r} has only some frozen base copies (missing {missing})")
            extra = set(f) - set(_TLORA)
        elif {"down", "up"} <= f.keys():
            variants.add("vanilla")  # LoRA factors with the timestep mask, as the reference code's "lora"
            extra = set(f) - {"down", "up"}
        else:
            raise AdapterFileError(path, f"{path} ({source}): module {name!r} has an incomplete set of factors ({sorted(f)})")
        if extra:
            raise AdapterFileError(path, f"{path} ({source}): module {name!r} mixes T-LoRA and LoRA factors ({sorted(f)})")
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
    expected = {"p": (out_f, r), "p0": (out_f, r), "up": (out_f, r), "lam": (r,), "lam0": (r,),
                "q": (r, in_f), "q0": (r, in_f), "down": (r, in_f)}
    for k, t in f.items():
        if tuple(t.shape) != expected[k]:
            raise AdapterFileError(
                path, f"{path}: module {name!r} ({out_f} x {in_f} in this model) has factor {k} of shape "
                f"{tuple(t.shape)}, expected {expected[k]}: the file was made for another model"
            )
    if r > min(out_f, in_f):
        raise AdapterFileError(path, f"{path}: module {name!r} has rank {r}, more than its {out_f} x {in_f} weight allows")
    return r


def _principal_base(base: nn.Linear, r: int) -> dict[str, torch.Tensor]:
    """LyCORIS's init with use_data_init=True, sig_type='principal': the top-r SVD triplets of W."""
    u, s, vh = torch.linalg.svd(base.weight.detach().float().cpu(), full_matrices=False)
    return {"p0": u[:, :r].contiguous(), "lam0": s[:r].contiguous(), "q0": vh[:r].contiguous()}


def _rank_settings(path: Path, meta: dict[str, str], min_rank, rank_exponent, num_train_timesteps) -> dict[str, Any]:
    found: dict[str, str] = dict(meta)
    if "ss_network_args" in meta:
        try:
            args = json.loads(meta["ss_network_args"])
            if isinstance(args, dict):
                found = {**{k: str(v) for k, v in args.items()}, **found}
        except json.JSONDecodeError:
            pass

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
                    raise AdapterFileError(path, f"{path}: metadata {k}={found[k]!r} is not {kind}", field=k)
                return int(number) if cast is int else number
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
        return (f"{head}; it holds a static LoRA (lora_A/lora_B or lora_down/lora_up keys), which has no "
                "timestep ranks: load it with pipe.load_lora_weights(file)")
    return (f"{head}, nor a T-LoRA checkpoint of the reference code (<attention>.processor.to_q_lora.q_layer.weight "
            f"...) or of LyCORIS (lycoris_<module>.q_layer.weight ...). First keys: {', '.join(keys[:4]) or '(none)'}")


__all__ = ["ExportResult", "FORMATS", "export", "import_adapter", "import_file"]
