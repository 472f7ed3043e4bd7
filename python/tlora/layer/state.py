"""What the adapted layers of one adapter share: the ranks of the current forward with the masks
built from them (`RankState`), and the folded inference weights (`FoldCache`).

Folded weights are admitted while they fit the device's budget and never evicted to make room (a
full cache keeps what it has and the rest is folded on the spot, so a sweep over more layers than
fit never thrashes); a layer drops its own entries when its weight or factors change.

A layer's folds are valid while its factors hold the values they were folded from, however they
were written. In-place version counters miss writes through `.data` (diffusers' `EMAModel.copy_to`
/ `restore`, `p.data.add_`), and numpy views miss every counter, so the cache keeps a copy of the
factors each layer's folds came from (factors are small next to a folded weight: r (in + out)
against in x out) and compares them before a fold is used: once per model forward for all the
layers at once (one device read-back on a GPU), or at each call of a layer used outside its
model's forward.
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
        # Per layer with folds: (layer, copies of the factors its folds were made from).
        self._sources: dict[int, tuple[TLoraLinear, list[torch.Tensor]]] = {}
        self._checked_forward: int | None = None  # the model forward whose check covers every layer
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
        if id(layer) not in self._sources:
            self._sources[id(layer)] = (layer, [f.detach().clone() for f in layer.factors()])
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
        self._sources.pop(id(layer), None)

    def clear(self) -> None:
        for layer, _ in list(self._sizes.values()):
            layer._folded.clear()
        self._sizes.clear()
        self._used.clear()
        self._sources.clear()

    def check(self, layer: TLoraLinear, forward: int | None) -> None:
        """Drop the folds of layers whose factors no longer hold the values they were folded
        from. Inside model forward number `forward`, every layer is checked at its first call (at
        once: one read-back), and not again in that forward; outside one (None), `layer` alone."""
        if forward is None:
            self._drop_stale([layer])
        elif forward != self._checked_forward:
            self._checked_forward = forward
            self._drop_stale([entry[0] for entry in self._sources.values()])

    def _drop_stale(self, layers: list[TLoraLinear]) -> None:
        layers = [m for m in layers if id(m) in self._sources]
        if not layers:
            return
        now = [[f.detach() for f in m.factors()] for m in layers]
        then = [self._sources[id(m)][1] for m in layers]
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
        for m, is_stale in zip(layers, stale):
            if is_stale:
                self.drop(m)
                m._folded_for = None

    def stats(self) -> dict[str, int]:
        return {
            "hits": self.hits,
            "misses": self.misses,
            "stores": self.stores,
            "entries": len(self),
            "bytes": self.nbytes,
        }


def _same(now: list[torch.Tensor], then: list[torch.Tensor]) -> bool:
    """The factors hold exactly the values (and shapes, dtypes) of the copies."""
    return len(now) == len(then) and all(
        a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b)
        for a, b in zip(now, then)
    )


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


# Values of the a != 1 rank rule within this below an integer count as that integer: the same
# constant as SNAP in src/schedule.rs, whose module comment explains the two rules.
RANK_SNAP = 1e-9


def ranks_of_levels(level: torch.Tensor, rank: int, min_rank: int, exponent: float, num_train_timesteps: int):
    """r(t) for noise levels t in [0, T] as tensor ops on their device (no host synchronisation):
    (same shape) int64. The device twin of the native `rank_schedule`, rule for rule (see
    src/schedule.rs): for a = 1, r - ceil(t (r - r_min) / T) exactly (integer levels in integers;
    float ones in float64, exact when t (r - r_min) is, as it is for every float32 level); for
    a != 1, floor(((T - t) / T)^a (r - r_min) + RANK_SNAP) in float64."""
    d, big_t = rank - min_rank, num_train_timesteps
    wide = torch.float32 if level.device.type == "mps" else torch.float64  # (MPS has no float64)
    if exponent == 1.0:
        if not level.is_floating_point():
            ceil = (level.long() * d + (big_t - 1)) // big_t
        else:
            y = level.to(wide) * d
            c = torch.ceil(y / big_t)
            # y / T was rounded: step c onto the exact ceiling (c T and (c - 1) T are exact integers).
            ceil = (c - ((c - 1) * big_t >= y).to(wide) + (c * big_t < y).to(wide)).long()
        return (d - ceil) + min_rank
    frac = ((big_t - level.to(wide)) / big_t) ** exponent
    return torch.floor(frac * d + RANK_SNAP).long().clamp(max=d) + min_rank
