"""The adapted linear layer: the base `nn.Linear` plus the masked low-rank update computed by
the native kernels.

Three paths compute the same output:

- the factored path, `base(x) + scale * ((x D^T) * m) U^T` on the active ranks, differentiable
  (used whenever a gradient is needed);
- in training, for T-LoRA in float32/float64 with many tokens, the same sum with the frozen
  branch's first r_min ranks folded into the base weight (the stage W_s = W - s P0 Λ0 Q0 at r_min
  ranks), `x W_s^T + b + s x [Q_k; Q0_{r_min..k}]^T [Λ_k P_k, -Λ0 P0_{r_min..k}]^T`
  (`SplitLowRank`): every timestep uses at least r_min ranks and W_s never changes during a run,
  so it is kept in the fold cache when there is room, and the frozen branch then costs only its
  k - r_min ranks above the stage. A batch of mixed ranks shares the base product and runs each
  sample's low-rank products at its own rank. Chosen by `_split_plan` (`SPLIT_FROZEN = False` turns it off;
  half-precision training keeps the factored path, where the two branches cancel exactly at
  initialisation);
- the inference fast path: when no gradient is needed (`torch.is_grad_enabled()` is False, or
  neither the input, the factors nor the base layer require grad), the update is folded into the
  weight, W_k = W + dW_k for each rank k the batch uses, and y = x W_k^T + b costs what the bare
  layer costs. A rank is folded when `tokens * (in + out) > in * out` (folding is cheaper than the
  factored update) or when its folded weight is already cached. A batch whose samples use
  different ranks is computed group by group (one group per rank).

Folded weights (and the training stages) are cached per adapter (shared by its layers) in a
least-recently-used cache of at most `FOLD_CACHE_BYTES` bytes (default 1 GiB; 0 turns caching off,
folding still happens). An entry is used only while the base weight and every factor it depends on
are the very tensors it was built from, at the same in-place version (`Tensor._version`,
`data_ptr()`): optimizer steps, `load_state_dict`, `copy_` under `no_grad`, `.to()` all invalidate
it, and a layer drops all its inference folds as soon as one is stale or a forward needs
gradients. Writes through `.data` bypass version counters:
after those, call `adapter.state.fold_cache.clear()`. `FAST_PATH = False` turns the fast path off
(every forward takes the factored path).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from . import _native
from .config import AdapterConfig

# Module-level switches (read at every forward): the inference fast path, its cache's budget, and
# the training path that folds T-LoRA's frozen branch into the base weight.
FAST_PATH = True
FOLD_CACHE_BYTES = 1 << 30
SPLIT_FROZEN = True

_COMPUTE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class FoldCache:
    """Folded weights of the layers of one adapter, least recently used first out, at most
    `FOLD_CACHE_BYTES` bytes in all (read when an entry is added). Two kinds share the budget: the
    inference fast path's W + dW_k (in each layer's `_folded`, keyed by (rank, device, dtype)) and
    the training stages W - s P0 Λ0 Q0 at r_min ranks (in `_staged`, keyed by ("stage", rank,
    device, dtype))."""

    def __init__(self) -> None:
        self._lru: OrderedDict[tuple, tuple["TLoraLinear", int]] = OrderedDict()
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._lru)

    @staticmethod
    def _store(layer: "TLoraLinear", key: tuple) -> dict:
        return layer._staged if key[0] == "stage" else layer._folded

    def get(self, layer: "TLoraLinear", key: tuple) -> torch.Tensor | None:
        w = self._store(layer, key).get(key)
        if w is not None:
            self._lru.move_to_end((id(layer), key))
        return w

    def put(self, layer: "TLoraLinear", key: tuple, w: torch.Tensor, evict: bool = True) -> bool:
        """Adds an entry, evicting the least recently used ones to make room (`evict`), or only if
        it fits as things are: a training run visits every layer once per step, so evicting would
        drop exactly the entry the next step needs first, while a full cache keeps a fixed subset."""
        size = w.numel() * w.element_size()
        budget = FOLD_CACHE_BYTES
        if size > budget or (not evict and self.nbytes + size > budget):
            return False
        while self._lru and self.nbytes + size > budget:
            (_, old_key), (old_layer, old_size) = self._lru.popitem(last=False)
            self._store(old_layer, old_key).pop(old_key, None)
            self.nbytes -= old_size
        self._store(layer, key)[key] = w
        self._lru[(id(layer), key)] = (layer, size)
        self.nbytes += size
        return True

    def drop(self, layer: "TLoraLinear", stages: bool = False) -> None:
        """Forget one layer's inference folds (`stages`: its training stages instead)."""
        store = layer._staged if stages else layer._folded
        for key in store:
            _, size = self._lru.pop((id(layer), key))
            self.nbytes -= size
        store.clear()

    def clear(self) -> None:
        for layer, _ in list(self._lru.values()):
            layer._folded.clear()
            layer._staged.clear()
        self._lru.clear()
        self.nbytes = 0


class RankState:
    """The ranks that every adapted layer of one model uses for the current forward.

    `ranks` is None (full rank r, as at t = 0), or a list of ints: one shared rank, or one per
    sample of the batch. Set by the model's timestep hook or by `Adapter.timestep`/`Adapter.rank`.
    `fold_cache` holds the folded weights of the inference fast path.
    """

    __slots__ = ("ranks", "pinned", "fold_cache")

    def __init__(self) -> None:
        self.ranks: list[int] | None = None
        self.pinned = False  # True inside `with adapter.timestep(...)`: the hook leaves ranks alone
        self.fold_cache = FoldCache()


class LowRankUpdate(torch.autograd.Function):
    """delta = the adapter's output for x, differentiable in x and in the trainable factors."""

    @staticmethod
    def forward(ctx, x, ranks, scale, n_trainable, *factors):  # type: ignore[override]
        delta, h, d, u = _native.lowrank_forward(x, list(factors), ranks, scale)
        ctx.save_for_backward(x, h, d, u, *factors)
        ctx.ranks, ctx.scale, ctx.n_trainable = ranks, scale, n_trainable
        return delta

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        return _backward(ctx, grad, ctx.needs_input_grad)


class LowRankAdd(torch.autograd.Function):
    """y + the adapter's output for x, added into y in place (y: the base layer's fresh output,
    same dtype as x); differentiable in y, x and the trainable factors."""

    @staticmethod
    def forward(ctx, y, x, ranks, scale, n_trainable, *factors):  # type: ignore[override]
        h, d, u = _native.lowrank_forward_add(y, x, list(factors), ranks, scale)
        ctx.mark_dirty(y)
        ctx.save_for_backward(x, h, d, u, *factors)
        ctx.ranks, ctx.scale, ctx.n_trainable = ranks, scale, n_trainable
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        return (grad, *_backward(ctx, grad, ctx.needs_input_grad[1:]))


class SplitLowRank(torch.autograd.Function):
    """T-LoRA in training, float32/float64: the base layer and the update in one function, with the
    frozen branch's first `stage_rank` ranks folded into the base weight (W_s: `staged`, cached,
    or folded on the spot with bitwise the same result) and its ranks stage_rank..k next to the
    trainable ones: the same sum as base + update. Differentiable in x and P, lam, Q; the base
    weight and bias must be frozen."""

    @staticmethod
    def forward(ctx, x, weight, bias, ranks, scale, stage_rank, staged, *factors):  # type: ignore[override]
        y, h, d, u = _native.lowrank_split_forward(x, weight, bias, list(factors), ranks, scale, stage_rank, staged)
        ctx.save_for_backward(x, h, d, u, weight, staged, *factors)
        ctx.ranks, ctx.scale, ctx.stage_rank = ranks, scale, stage_rank
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        x, h, d, u, weight, staged, *factors = ctx.saved_tensors
        needs = ctx.needs_input_grad
        wanted = [needs[0], needs[7], needs[8], needs[9]]
        none = (None,) * (7 + len(factors))
        if not any(wanted):
            return none
        gx, gp, glam, gq = _native.lowrank_split_backward(grad, x, h, d, u, weight, factors, ctx.ranks, ctx.scale,
                                                          wanted, ctx.stage_rank, staged)
        return (gx, *none[1:7], gp, glam, gq, *none[10:])


# ---- torch.compile ----------------------------------------------------------------------------
# Dynamo cannot trace into the extension's functions, so under `torch.compile` the update runs
# through these custom ops (with fake kernels for tracing and a registered backward): the adapted
# layers then compile into the model's graph instead of breaking it. The forward saves nothing but
# its inputs; the backward recomputes the kernels' intermediates (one down-projection). Eager
# calls keep the autograd.Functions above, which save them.

@torch.library.custom_op("tlora::lowrank_delta", mutates_args=())
def _lowrank_delta(x: torch.Tensor, factors: list[torch.Tensor], ranks: list[int] | None, scale: float) -> torch.Tensor:
    return _native.lowrank_forward(x, factors, ranks, scale)[0]


@_lowrank_delta.register_fake
def _(x, factors, ranks, scale):
    out_f = factors[0].shape[0] if len(factors) == 6 else factors[1].shape[0]
    return x.new_empty((*x.shape[:-1], out_f))


@torch.library.custom_op("tlora::lowrank_delta_backward", mutates_args=())
def _lowrank_delta_backward(grad: torch.Tensor, x: torch.Tensor, factors: list[torch.Tensor], ranks: list[int] | None,
                            scale: float, needs: list[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _, h, d, u = _native.lowrank_forward(x, factors, ranks, scale)
    grads = _native.lowrank_backward(grad.contiguous(), x, h, factors, ranks, scale, needs, d, u)
    # Custom ops return tensors: an empty one stands for "not computed".
    return tuple(g if g is not None else x.new_empty(0) for g in grads)  # type: ignore[return-value]


@_lowrank_delta_backward.register_fake
def _(grad, x, factors, ranks, scale, needs):
    like = [x, *factors[:3]]
    return tuple(torch.empty_like(like[i]) if i < len(like) and needs[i] else x.new_empty(0) for i in range(4))


def _delta_setup_context(ctx, inputs, output):
    x, factors, ranks, scale = inputs
    ctx.save_for_backward(x, *factors)
    ctx.ranks, ctx.scale = ranks, scale


def _delta_backward(ctx, grad):
    x, *factors = ctx.saved_tensors
    n_trainable = 3 if len(factors) == 6 else 2
    needs_x, needs_f = ctx.needs_input_grad[0], list(ctx.needs_input_grad[1])
    needs = [bool(needs_x)] + [bool(needs_f[i]) if i < n_trainable else False for i in range(3)]
    if not any(needs):
        return None, [None] * len(factors), None, None
    gx, *gf = _lowrank_delta_backward(grad, x, factors, ctx.ranks, ctx.scale, needs)
    factor_grads = [gf[i] if i < n_trainable and needs[1 + i] else None for i in range(len(factors))]
    return (gx if needs[0] else None), factor_grads, None, None


_lowrank_delta.register_autograd(_delta_backward, setup_context=_delta_setup_context)


def _plain_linear(base: nn.Module) -> bool:
    """Whether calling `base` is exactly F.linear(x, weight, bias): no hooks, no patched forward
    (e.g. accelerate's offloading), so that a function may use its weight directly."""
    from torch.nn.modules import module as _m

    return (type(base) is nn.Linear and not base._forward_hooks and not base._forward_pre_hooks
            and "forward" not in base.__dict__ and not _m._global_forward_hooks and not _m._global_forward_pre_hooks)


def _backward(ctx, grad, needs):
    """Gradients of (x, ranks, scale, n_trainable, *factors), given which inputs need one."""
    x, h, d, u, *factors = ctx.saved_tensors
    n = ctx.n_trainable
    wanted = [needs[0]] + [needs[4 + i] for i in range(n)] + [False] * (3 - n)
    if not any(wanted):
        return (None,) * (4 + len(factors))
    gx, *gf = _native.lowrank_backward(grad, x, h, factors, ctx.ranks, ctx.scale, wanted, d, u)
    return (gx, None, None, None, *gf[:n], *([None] * (len(factors) - n)))


class TLoraLinear(nn.Module):
    """`base_layer(x) + scale * x dW_t^T`, with dW_t the update at the ranks in `state`.

    Factors (float32): variant "tlora" trains `p` (out x r), `lam` (r), `q` (r x in) and keeps the
    frozen initial copies `p0`, `lam0`, `q0` as buffers; "vanilla" and "lora" train `down`
    (r x in) and `up` (out x r).
    """

    def __init__(self, base_layer: nn.Linear, config: AdapterConfig, state: RankState, factors: dict[str, torch.Tensor]):
        super().__init__()
        self.base_layer = base_layer
        self.config = config
        self.state = state
        if config.variant == "tlora":
            for name in ("p", "lam", "q"):
                setattr(self, name, nn.Parameter(factors[name]))
            for name in ("p0", "lam0", "q0"):
                self.register_buffer(name, factors[name])
        else:
            self.down = nn.Parameter(factors["down"])
            self.up = nn.Parameter(factors["up"])
        # Inference fast path: folded weights by (rank, device, dtype), valid for `_folded_for`;
        # training: the frozen branch's stage (at most one entry), valid for `_staged_for`.
        self._folded: dict[tuple, torch.Tensor] = {}
        self._folded_for: tuple | None = None
        self._staged: dict[tuple, torch.Tensor] = {}
        self._staged_for: tuple | None = None

    # The base layer's attributes, for code that inspects `attn.to_q.weight` and the like.
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def factors(self) -> list[torch.Tensor]:
        """The tensors in the order the native kernels take them (trainable first)."""
        params, bufs = self._parameters, self._buffers  # (what nn.Module.__getattr__ reads, faster)
        if self.config.variant == "tlora":
            return [params["p"], params["lam"], params["q"], bufs["p0"], bufs["lam0"], bufs["q0"]]
        return [params["down"], params["up"]]

    def factor_names(self) -> tuple[str, ...]:
        return ("p", "lam", "q", "p0", "lam0", "q0") if self.config.variant == "tlora" else ("down", "up")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        config = self.config
        ranks = self.state.ranks if config.masked else None
        factors = self.factors()
        base = self._modules["base_layer"]
        if torch.compiler.is_compiling():
            return self._compiled_forward(x, ranks, factors, base)
        if torch.is_grad_enabled() and (x.requires_grad or any(f.requires_grad for f in factors)
                                        or any(p.requires_grad for p in base._parameters.values() if p is not None)):
            if self._folded:  # training: the factors are about to change
                self.state.fold_cache.drop(self)
            plan = self._split_plan(x, ranks, factors, base) if SPLIT_FROZEN and config.variant == "tlora" else None
            if plan is not None:
                w, b = base._parameters["weight"], base._parameters["bias"]
                return SplitLowRank.apply(x, w, b, ranks, config.scale, *plan, *factors)
        elif FAST_PATH:
            y = self._folded_forward(x, ranks, factors, base)
            if y is not None:
                return y
        # The base layer on 2-D rows: its output is then a fresh tensor (not a view) that the
        # update can be added into in place, and reshaped once at the end.
        in_place = x.dim() >= 1 and not base._forward_hooks
        y = base(x.reshape(-1, x.shape[-1]) if in_place and x.dim() != 2 else x)
        device = x.device.type
        if torch.is_autocast_enabled(device):
            # Run the update in the autocast dtype, as the base layer did; the kernels handle the
            # float32 factors themselves, so autocast must not rewrite their ops.
            x = x.to(torch.get_autocast_dtype(device))
            with torch.autocast(device, enabled=False):
                return self._add_update(y, x, ranks, factors, in_place)
        return self._add_update(y, x, ranks, factors, in_place)

    def _compiled_forward(self, x: torch.Tensor, ranks: list[int] | None, factors: list[torch.Tensor],
                          base: nn.Module) -> torch.Tensor:
        """The factored path as custom ops that torch.compile traces (no folding, no split: the
        fold cache keys on data pointers and in-place versions, which a graph cannot check)."""
        y = base(x)
        device = x.device.type
        if torch.is_autocast_enabled(device):
            x = x.to(torch.get_autocast_dtype(device))
            with torch.autocast(device, enabled=False):
                delta = _lowrank_delta(x, factors, ranks, self.config.scale)
        else:
            delta = _lowrank_delta(x, factors, ranks, self.config.scale)
        return y + delta.to(y.dtype)

    def _add_update(self, y: torch.Tensor, x: torch.Tensor, ranks: list[int] | None, factors: list[torch.Tensor],
                    in_place: bool) -> torch.Tensor:
        n_trainable = 3 if self.config.variant == "tlora" else 2
        if in_place and y.dtype == x.dtype and y._base is None:
            # y is the base layer's fresh output that nobody else holds: add into it.
            y = LowRankAdd.apply(y, x, ranks, self.config.scale, n_trainable, *factors)
            return y if x.dim() == 2 else y.view(*x.shape[:-1], y.shape[-1])
        delta = LowRankUpdate.apply(x, ranks, self.config.scale, n_trainable, *factors)
        if y.dim() != delta.dim():
            y = y.view(*x.shape[:-1], y.shape[-1])
        return y + delta.to(y.dtype)

    def _split_plan(self, x: torch.Tensor, ranks: list[int] | None, factors: list[torch.Tensor],
                    base: nn.Module) -> tuple[int, torch.Tensor | None] | None:
        """(stage rank, cached stage or None) when SplitLowRank applies (float32/64, frozen plain
        base layer, valid ranks, none below r_min) and is cheaper than the factored path, else
        None.

        The stage W_s = W - s P0 Λ0 Q0 at r_min ranks replaces the base weight, and the frozen
        branch then costs only its ranks r_min..k in the factored products. Every timestep uses at
        least r_min ranks and W and the frozen factors never change, so W_s is kept for the run in
        the fold cache when it has room: the r_min frozen ranks then cost nothing per step. It is
        kept for layers where folding pays by FLOPs at all, tokens*(in + out) > in*out (the
        frozen products it replaces cost tokens*(in + out) per rank each way, a fold in*out);
        without room it is folded on the spot each way (bitwise the same result), which also
        writes a whole weight: taken from twice that break-even, where it measured faster on CPU
        (benches/RESULTS.md, case a)."""
        w = base._parameters["weight"]
        if (x.dtype not in (torch.float32, torch.float64) or w.dtype != x.dtype or x.device != w.device
                or x.dim() == 0 or torch.is_autocast_enabled(x.device.type) or not _plain_linear(base)):
            return None
        b = base._parameters["bias"]
        if w.requires_grad or (b is not None and b.requires_grad):
            return None
        out_f, in_f = w.shape
        if x.shape[-1] != in_f:
            return None
        r, stage_rank = self.config.rank, self.config.min_rank
        if ranks is not None:
            if any(not stage_rank <= k <= r for k in ranks):
                return None  # (a rank pinned below r_min: the factored path)
            if len(set(ranks)) > 1 and (x.dim() < 2 or x.shape[0] != len(ranks)):
                return None
        per_rank = (x.numel() // in_f) * (in_f + out_f)
        if per_rank <= in_f * out_f:
            return None
        staged = self._stage(w, factors, stage_rank)
        if staged is not None:
            return stage_rank, staged
        return (stage_rank, None) if per_rank > 2 * in_f * out_f else None

    def _stage(self, w: torch.Tensor, factors: list[torch.Tensor], rank: int) -> torch.Tensor | None:
        """The cached W - s P0 Λ0 Q0 at `rank` ranks, built and cached if the fold cache has room
        (without evicting anything), else None. Valid while W and the frozen factors are the same
        tensors at the same in-place version."""
        cache = self.state.fold_cache
        valid = _fold_validity(w, factors[3:])
        if valid is None:
            return None
        key = ("stage", rank, w.device, w.dtype)
        if valid != self._staged_for:
            if self._staged:
                cache.drop(self, stages=True)
            self._staged_for = valid
        staged = cache.get(self, key) if self._staged else None
        if staged is None and cache.nbytes + w.numel() * w.element_size() <= FOLD_CACHE_BYTES:
            with torch.no_grad():
                staged = _native.fold_frozen(w.detach(), [f.detach() for f in factors], rank, self.config.scale)
            if not cache.put(self, key, staged, evict=False):
                return None
        return staged

    # ---- inference fast path ---------------------------------------------------------------
    def _folded_forward(self, x: torch.Tensor, ranks: list[int] | None, factors: list[torch.Tensor],
                        base: nn.Linear) -> torch.Tensor | None:
        """y computed with folded weights, or None where the factored path should run (small
        inputs, or anything unusual: the factored path then also raises the proper errors)."""
        w, b = base._parameters["weight"], base._parameters["bias"]
        out_f, in_f = w.shape
        r = self.config.rank
        if x.dim() == 0 or x.shape[-1] != in_f:
            return None
        device = x.device
        if device != w.device or device != factors[0].device:
            return None
        autocast = torch.is_autocast_enabled(device.type)
        dtype = torch.get_autocast_dtype(device.type) if autocast else w.dtype
        if (x.dtype != dtype and not autocast) or dtype not in _COMPUTE_DTYPES or x.dtype not in _COMPUTE_DTYPES:
            return None
        if torch.compiler.is_compiling() or not _plain_linear(base):
            return None
        tokens = x.numel() // in_f
        if ranks is None:
            groups = [(r, None, tokens)]
        else:
            first = ranks[0]
            if len(ranks) == 1 or all(k == first for k in ranks):
                if not 1 <= first <= r:
                    return None
                groups = [(first, None, tokens)]
            else:
                if any(not 1 <= k <= r for k in ranks) or x.dim() < 2 or x.shape[0] != len(ranks):
                    return None
                per_sample = tokens // len(ranks)
                rows: dict[int, list[int]] = {}
                for i, k in enumerate(ranks):
                    rows.setdefault(k, []).append(i)
                groups = [(k, idx, per_sample * len(idx)) for k, idx in rows.items()]
        cache = self.state.fold_cache
        valid = _fold_validity(w, factors)
        if valid != self._folded_for:
            if self._folded:
                cache.drop(self)
            self._folded_for = valid
        folded = []
        for k, _, n in groups:
            key = (k, device, dtype)
            wk = cache.get(self, key) if self._folded else None
            if wk is None and n * (in_f + out_f) <= in_f * out_f:
                return None  # the factored update is cheaper than folding this rank
            folded.append((key, wk))
        weights = []
        for (key, wk), (k, _, _) in zip(folded, groups):
            if wk is None:
                wk = self._fold(w, factors, k, dtype)
                if valid is not None and FOLD_CACHE_BYTES > 0:
                    cache.put(self, key, wk)
            weights.append(wk)
        bias = None if b is None else b.to(dtype)
        xc = x.to(dtype)
        if autocast:
            with torch.autocast(device.type, enabled=False):
                return _grouped_linear(xc, weights, bias, groups, out_f)
        return _grouped_linear(xc, weights, bias, groups, out_f)

    def _fold(self, w: torch.Tensor, factors: list[torch.Tensor], k: int, dtype: torch.dtype) -> torch.Tensor:
        """W + dW_k in `dtype`, computed in float32 (float64 for double models) and rounded once."""
        with torch.no_grad():
            folded = _native.fold_weight(w.detach(), [f.detach() for f in factors],
                                         None if k == self.config.rank else k, self.config.scale)
            return folded.to(dtype)

    def extra_repr(self) -> str:
        c = self.config
        return f"variant={c.variant}, rank={c.rank}, min_rank={c.min_rank}, in={self.in_features}, out={self.out_features}"


def _fold_validity(w: torch.Tensor, factors: list[torch.Tensor]) -> tuple | None:
    """What a folded weight depends on: the very tensors and their in-place versions (None: not
    trackable, e.g. inference-mode tensors, which are then never cached)."""
    try:
        return (w.data_ptr(), w._version, *[(f.data_ptr(), f._version) for f in factors])
    except RuntimeError:  # inference tensors have no version counter
        return None


def _grouped_linear(x: torch.Tensor, weights: list[torch.Tensor], bias: torch.Tensor | None, groups: list,
                    out_f: int) -> torch.Tensor:
    """x W_k^T + b, with W_k the weight of each sample's group."""
    if len(weights) == 1:
        return F.linear(x, weights[0], bias)
    y = x.new_empty((*x.shape[:-1], out_f))
    for wk, (_, idx, _) in zip(weights, groups):
        index = torch.tensor(idx, device=x.device)
        y.index_copy_(0, index, F.linear(x.index_select(0, index), wk, bias))
    return y
