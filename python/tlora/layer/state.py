"""What the adapted layers of one adapter share: the ranks of the current forward with the masks
built from them (`RankState`), and the folded inference weights (`FoldCache`).

Folded weights are admitted while they fit the device's budget and never evicted to make room (a
full cache keeps what it has and the rest is folded on the spot, so a sweep over more layers than
fit never thrashes); a layer drops its own entries when its weight or factors change.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..config import AdapterConfig

if TYPE_CHECKING:
    from .linear import TLoraLinear


def default_fold_budget(device: torch.device) -> int:
    """Bytes of folded weights kept per device: 1 GiB on the CPU, 1/8 of a GPU's memory."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory // 8
    return 1 << 30


class FoldCache:
    """Folded inference weights of the layers of one adapter, by device, within a byte budget per
    device (`budget`: one number for every device, or None for `default_fold_budget`). Entries
    are admitted while they fit and never evicted for a newcomer; stale ones go when their layer
    notices. `hits`, `misses` (folded on the spot, not kept) and `stores` count what happened."""

    def __init__(self, budget: int | None = None) -> None:
        self.budget = budget
        self._sizes: dict[tuple, tuple[TLoraLinear, int]] = {}
        self._used: dict[torch.device, int] = {}
        self.hits = self.misses = self.stores = 0

    def __len__(self) -> int:
        return len(self._sizes)

    @property
    def nbytes(self) -> int:
        return sum(self._used.values())

    def budget_for(self, device: torch.device) -> int:
        return default_fold_budget(device) if self.budget is None else self.budget

    def get(self, layer: TLoraLinear, key: tuple) -> torch.Tensor | None:
        w = layer._folded.get(key)
        if w is not None:
            self.hits += 1
        return w

    def put(self, layer: TLoraLinear, key: tuple, w: torch.Tensor) -> bool:
        """Keep `w` if it fits the budget of its device as things are."""
        size = w.numel() * w.element_size()
        used = self._used.get(w.device, 0)
        if used + size > self.budget_for(w.device):
            self.misses += 1
            return False
        layer._folded[key] = w
        self._sizes[(id(layer), key)] = (layer, size)
        self._used[w.device] = used + size
        self.stores += 1
        return True

    def drop(self, layer: TLoraLinear) -> None:
        """Forget one layer's folds."""
        for key, w in layer._folded.items():
            _, size = self._sizes.pop((id(layer), key))
            self._used[w.device] -= size
        layer._folded.clear()

    def clear(self) -> None:
        for layer, _ in list(self._sizes.values()):
            layer._folded.clear()
        self._sizes.clear()
        self._used.clear()

    def stats(self) -> dict[str, int]:
        return {
            "hits": self.hits,
            "misses": self.misses,
            "stores": self.stores,
            "entries": len(self),
            "bytes": self.nbytes,
        }


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
        self.masked = config.masked
        self.ranks: list[int] | None = None
        self.rank_tensor: torch.Tensor | None = None
        self.pinned = False  # True inside `with adapter.timestep(...)`: the hook leaves ranks alone
        self.fast_path = True  # fold the update into the weight at inference
        self.fold_cache = FoldCache()
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
        return rank_mask(ranks, self.rank, self.blocks, self.scale, device, dtype, self._cols(device))


def rank_mask(
    ranks: list[int] | torch.Tensor | None,
    rank: int,
    blocks: int,
    scale: float,
    device: torch.device,
    dtype: torch.dtype,
    cols: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """The (B or 1, blocks * rank) mask, scale included, for host ranks (a list; None: full rank)
    or a (B,) rank tensor on the device; None where it would be all ones. Entry (b, j) is set when
    rank j mod `rank` is below sample b's rank."""
    if cols is None:
        cols = torch.arange(rank, device=device).repeat(blocks)
    width = rank * blocks
    if isinstance(ranks, torch.Tensor):
        m = (cols.unsqueeze(0) < ranks.to(device).reshape(-1, 1)).to(dtype)
    elif ranks is None or all(k >= rank for k in ranks):
        return None if scale == 1.0 else torch.full((1, width), scale, device=device, dtype=dtype)
    elif all(k == ranks[0] for k in ranks):
        m = (cols < ranks[0]).to(dtype).unsqueeze(0)
    else:  # one host-to-device copy per forward, shared by every layer
        m = (cols.unsqueeze(0) < torch.tensor(ranks, device=device).unsqueeze(1)).to(dtype)
    return m * scale if scale != 1.0 else m
