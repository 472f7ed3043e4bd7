//! The training call with the update folded into the base weight (float32 and float64).
//!
//! The factored update ([`super::lowrank_forward`] and its backward) costs about 5 r (in + out)
//! multiply-adds per token in a training step: the forward, the input's gradient and D's at T-LoRA's
//! width 2r, U's at r. When a sample has many tokens, folding its update into the weight is
//! cheaper: W_b = W + (U * m_b) D costs out * in * 2r once per sample (once for a batch that shares
//! its ranks), the forward and the input's gradient are then the base layer's own products with
//! W_b instead of W, and the factors' gradients need only the trainable product, which the frozen
//! block does not enter (m the first block of the mask, scale in it):
//!
//! ```text
//! T-LoRA  y = x (W + P L M Q - P0 L0 M Q0)^T + b
//!         G = grad^T ((x Q^T) * m):  dP = G L,  dlam = sum_o P * G;   dQ = (grad (P L * m))^T x
//! LoRA    y = x (W + B M A)^T + b:   dB = grad^T ((x A^T) * m),      dA = (grad (B * m))^T x
//! ```
//!
//! (P L * m is the difference of U * M's two blocks, B * m is U * M: the forward's scaled U serves.)
//!
//! That is 2 r (in + out) per token plus the fold, and a second fold in the backward where the
//! folded weights are not kept from the forward: they are kept where they are no larger than the
//! input rows they serve (out <= tokens per fold), so that keeping them costs at most what the
//! saved input does. [`fold_plan`] says when folding is the cheaper way, and whether to keep.
//! Only for float32 and float64: in half precision the folded weight would round the update to
//! 2^-8 of the weight's size, the very loss the difference form of the operands exists to avoid
//! (mod.rs), so half-precision calls stay factored.
//! Shapes are fixed as in the factored path: the ranks are the mask's data, whatever they are.

use super::{cast, check_input, check_operands, mask_for, p_lam_grads, Factors, Grads, Operands};
use anyhow::{ensure, Result};
use tch::{Kind, Tensor};

/// How a training call of `tokens` tokens per fold (per sample with per-sample ranks, the whole
/// batch with shared ones) runs: None factored; Some(keep) folded, keeping the folded weights for
/// the backward when they are no larger than the input rows they serve (out <= tokens). Folded
/// costs 2 r (in + out) per token plus one fold of out * in * 2r (two without keeping), factored
/// 5 r (in + out) per token: folded when 3 tokens (in + out) > 2 folds in out.
pub fn fold_plan(tokens: i64, in_f: i64, out_f: i64) -> Option<bool> {
    let keep = out_f <= tokens;
    let folds = if keep { 1 } else { 2 };
    (3 * tokens * (in_f + out_f) > 2 * folds * in_f * out_f).then_some(keep)
}

/// Whether `kind` is a dtype the folded path computes in (float32, float64).
pub fn folds_in(kind: Kind) -> bool {
    matches!(kind, Kind::Float | Kind::Double)
}

/// U scaled by the mask: (out, w) for no mask or a shared one, (B, out, w) for per-sample masks.
fn scaled_up(u: &Tensor, mask: Option<&Tensor>, x: &Tensor, w: i64) -> Result<Tensor> {
    let Some(m) = mask else { return Ok(u.shallow_clone()) };
    let _ = mask_for(m, x, w)?; // (checks the mask's shape, dtype, device and batch against x)
    Ok(if m.size()[0] == 1 { u.f_mul(m)? } else { u.f_unsqueeze(0)?.f_mul(&m.f_unsqueeze(1)?)? })
}

/// The folded weights W + um D: (out, in), or (B, out, in) for per-sample `um`.
fn folded(weight: &Tensor, um: &Tensor, d: &Tensor) -> Result<Tensor> {
    Ok(if um.dim() == 2 {
        weight.f_addmm(um, d)?
    } else {
        let (b, ds) = (um.size()[0], d.size());
        weight.f_baddbmm(um, &d.f_expand([b, ds[0], ds[1]], false)?, 1.0, 1.0)?
    })
}

fn check_weight(weight: &Tensor, bias: Option<&Tensor>, x: &Tensor, in_f: i64, out_f: i64) -> Result<()> {
    ensure!(folds_in(x.kind()), "the folded training path computes in float32 or float64, got {:?}", x.kind());
    ensure!(
        weight.size() == [out_f, in_f] && weight.kind() == x.kind() && weight.device() == x.device(),
        "the base weight is {:?} ({:?} on {:?}), expected [{out_f}, {in_f}] ({:?} on {:?})",
        weight.size(),
        weight.kind(),
        weight.device(),
        x.kind(),
        x.device()
    );
    if let Some(b) = bias {
        ensure!(
            b.size() == [out_f] && b.kind() == x.kind() && b.device() == x.device(),
            "the base bias is {:?} ({:?}), expected [{out_f}] ({:?})",
            b.size(),
            b.kind(),
            x.kind()
        );
    }
    Ok(())
}

/// `x`'s leading dimensions followed by `last`.
fn lead_with(x: &Tensor, last: i64) -> Vec<i64> {
    let mut shape = x.size();
    shape.pop();
    shape.push(last);
    shape
}

/// Forward: y = x W_b^T + bias with W_b = W + (U * m_b) D (one weight for all samples when the
/// mask is shared or absent). Returns (y, U * M, W_b): [`folded_backward`] takes W_b, or refolds
/// it from U * M.
pub fn folded_forward(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    ops: &Operands,
    mask: Option<&Tensor>,
) -> Result<(Tensor, Tensor, Tensor)> {
    let ds = ops.d.size();
    ensure!(ds.len() == 2 && ops.u.dim() == 2 && ops.u.size()[1] == ds[0], "operands have shapes {ds:?} and {:?}", ops.u.size());
    let (w, in_f, out_f) = (ds[0], ds[1], ops.u.size()[0]);
    check_input(x, ops, in_f)?;
    check_weight(weight, bias, x, in_f, out_f)?;
    let um = scaled_up(&ops.u, mask, x, w)?;
    let wb = folded(weight, &um, &ops.d)?;
    let y = if um.dim() == 2 {
        x.f_linear(&wb, bias)?
    } else {
        let x3 = x.f_reshape([um.size()[0], -1, in_f])?;
        let wt = wb.f_transpose(1, 2)?;
        let y3 = match bias {
            Some(b) => b.f_baddbmm(&x3, &wt, 1.0, 1.0)?,
            None => x3.f_bmm(&wt)?,
        };
        y3.f_reshape(lead_with(x, out_f).as_slice())?
    };
    Ok((y, um, wb))
}

/// Backward of [`folded_forward`] given the gradient of y, the U * M it returned and its W_b if
/// kept: gradients for the input and the trainable factors as `needs` = (input, factor 0, 1, 2)
/// asks (the base weight, its bias and the frozen factors get none).
// One parameter per operand the backward reads.
#[allow(clippy::too_many_arguments)]
pub fn folded_backward(
    grad: &Tensor,
    x: &Tensor,
    weight: &Tensor,
    um: &Tensor,
    kept: Option<&Tensor>,
    ops: &Operands,
    mask: Option<&Tensor>,
    f: &Factors,
    needs: [bool; 4],
) -> Result<Grads> {
    let (r, in_f, out_f, w) = check_operands(x, ops, f)?;
    check_weight(weight, None, x, in_f, out_f)?;
    let per_sample = um.dim() == 3;
    ensure!(
        um.size().ends_with(&[out_f, w]) && um.kind() == x.kind() && (um.dim() == 2 || per_sample),
        "saved U * M has shape {:?} ({:?}), expected (B, {out_f}, {w}) or ({out_f}, {w})",
        um.size(),
        um.kind()
    );
    let rows = x.numel() as i64 / in_f.max(1);
    ensure!(
        grad.dim() >= 1 && grad.size()[grad.dim() - 1] == out_f && grad.numel() as i64 == rows * out_f,
        "gradient shape {:?} does not match {rows} rows of {out_f} features",
        grad.size()
    );
    let grad_x = cast(grad, x.kind())?.f_reshape(lead_with(x, out_f).as_slice())?;
    let input = if needs[0] {
        let wb = match kept {
            Some(wb) => {
                let want: &[i64] = if per_sample { &[um.size()[0], out_f, in_f] } else { &[out_f, in_f] };
                ensure!(wb.size() == want && wb.kind() == x.kind(), "kept folded weights have shape {:?}, expected {want:?}", wb.size());
                wb.shallow_clone()
            }
            None => folded(weight, um, &ops.d)?,
        };
        Some(if per_sample {
            grad_x.f_reshape([um.size()[0], -1, out_f])?.f_bmm(&wb)?.f_reshape(x.size().as_slice())?
        } else {
            grad_x.f_matmul(&wb)?
        })
    } else {
        None
    };
    // The trainable product's down factor (Q for T-LoRA, A for LoRA) in the compute dtype, and
    // its up factor with the mask in it, from U * M: for T-LoRA the blocks' difference
    // (P L - P0 L0) m - (-P0 L0) m = P L m, for LoRA B m itself.
    let down = ops.d.f_narrow(0, 0, r)?;
    let (wants_up, wants_down, down_slot) = match f {
        Factors::TLora { .. } => (needs[1] || needs[2], needs[3], 2),
        Factors::LoRA { .. } => (needs[2], needs[1], 0),
    };
    let mut factors: [Option<Tensor>; 3] = [None, None, None];
    if wants_up {
        let mut h = x.f_matmul(&down.f_tr()?)?;
        if let Some(m) = mask {
            let _ = h.f_mul_(&mask_for(&m.f_narrow(1, 0, r)?, x, r)?)?;
        }
        let g_mat = grad_x.f_reshape([rows, out_f])?.f_tr()?.f_mm(&h.f_reshape([rows, r])?)?;
        match f {
            Factors::TLora { p, lam, .. } => {
                let g_mat = cast(&g_mat, p.kind())?;
                p_lam_grads(&g_mat, p, lam, needs, &mut factors)?;
            }
            Factors::LoRA { .. } => factors[1] = Some(g_mat),
        }
    }
    if wants_down {
        let last = um.dim() as i64 - 1;
        let up_m = match f {
            Factors::TLora { .. } => um.f_narrow(last, 0, r)?.f_sub(&um.f_narrow(last, r, r)?)?,
            Factors::LoRA { .. } => um.shallow_clone(),
        };
        let gq = if per_sample { grad_x.f_reshape([um.size()[0], -1, out_f])?.f_bmm(&up_m)? } else { grad_x.f_matmul(&up_m)? };
        factors[down_slot] = Some(gq.f_reshape([rows, r])?.f_tr()?.f_mm(&x.f_reshape([rows, in_f])?)?);
    }
    Ok(Grads { input, factors })
}
