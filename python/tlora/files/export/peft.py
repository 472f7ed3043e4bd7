"""The PEFT layout: `base_model.model.<module>.lora_A.weight` / `.lora_B.weight` in
`adapter_model.safetensors` plus `adapter_config.json`, a folder for
`peft.PeftModel.from_pretrained(denoiser, folder)`, written whole."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ...errors import ConfigError
from ..atomic import write_atomic, write_folder
from ..io import write_tensors
from .common import no_check

PEFT_WEIGHTS, PEFT_CONFIG = "adapter_model.safetensors", "adapter_config.json"

check = no_check


def output(out: Path) -> Path:
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


def write(
    out: Path, baked: dict[str, tuple[torch.Tensor, torch.Tensor]], meta: dict[str, str], prefix: str
) -> tuple[Path, Path]:
    """The folder `out` (from `output`), whole; returns (weights file, config file). `prefix` is
    not used: PEFT's keys start at the model PeftModel wraps."""
    lora_rank = next(iter(baked.values()))[0].shape[0]
    items = [
        (f"base_model.model.{n}.lora_{ab}.weight", t) for n, (a, b) in baked.items() for ab, t in (("A", a), ("B", b))
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
        "target_modules": list(baked),
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
    return out / PEFT_WEIGHTS, out / PEFT_CONFIG
