"""Type stubs for the Rust extension (src/python.rs)."""

from collections.abc import Sequence

import torch

def rank_schedule(
    timesteps: torch.Tensor, rank: int, min_rank: int, exponent: float, num_train_timesteps: float
) -> torch.Tensor: ...
def orthogonal_init(
    out_features: int,
    in_features: int,
    rank: int,
    component: str,
    seed: int,
    weight: torch.Tensor | None = None,
    device: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...
def gaussian(rows: int, cols: int, std: float, seed: int) -> torch.Tensor: ...

_Grads = tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]

def frozen_block(p0: torch.Tensor, lam0: torch.Tensor) -> torch.Tensor:
    """P0 diag(lam0): T-LoRA's frozen product (U's frozen block is its negative)."""

def lowrank_operands(
    factors: Sequence[torch.Tensor],
    frozen: torch.Tensor | None,
    dtype: str,
    d_buf: torch.Tensor | None = None,
    u_buf: torch.Tensor | None = None,
    write_frozen: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(D, U) at full rank in `dtype` ("float32", "float16", "bfloat16", "float64"): T-LoRA's
    difference form D = [Q; Q0 - Q], U = [P diag(lam) - P0 diag(lam0), -P0 diag(lam0)] (small
    factors formed in float32, rounded once), or LoRA's (A, B). Fresh, or written into `d_buf`
    (2r x in) and `u_buf` (out x 2r); `write_frozen` also (re)writes U's frozen block."""

def lowrank_forward(
    x: torch.Tensor, d: torch.Tensor, u: torch.Tensor, mask: torch.Tensor | None = None, acc: torch.Tensor | None = None
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(delta, h): h = (x D^T) * mask (mask: (B or 1, width), the scale in it), delta = h U^T, or
    None when it was added into `acc` (the base layer's output, same rows) in place."""

def lowrank_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    h: torch.Tensor,
    d: torch.Tensor,
    u: torch.Tensor,
    mask: torch.Tensor | None,
    factors: Sequence[torch.Tensor],
    needs: Sequence[bool],
) -> _Grads:
    """Gradients (x, factor 0, 1, 2) of `lowrank_forward` for the trainable factors (T-LoRA: P,
    lam, Q; LoRA: down, up, None); `needs` says which to compute."""

def dense_update(factors: Sequence[torch.Tensor], rank: int | None, scale: float) -> torch.Tensor:
    """The update at one rank (None: full rank) as an (out x in) matrix, scale included."""

def fold_weight(weight: torch.Tensor, factors: Sequence[torch.Tensor], rank: int | None, scale: float) -> torch.Tensor:
    """W + dW at one rank, computed in float32 (float64 for double weights or factors)."""

def save_file(path: str, tensors: Sequence[tuple[str, torch.Tensor]], metadata: dict[str, str]) -> None: ...
def load_file(path: str) -> tuple[list[tuple[str, torch.Tensor]], dict[str, str]]: ...
