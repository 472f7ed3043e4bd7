"""The reference implementation's attention-processor checkpoints (SD-XL `pytorch_lora_weights`):
`<attention>.processor.to_q_lora.q_layer.weight`, `.p_layer.weight`, `.lambda_layer`,
`.base_q.weight`, `.base_p.weight`, `.base_lambda` (T-LoRA), or `...to_q_lora.down.weight` /
`.up.weight` (LoRA with timestep ranks); `to_out_lora` is `to_out.0`."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from ...errors import AdapterFileError
from .common import check_tensors, variant_of

SOURCE = "reference T-LoRA code"

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


def detects(tensors: dict[str, torch.Tensor]) -> bool:
    return any(_REF_KEY.match(k) for k in tensors)


def parse(path: Path, tensors: dict[str, torch.Tensor], all_names: list[str]):
    """(factors by module path, variant, alpha) of a reference checkpoint; `all_names` (the model's
    module paths) is not needed: the keys hold the paths."""
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
    check_tensors(path, SOURCE, modules)
    variant = variant_of(path, modules, SOURCE)
    return modules, variant, None  # the reference code has no alpha: scale 1


def missing_base(path: Path, modules, linear: dict[str, nn.Linear], r: int, reconstruct_base: bool) -> None:
    """The reference code always saves the frozen copies: a T-LoRA file without them is cut short."""
    raise AdapterFileError(
        path,
        f"{path} ({SOURCE}) has no frozen base copies (base_q, base_p, base_lambda): the file is incomplete",
    )
