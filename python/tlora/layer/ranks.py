"""The ranks every adapted layer of one adapter uses for the current forward and the masks built
from them (`RankState`, `rank_mask`), and r(t) as tensor ops on the timestep's device
(`ranks_of_levels`).
"""

from __future__ import annotations

import math

import torch

from ..config import DEFAULT_RANK_BOUNDARY, AdapterConfig
from .folds import FoldCache


class RankState:
    """The ranks that every adapted layer of one model uses for the current forward, and the
    masks built from them.

    The ranks are known either on the host (`ranks`: None for full rank, or a list: one shared
    rank or one per sample), or only on the device (`rank_tensor`, (B,) int64, from a timestep that
    lives there: reading it back would stall the GPU). Each layer asks `mask(device, dtype)`; it is
    built once per forward, device and dtype, and shared.
    """

    def __init__(self, config: AdapterConfig) -> None:
        self.rank = config.rank
        self.blocks = 2 if config.variant == "tlora" else 1
        self.scale = config.scale
        self.rank_scaling = config.rank_scaling
        self.masked = config.masked
        self.ranks: list[int] | None = None
        self.rank_tensor: torch.Tensor | None = None
        self.pinned = False  # True inside `with adapter.timestep(...)`: the hook leaves ranks alone
        self.fast_path = True  # fold the update into the weight at inference
        # The adapter's folded inference weights (folds.py), shared by its layers as the ranks are.
        self.fold_cache = FoldCache()
        # Which model forward is running (None: none; the adapter's hooks count them), so that the
        # fold cache checks the factors once per forward.
        self.forward: int | None = None
        self._forwards = 0
        self._masks: dict[tuple, torch.Tensor | None] = {}
        self._columns: dict[torch.device, torch.Tensor] = {}

    # ---- setting ------------------------------------------------------------------------------
    def set_host(self, ranks: list[int] | None) -> None:
        """Ranks known on the host, each in 1..rank (checked by the caller: `config.check_ranks`
        or the schedule)."""
        self.ranks, self.rank_tensor, self._masks = (ranks if self.masked else None), None, {}

    def set_device(self, rank_tensor: torch.Tensor) -> None:
        if not self.masked:
            return self.set_host(None)
        self.ranks, self.rank_tensor, self._masks = None, rank_tensor, {}

    def begin_forward(self) -> None:
        self._forwards += 1
        self.forward = self._forwards

    def end_forward(self) -> None:
        self.forward = None

    @property
    def host_known(self) -> bool:
        return self.rank_tensor is None

    def snapshot(self) -> tuple:
        return self.ranks, self.rank_tensor, self._masks

    def restore(self, snap: tuple) -> None:
        self.ranks, self.rank_tensor, self._masks = snap

    # ---- masks --------------------------------------------------------------------------------
    def mask(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
        """(B or 1, width) mask with the scale in it, or None where it would be all ones."""
        if torch.compiler.is_compiling():
            return self._build(device, dtype)
        key = (device, dtype)
        try:
            return self._masks[key]
        except KeyError:
            m = self._masks[key] = self._build(device, dtype)
            return m

    def _cols(self, device: torch.device) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return torch.arange(self.rank, device=device).repeat(self.blocks)
        cols = self._columns.get(device)
        if cols is None:
            cols = self._columns[device] = torch.arange(self.rank, device=device).repeat(self.blocks)
        return cols

    def _build(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
        ranks = self.rank_tensor if self.rank_tensor is not None else self.ranks
        return rank_mask(
            ranks, self.rank, self.blocks, self.scale, device, dtype, self._cols(device), self.rank_scaling
        )


def rank_mask(
    ranks: list[int] | torch.Tensor | None,
    rank: int,
    blocks: int,
    scale: float,
    device: torch.device,
    dtype: torch.dtype,
    cols: torch.Tensor | None = None,
    rank_scaling: str = "none",
) -> torch.Tensor | None:
    """The (B or 1, blocks * rank) mask, scale included, for host ranks (a list; None: full rank)
    or a (B,) rank tensor on the device; None where it would be all ones. Entry (b, j) is set when
    rank j mod `rank` is below sample b's rank k_b, to `scale`, or under rank_scaling "rank" to
    scale * rank / k_b (`AdapterConfig.scale_at`: scale itself at k_b = rank, else computed in
    float64 in that order on both paths, then rounded once to `dtype`)."""
    if cols is None:
        cols = torch.arange(rank, device=device).repeat(blocks)
    width = rank * blocks
    if rank_scaling == "rank" and ranks is not None:
        if isinstance(ranks, torch.Tensor):
            k = ranks.to(device).reshape(-1, 1)
        elif all(k >= rank for k in ranks):
            return rank_mask(None, rank, blocks, scale, device, dtype, cols)
        elif all(k == ranks[0] for k in ranks):
            k = torch.tensor([[ranks[0]]], device=device)
        else:
            k = torch.tensor(ranks, device=device).unsqueeze(1)
        row_scale = torch.where(k == rank, scale, scale * rank / k.to(torch.float64)).to(dtype)
        return (cols.unsqueeze(0) < k).to(dtype) * row_scale
    if isinstance(ranks, torch.Tensor):
        m = (cols.unsqueeze(0) < ranks.to(device).reshape(-1, 1)).to(dtype)
    elif ranks is None or all(k >= rank for k in ranks):
        return None if scale == 1.0 else torch.full((1, width), scale, device=device, dtype=dtype)
    elif all(k == ranks[0] for k in ranks):
        m = (cols < ranks[0]).to(dtype).unsqueeze(0)
    else:  # one host-to-device copy per forward, shared by every layer
        m = (cols.unsqueeze(0) < torch.tensor(ranks, device=device).unsqueeze(1)).to(dtype)
    return m * scale if scale != 1.0 else m


# Values of the a != 1 rank rule within this below an integer count as that integer: the same
# constant as SNAP in src/schedule.rs, whose module comment explains the two rules.
RANK_SNAP = 1e-9


def ranks_of_levels(
    level: torch.Tensor,
    rank: int,
    min_rank: int,
    rank_exponent: float,
    num_train_timesteps: int,
    rank_schedule: str = "power",
    rank_boundary: float = DEFAULT_RANK_BOUNDARY,
):
    """r(t) for noise levels t in [0, T] as tensor ops on their device (no host synchronisation):
    (same shape) int64. The device twin of the native `rank_schedule`, rule for rule (see
    src/schedule.rs, whose module comment gives the reasoning for each float rule): power, a = 1:
    r - ceil(t (r - r_min) / T) exactly (integer levels in integers; float ones in float64, exact
    when t (r - r_min) is, as it is for every float32 level); power, a != 1: floor(((T - t) / T)^a
    (r - r_min) + RANK_SNAP) in float64; cosine: floor(cos(pi/2 * (t / T)) (r - r_min) + RANK_SNAP)
    in float64; step: r where t < fl(rank_boundary * T) in float64, else r_min."""
    d, big_t = rank - min_rank, num_train_timesteps
    wide = torch.float64  # (the kernels' devices, CPU and CUDA, have it)
    if rank_schedule == "step":
        return torch.where(level.to(wide) < rank_boundary * big_t, rank, min_rank).long()
    if rank_schedule == "cosine":
        frac = torch.cos((math.pi / 2) * (level.to(wide) / big_t))
        return torch.floor(frac * d + RANK_SNAP).long().clamp(min=0, max=d) + min_rank
    if rank_exponent == 1.0:
        if not level.is_floating_point():
            ceil = (level.long() * d + (big_t - 1)) // big_t
        else:
            y = level.to(wide) * d
            c = torch.ceil(y / big_t)
            # y / T was rounded: step c onto the exact ceiling (c T and (c - 1) T are exact integers).
            ceil = (c - ((c - 1) * big_t >= y).to(wide) + (c * big_t < y).to(wide)).long()
        return (d - ceil) + min_rank
    frac = ((big_t - level.to(wide)) / big_t) ** rank_exponent
    return torch.floor(frac * d + RANK_SNAP).long().clamp(max=d) + min_rank
