"""The diffusers LoRA layout: `<unet|transformer>.<module>.lora_A.weight` / `.lora_B.weight`, one
.safetensors file for `pipe.load_lora_weights(file)`."""

from __future__ import annotations

from pathlib import Path

import torch

from ..io import write_tensors
from .common import no_check, one_file

check = no_check


def output(out: Path) -> Path:
    return one_file(out, "diffusers")


def write(
    out: Path, baked: dict[str, tuple[torch.Tensor, torch.Tensor]], meta: dict[str, str], prefix: str
) -> tuple[Path, None]:
    items = [(f"{prefix}.{n}.lora_{ab}.weight", t) for n, (a, b) in baked.items() for ab, t in (("A", a), ("B", b))]
    write_tensors(out, items, meta)
    return out, None
