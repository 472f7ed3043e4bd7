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
float16's subnormal range: a loader that casts A and B to float16 / bfloat16 then multiplies small
terms, instead of subtracting two nearly equal products (the form [Q; Q0], [PΛ, -P0Λ0] loses the
update to cancellation in half precision once training has moved the factors only a little). A
LoRA update `s up_k down_k` is A = down_k, B = s up_k. The scale s is folded into B and the file's
alpha equals its rank, so every loader's alpha / rank is 1. What is lost: a static LoRA applies
the same rank at every timestep, not T-LoRA's r(t).

`import_file` converts another tool's T-LoRA checkpoint (the reference code's or LyCORIS's, read
by `tlora.load` through `tlora.files.foreign`) into a tlora adapter file.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..adapter.inject import Adapter, adapter_of, rank_schedule
from ..config import AdapterConfig, check_float, check_rank
from ..errors import ConfigError, TloraError
from ..layer import factors
from ..options import EXPORT_FORMATS
from .atomic import write_atomic, write_folder
from .io import load, read_adapter, save, write_tensors

FORMATS = EXPORT_FORMATS  # (options.py: the one list, also the parser's)
PEFT_WEIGHTS, PEFT_CONFIG = "adapter_model.safetensors", "adapter_config.json"
EXPORT_METADATA_KEY = "tlora_export"
LOSS_NOTE = (
    "a static LoRA applies one rank at every timestep: T-LoRA's per-timestep ranks r(t) are lost "
    "(this export uses rank {k} of {r} at every denoising step)"
)

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


def export(
    adapter_path: str | os.PathLike | Adapter | nn.Module,
    out_path: str | os.PathLike,
    format: str = "diffusers",
    timestep: float | None = None,
    rank: int | None = None,
    prefix: str | None = None,
) -> ExportResult:
    """Bake an adapter (a tlora file, an `Adapter`, or a model with one) into a static LoRA.

    - `rank`: the T-LoRA rank k to bake (1..r); `timestep`: bake r(t) instead, t on the training
      scale 0..num_train_timesteps (the paper's t, e.g. 0..1000 for FLUX too). Default: full rank
      r, the rank at t = 0. Variant "lora" has no timestep ranks and is always baked at rank r.
    - `format`: "diffusers" (a .safetensors file), "peft" (a folder: adapter_model.safetensors and
      adapter_config.json, written whole; an existing export folder is replaced) or "kohya" (a
      .safetensors file; UNets only).
    - `prefix`: the pipeline component in diffusers keys, default "unet" for UNets and
      "transformer" otherwise.

    Files are written atomically, into an existing folder, never over the input. Returns an
    `ExportResult`; its `note` says that the per-timestep ranks are lost.
    """
    if format not in FORMATS:
        raise ConfigError(f"unknown export format {format!r}: choose one of {', '.join(FORMATS)}")
    out = Path(out_path)
    if isinstance(adapter_path, (str, os.PathLike)):
        refuse_overwriting_input(adapter_path, out)
    if format == "peft":
        out = _peft_folder(out)
    else:
        _check_suffix(out, format)
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
    baked = {name: _bake(tensors, name, config, k) for name in names}
    lora_rank = next(iter(baked.values()))[0].shape[0]
    note = (
        LOSS_NOTE.format(k=k, r=config.rank)
        if config.masked
        else ("variant 'lora' has no per-timestep ranks: the static LoRA is the same update at every timestep")
    )
    info = {
        "variant": config.variant,
        "rank": k,
        "adapter_rank": config.rank,
        "lora_rank": lora_rank,
        "timestep": timestep,
        "base_model": base_model,
        "note": note,
    }
    meta = {EXPORT_METADATA_KEY: json.dumps(info)}
    config_path = None

    if format == "diffusers":
        items = [(f"{prefix}.{n}.lora_{ab}.weight", t) for n, (a, b) in baked.items() for ab, t in (("A", a), ("B", b))]
        write_tensors(out, items, meta)
    elif format == "peft":
        items = [
            (f"base_model.model.{n}.lora_{ab}.weight", t)
            for n, (a, b) in baked.items()
            for ab, t in (("A", a), ("B", b))
        ]
        peft_config = {
            "peft_type": "LORA",
            "task_type": None,
            "base_model_name_or_path": None,
            "inference_mode": True,
            "r": lora_rank,
            "lora_alpha": lora_rank,
            "lora_dropout": 0.0,
            "bias": "none",
            "target_modules": names,
            "fan_in_fan_out": False,
            "init_lora_weights": True,
            "use_rslora": False,
            "use_dora": False,
            "modules_to_save": None,
        }

        def fill(folder: Path) -> None:
            write_tensors(folder / PEFT_WEIGHTS, items, meta)
            write_atomic(folder / PEFT_CONFIG, json.dumps(peft_config, indent=2) + "\n")

        # One folder, renamed into place whole: a kill never leaves new weights beside an old config.
        write_folder(out, fill)
        out, config_path = out / PEFT_WEIGHTS, out / PEFT_CONFIG
    else:  # kohya
        items = []
        for n, (a, b) in baked.items():
            key = "lora_unet_" + n.replace(".", "_")
            items += [
                (f"{key}.lora_down.weight", a),
                (f"{key}.lora_up.weight", b),
                (f"{key}.alpha", torch.tensor(float(lora_rank))),
            ]
        meta.update(ss_network_module="networks.lora", ss_network_dim=str(lora_rank), ss_network_alpha=str(lora_rank))
        write_tensors(out, items, meta)
    return ExportResult(
        path=out, format=format, rank=k, lora_rank=lora_rank, modules=len(names), note=note, config_path=config_path
    )


def _peft_folder(out: Path) -> Path:
    """The PEFT export folder `out` (symlinks resolved): new, empty, or a previous export (only
    PEFT_WEIGHTS and PEFT_CONFIG), since writing it whole replaces everything in it."""
    if out.suffix == ".safetensors":
        raise ConfigError(
            f"a peft export is a folder ({PEFT_WEIGHTS} + {PEFT_CONFIG}, what PeftModel.from_pretrained "
            f"reads), written whole; got the file name {out.name!r}: give a folder, e.g. {out.with_suffix('')}"
        )
    out = Path(os.path.realpath(out))
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise ConfigError(f"{out} exists and is not a folder: a peft export is one; choose another output (--out)")
        others = sorted(p.name for p in out.iterdir() if p.name not in (PEFT_WEIGHTS, PEFT_CONFIG))
        if others:
            raise ConfigError(
                f"{out} holds files that are not part of a peft export ({', '.join(others[:5])}"
                f"{' ...' if len(others) > 5 else ''}); exporting replaces the whole folder: give a new or "
                "empty folder, or an earlier export's"
            )
    return out


def refuse_overwriting_input(source: str | os.PathLike, out: Path) -> None:
    """ConfigError when writing `out` would replace the input file `source`: the same file
    (also through a symlink or a hard link), or, for a folder that is replaced whole, a file in
    it."""
    src = Path(source)
    if not (src.exists() and (out.exists() or out.is_symlink())):
        return
    targets = [out, *out.iterdir()] if out.is_dir() else [out]
    inside = out.is_dir() and Path(os.path.realpath(src)).is_relative_to(os.path.realpath(out))
    same = next((t for t in targets if t.exists() and os.path.samefile(src, t)), None)
    if same is not None or inside:
        where = f"{out} (its {same.name})" if same is not None and same != out else str(out)
        raise ConfigError(
            f"the output {where} is the input {src}{' (the same file)' if same is not None else ''}: writing "
            "it would replace the adapter being read; choose another output (--out)"
        )


def _export_source(source) -> tuple[dict[str, torch.Tensor], AdapterConfig, str]:
    if isinstance(source, nn.Module):
        adapter = adapter_of(source)
        if adapter is None:
            raise TloraError(f"{type(source).__name__} has no tlora adapter to export")
        source = adapter
    if isinstance(source, Adapter):
        tensors = {k: factors.checked(None, k, v.detach().float().cpu()) for k, v in source.state_dict().items()}
        return tensors, source.config, type(source.model).__name__
    if not isinstance(source, (str, os.PathLike)):
        raise ConfigError(
            f"export reads a tlora file (a path), an Adapter or a model with one, got {type(source).__name__}"
        )
    f = read_adapter(source)
    return f.tensors, f.config, f.base_model


def _export_rank(config: AdapterConfig, timestep: float | None, rank: int | None) -> int:
    if timestep is not None and rank is not None:
        raise ConfigError("give timestep or rank, not both")
    r = config.rank
    if rank is not None:
        rank = check_rank(rank, r)
        if not config.masked and rank != r:
            raise ConfigError(f"variant 'lora' has no timestep ranks: it always uses all {r} ranks; leave rank unset")
        return rank
    if timestep is not None:
        T = config.num_train_timesteps
        timestep = check_float("timestep (on the training scale 0..num_train_timesteps)", timestep, 0, T)
        if not config.masked:
            return r
        return int(
            rank_schedule(
                torch.tensor([float(timestep)], dtype=torch.float64), r, config.min_rank, config.rank_exponent, T
            )[0]
        )
    return r


def _bake(
    tensors: dict[str, torch.Tensor], name: str, config: AdapterConfig, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of module `name` at rank k: the LoRA with B @ A = the adapter's update, scale included."""
    s = config.scale
    if config.variant == "tlora":
        p, lam, q, p0, lam0, q0 = (tensors[f"{name}.{f}"].double() for f in factors.TLORA)
        frozen = p0[:, :k] * lam0[:k]
        blocks = [(q[:k], s * (p[:, :k] * lam[:k] - frozen)), (q[:k] - q0[:k], s * frozen)]
        # Balance each block's magnitudes (A c, B / c: the same product) so that neither factor's
        # entries sink into float16's subnormal range when a loader casts them.
        blocks = [(a_ * c, b_ / c) for a_, b_ in blocks for c in [_balance(a_, b_)]]
        return (
            torch.cat([blocks[0][0], blocks[1][0]], dim=0).float().contiguous(),
            torch.cat([blocks[0][1], blocks[1][1]], dim=1).float().contiguous(),
        )
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


def import_file(
    adapter_path: str | os.PathLike, model: str | nn.Module, out_path: str | os.PathLike, **options: Any
) -> tuple[Adapter, Path]:
    """Convert another tool's T-LoRA file into a tlora adapter file (what `tlora import` runs).

    `model`: the base denoiser, or a diffusers folder / hub id whose `unet/` or `transformer/` is
    loaded. `options` (min_rank, rank_exponent, num_train_timesteps, reconstruct_base, device) go
    to `tlora.load`. The adapter is written to `out_path` and stays
    injected in the model; returns (adapter, path written).
    """
    out = Path(out_path)
    if out.suffix != ".safetensors":
        raise ConfigError(f"adapter files are .safetensors; got {out.name!r}")
    refuse_overwriting_input(adapter_path, out)
    if not isinstance(model, nn.Module):
        from ..pipelines import load_denoiser

        model = load_denoiser(str(model))
    adapter = load(model, adapter_path, **options)
    return adapter, save(adapter, out)


__all__ = ["ExportResult", "FORMATS", "export", "import_file"]
