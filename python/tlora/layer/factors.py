"""The adapter's factors: their names, shapes and order, the variant they imply, and the checks
every factor passes on its way into or out of a file. The one place these rules live.

Variant "tlora" has six factors per module, in the native kernels' order: the trainable P
(out x r), lambda (r) and Q (r x in), then their frozen initial copies P0, lambda0, Q0. Variants
"vanilla" and "lora" have two: down (r x in) and up (out x r), both trainable.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from ..errors import AdapterFileError

TLORA = ("p", "lam", "q", "p0", "lam0", "q0")
LORA = ("down", "up")
FROZEN = ("p0", "lam0", "q0")
# Larger factor values overflow half-precision inference and only come from a diverged run.
MAX_ABS = 1e6
# Float dtypes converted to float32 on reading (with a warning); anything else is refused.
CONVERTIBLE = (torch.float16, torch.bfloat16, torch.float64)


def names(variant: str) -> tuple[str, ...]:
    """The factor names of a variant, in the kernels' order (trainable first)."""
    return TLORA if variant == "tlora" else LORA


def trainable(variant: str) -> tuple[str, ...]:
    return TLORA[:3] if variant == "tlora" else LORA


def is_tlora(factors: list | tuple) -> bool:
    """Whether a kernel-ordered factor list is T-LoRA's (six factors) rather than LoRA's (two)."""
    return len(factors) == len(TLORA)


def n_trainable(factors: list | tuple) -> int:
    """How many leading factors of a kernel-ordered list are trainable."""
    return 3 if is_tlora(factors) else 2


def rank_of(factors: list | tuple) -> int:
    """r of a kernel-ordered factor list: P's columns (T-LoRA) or down's rows (LoRA)."""
    return factors[0].shape[1] if is_tlora(factors) else factors[0].shape[0]


def shape(name: str, rank: int, out_features: int, in_features: int) -> tuple[int, ...]:
    """The shape of factor `name` of a rank-`rank` adapter on an out x in linear layer."""
    if name in ("p", "p0", "up"):
        return (out_features, rank)
    if name in ("lam", "lam0"):
        return (rank,)
    if name in ("q", "q0", "down"):
        return (rank, in_features)
    raise KeyError(f"unknown factor {name!r}: expected one of {', '.join(TLORA + LORA)}")


def bad_values(t: torch.Tensor) -> str:
    """'' for finite values of magnitude <= MAX_ABS, else what is wrong."""
    if t.numel() == 0:
        return ""
    finite = torch.isfinite(t)
    if not bool(finite.all()):
        return f"{int((~finite).sum())} non-finite values (NaN or inf)"
    big = float(t.abs().max())
    return f"values as large as {big:.3g}" if big > MAX_ABS else ""


def checked(path: Path | None, key: str, t: torch.Tensor) -> torch.Tensor:
    """A factor read from `path` as float32: other float dtypes converted with a warning, integers
    refused, values finite and at most MAX_ABS in magnitude."""
    if t.dtype != torch.float32:
        if t.dtype not in CONVERTIBLE:
            raise AdapterFileError(
                path,
                f"tensor {key} has dtype {str(t.dtype).removeprefix('torch.')}; "
                "adapter factors are float32 (float16, bfloat16 and float64 are converted)",
            )
        warnings.warn(
            f"{path}: tensor {key} is {str(t.dtype).removeprefix('torch.')}, converted to float32",
            UserWarning,
            stacklevel=4,
        )
        t = t.float()
    bad = bad_values(t)
    if bad:
        raise AdapterFileError(
            path, f"tensor {key} has {bad}; a usable adapter has finite factors of magnitude <= {MAX_ABS:g}"
        )
    return t
