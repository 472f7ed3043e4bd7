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

One writer per format (diffusers.py, peft.py, kohya.py), in the registry `WRITERS`; the baking
they share in common.py.

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

from ...adapter.inject import Adapter, adapter_of, config_ranks
from ...config import AdapterConfig, check_float, check_rank
from ...errors import ConfigError, TloraError
from ...layer import factors
from ...options import EXPORT_FORMATS
from ..io import load, read_adapter, save
from . import diffusers, kohya, peft
from .common import bake

FORMATS = EXPORT_FORMATS  # (options.py: the one list, also the parser's)
# The writer of each format: a module with output(out) -> the path to write (checked before the
# adapter is read), check(base_model, module names) and write(out, baked factors, metadata, prefix).
WRITERS = {"diffusers": diffusers, "peft": peft, "kohya": kohya}
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
    writer = WRITERS[format]
    out = Path(out_path)
    if isinstance(adapter_path, (str, os.PathLike)):
        refuse_overwriting_input(adapter_path, out)
    out = writer.output(out)
    tensors, config, base_model = _export_source(adapter_path)
    k = _export_rank(config, timestep, rank)
    names = sorted({key.rsplit(".", 1)[0] for key in tensors})
    writer.check(base_model, names)
    baked = {name: bake(tensors, name, config, k) for name in names}
    lora_rank = next(iter(baked.values()))[0].shape[0]
    note, meta = _export_metadata(config, k, lora_rank, timestep, base_model)
    if prefix is None:
        prefix = "unet" if "UNet" in base_model else "transformer"
    path, config_path = writer.write(out, baked, meta, prefix)
    return ExportResult(
        path=path, format=format, rank=k, lora_rank=lora_rank, modules=len(names), note=note, config_path=config_path
    )


def _export_metadata(
    config: AdapterConfig, k: int, lora_rank: int, timestep: float | None, base_model: str
) -> tuple[str, dict[str, str]]:
    """The note on what the static LoRA loses, and the export's record in the file's metadata."""
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
        # The scale baked into B: alpha / r, times r / k under rank_scaling "rank".
        "rank_scaling": config.rank_scaling,
        "scale": config.scale_at(k),
        "base_model": base_model,
        "note": note,
    }
    return note, {EXPORT_METADATA_KEY: json.dumps(info)}


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
        return int(config_ranks(torch.tensor([float(timestep)], dtype=torch.float64), config)[0])
    return r


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
        from ...pipelines import load_denoiser

        model = load_denoiser(str(model))
    adapter = load(model, adapter_path, **options)
    return adapter, save(adapter, out)


__all__ = ["ExportResult", "FORMATS", "export", "import_file"]
