"""`TLoraLinear`: the base `nn.Linear` plus the masked low-rank update computed by the native
kernels.

One computation serves training and inference, eager and compiled, every dtype:
`base(x) + ((x D^T) * M) U^T` at the adapter's full rank r, where the timestep's ranks are data,
the mask M (one row per sample, or one shared row; the update's scale is in it), not shapes. So
a call costs the same few kernels whatever its ranks (a GPU's launch count), nothing is read back
to the host inside a layer, and torch.compile builds one graph for every rank.

For T-LoRA the operands are the difference form, D = [Q; Q0 - Q], U = [P Λ - P0 Λ0, -P0 Λ0]
(src/kernel/mod.rs explains why: no cancellation in half precision); they are written once per
call into two buffers the layer keeps per compute dtype.

A float32 (or float64) training call with many tokens per sample folds the masked update into the
weight instead, y = x (W + (U * M) D)^T + b, one folded weight per mask row, which costs less
than the factored product there (src/kernel/folded.rs; `_folded_training_forward` says when).

Inference adds a fast path: when no gradient is needed and the ranks are known on the host, the
update at rank k is folded into the weight, W_k = W + dW_k, and y = x W_k^T + b costs what the bare
layer costs. Folded weights live in the adapter's `FoldCache` (folds.py), which owns them; the layer
gets and puts them there and has them checked. An entry is used only
while the base weight is the very tensor it was built from at the same in-place version, every
factor holds the values it was folded from (compared with a copy: writes through `.data`, such as
diffusers' `EMAModel.copy_to`, bump no version counter) and, inside a PEFT LoRA layer, while PEFT's
merged adapters are the same (PEFT's `merge()` and diffusers' `fuse_lora()` write the base weight
through `.data`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import _native
from ..config import AdapterConfig
from .factors import FROZEN, LORA, is_tlora, n_trainable, names, trainable
from .ops import COMPUTE_DTYPES, DTYPE_NAMES, FOLDED_DTYPES, FoldedUpdate, Update, check_compute_dtype, update_op
from .ranks import RankState


def _plain_linear(base: nn.Module) -> bool:
    """Whether calling `base` is exactly F.linear(x, weight, bias): no hooks, no patched forward
    (e.g. accelerate's offloading), so that a folded weight may replace its weight."""
    from torch.nn.modules import module as _m

    # (a quantized weight, e.g. torchao's tensor subclasses in a plain nn.Linear, is no float matrix to fold into)
    return (
        type(base) is nn.Linear
        and type(base._parameters["weight"]) is nn.Parameter
        and not base._forward_hooks
        and not base._forward_pre_hooks
        and "forward" not in base.__dict__
        and not _m._global_forward_hooks
        and not _m._global_forward_pre_hooks
    )


@dataclass
class Scratch:
    """The buffers a layer keeps per (compute dtype, device) for its T-LoRA operands, as the native
    `lowrank_operands` takes them (Rust's `kernel::Scratch`): `d` (2r x in; in float32 its first r
    rows are Q itself), `u` (out x 2r; made at the first call that needs it), and `write_frozen`:
    whether u's frozen block must be (re)written (at first, and after the frozen factors changed)."""

    d: torch.Tensor
    u: torch.Tensor | None = None
    write_frozen: bool = True


class TLoraLinear(nn.Module):
    """`base_layer(x) + x dW_t^T`, with dW_t the update at the ranks in `state` (scale included).

    Factors (float32, whatever `.to()` / `.half()` asks of the model): variant "tlora" trains `p`
    (out x r), `lam` (r), `q` (r x in) and keeps the frozen initial copies `p0`, `lam0`, `q0` as
    buffers; "vanilla" and "lora" train `down` (r x in) and `up` (out x r).
    """

    def __init__(
        self, base_layer: nn.Linear, config: AdapterConfig, state: RankState, factors: dict[str, torch.Tensor]
    ):
        super().__init__()
        self.base_layer = base_layer
        self.config = config
        self.state = state
        # T-LoRA operand buffers per (compute dtype, device); P0 Λ0 with the frozen factors it came from.
        self._operand_bufs: dict[tuple, Scratch] = {}
        self._frozen: tuple[tuple, torch.Tensor] | None = None
        if config.variant == "tlora":
            for name in trainable("tlora"):
                setattr(self, name, nn.Parameter(factors[name]))
            for name in FROZEN:
                self.register_buffer(name, factors[name])
            self._house_q()
        else:
            for name in LORA:
                setattr(self, name, nn.Parameter(factors[name]))
        # (Inference folds live in the adapter's fold cache, `state.fold_cache`, not here.)
        # The PEFT LoRA layer this layer is the base of, if any (set by the Adapter).
        self._peft_owner = None

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
        return names(self.config.variant)

    def _house_q(self) -> None:
        """Keep Q as the first rows of its float32 operand buffer D = [Q; Q0 - Q], so that a
        float32 call does not copy it. (Anything that later replaces Q's storage, such as
        `.data =` or a sharded wrapper, only costs that copy: the kernels check.)"""
        q = self._parameters["q"]
        self._operand_bufs.clear()
        if q.dtype != torch.float32 or q.is_meta:
            return
        r, in_f = q.shape
        d = torch.empty(2 * r, in_f, dtype=torch.float32, device=q.device)
        d[:r].copy_(q.data)
        q.data = d[:r]
        # U's buffer comes with the first float32 call (a bf16 run never needs it).
        self._operand_bufs[(torch.float32, q.device)] = Scratch(d)

    # ---- dtype and device moves --------------------------------------------------------------
    def _apply(self, fn, recurse=True):
        """`.to()`, `.half()`, `.cuda()`... move the adapter's factors with the model but keep
        them float32: the optimizer's state and the fold's accuracy depend on it. The base layer
        is converted as asked."""
        if recurse:
            for child in self.children():
                child._apply(fn)
        for store in (self._parameters, self._buffers):
            for name, t in store.items():
                if t is None:
                    continue
                target = fn(torch.empty(0, dtype=t.dtype, device=t.device))  # where fn sends a tensor
                if t.is_meta or target.is_meta:
                    moved = fn(t.data).to(t.dtype)
                elif target.device != t.device:
                    moved = t.data.to(target.device)
                else:
                    continue  # a dtype change only: the factors stay float32
                if store is self._parameters:
                    t.data = moved
                    if t.grad is not None:
                        t.grad.data = t.grad.data.to(moved.device)
                else:
                    store[name] = moved
        self._operand_bufs.clear()
        self._frozen = None
        if self.config.variant == "tlora":
            self._house_q()
        self.state.fold_cache.drop(self)
        return self

    # ---- forward ------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        factors = self.factors()
        base = self._modules["base_layer"]
        if torch.compiler.is_compiling():
            return self._compiled_forward(x, factors, base)
        training = torch.is_grad_enabled() and (
            x.requires_grad
            or any(f.requires_grad for f in factors)
            or any(p.requires_grad for p in base._parameters.values() if p is not None)
        )
        if training:  # the factors are about to change
            self.state.fold_cache.drop(self)
            y = self._folded_training_forward(x, factors, base)
            if y is not None:
                return y
        elif self.state.fast_path:
            y = self._folded_forward(x, factors, base)
            if y is not None:
                return y
        # The base layer on 2-D rows: its output is then a fresh tensor (not a view) that the
        # update is added into in place (one fused multiply-add), reshaped once at the end.
        rows = x.dim() > 2 and not base._forward_hooks and not base._forward_pre_hooks
        y = base(x.reshape(-1, x.shape[-1]) if rows else x)
        device = x.device
        autocast = torch.is_autocast_enabled(device.type)
        dtype = torch.get_autocast_dtype(device.type) if autocast else x.dtype
        check_compute_dtype(dtype)
        if autocast:
            # Run the update in the autocast dtype, as the base layer did; the kernels handle the
            # float32 factors themselves, so autocast must not rewrite their ops.
            with torch.autocast(device.type, enabled=False):
                out = self._add_update(y, x.to(dtype), factors, dtype)
        else:
            out = self._add_update(y, x, factors, dtype)
        return out.view(*x.shape[:-1], out.shape[-1]) if out.dim() != x.dim() else out

    def _add_update(
        self, y: torch.Tensor, x: torch.Tensor, factors: list[torch.Tensor], dtype: torch.dtype
    ) -> torch.Tensor:
        mask = self.state.mask(x.device, dtype)
        d, u = self._operands(factors, dtype, x.device)
        if (
            y.dtype == dtype
            and y._base is None
            and y.is_contiguous()
            and y.numel() // max(y.shape[-1], 1) == x.numel() // max(x.shape[-1], 1)
        ):
            # y is the base layer's fresh output that nobody else holds: add into it.
            return Update.apply(y, x, mask, d, u, n_trainable(factors), *factors)
        delta = Update.apply(None, x, mask, d, u, n_trainable(factors), *factors)
        return y.view_as(delta) + delta.to(y.dtype) if y.shape != delta.shape else y + delta.to(y.dtype)

    def _operands(self, factors: list[torch.Tensor], dtype: torch.dtype, device: torch.device):
        """(D, U) in `dtype`: T-LoRA's written into this layer's buffers, LoRA's its factors."""
        if not is_tlora(factors):
            down, up = factors
            return (down, up) if down.dtype == dtype else (down.to(dtype), up.to(dtype))
        p, lam, q, p0, lam0, q0 = factors
        # P0 Λ0 by the frozen buffers' identity and version: they are the method's constants, which
        # tlora.load and load_state_dict write in place (a new version). Forming it afresh at each
        # call would also see writes through `.data`, at 3 more kernels per layer and call.
        frozen = (p0.data_ptr(), p0._version, lam0.data_ptr(), lam0._version, p0.device)
        if self._frozen is None or self._frozen[0] != frozen:
            self._frozen = (frozen, _native.frozen_block(p0, lam0))
            for bufs in self._operand_bufs.values():
                bufs.write_frozen = True
        key = (dtype, p.device)
        bufs = self._operand_bufs.get(key)
        r, in_f, out_f = q.shape[0], q.shape[1], p.shape[0]
        if bufs is None:
            bufs = self._operand_bufs[key] = Scratch(torch.empty(2 * r, in_f, dtype=dtype, device=p.device))
        if bufs.u is None:
            bufs.u = torch.empty(out_f, 2 * r, dtype=dtype, device=p.device)
        d, u = _native.lowrank_operands(factors, self._frozen[1], DTYPE_NAMES[dtype], bufs.d, bufs.u, bufs.write_frozen)
        bufs.write_frozen = False
        return d, u

    def _folded_training_forward(self, x: torch.Tensor, factors: list[torch.Tensor], base: nn.Module):
        """The training call with the masked update folded into the weight, x (W + (U * M) D)^T + b
        (src/kernel/folded.rs), or None where the factored path runs: half precision or autocast
        (the folded weight would round the update away), a base layer that is not a plain frozen
        nn.Linear, or too few tokens per folded weight for the fold to pay (`_native.fold_plan`, which
        also says whether the backward keeps the folded weights or refolds them)."""
        if not _plain_linear(base):
            return None
        w, b = base._parameters["weight"], base._parameters["bias"]
        dtype, device = x.dtype, x.device
        out_f, in_f = w.shape
        if (
            dtype not in FOLDED_DTYPES
            or w.dtype != dtype
            or w.requires_grad
            or (b is not None and (b.requires_grad or b.dtype != dtype))
            or x.dim() == 0
            or x.shape[-1] != in_f
            or device != w.device
            or torch.is_autocast_enabled(device.type)
        ):
            return None
        mask = self.state.mask(device, dtype)
        folds = 1 if mask is None else mask.shape[0]  # one folded weight per mask row
        keep = _native.fold_plan(x.numel() // (in_f * folds), in_f, out_f)
        if keep is None:
            return None
        d, u = self._operands(factors, dtype, device)
        return FoldedUpdate.apply(x, w, b, mask, d, u, keep, n_trainable(factors), *factors)

    def _compiled_forward(self, x: torch.Tensor, factors: list[torch.Tensor], base: nn.Module) -> torch.Tensor:
        """The update as custom ops that torch.compile traces, the mask an input of the graph."""
        y = base(x)
        device = x.device
        if torch.is_autocast_enabled(device.type):
            dtype = torch.get_autocast_dtype(device.type)
            with torch.autocast(device.type, enabled=False):
                delta, _ = update_op(x.to(dtype), factors, self.state.mask(device, dtype))
        else:
            delta, _ = update_op(x, factors, self.state.mask(device, x.dtype))
        return y + delta.to(y.dtype)

    # ---- inference fast path ------------------------------------------------------------------
    def _validity(self, w: torch.Tensor, factors: list[torch.Tensor]) -> tuple | None:
        """What a folded weight depends on: the very tensors at their in-place versions, and the
        merged adapters of a PEFT layer around this one (None: not trackable, e.g. inference-mode
        tensors, which are then never cached)."""
        owner = self._peft_owner() if self._peft_owner is not None else None
        merged = tuple(getattr(owner, "merged_adapters", ())) if owner is not None else ()
        try:
            return (w.data_ptr(), w._version, merged, *[(f.data_ptr(), f._version) for f in factors])
        except RuntimeError:  # inference tensors have no version counter
            return None

    def _folded_forward(self, x: torch.Tensor, factors: list[torch.Tensor], base: nn.Module) -> torch.Tensor | None:
        """y computed with folded weights, or None where the factored path should run (ranks
        not known on the host, small inputs, or anything unusual: the factored path then also
        raises the proper errors)."""
        state = self.state
        if not state.host_known or not _plain_linear(base):
            return None
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
        if (x.dtype != dtype and not autocast) or dtype not in COMPUTE_DTYPES or x.dtype not in COMPUTE_DTYPES:
            return None
        tokens = x.numel() // in_f
        ranks = state.ranks
        if ranks is None:
            groups = [(r, None, tokens)]
        else:
            first = ranks[0]
            if all(k == first for k in ranks):
                groups = [(first, None, tokens)]
            else:
                if x.dim() < 2 or x.shape[0] != len(ranks):
                    return None
                per_sample = tokens // len(ranks)
                rows: dict[int, list[int]] = {}
                for i, k in enumerate(ranks):
                    rows.setdefault(k, []).append(i)
                groups = [(k, idx, per_sample * len(idx)) for k, idx in rows.items()]
        cache = state.fold_cache
        valid = self._validity(w, factors)
        # Folds of other tensors, or of factors written through `.data` (EMA), numpy, ... (no
        # version counter tells): dropped here.
        cache.check(self, valid, state.forward)
        folded = []
        for k, _, n in groups:
            key = (k, device, dtype)
            wk = cache.get(self, key)
            if wk is None and n * (in_f + out_f) <= in_f * out_f:
                return None  # the factored update is cheaper than folding this rank
            folded.append((key, wk))
        weights = []
        for (key, wk), (k, _, _) in zip(folded, groups):
            if wk is None:
                wk = self._fold(w, factors, k, dtype)
                cache.put(self, key, wk, valid)
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
            folded = _native.fold_weight(
                w.detach(), [f.detach() for f in factors], None if k == self.config.rank else k, self.config.scale_at(k)
            )
            return folded.to(dtype)

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"variant={c.variant}, rank={c.rank}, min_rank={c.min_rank}, in={self.in_features}, out={self.out_features}"
        )


def _grouped_linear(
    x: torch.Tensor, weights: list[torch.Tensor], bias: torch.Tensor | None, groups: list, out_f: int
) -> torch.Tensor:
    """x W_k^T + b, with W_k the weight of each sample's group."""
    if len(weights) == 1:
        return F.linear(x, weights[0], bias)
    y = x.new_empty((*x.shape[:-1], out_f))
    for wk, (_, idx, _) in zip(weights, groups):
        index = torch.tensor(idx, device=x.device)
        y.index_copy_(0, index, F.linear(x.index_select(0, index), wk, bias))
    return y
