"""
The Rust extension of tlora (`src/python.rs`): T-LoRA's rank schedule, initialisation, low-rank
kernels and file I/O over libtorch tensors.

Each function here calls the Rust core function of the same name (`fold_weight` calls
`kernel::fold_weight`, `save_file` calls `format::save_file`, ...). All of them release the GIL
while they work.

Factors are passed in the kernels' order, and their number says the variant: 6 tensors
`(p, lam, q, p0, lam0, q0)` are T-LoRA (P: out x r, lam: r, Q: r x in, and their frozen initial
copies), 2 tensors `(down, up)` are LoRA (down: r x in, up: out x r). Factors are float32 (float64
in tests), all of one dtype and on one device, the CPU or a CUDA device: the kernels run on those
and nowhere else (`tlora.layer.ops.KERNEL_DEVICES`; tensors on MPS or meta and other device names
are refused).

Errors: every refusal of an input is a `tlora.errors.ConfigError` (a `ValueError`; "ValueError" in
the docstrings below) whose message names the problem (libtorch's C++ stack trace cut off); a
failure of the file system is an `OSError` (`tlora.errors.MissingFileError`, also a
`FileNotFoundError`, when the file or folder is missing). Arguments of the wrong Python type raise
pyo3's `TypeError` (or `OverflowError` for a negative `seed`).
"""

from collections.abc import Sequence
from os import PathLike

import torch

_Grads = tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]

def rank_schedule(
    timesteps: torch.Tensor,
    rank: int,
    min_rank: int,
    rank_exponent: float,
    num_train_timesteps: int,
    shape: str = "power",
    rank_boundary: float = 0.875,
) -> torch.Tensor:
    """
    The timestep-dependent rank r(t), from r(0) = rank to r(T) = min_rank: for shape "power",
    floor(((T - t) / T)^rank_exponent * (rank - min_rank)) + min_rank; "cosine",
    floor(cos(pi t / 2T) * (rank - min_rank)) + min_rank; "step", rank for t < rank_boundary * T
    and min_rank from there (src/schedule.rs).

    Arguments:
        timesteps: Timesteps t in [0, T], any shape, any real dtype, on the CPU or a CUDA device.
        rank: The maximum rank r (at t = 0), >= 1.
        min_rank: The minimum rank (at t = T), in 1..=rank.
        rank_exponent: The power schedule's exponent (1: linear), finite and > 0.
        num_train_timesteps: T, an integer in 1..=10**9.
        shape: The schedule's shape: "power", "cosine" or "step".
        rank_boundary: The step shape's boundary as a fraction of T, in (0, 1].

    Returns:
        The ranks, an int64 tensor of the shape of `timesteps`, on the CPU.

    Raises:
        ValueError: If a parameter is out of range (the message names it), a timestep is NaN or
            outside [0, T], or `timesteps` has no data (meta device).
    """

def orthogonal_init(
    out_features: int,
    in_features: int,
    rank: int,
    init: str,
    seed: int,
    weight: torch.Tensor | None = None,
    device: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """
    T-LoRA's orthogonal initialisation: `rank` singular triplets (P, lam, Q) of a matrix, singular
    values in descending order, column j of P paired with row j of Q.

    Without `weight`, the matrix is a seeded N(0, (1/rank)^2) matrix of shape out_features x
    in_features (the paper's init), whose triplets are drawn from their law without forming it;
    the same seed gives the same factors on every device. With `weight`, they are the exact SVD
    of `weight` (computed in float64 on the CPU); `out_features`, `in_features` and `seed` are
    then not used.

    Arguments:
        out_features: Rows of the random matrix.
        in_features: Columns of the random matrix.
        rank: How many triplets to keep, in 1..=min(out, in).
        init: Which triplets: "principal" (largest singular values), "middle" or "last"
            (smallest: the paper's choice).
        seed: Seed of the random matrix (>= 0); torch's global generator is not touched.
        weight: A 2-D (out x in) matrix to decompose instead, any real dtype, CPU or CUDA.
        device: Where the factors go: "cpu", "cuda" or "cuda:N"; None: the CPU.

    Returns:
        (P, lam, Q): P (out x rank), lam (rank,), Q (rank x in), float32 on `device`.

    Raises:
        ValueError: If `init` or `device` is not one of the names above, `rank` is outside
            1..=min(out, in), a shape is not positive, `weight` is not 2-D, has NaN or infinite
            entries, or has no data (meta device).
    """

def gaussian(rows: int, cols: int, std: float, seed: int) -> torch.Tensor:
    """
    A seeded Gaussian matrix, drawn from a ChaCha stream of `seed` so that torch's global
    generator (which the user's training loop depends on) is not touched.

    Arguments:
        rows: Number of rows, >= 1.
        cols: Number of columns, >= 1.
        std: Standard deviation of the entries (mean 0), finite.
        seed: The seed (>= 0): the same seed gives the same matrix.

    Returns:
        A (rows x cols) float32 tensor on the CPU.

    Raises:
        ValueError: If the shape is not positive or `std` is infinite or NaN.
    """

def frozen_block(p0: torch.Tensor, lam0: torch.Tensor) -> torch.Tensor:
    """
    T-LoRA's frozen product P0 diag(lam0), computed without autograd. U's frozen block is its
    negative; pass it as `frozen` to `lowrank_operands` to reuse it while P0 and lam0 are unchanged.

    Arguments:
        p0: The frozen P0 (out x r), float32 or float64, CPU or CUDA.
        lam0: The frozen lam0 (r,), same dtype and device.

    Returns:
        P0 diag(lam0), (out x r), in the factors' dtype, on their device.

    Raises:
        ValueError: If `p0` has no data (meta device) or the shapes do not broadcast.
    """

def lowrank_operands(
    factors: Sequence[torch.Tensor],
    frozen: torch.Tensor | None,
    dtype: str,
    d_buf: torch.Tensor | None = None,
    u_buf: torch.Tensor | None = None,
    write_frozen: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    The operands (D, U) of the update delta(x) = ((x D^T) * mask) U^T at the adapter's full rank r.

    T-LoRA uses its difference form, D = [Q; Q0 - Q] (2r x in) and U = [P diag(lam) - P0 diag(lam0),
    -P0 diag(lam0)] (out x 2r), whose small blocks are formed in float32 and rounded once to
    `dtype`, so that half precision keeps the update's relative accuracy. LoRA's are D = down
    (r x in) and U = up (out x r), cast to `dtype`. Computed without autograd.

    Arguments:
        factors: The 6 T-LoRA or 2 LoRA factors (see the module docstring).
        frozen: `frozen_block(p0, lam0)` (out x r) to reuse, or None to compute it (T-LoRA only).
        dtype: The compute dtype: "float32", "float16", "bfloat16" or "float64".
        d_buf: A (2r x in) tensor of `dtype` on the factors' device to write D into (T-LoRA only;
            when its first r rows already are Q, in place, they are not copied).
        u_buf: A (out x 2r) tensor of `dtype` to write U into; pass both buffers or neither.
        write_frozen: With buffers, whether to (re)write U's frozen block (first call, or after
            P0 or lam0 changed).

    Returns:
        (D, U) in `dtype` on the factors' device: new tensors, or `d_buf` and `u_buf` written.

    Raises:
        ValueError: If there are not 6 or 2 factors, their shapes, dtypes or devices disagree (the
            message names the factor), `dtype` is not supported, `frozen` or a buffer has the
            wrong shape or dtype, only one buffer is passed, or buffers are passed for LoRA.
    """

def lowrank_forward(
    x: torch.Tensor, d: torch.Tensor, u: torch.Tensor, mask: torch.Tensor | None = None, acc: torch.Tensor | None = None
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """
    The forward of the masked low-rank update: h = (x D^T) * mask and delta = h U^T, the ranks
    applied as data (a 0/1 mask with the scale in it) so that every rank costs the same kernels.

    Arguments:
        x: The input (..., in), float32, float16, bfloat16 or float64, on the operands' device and
            in their dtype.
        d: D (w x in) from `lowrank_operands`.
        u: U (out x w) from `lowrank_operands`.
        mask: (B or 1, w) in x's dtype and device, B being x's first (batch) dimension; None:
            every rank, scale 1.
        acc: The base layer's output to add delta into in place: contiguous, x's dtype and
            device, the same rows as x, last dimension out (shape (..., out) or flattened to 2-D).

    Returns:
        (delta, h): delta (..., out) in x's dtype, or None when it was added into `acc`; h
        (..., w), which `lowrank_backward` needs.

    Raises:
        ValueError: If x's last dimension is not `in`, its dtype is not supported, x and the
            operands differ in dtype or device, the mask or `acc` has the wrong shape, dtype or
            device, `acc` is not contiguous, or x has no data (meta device).
    """

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
    """
    The gradients of `lowrank_forward` for the input and the trainable factors, at full rank (the
    masked ranks get exactly zero). Frozen factors never get a gradient.

    Arguments:
        grad: The gradient of delta (..., out), the same rows as x.
        x: The forward's input (..., in).
        h: The h the forward returned (..., w).
        d: The forward's D (w x in).
        u: The forward's U (out x w).
        mask: The forward's mask, or None.
        factors: The factors the operands were built from (6 T-LoRA or 2 LoRA).
        needs: 4 flags: whether to compute the gradient of x, of factor 0, 1 and 2 (T-LoRA: P,
            lam, Q; LoRA: down, up, unused).

    Returns:
        (dx, d0, d1, d2), None where not asked for: dx in x's shape and dtype; T-LoRA's dP
        (out x r) and dlam (r,) in the factors' dtype and dQ (r x in) in x's dtype; LoRA's
        d_down (r x in) and d_up (out x r) in x's dtype, and None.

    Raises:
        ValueError: If there are not 6 or 2 factors, or any shape, dtype or device disagrees
            with the factors, the operands or x (the message names which).
    """

def folded_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    d: torch.Tensor,
    u: torch.Tensor,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """
    A training call with the masked update folded into the base weight: y = x W_b^T + bias with
    W_b = weight + (U * m_b) D, one folded weight per mask row (one for a shared mask or none).
    Float32 and float64 only (in half precision the fold would round the update away).

    Arguments:
        x: The input (..., in); with a per-sample mask its first dimension is the batch.
        weight: The base layer's weight (out x in), x's dtype and device.
        bias: The base layer's bias (out,), or None.
        d: The operands' D (w x in), as `lowrank_operands` gives it.
        u: The operands' U (out x w).
        mask: The (B or 1, w) rank mask, scale included, or None for all ones.

    Returns:
        (y, um, folded): y (..., out) in x's dtype, U * M ((out x w), or (B x out x w) for a
        per-sample mask) and the folded weights ((out x in) or (B x out x in)), which
        `folded_backward` takes, or refolds from U * M.

    Raises:
        ValueError: If a dtype is not float32 / float64, or any shape, dtype or device disagrees
            (the message names which).
    """

def folded_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    um: torch.Tensor,
    kept: torch.Tensor | None,
    d: torch.Tensor,
    u: torch.Tensor,
    mask: torch.Tensor | None,
    factors: Sequence[torch.Tensor],
    needs: Sequence[bool],
) -> _Grads:
    """
    The gradients of `folded_forward` for the input and the trainable factors (the weight, its
    bias and the frozen factors get none), at full rank: the masked ranks get exactly zero.

    Arguments:
        grad: The gradient of y (..., out), the same rows as x.
        x: The forward's input.
        weight: The forward's base weight.
        um: The U * M the forward returned.
        kept: The folded weights the forward returned, or None to refold them from um.
        d: The forward's D.
        u: The forward's U.
        mask: The forward's mask, or None.
        factors: The factors the operands were built from (6 T-LoRA or 2 LoRA).
        needs: 4 flags, as for `lowrank_backward`.

    Returns:
        (dx, d0, d1, d2) as `lowrank_backward` returns them.

    Raises:
        ValueError: If any shape, dtype or device disagrees (the message names which).
    """

def fold_plan(tokens: int, in_features: int, out_features: int) -> bool | None:
    """
    How a training call with `tokens` tokens per folded weight (per sample with per-sample ranks,
    the whole batch with shared ones) runs: None factored (`lowrank_forward`); True or False
    folded (`folded_forward`), True keeping the folded weights for the backward (where
    out_features <= tokens: no larger than the input rows they serve). Folded where
    3 tokens (in + out) > 2 folds in out, folds = 1 when kept, else 2.
    """

def dense_update(factors: Sequence[torch.Tensor], rank: int | None, scale: float) -> torch.Tensor:
    """
    The adapter's update at one rank as a weight matrix, scale included: for T-LoRA
    scale * (P diag(lam m) Q - P0 diag(lam0 m) Q0), m keeping the first `rank` ranks (difference
    form), for LoRA scale * up[:, :rank] down[:rank].

    Arguments:
        factors: The 6 T-LoRA or 2 LoRA factors.
        rank: The rank, in 1..=r; None: full rank r.
        scale: The factor applied to the update (alpha / r).

    Returns:
        The (out x in) update in the factors' dtype, on their device.

    Raises:
        ValueError: If there are not 6 or 2 factors, they disagree in shape, dtype or device,
            or `rank` is outside 1..=r.
    """

def fold_weight(weight: torch.Tensor, factors: Sequence[torch.Tensor], rank: int | None, scale: float) -> torch.Tensor:
    """
    The base weight with the update at one rank folded in, W + scale * dW, for inference: what the
    base layer plus `lowrank_forward` compute for every sample of that rank, as one weight.

    Arguments:
        weight: The base weight W (out x in), a floating dtype, on the factors' device.
        factors: The 6 T-LoRA or 2 LoRA factors.
        rank: The rank, in 1..=r; None: full rank r.
        scale: The factor applied to the update (alpha / r).

    Returns:
        W + scale * dW (out x in), computed and returned in float32, or float64 when the weight
        or the factors are float64.

    Raises:
        ValueError: If there are not 6 or 2 factors, they disagree, `rank` is outside 1..=r, the
            weight's shape is not (out x in), it is on another device, its dtype is not floating,
            or it has no data (meta device).
    """

def save_file(path: str | PathLike[str], tensors: Sequence[tuple[str, torch.Tensor]], metadata: dict[str, str]) -> None:
    """
    Writes tensors and string metadata to a safetensors file, atomically (as `write_atomic`).

    Arguments:
        path: The file to write; its folder must exist. An existing file is replaced.
        tensors: (name, tensor) pairs, on any device (copied to the CPU), of dtype float32,
            float64, float16, bfloat16, int64, int32 or uint8.
        metadata: The header's string metadata.

    Raises:
        ValueError: If the folder does not exist ("cannot write PATH: folder DIR does not exist")
            or a tensor's dtype cannot be stored (the message names the tensor).
        OSError: If writing or renaming fails (the message names the path).
    """

def load_file(path: str | PathLike[str]) -> tuple[list[tuple[str, torch.Tensor]], dict[str, str]]:
    """
    Reads a safetensors file (never a pickle).

    Arguments:
        path: The file to read.

    Returns:
        ([(name, tensor)], metadata): the tensors on the CPU, in the order in which they lie in
        the file, and the header's string metadata ({} when it has none).

    Raises:
        FileNotFoundError: If the file does not exist ("cannot read adapter file PATH").
        OSError: If it cannot be read.
        ValueError: If it is not a valid safetensors file (truncated or another format) or holds
            a dtype tlora does not read (the message names the tensor).
    """

def write_atomic(path: str | PathLike[str], data: bytes) -> None:
    """
    Writes `data` to `path` atomically: a temporary file in the same folder is written and
    fsynced, renamed over `path`, and the folder is fsynced, so that a crash leaves the old file
    or the new one, never a part. The temporary file is removed when a step fails.

    Arguments:
        path: The file to write; its folder must exist. An existing file is replaced.
        data: The file's whole content.

    Raises:
        FileNotFoundError: If the folder does not exist ("cannot write PATH: folder DIR does not
            exist").
        OSError: If writing or renaming fails, e.g. `path` is a folder (the message names the
            path).
    """
