//! Forward and backward of the masked, rank-adaptive low-rank update.
//!
//! Every variant is one low-rank product at the adapter's full rank r, with the timestep's ranks
//! applied as data (a 0/1 mask, scale included) rather than as shapes, so that a call costs the
//! same kernels whatever its ranks are, a compiled graph serves every rank, and nothing has to be
//! read back to the host:
//!
//! ```text
//! delta(x) = ((x D^T) * M) U^T        D: w x in,  U: out x w,  M: (B or 1) x w  (scale in M)
//! ```
//!
//! - `TLora` (variant "tlora"). The update P diag(lam m) Q - P0 diag(lam0 m) Q0 is a difference of two
//!   nearly equal products (P, lam, Q start as copies of P0, lam0, Q0 and move little). Computed
//!   as written, half precision rounds each product to 2^-8 of its size and the difference is
//!   lost. The same update is written with small factors only ("difference form"):
//!
//!   ```text
//!   P L M Q - P0 L0 M Q0 = (P L - P0 L0) M Q + (-P0 L0) M (Q0 - Q)
//!   D = [Q; Q0 - Q]  (2r x in),   U = [P L - P0 L0, -P0 L0]  (out x 2r),   M = [m, m] * scale
//!   ```
//!
//!   The two small factors (P L - P0 L0 and Q0 - Q) are formed in float32 and rounded once to
//!   the compute dtype, so each of the two products is accurate relative to its own (small) size.
//! - `LoRA` (variants "vanilla" and "lora"): D = A, U = B, M = m * scale.
//!
//! The operands are built once per call, either fresh (`Scratch` absent: pure, what torch.compile
//! traces) or written into two buffers that the layer keeps for each compute dtype (no per-call
//! allocation or concatenation; the frozen block -P0 L0 is written only when it changes).
//! Gradients are returned for the input and the trainable factors only, at full rank (the masked
//! ranks get exactly zero).
//!
//! [`fold_weight`] folds the update at one rank into the base weight for inference (same difference
//! form, float32), and [`dense_update`] is the update as a weight matrix. In float32 and float64, a
//! training call with many tokens per sample folds the masked update into the weight instead
//! (folded.rs: [`folded_forward`], [`folded_backward`]), which costs less than the factored
//! product ([`fold_plan`]).

mod folded;

use crate::ranks;
use anyhow::{bail, ensure, Result};
use tch::{Device, Kind, Tensor};

pub use folded::{fold_plan, folded_backward, folded_forward, folds_in};

/// The adapter factors of one layer, all float32 (float64 in tests), on one device. The variants
/// are named as the Python side names the factor sets (`tlora.factors.TLORA` and `LORA`).
pub enum Factors<'a> {
    /// Variant "tlora" (T-LoRA, and Ortho-LoRA without a mask): trainable P (out x r), lam (r), Q
    /// (r x in) and their frozen initial copies.
    TLora { p: &'a Tensor, lam: &'a Tensor, q: &'a Tensor, p0: &'a Tensor, lam0: &'a Tensor, q0: &'a Tensor },
    /// Variants "vanilla" (Vanilla T-LoRA) and "lora": down A (r x in), up B (out x r).
    LoRA { down: &'a Tensor, up: &'a Tensor },
}

/// Gradients for the input and the trainable factors (`None` where not asked for).
/// For `TLora` the factor gradients are (P, lam, Q); for `LoRA` (down, up) and a `None`.
pub struct Grads {
    pub input: Option<Tensor>,
    pub factors: [Option<Tensor>; 3],
}

impl<'a> Factors<'a> {
    /// The variant, from the number of factors: 6 (P, lam, Q, P0, lam0, Q0) is T-LoRA, 2 (down,
    /// up) is LoRA. The only place that tells the variants apart by count.
    pub fn from_slice(tensors: &'a [Tensor]) -> Result<Self> {
        match tensors {
            [p, lam, q, p0, lam0, q0] => Ok(Factors::TLora { p, lam, q, p0, lam0, q0 }),
            [down, up] => Ok(Factors::LoRA { down, up }),
            other => bail!("expected 6 factors (p, lam, q, p0, lam0, q0) or 2 (down, up), got {}", other.len()),
        }
    }

    /// (rank r, in_features, out_features), after checking every shape, dtype and device against
    /// the others.
    pub fn dims(&self) -> Result<(i64, i64, i64)> {
        let (r, in_f, out_f, all) = match self {
            Factors::TLora { p, lam, q, p0, lam0, q0 } => {
                let (ps, qs) = (p.size(), q.size());
                ensure!(ps.len() == 2 && qs.len() == 2, "P and Q must be 2-D, got {ps:?} and {qs:?}");
                let (out_f, r, in_f) = (ps[0], ps[1], qs[1]);
                ensure!(qs[0] == r, "Q has {} rows but P has {r} columns", qs[0]);
                ensure!(lam.size() == [r], "lam must have shape [{r}], got {:?}", lam.size());
                ensure!(p0.size() == ps, "P0 shape {:?} differs from P {ps:?}", p0.size());
                ensure!(q0.size() == qs, "Q0 shape {:?} differs from Q {qs:?}", q0.size());
                ensure!(lam0.size() == [r], "lam0 must have shape [{r}], got {:?}", lam0.size());
                (r, in_f, out_f, vec![*p, *lam, *q, *p0, *lam0, *q0])
            }
            Factors::LoRA { down, up } => {
                let (ds, us) = (down.size(), up.size());
                ensure!(ds.len() == 2 && us.len() == 2, "down and up must be 2-D, got {ds:?} and {us:?}");
                ensure!(ds[0] == us[1], "down has {} rows but up has {} columns", ds[0], us[1]);
                (ds[0], ds[1], us[0], vec![*down, *up])
            }
        };
        ranks::check_adapter_rank(r)?;
        let (kind, device) = (all[0].kind(), all[0].device());
        for t in &all {
            ensure!(matches!(t.kind(), Kind::Float | Kind::Double), "adapter factors must be float32 (or float64), got {:?}", t.kind());
            ensure!(t.kind() == kind, "adapter factors mix {kind:?} and {:?}", t.kind());
            ensure!(t.device() == device, "adapter factors are on {device:?} and {:?}: move them together", t.device());
            check_device(t, "adapter factor")?;
        }
        Ok((r, in_f, out_f))
    }

    /// Operand width: 2r for T-LoRA (trainable and difference blocks), r for LoRA.
    pub fn width(&self) -> Result<i64> {
        let (r, _, _) = self.dims()?;
        Ok(match self {
            Factors::TLora { .. } => 2 * r,
            Factors::LoRA { .. } => r,
        })
    }

    fn first(&self) -> &Tensor {
        match self {
            Factors::TLora { p, .. } => p,
            Factors::LoRA { down, .. } => down,
        }
    }
}

/// The device policy, stated once: tlora's kernels run on the CPU and on CUDA devices, nowhere
/// else (no MPS, no meta tensors). [`check_device`] refuses tensors elsewhere and [`parse_device`]
/// the names of other devices; the Python side follows the same rule (`tlora.layer.ops.KERNEL_DEVICES`).
pub fn is_kernel_device(device: Device) -> bool {
    matches!(device, Device::Cpu | Device::Cuda(_))
}

/// Refuses tensors without data (meta) and devices the kernels do not run on, by name.
pub fn check_device(t: &Tensor, what: &str) -> Result<()> {
    // libtorch's meta device reaches tch as `Mps` (tch knows no meta device); tlora runs on
    // neither, so both are refused by name.
    ensure!(
        is_kernel_device(t.device()),
        "{what} is on the meta device (no data) or on a device tlora's kernels do not support: materialise the model \
         (to_empty / load its weights) on the CPU or a CUDA device first"
    );
    Ok(())
}

/// `cpu`, `cuda` or `cuda:N` (what `str(torch.device)` gives) as a tch device: the devices of
/// [`is_kernel_device`], any other name refused.
pub fn parse_device(name: &str) -> Result<Device> {
    Ok(match name {
        "cpu" => Device::Cpu,
        "cuda" => Device::Cuda(0),
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(index)) => Device::Cuda(index),
            _ => bail!("unsupported device {other:?}: tlora's kernels run on \"cpu\", \"cuda\" or \"cuda:N\" only"),
        },
    })
}

/// The compute dtypes, as users name them (`torch.float32` ...) and as tch does.
const COMPUTE_KINDS: [(&str, Kind); 4] =
    [("float32", Kind::Float), ("float16", Kind::Half), ("bfloat16", Kind::BFloat16), ("float64", Kind::Double)];

/// Whether `kind` is a floating dtype the kernels compute in.
pub fn is_compute_kind(kind: Kind) -> bool {
    COMPUTE_KINDS.iter().any(|&(_, k)| k == kind)
}

/// The one refusal of a dtype the kernels do not compute in: `what` (e.g. "input dtype") and the
/// dtype as given.
fn unsupported_dtype(what: &str, dtype: &dyn std::fmt::Debug) -> anyhow::Error {
    anyhow::anyhow!("{what} {dtype:?} is not supported: use float32, float16, bfloat16 or float64")
}

/// Refuses a dtype the kernels do not compute in, naming `what` (e.g. "input dtype").
pub fn check_compute_kind(kind: Kind, what: &str) -> Result<()> {
    if is_compute_kind(kind) {
        Ok(())
    } else {
        Err(unsupported_dtype(what, &kind))
    }
}

/// The compute dtype named `name` ("float32", "float16", "bfloat16" or "float64").
pub fn compute_kind(name: &str) -> Result<Kind> {
    COMPUTE_KINDS.iter().find(|&&(n, _)| n == name).map(|&(_, k)| k).ok_or_else(|| unsupported_dtype("compute dtype", &name))
}

/// P0 diag(lam0) (out x r), which the layer caches until P0 or lam0 change: U's frozen block is
/// its negative, and P diag(lam) minus it is U's trainable block. It is the same rounded product
/// as P diag(lam) at initialisation, so that block starts at exactly zero (an update of exactly
/// zero before training).
pub fn frozen_block(p0: &Tensor, lam0: &Tensor) -> Result<Tensor> {
    let _no_grad = tch::no_grad_guard();
    Ok(p0.f_mul(&lam0.f_unsqueeze(0)?)?)
}

/// The operands D (w x in) and U (out x w) in the compute dtype.
pub struct Operands {
    pub d: Tensor,
    pub u: Tensor,
}

/// Buffers that a layer keeps per compute dtype for its T-LoRA operands: `d` (2r x in) and `u`
/// (out x 2r). `write_frozen` says whether u's frozen block must be (re)written: on the first
/// call and after the frozen factors changed. When d's first r rows are Q itself (the layer keeps
/// Q inside its float32 buffer), they are not copied.
pub struct Scratch<'a> {
    pub d: &'a Tensor,
    pub u: &'a Tensor,
    pub write_frozen: bool,
}

/// Builds the operands at full rank in `kind`. `frozen` is [`frozen_block`] (computed here when
/// absent).
pub fn lowrank_operands(f: &Factors, frozen: Option<&Tensor>, kind: Kind, scratch: Option<Scratch>) -> Result<Operands> {
    // Operands are data for the kernels, which differentiate by hand: no autograd graph.
    let _no_grad = tch::no_grad_guard();
    let (r, in_f, out_f) = f.dims()?;
    check_compute_kind(kind, "compute dtype")?;
    match f {
        Factors::TLora { p, lam, q, p0, lam0, q0 } => {
            let owned;
            let nf = match frozen {
                Some(n) => {
                    ensure!(n.size() == [out_f, r], "the frozen block has shape {:?}, expected [{out_f}, {r}]", n.size());
                    n
                }
                None => {
                    owned = frozen_block(p0, lam0)?;
                    &owned
                }
            };
            match scratch {
                None => {
                    let diff = q0.f_sub(q)?;
                    let a1 = p.f_mul(&lam.f_unsqueeze(0)?)?.f_sub(nf)?;
                    let d = Tensor::f_cat(&[q.f_to_kind(kind)?, diff.f_to_kind(kind)?], 0)?;
                    let u = Tensor::f_cat(&[a1.f_to_kind(kind)?, nf.f_neg()?.f_to_kind(kind)?], 1)?;
                    Ok(Operands { d, u })
                }
                Some(s) => {
                    ensure!(
                        s.d.size() == [2 * r, in_f] && s.u.size() == [out_f, 2 * r] && s.d.kind() == kind && s.u.kind() == kind,
                        "operand buffers have shapes {:?} and {:?} ({:?}), expected [{}, {in_f}] and [{out_f}, {}] ({kind:?})",
                        s.d.size(),
                        s.u.size(),
                        s.d.kind(),
                        2 * r,
                        2 * r
                    );
                    let d_top = s.d.f_narrow(0, 0, r)?;
                    if d_top.data_ptr() != q.data_ptr() || d_top.kind() != q.kind() || d_top.stride() != q.stride() {
                        let mut top = d_top;
                        top.f_copy_(q)?;
                    }
                    let _ = q0.f_sub_out(&s.d.f_narrow(0, r, r)?, q)?;
                    // P L - P0 L0 in float32, rounded once into the buffer.
                    let _ = p.f_mul(&lam.f_unsqueeze(0)?)?.f_sub_out(&s.u.f_narrow(1, 0, r)?, nf)?;
                    if s.write_frozen {
                        let mut bottom = s.u.f_narrow(1, r, r)?;
                        bottom.f_copy_(&nf.f_neg()?)?;
                    }
                    Ok(Operands { d: s.d.shallow_clone(), u: s.u.shallow_clone() })
                }
            }
        }
        Factors::LoRA { down, up } => {
            ensure!(scratch.is_none(), "LoRA factors need no operand buffers");
            Ok(Operands { d: cast(down, kind)?, u: cast(up, kind)? })
        }
    }
}

/// `t` in `kind`, without a dispatch when it already is.
fn cast(t: &Tensor, kind: Kind) -> Result<Tensor> {
    Ok(if t.kind() == kind { t.shallow_clone() } else { t.f_to_kind(kind)? })
}

fn check_input(x: &Tensor, ops: &Operands, in_f: i64) -> Result<()> {
    check_device(x, "the input")?;
    check_compute_kind(x.kind(), "input dtype")?;
    ensure!(
        ops.d.device() == x.device(),
        "the adapter is on {:?} but the input is on {:?}: move the model after inject, or inject after moving it",
        ops.d.device(),
        x.device()
    );
    ensure!(ops.d.kind() == x.kind(), "operands are {:?} but the input is {:?}", ops.d.kind(), x.kind());
    ensure!(x.dim() >= 1 && x.size()[x.dim() - 1] == in_f, "input shape {:?} does not end in in_features = {in_f}", x.size());
    Ok(())
}

/// The operands fit the factors and the input: (r, in_features, out_features, operand width).
fn check_operands(x: &Tensor, ops: &Operands, f: &Factors) -> Result<(i64, i64, i64, i64)> {
    let (r, in_f, out_f) = f.dims()?;
    let w = f.width()?;
    ensure!(
        ops.d.size() == [w, in_f] && ops.u.size() == [out_f, w],
        "operands have shapes {:?} and {:?}, expected [{w}, {in_f}] and [{out_f}, {w}]",
        ops.d.size(),
        ops.u.size()
    );
    check_input(x, ops, in_f)?;
    Ok((r, in_f, out_f, w))
}

/// T-LoRA's P and lam gradients from G = grad^T h over U's trainable block P diag(lam):
/// dP = G diag(lam), dlam_j = sum_o P_oj G_oj (a product and a column sum: an einsum costs three
/// times their dispatch); `needs[1]`, `needs[2]` say which.
fn p_lam_grads(g_mat: &Tensor, p: &Tensor, lam: &Tensor, needs: [bool; 4], factors: &mut [Option<Tensor>]) -> Result<()> {
    if needs[1] {
        factors[0] = Some(g_mat.f_mul(&lam.f_unsqueeze(0)?)?);
    }
    if needs[2] {
        factors[1] = Some(g_mat.f_mul(p)?.f_sum_dim_intlist(0i64, false, None::<Kind>)?);
    }
    Ok(())
}

/// The mask shaped to broadcast over an intermediate like `x`'s: (B, 1, ..., 1, w).
fn mask_for(mask: &Tensor, x: &Tensor, w: i64) -> Result<Tensor> {
    ensure!(mask.dim() == 2 && mask.size()[1] == w, "the rank mask has shape {:?}, expected (batch, {w})", mask.size());
    ensure!(
        mask.kind() == x.kind() && mask.device() == x.device(),
        "the rank mask is {:?} on {:?}, the input {:?} on {:?}",
        mask.kind(),
        mask.device(),
        x.kind(),
        x.device()
    );
    let b = mask.size()[0];
    if b != 1 {
        ensure!(
            x.dim() >= 2 && x.size()[0] == b,
            "got {b} per-sample ranks for an input of shape {:?}: the input's first dimension must be the batch",
            x.size()
        );
    }
    if x.dim() == 2 || (x.dim() == 1 && b == 1) {
        return Ok(if x.dim() == 1 { mask.f_view([w])? } else { mask.shallow_clone() });
    }
    let mut shape = vec![b];
    shape.extend(std::iter::repeat_n(1, x.dim() - 2));
    shape.push(w);
    Ok(mask.f_view(shape.as_slice())?)
}

/// Forward: h = (x D^T) * M, and h U^T added into `acc` in place when given (the base layer's
/// output, x's dtype, the same rows: shape (..., out) or flattened to 2-D), else returned as
/// delta. Returns (delta, h); h is what [`lowrank_backward`] needs.
pub fn lowrank_forward(x: &Tensor, ops: &Operands, mask: Option<&Tensor>, acc: Option<&Tensor>) -> Result<(Option<Tensor>, Tensor)> {
    let ds = ops.d.size();
    ensure!(ds.len() == 2 && ops.u.dim() == 2 && ops.u.size()[1] == ds[0], "operands have shapes {ds:?} and {:?}", ops.u.size());
    let (w, in_f, out_f) = (ds[0], ds[1], ops.u.size()[0]);
    check_input(x, ops, in_f)?;
    let mut h = x.f_matmul(&ops.d.f_tr()?)?;
    if let Some(m) = mask {
        let _ = h.f_mul_(&mask_for(m, x, w)?)?;
    }
    let delta = match acc {
        None => Some(h.f_matmul(&ops.u.f_tr()?)?),
        Some(y) => {
            let rows = if in_f == 0 { 0 } else { x.numel() as i64 / in_f };
            ensure!(
                y.kind() == x.kind()
                    && y.device() == x.device()
                    && y.dim() >= 1
                    && y.size()[y.dim() - 1] == out_f
                    && y.numel() as i64 == rows * out_f,
                "the output to add into has shape {:?} ({:?}), expected {rows} rows of {out_f} features ({:?})",
                y.size(),
                y.kind(),
                x.kind()
            );
            ensure!(y.is_contiguous(), "the output to add into must be contiguous");
            let mut y2 = y.f_view([-1, out_f])?;
            let _ = y2.f_addmm_(&h.f_reshape([-1, w])?, &ops.u.f_tr()?)?;
            None
        }
    };
    Ok((delta, h))
}

/// Backward of [`lowrank_forward`] given the gradient of delta and the h it returned. `needs` = (input,
/// factor 0, 1, 2) says which gradients to compute; frozen tensors never get one.
pub fn lowrank_backward(
    grad: &Tensor,
    x: &Tensor,
    h: &Tensor,
    ops: &Operands,
    mask: Option<&Tensor>,
    f: &Factors,
    needs: [bool; 4],
) -> Result<Grads> {
    let (r, in_f, out_f, w) = check_operands(x, ops, f)?;
    ensure!(
        h.size().last() == Some(&w) && h.kind() == x.kind(),
        "saved intermediate has shape {:?} ({:?}), expected (..., {w})",
        h.size(),
        h.kind()
    );
    let rows = x.numel() as i64 / in_f.max(1);
    ensure!(
        grad.dim() >= 1 && grad.size()[grad.dim() - 1] == out_f && grad.numel() as i64 == rows * out_f,
        "gradient shape {:?} does not match {rows} rows of {out_f} features",
        grad.size()
    );
    let mut lead = x.size();
    lead.pop();
    let grad_x = cast(grad, x.kind())?.f_reshape(lead.iter().copied().chain([out_f]).collect::<Vec<_>>().as_slice())?;
    let grad2 = grad_x.f_reshape([rows, out_f])?;
    let x2 = x.f_reshape([rows, in_f])?;
    let h2 = h.f_reshape([rows, w])?;
    let (trains_d, trains_u) = match f {
        Factors::TLora { .. } => (needs[3], needs[1] || needs[2]),
        Factors::LoRA { .. } => (needs[1], needs[2]),
    };
    // dL/dh, masked (in x's shape, so that a per-sample mask broadcasts over the tokens): feeds
    // the input's gradient and D's. Without the input's gradient (a frozen text encoder's states
    // entering cross-attention), T-LoRA's Q needs only gh's first block minus its second,
    // grad (U_1 - U_2) masked: a product at width r instead of 2r.
    let q_only = matches!(f, Factors::TLora { .. }) && !needs[0];
    let gq_direct = if q_only && trains_d {
        let mut gq = grad_x.f_matmul(&ops.u.f_narrow(1, 0, r)?.f_sub(&ops.u.f_narrow(1, r, r)?)?)?;
        if let Some(m) = mask {
            let _ = gq.f_mul_(&mask_for(&m.f_narrow(1, 0, r)?, x, r)?)?;
        }
        Some(gq.f_reshape([rows, r])?)
    } else {
        None
    };
    let gh = if !q_only && (needs[0] || trains_d) {
        let mut gh = grad_x.f_matmul(&ops.u)?;
        if let Some(m) = mask {
            let _ = gh.f_mul_(&mask_for(m, x, w)?)?;
        }
        Some(gh)
    } else {
        None
    };
    let input = match (&gh, needs[0]) {
        (Some(gh), true) => Some(gh.f_matmul(&ops.d)?),
        _ => None,
    };
    let mut factors: [Option<Tensor>; 3] = [None, None, None];
    match f {
        Factors::TLora { p, lam, .. } => {
            if trains_u {
                // U's trainable block is P diag(lam) - P0 diag(lam0): G = grad^T h over it gives
                // dP = G diag(lam) and dlam_j = sum_o P_oj G_oj (scale and mask are in h).
                // (in the factors' dtype: one cast for half-precision inputs)
                let g_mat = cast(&grad2.f_tr()?.f_mm(&h2.f_narrow(1, 0, r)?)?, p.kind())?;
                p_lam_grads(&g_mat, p, lam, needs, &mut factors)?;
            }
            if needs[3] {
                // D = [Q; Q0 - Q]: Q's gradient is the first block's minus the second's.
                let gq = match (gq_direct, &gh) {
                    (Some(gq), _) => gq,
                    (None, Some(gh)) => {
                        let last = gh.dim() as i64 - 1;
                        gh.f_narrow(last, 0, r)?.f_sub(&gh.f_narrow(last, r, r)?)?.f_reshape([rows, r])?
                    }
                    (None, None) => bail!("internal: Q's gradient without dL/dh"),
                };
                factors[2] = Some(gq.f_tr()?.f_mm(&x2)?);
            }
        }
        Factors::LoRA { .. } => {
            if needs[1] {
                factors[0] = Some(gh.as_ref().unwrap().f_reshape([rows, w])?.f_tr()?.f_mm(&x2)?);
            }
            if needs[2] {
                factors[1] = Some(grad2.f_tr()?.f_mm(&h2)?);
            }
        }
    }
    Ok(Grads { input, factors })
}

/// The update at one rank (None: full rank) as a weight matrix, scale included, in the factors'
/// dtype: U_k D_k over the first k ranks of each block (difference form).
pub fn dense_update(f: &Factors, rank: Option<i64>, scale: f64) -> Result<Tensor> {
    let (r, _, _) = f.dims()?;
    let k = ranks::rank_or_full(rank, r)?;
    let ops = lowrank_operands(f, None, f.first().kind(), None)?;
    let (d, u) = narrow_ops(f, &ops, k)?;
    Ok(u.f_matmul(&d)?.f_mul_scalar(scale)?)
}

/// The first k ranks of each block of full-rank operands.
fn narrow_ops(f: &Factors, ops: &Operands, k: i64) -> Result<(Tensor, Tensor)> {
    let (r, _, _) = f.dims()?;
    Ok(match f {
        Factors::TLora { .. } => (
            Tensor::f_cat(&[ops.d.f_narrow(0, 0, k)?, ops.d.f_narrow(0, r, k)?], 0)?,
            Tensor::f_cat(&[ops.u.f_narrow(1, 0, k)?, ops.u.f_narrow(1, r, k)?], 1)?,
        ),
        Factors::LoRA { .. } => (ops.d.f_narrow(0, 0, k)?, ops.u.f_narrow(1, 0, k)?),
    })
}

/// The folded weight W + dW at one rank (None: full rank), computed in float32 (float64 when the
/// weight or the factors are) from the difference form and returned in that dtype: what the base
/// layer plus [`lowrank_forward`] compute for every sample of that rank, as one weight (inference).
pub fn fold_weight(weight: &Tensor, f: &Factors, rank: Option<i64>, scale: f64) -> Result<Tensor> {
    let (r, in_f, out_f) = f.dims()?;
    let k = ranks::rank_or_full(rank, r)?;
    check_device(weight, "the base weight")?;
    ensure!(weight.size() == [out_f, in_f], "weight has shape {:?}, expected [{out_f}, {in_f}]", weight.size());
    ensure!(weight.device() == f.first().device(), "the weight is on {:?} but the adapter is on {:?}", weight.device(), f.first().device());
    check_compute_kind(weight.kind(), "weight dtype")?;
    let kind = if weight.kind() == Kind::Double || f.first().kind() == Kind::Double { Kind::Double } else { Kind::Float };
    let ops = lowrank_operands(f, None, kind, None)?;
    let (d, u) = narrow_ops(f, &ops, k)?;
    let u = if scale == 1.0 { u } else { u.f_mul_scalar(scale)? };
    Ok(cast(weight, kind)?.f_addmm(&u, &d)?)
}

#[cfg(test)]
mod tests;
