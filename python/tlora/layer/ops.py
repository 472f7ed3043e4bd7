"""The update `((x D^T) * M) U^T` as autograd and torch.compile know it: an autograd Function for
eager runs, custom ops with fake kernels and a registered backward for compiled ones, both over
the native kernels (src/kernel), and `lowrank_update`, the same as a plain function of x and the
factors. `FoldedUpdate` (and `folded_linear`, its plain function) is the eager training call with
the update folded into the base weight, x (W + (U * M) D)^T + b, in float32 and float64
(src/kernel/folded.rs).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .. import _native
from ..config import RANK_SCALINGS, check_ranks
from ..errors import ConfigError
from .factors import is_tlora, n_trainable, rank_of
from .ranks import rank_mask

# The dtypes the kernels compute in, by the names the native functions take (src/kernel: `compute_kind`).
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float64: "float64"}
COMPUTE_DTYPES = tuple(DTYPE_NAMES)
# The dtypes a training call may fold the update into the weight in (src/kernel/folded.rs:
# `folds_in`): in half precision the folded weight would round the update away.
FOLDED_DTYPES = (torch.float32, torch.float64)
# The devices the kernels run on: the CPU and CUDA devices (the policy of src/kernel's
# `is_kernel_device`; the native code refuses tensors and device names elsewhere: MPS, meta, ...).
KERNEL_DEVICES = ("cpu", "cuda")


def check_compute_dtype(dtype: torch.dtype) -> None:
    """The Python side's one refusal of a dtype the kernels do not compute in (Rust's:
    `kernel::check_compute_kind`, with the same message)."""
    if dtype not in COMPUTE_DTYPES:
        raise ConfigError(f"input dtype {dtype} is not supported: use float32, float16, bfloat16 or float64")


def lowrank_update(
    x: torch.Tensor,
    factors: list[torch.Tensor],
    ranks: list[int] | None = None,
    scale: float = 1.0,
    rank_scaling: str = "none",
) -> torch.Tensor:
    """The adapter's output for x at `ranks` (None: full rank; one, or one per sample), as a
    differentiable function of x and the trainable factors (in the kernels' order: T-LoRA's
    p, lam, q, p0, lam0, q0, or LoRA's down, up). What a TLoraLinear adds to its base layer.
    `rank_scaling` "rank" multiplies sample b's update by rank / ranks[b] (`AdapterConfig.scale_at`)."""
    rank = rank_of(factors)
    if ranks is not None:
        ranks = check_ranks(ranks, rank)
    check_compute_dtype(x.dtype)
    blocks = 2 if is_tlora(factors) else 1
    if rank_scaling not in RANK_SCALINGS:
        raise ConfigError(f"unknown rank_scaling {rank_scaling!r}: choose one of {', '.join(RANK_SCALINGS)}")
    mask = rank_mask(ranks, rank, blocks, scale, x.device, x.dtype, rank_scaling=rank_scaling)
    d, u = _native.lowrank_operands(list(factors), None, DTYPE_NAMES[x.dtype])
    return Update.apply(None, x, mask, d, u, n_trainable(factors), *factors)


class Update(torch.autograd.Function):
    """The adapter's output for x, added into `y` in place when given (the base layer's fresh
    output) and returned; differentiable in y, x and the trainable factors."""

    @staticmethod
    def forward(ctx, y, x, mask, d, u, n_trainable, *factors):  # type: ignore[override]
        delta, h = _native.lowrank_forward(x, d, u, mask, y)
        if y is not None:
            ctx.mark_dirty(y)
        # P and lam (T-LoRA) enter the factors' gradients; Q, A and B do not.
        ctx.save_for_backward(x, h, *(factors[:2] if is_tlora(factors) else ()))
        ctx.mask, ctx.d, ctx.u, ctx.factors, ctx.n_trainable = mask, d, u, factors, n_trainable
        ctx.has_y = y is not None
        return y if y is not None else delta

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        x, h, *_ = ctx.saved_tensors
        needs = ctx.needs_input_grad
        n = ctx.n_trainable
        wanted = [needs[1]] + [needs[6 + i] for i in range(n)] + [False] * (3 - n)
        head = (grad if ctx.has_y else None,)
        if not any(wanted):
            return head + (None,) * (5 + len(ctx.factors))
        gx, *gf = _native.lowrank_backward(grad, x, h, ctx.d, ctx.u, ctx.mask, list(ctx.factors), wanted)
        gf = [g if g is None or g.dtype == f.dtype else g.to(f.dtype) for g, f in zip(gf[:n], ctx.factors)]
        return head + (gx, None, None, None, None, *gf, *([None] * (len(ctx.factors) - n)))


def folded_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    factors: list[torch.Tensor],
    ranks: list[int] | None = None,
    scale: float = 1.0,
    keep: bool = False,
) -> torch.Tensor:
    """x (W + dW)^T + b at `ranks` (as `lowrank_update` takes them) through the folded training
    path, differentiable in x and the trainable factors (the weight and bias are frozen): what a
    float32 TLoraLinear computes in training when the fold pays (`_native.fold_plan`); `keep`: the
    backward uses the forward's folded weights instead of refolding."""
    rank = rank_of(factors)
    if ranks is not None:
        ranks = check_ranks(ranks, rank)
    blocks = 2 if is_tlora(factors) else 1
    mask = rank_mask(ranks, rank, blocks, scale, x.device, x.dtype)
    d, u = _native.lowrank_operands(list(factors), None, DTYPE_NAMES[x.dtype])
    return FoldedUpdate.apply(x, weight, bias, mask, d, u, keep, n_trainable(factors), *factors)


class FoldedUpdate(torch.autograd.Function):
    """x (W + (U * M) D)^T + b, one folded weight per mask row, differentiable in x and the
    trainable factors; the backward uses the folded weights when `keep` (where they are no larger
    than the input rows they serve) and refolds them from U * M otherwise."""

    @staticmethod
    def forward(ctx, x, weight, bias, mask, d, u, keep, n_trainable, *factors):  # type: ignore[override]
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            raise ConfigError("the folded path trains no base weight or bias: freeze them (requires_grad_(False))")
        y, um, folded = _native.folded_forward(x, weight, bias, d, u, mask)
        if keep:
            ctx.save_for_backward(x, um, folded)
        else:
            ctx.save_for_backward(x, um)
        ctx.weight, ctx.mask, ctx.d, ctx.u, ctx.factors, ctx.n_trainable = weight, mask, d, u, factors, n_trainable
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        x, um, *kept = ctx.saved_tensors
        needs = ctx.needs_input_grad
        n = ctx.n_trainable
        wanted = [needs[0]] + [needs[8 + i] for i in range(n)] + [False] * (3 - n)
        if not any(wanted):
            return (None,) * (8 + len(ctx.factors))
        folded = kept[0] if kept else None
        args = (grad, x, ctx.weight, um, folded, ctx.d, ctx.u, ctx.mask, list(ctx.factors), wanted)
        gx, *gf = _native.folded_backward(*args)
        gf = [g if g is None or g.dtype == f.dtype else g.to(f.dtype) for g, f in zip(gf[:n], ctx.factors)]
        return (gx, None, None, None, None, None, None, None, *gf, *([None] * (len(ctx.factors) - n)))


# ---- torch.compile ----------------------------------------------------------------------------
# Dynamo cannot trace into the extension, so compiled models run the update as custom ops with
# fake kernels and a registered backward. The mask is an input: every rank runs the same graph.
# The forward returns h for the backward, which recomputes only the (small) operands.


@torch.library.custom_op("tlora::update", mutates_args=())
def update_op(
    x: torch.Tensor, factors: list[torch.Tensor], mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    d, u = _native.lowrank_operands(factors, None, DTYPE_NAMES[x.dtype])
    delta, h = _native.lowrank_forward(x, d, u, mask, None)
    return delta, h


@update_op.register_fake
def _(x, factors, mask):
    tlora = is_tlora(factors)
    width = 2 * factors[0].shape[1] if tlora else factors[0].shape[0]
    out_f = factors[0].shape[0] if tlora else factors[1].shape[0]
    return x.new_empty((*x.shape[:-1], out_f)), x.new_empty((*x.shape[:-1], width))


@torch.library.custom_op("tlora::update_backward", mutates_args=())
def update_backward_op(
    grad: torch.Tensor,
    x: torch.Tensor,
    h: torch.Tensor,
    factors: list[torch.Tensor],
    mask: torch.Tensor | None,
    needs: list[bool],
) -> list[torch.Tensor]:
    d, u = _native.lowrank_operands(factors, None, DTYPE_NAMES[x.dtype])
    grads = _native.lowrank_backward(grad.contiguous(), x, h, d, u, mask, factors, needs)
    # Custom ops return tensors: an empty one stands for "not computed".
    return [g if g is not None else x.new_empty(0) for g in grads]


@update_backward_op.register_fake
def _(grad, x, h, factors, mask, needs):
    like = [x, *factors[: n_trainable(factors)]]
    return [torch.empty_like(like[i]) if i < len(like) and needs[i] else x.new_empty(0) for i in range(4)]


def _update_setup_context(ctx, inputs, output):
    x, factors, mask = inputs
    ctx.save_for_backward(x, output[1], *factors)
    ctx.has_mask = mask is not None
    if mask is not None:
        ctx.mask = mask
    ctx.mark_non_differentiable(output[1])


def _update_backward(ctx, grad, _grad_h):
    x, h, *factors = ctx.saved_tensors
    n = n_trainable(factors)
    needs_x, needs_f = ctx.needs_input_grad[0], list(ctx.needs_input_grad[1])
    needs = [bool(needs_x)] + [bool(needs_f[i]) if i < n else False for i in range(3)]
    if not any(needs):
        return None, [None] * len(factors), None
    gx, *gf = update_backward_op(grad, x, h, factors, ctx.mask if ctx.has_mask else None, needs)
    factor_grads = [gf[i].to(factors[i].dtype) if i < n and needs[1 + i] else None for i in range(len(factors))]
    return (gx if needs[0] else None), factor_grads, None


update_op.register_autograd(_update_backward, setup_context=_update_setup_context)
