"""LyCORIS `tlora` networks: `lycoris_<module with . as _>.q_layer.weight`, `.p_layer.weight`,
`.lambda_layer`, `.alpha` and the frozen copies `.base_q`, `.base_p`, `.base_lambda`."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ...errors import AdapterFileError
from .common import check_tensors, variant_of

SOURCE = "LyCORIS"

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
# Tensors of LyCORIS's other algorithms (LoRA, LoHa, LoKr, OFT): the file is not a T-LoRA network.
_OTHER_ALGORITHMS = ("lora_down.weight", "lora_up.weight", "hada_w1_a", "lokr_w1", "oft_blocks", "oft_diag")


def detects(tensors: dict[str, torch.Tensor]) -> bool:
    return any(k.startswith("lycoris_") for k in tensors)


def parse(path: Path, tensors: dict[str, torch.Tensor], all_names: list[str]):
    """(factors by module path, variant, alpha) of a LyCORIS T-LoRA network. LyCORIS names a module
    `lycoris_` + its path with dots as underscores: map back through the model's own module paths
    `all_names` (refusing a name that two paths share)."""
    modules, alphas = _factors_by_module(path, tensors, all_names)
    conv = next((n for n, f in modules.items() if any(t.dim() > 2 for t in f.values())), None)
    if conv is not None:
        raise AdapterFileError(
            path, f"{path} (LyCORIS) adapts a convolution ({conv}); tlora adapts nn.Linear layers only"
        )
    check_tensors(path, SOURCE, modules)
    variant = variant_of(path, modules, SOURCE)
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


def _factors_by_module(path: Path, tensors: dict[str, torch.Tensor], all_names: list[str]):
    """The file's factors by module path (our factor names) and its alphas by module path."""
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
            if param in _OTHER_ALGORITHMS:
                raise AdapterFileError(
                    path,
                    f"{path} is a LyCORIS network of another algorithm ({param!r} in {key!r}), not T-LoRA "
                    "(algo='tlora'): load it with LyCORIS or with pipe.load_lora_weights",
                )
            raise AdapterFileError(path, f"{path} (LyCORIS): unexpected tensor {key!r} for a T-LoRA module")
        if factor == "alpha":
            alphas[name] = _alpha(path, key, t)
        else:
            modules.setdefault(name, {})[factor] = t
    return modules, alphas


def _alpha(path: Path, key: str, t: torch.Tensor) -> float:
    value = t.double().reshape(-1) if t.is_floating_point() or t.dtype in (torch.int32, torch.int64) else None
    if value is None or value.numel() != 1 or not bool(torch.isfinite(value).all()) or float(value[0]) < 0:
        raise AdapterFileError(
            path,
            f"{path} (LyCORIS): {key!r} must hold one finite number >= 0, got "
            f"{'a ' + str(t.dtype) if value is None else value.tolist()}",
        )
    return float(value[0])


def missing_base(path: Path, modules, linear: dict[str, nn.Linear], r: int, reconstruct_base: bool) -> None:
    """LyCORIS's own `save_weights` leaves out the frozen copies base_q, base_p, base_lambda:
    refused, unless `reconstruct_base`, which rebuilds them in `modules` as LyCORIS's loader does."""
    if not reconstruct_base:
        raise AdapterFileError(
            path,
            f"{path} ({SOURCE}) has no frozen base copies (base_q, base_p, base_lambda), without which a T-LoRA "
            "update cannot be computed: LyCORIS's save_weights() leaves them out. Save them with the "
            "trained factors, e.g. {f'{m.lora_name}.{k}': v for m in network.loras for k, v in "
            "torch.nn.Module.state_dict(m).items()}, or pass reconstruct_base=True if the network was "
            "trained with LyCORIS's default init (use_data_init=True, sig_type='principal')",
        )
    for name, f in modules.items():
        if "p0" not in f:
            f.update(_principal_base(linear[name], r))


def _principal_base(base: nn.Linear, r: int) -> dict[str, torch.Tensor]:
    """LyCORIS's init with use_data_init=True, sig_type='principal': the top-r SVD triplets of W."""
    u, s, vh = torch.linalg.svd(base.weight.detach().float().cpu(), full_matrices=False)
    return {"p0": u[:, :r].contiguous(), "lam0": s[:r].contiguous(), "q0": vh[:r].contiguous()}
