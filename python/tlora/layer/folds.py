"""The folded inference weights of the layers of one adapter (`FoldCache`): W_k = W + dW_k per
layer and (rank, device, dtype), owned by the cache; a layer asks for them and hands new ones in
through `get` / `put`, and has them checked (`check`) or forgotten (`drop`).

Folded weights are admitted while they fit the device's budget and never evicted to make room (a
full cache keeps what it has and the rest is folded on the spot, so a sweep over more layers than
fit never thrashes); a layer's entries go when its weight or factors change.

A layer's folds are valid while its factors hold the values they were folded from, however they
were written. In-place version counters miss writes through `.data` (diffusers' `EMAModel.copy_to`
/ `restore`, `p.data.add_`), and numpy views miss every counter, so the cache keeps a copy of the
factors each layer's folds came from (factors are small next to a folded weight: r (in + out)
against in x out) and compares them before a fold is used: once per model forward for all the
layers at once (one device read-back on a GPU), or at each call of a layer used outside its
model's forward.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .linear import TLoraLinear


def default_fold_budget(device: torch.device) -> int:
    """Bytes of folded weights kept per device: 1 GiB on the CPU, 1/8 of a GPU's memory."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory // 8
    return 1 << 30


@dataclass
class _LayerFolds:
    """One layer's entries: what they depend on besides the factors' values (`validity`, the
    layer's `_validity`), copies of the factors they were folded from, and the folded weights by
    (rank, device, dtype)."""

    layer: TLoraLinear
    validity: tuple
    sources: list[torch.Tensor]
    weights: dict[tuple, torch.Tensor] = field(default_factory=dict)


def _nbytes(w: torch.Tensor) -> int:
    return w.numel() * w.element_size()


class FoldCache:
    """Folded inference weights of the layers of one adapter, by layer and (rank, device, dtype),
    within a byte budget per device (`budget`: one number for every device, or None for
    `default_fold_budget`). Entries are admitted while they fit and never evicted for a newcomer;
    stale ones go at the layer's `check`. `hits`, `misses` (folded on the spot, not kept) and
    `stores` count what happened."""

    def __init__(self, budget: int | None = None) -> None:
        self.budget = budget
        self._layers: dict[int, _LayerFolds] = {}  # by id(layer)
        self._used: dict[torch.device, int] = {}
        self._checked_forward: int | None = None  # the model forward whose check covers every layer
        self.hits = self.misses = self.stores = 0

    def __len__(self) -> int:
        return sum(len(entry.weights) for entry in self._layers.values())

    @property
    def nbytes(self) -> int:
        return sum(self._used.values())

    def budget_for(self, device: torch.device) -> int:
        return default_fold_budget(device) if self.budget is None else self.budget

    # ---- what a layer calls ------------------------------------------------------------------
    def get(self, layer: TLoraLinear, key: tuple) -> torch.Tensor | None:
        """`layer`'s folded weight for `key`, if kept."""
        entry = self._layers.get(id(layer))
        w = entry.weights.get(key) if entry is not None else None
        if w is not None:
            self.hits += 1
        return w

    def put(self, layer: TLoraLinear, key: tuple, w: torch.Tensor, validity: tuple | None) -> bool:
        """Keep `w`, folded from `layer`'s current factors under `validity` (None: not trackable,
        never kept), if it fits the budget of its device as things are."""
        if validity is None:
            self.misses += 1
            return False
        entry = self._layers.get(id(layer))
        if entry is not None and entry.validity != validity:
            self.drop(layer)
            entry = None
        size, used = _nbytes(w), self._used.get(w.device, 0)
        old = entry.weights.get(key) if entry is not None else None
        if old is not None:
            used -= _nbytes(old)
        if used + size > self.budget_for(w.device):
            self.misses += 1
            return False
        if entry is None:
            sources = [f.detach().clone() for f in layer.factors()]
            entry = self._layers[id(layer)] = _LayerFolds(layer, validity, sources)
        entry.weights[key] = w
        self._used[w.device] = used + size
        self.stores += 1
        return True

    def drop(self, layer: TLoraLinear) -> None:
        """Forget `layer`'s folds (its weight or factors are about to change, or have moved)."""
        entry = self._layers.pop(id(layer), None)
        if entry is not None:
            for w in entry.weights.values():
                self._used[w.device] -= _nbytes(w)

    def check(self, layer: TLoraLinear, validity: tuple | None, forward: int | None) -> None:
        """Drop folds that no longer hold: `layer`'s when `validity` is not what they were folded
        under, and those of every layer whose factors no longer hold the values they were folded
        from. Inside model forward number `forward`, every layer is compared at the first call of
        one with folds (at once: one read-back), and not again in that forward; outside one
        (None), `layer` alone."""
        entry = self._layers.get(id(layer))
        if entry is None:
            return
        if entry.validity != validity:
            self.drop(layer)
        elif forward is None:
            self._drop_stale([entry])
        elif forward != self._checked_forward:
            self._checked_forward = forward
            self._drop_stale(list(self._layers.values()))

    # ---- inspection and housekeeping -----------------------------------------------------------
    def folds_of(self, layer: TLoraLinear) -> dict[tuple, torch.Tensor]:
        """A copy of `layer`'s kept folds, by (rank, device, dtype)."""
        entry = self._layers.get(id(layer))
        return dict(entry.weights) if entry is not None else {}

    def clear(self) -> None:
        self._layers.clear()
        self._used.clear()

    def stats(self) -> dict[str, int]:
        return {
            "hits": self.hits,
            "misses": self.misses,
            "stores": self.stores,
            "entries": len(self),
            "bytes": self.nbytes,
        }

    def _drop_stale(self, entries: list[_LayerFolds]) -> None:
        now = [[f.detach() for f in e.layer.factors()] for e in entries]
        then = [e.sources for e in entries]
        if all(f.device.type == "cpu" for fs in now for f in fs):
            stale = [not _same(a, b) for a, b in zip(now, then)]
        else:
            # Two multi-tensor kernels and one read-back for every layer of the adapter. (A NaN in
            # a factor reads as changed: such a layer is folded afresh, never wrongly reused.)
            flat_now = [f for fs in now for f in fs]
            flat_then = [f for fs in then for f in fs]
            pairs = zip(flat_now, flat_then)
            if any(a.shape != b.shape or a.dtype != b.dtype or a.device != b.device for a, b in pairs):
                stale = [not _same(a, b) for a, b in zip(now, then)]
            else:
                norms = torch._foreach_norm(torch._foreach_sub(flat_now, flat_then), float("inf"))
                changed = (torch.stack([n.to(flat_now[0].device) for n in norms]) != 0).tolist()
                stale, i = [], 0
                for fs in now:
                    stale.append(any(changed[i : i + len(fs)]))
                    i += len(fs)
        for entry, is_stale in zip(entries, stale):
            if is_stale:
                self.drop(entry.layer)


def _same(now: list[torch.Tensor], then: list[torch.Tensor]) -> bool:
    """The factors hold exactly the values (and shapes, dtypes) of the copies."""
    return len(now) == len(then) and all(
        a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b)
        for a, b in zip(now, then)
    )
