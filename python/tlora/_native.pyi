"""Type stubs for the Rust extension (src/python.rs)."""

from typing import Sequence

import torch

def rank_schedule(timesteps: torch.Tensor, rank: int, min_rank: int, exponent: float, num_train_timesteps: float) -> torch.Tensor: ...
def orthogonal_init(
    out_features: int, in_features: int, rank: int, component: str, seed: int, weight: torch.Tensor | None = None,
    device: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...
def gaussian(rows: int, cols: int, std: float, seed: int) -> torch.Tensor: ...
_Grads = tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]

def lowrank_forward(
    x: torch.Tensor, factors: Sequence[torch.Tensor], ranks: Sequence[int] | None, scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]: ...
def lowrank_forward_add(
    y: torch.Tensor, x: torch.Tensor, factors: Sequence[torch.Tensor], ranks: Sequence[int] | None, scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...
def lowrank_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    h: torch.Tensor,
    factors: Sequence[torch.Tensor],
    ranks: Sequence[int] | None,
    scale: float,
    needs: Sequence[bool],
    d: torch.Tensor | None = None,
    u: torch.Tensor | None = None,
) -> _Grads: ...
def lowrank_split_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    factors: Sequence[torch.Tensor],
    ranks: Sequence[int] | None,
    scale: float,
    stage_rank: int = 0,
    staged: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]: ...
def lowrank_split_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    h: torch.Tensor,
    d: torch.Tensor,
    u: torch.Tensor,
    weight: torch.Tensor,
    factors: Sequence[torch.Tensor],
    ranks: Sequence[int] | None,
    scale: float,
    needs: Sequence[bool],
    stage_rank: int = 0,
    staged: torch.Tensor | None = None,
) -> _Grads: ...
def dense_update(factors: Sequence[torch.Tensor], rank: int | None, scale: float) -> torch.Tensor: ...
def fold_weight(weight: torch.Tensor, factors: Sequence[torch.Tensor], rank: int | None, scale: float) -> torch.Tensor: ...
def fold_frozen(weight: torch.Tensor, factors: Sequence[torch.Tensor], rank: int, scale: float) -> torch.Tensor: ...
def save_file(path: str, tensors: Sequence[tuple[str, torch.Tensor]], metadata: dict[str, str]) -> None: ...
def load_file(path: str) -> tuple[list[tuple[str, torch.Tensor]], dict[str, str]]: ...
