"""The adapted linear layer: the base `nn.Linear` plus the masked low-rank update computed by
the native kernels."""

from __future__ import annotations

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from . import _native
from .config import AdapterConfig


class RankState:
    """The ranks that every adapted layer of one model uses for the current forward.

    `ranks` is None (full rank r, as at t = 0), or a list of ints: one shared rank, or one per
    sample of the batch. Set by the model's timestep hook or by `Adapter.timestep`/`Adapter.rank`.
    """

    __slots__ = ("ranks", "pinned")

    def __init__(self) -> None:
        self.ranks: list[int] | None = None
        self.pinned = False  # True inside `with adapter.timestep(...)`: the hook leaves ranks alone


class LowRankUpdate(torch.autograd.Function):
    """delta = the adapter's output for x, differentiable in x and in the trainable factors."""

    @staticmethod
    def forward(ctx, x, ranks, scale, n_trainable, *factors):  # type: ignore[override]
        delta, h = _native.lowrank_forward(x, list(factors), ranks, scale)
        ctx.save_for_backward(x, h, *factors)
        ctx.ranks, ctx.scale, ctx.n_trainable = ranks, scale, n_trainable
        return delta

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        x, h, *factors = ctx.saved_tensors
        needs = ctx.needs_input_grad
        n = ctx.n_trainable
        wanted = [needs[0]] + [needs[4 + i] for i in range(n)] + [False] * (3 - n)
        gx, *gf = _native.lowrank_backward(grad, x, h, factors, ctx.ranks, ctx.scale, wanted)
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
        if self.config.variant == "tlora":
            return [self.p, self.lam, self.q, self.p0, self.lam0, self.q0]
        return [self.down, self.up]

    def factor_names(self) -> tuple[str, ...]:
        return ("p", "lam", "q", "p0", "lam0", "q0") if self.config.variant == "tlora" else ("down", "up")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        ranks = self.state.ranks if self.config.masked else None
        device = x.device.type
        if torch.is_autocast_enabled(device):
            # Run the update in the autocast dtype, as the base layer did; the kernels handle the
            # float32 factors themselves, so autocast must not rewrite their ops.
            x = x.to(torch.get_autocast_dtype(device))
            with torch.autocast(device, enabled=False):
                delta = self._update(x, ranks)
        else:
            delta = self._update(x, ranks)
        return y + delta.to(y.dtype)

    def _update(self, x: torch.Tensor, ranks: list[int] | None) -> torch.Tensor:
        n_trainable = 3 if self.config.variant == "tlora" else 2
        return LowRankUpdate.apply(x, ranks, self.config.scale, n_trainable, *self.factors())

    def extra_repr(self) -> str:
        c = self.config
        return f"variant={c.variant}, rank={c.rank}, min_rank={c.min_rank}, in={self.in_features}, out={self.out_features}"
