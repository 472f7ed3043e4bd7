"""The paper's T-LoRA update written plainly in float64 PyTorch, its rank schedule r(t) in exact
arithmetic, and the "drifted" projection the half-precision checks measure it on; shared by
benches/precision.py and the tests (test_real_path, test_fuzz, test_kernels, test_pipelines and
family_ranks; tests/conftest.py puts benches/ on their path).

The reference is independent of tlora's kernels: it only reads the layer's factors.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch
from torch import nn

import tlora

FACTORS = ("p", "lam", "q", "p0", "lam0", "q0")


class Projection(nn.Module):
    """One adapted attention-style projection `to_q`, called like a denoiser (x, timestep)."""

    def __init__(self, in_f: int, out_f: int):
        super().__init__()
        self.to_q = nn.Linear(in_f, out_f)

    def forward(self, x, timestep=None):
        return self.to_q(x)


def rank_at(t: float, rank: int, min_rank: int, num_train_timesteps: int = 1000, exponent: float = 1.0) -> int:
    """The paper's schedule r(t) = floor(((T - t) / T)^a * (r - r_min)) + r_min (a = 1 in the paper)
    from the timestep's exact binary value (a float product can fall on either side of the floor):
    in rationals for whole exponents, else to 60 digits (where 1e-40 is far below any gap between a
    value and the next integer, and far above the 60-digit error of an exact integer such as
    0.25 ** 0.5 * 2)."""
    frac = (num_train_timesteps - Fraction(t)) / num_train_timesteps
    if float(exponent).is_integer():
        return math.floor(frac ** int(exponent) * (rank - min_rank)) + min_rank
    import mpmath

    with mpmath.workdps(60):
        value = (mpmath.mpf(frac.numerator) / frac.denominator) ** mpmath.mpf(exponent) * (rank - min_rank)
        return int(mpmath.floor(value + mpmath.mpf("1e-40"))) + min_rank


def cosine_rank_at(t: float, rank: int, min_rank: int, num_train_timesteps: int = 1000) -> int:
    """The cosine schedule floor(cos(pi t / 2T) * (r - r_min)) + r_min from the timestep's exact binary
    value, to 60 digits: a value within 1e-40 of an integer is that integer (Niven: d cos(pi t / 2T)
    is one only where the cosine is 1, 1/2 or 0; the 60-digit error is far below 1e-40, and any
    other value is far further from an integer)."""
    import mpmath

    frac = Fraction(t) / num_train_timesteps
    with mpmath.workdps(60):
        value = mpmath.cos(mpmath.pi / 2 * mpmath.mpf(frac.numerator) / frac.denominator) * (rank - min_rank)
        return int(mpmath.floor(value + mpmath.mpf("1e-40"))) + min_rank


def step_rank_at(t: float, rank: int, min_rank: int, num_train_timesteps: int = 1000, boundary: float = 0.875) -> int:
    """The step schedule: r below the boundary t_b, r_min from it on, with t_b = boundary * T exactly
    (in rationals; the schedule's float64 product equals it for the boundaries the tests use)."""
    return rank if Fraction(t) < Fraction(boundary) * num_train_timesteps else min_rank


def layer_factors(layer) -> dict[str, torch.Tensor]:
    """The layer's six factors, detached."""
    return {n: getattr(layer, n).detach() for n in FACTORS}


def update_f64(factors: dict[str, torch.Tensor], k: int | None = None) -> torch.Tensor:
    """P diag(lam m) Q - P0 diag(lam0 m) Q0 in float64, m keeping the first k ranks (all if None)."""
    f = {n: factors[n].double() for n in FACTORS}
    rank = f["lam"].numel()
    m = (torch.arange(rank) < (rank if k is None else k)).double()
    return f["p"] @ torch.diag(f["lam"] * m) @ f["q"] - f["p0"] @ torch.diag(f["lam0"] * m) @ f["q0"]


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want|, in float64."""
    return ((got.double() - want.double()).abs().max() / want.double().abs().max()).item()


def drifted_update_model(
    in_f: int, out_f: int, rank: int, min_rank: int, drift: float, dtype: torch.dtype, seed: int = 0
):
    """(model, adapter, layer): a Projection whose output is its T-LoRA update only (its own weight
    and bias zeroed), the trained factors moved by a relative `drift` from the frozen copies, then
    cast to `dtype` (the factors stay float32)."""
    torch.manual_seed(seed)
    model = Projection(in_f, out_f)
    adapter = tlora.inject(model, rank=rank, min_rank=min_rank, target_modules=["to_q"])
    layer = adapter.layers["to_q"]
    with torch.no_grad():
        layer.base_layer.weight.zero_()
        layer.base_layer.bias.zero_()
        for p in adapter.parameters():
            p.mul_(1 + drift * torch.randn(p.shape))
    model.to(dtype)
    return model, adapter, layer
