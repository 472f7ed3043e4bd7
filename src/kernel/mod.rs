//! Forward and backward of the masked, rank-adaptive low-rank update.
//!
//! Every variant is a low-rank product evaluated on the active ranks only:
//!
//! ```text
//! delta(x) = ((x D^T) * M) U'^T        D: k' x in,  U' = U diag(G): out x k',  M: per-sample 0/1 mask
//! ```
//!
//! - `Ortho` (T-LoRA): D = [Q_k; Q0_k], U = [P_k, P0_k], G = scale * [lam_k, -lam0_k].
//!   The trainable and the frozen branch share one matmul each way, and the frozen copy makes the
//!   update exactly zero at initialisation.
//! - `Plain` (Vanilla T-LoRA and LoRA): D = A_k, U = B_k, G = scale.
//!
//! The gains are folded into the small U (out x k') once per call instead of scaling the
//! (tokens x k') intermediate. k is the largest rank in the batch; samples with a smaller rank r_b
//! get the mask M[b, j] = (j < r_b) on the intermediate, never on the weights; a batch with one
//! shared rank has no mask at all.
//!
//! The forward keeps for the backward only the trainable branch's (masked) intermediate
//! (tokens x k), since the frozen branch's half is not needed by any gradient, and the operands
//! D and U' so that the backward does not rebuild them. It can add its output into the base
//! layer's output in place ([`forward_into`]). Gradients are returned only for the input and the
//! trainable factors, padded with zeros to the full rank r (the inactive ranks receive exactly
//! zero gradient).
//!
//! Two folds trade tokens-long products for (out x in) ones: [`forward_split`] /
//! [`backward_split`] fold the first ranks of T-LoRA's frozen branch into the base weight for
//! training (float32/float64; a [`Stage`], which the caller can keep for a whole run; a batch of
//! mixed ranks runs each sample's products at its own rank there, with no masked columns), and
//! [`fold`] folds the whole update for inference.

use anyhow::{bail, ensure, Result};
use tch::{Device, Kind, Tensor};

/// The adapter factors of one layer, all float32 (any device).
pub enum Factors<'a> {
    /// T-LoRA / Ortho-LoRA: trainable P (out x r), lam (r), Q (r x in) and their frozen initial copies.
    Ortho { p: &'a Tensor, lam: &'a Tensor, q: &'a Tensor, p0: &'a Tensor, lam0: &'a Tensor, q0: &'a Tensor },
    /// LoRA / Vanilla T-LoRA: down A (r x in), up B (out x r).
    Plain { down: &'a Tensor, up: &'a Tensor },
}

/// Gradients for the input and the trainable factors (`None` where not asked for).
/// For `Ortho` the factor gradients are (P, lam, Q); for `Plain` (down, up) and a `None`.
pub struct Grads {
    pub input: Option<Tensor>,
    pub factors: [Option<Tensor>; 3],
}

impl Factors<'_> {
    /// (rank r, in_features, out_features), after checking every shape against the others.
    pub fn dims(&self) -> Result<(i64, i64, i64)> {
        match self {
            Factors::Ortho { p, lam, q, p0, lam0, q0 } => {
                let (ps, qs) = (p.size(), q.size());
                ensure!(ps.len() == 2 && qs.len() == 2, "P and Q must be 2-D, got {ps:?} and {qs:?}");
                let (out_f, r, in_f) = (ps[0], ps[1], qs[1]);
                ensure!(qs[0] == r, "Q has {} rows but P has {r} columns", qs[0]);
                ensure!(lam.size() == [r], "lam must have shape [{r}], got {:?}", lam.size());
                ensure!(p0.size() == ps, "P0 shape {:?} differs from P {ps:?}", p0.size());
                ensure!(q0.size() == qs, "Q0 shape {:?} differs from Q {qs:?}", q0.size());
                ensure!(lam0.size() == [r], "lam0 must have shape [{r}], got {:?}", lam0.size());
                Ok((r, in_f, out_f))
            }
            Factors::Plain { down, up } => {
                let (ds, us) = (down.size(), up.size());
                ensure!(ds.len() == 2 && us.len() == 2, "down and up must be 2-D, got {ds:?} and {us:?}");
                ensure!(ds[0] == us[1], "down has {} rows but up has {} columns", ds[0], us[1]);
                Ok((ds[0], ds[1], us[0]))
            }
        }
    }

    fn kind(&self) -> Kind {
        match self {
            Factors::Ortho { p, .. } => p.kind(),
            Factors::Plain { down, .. } => down.kind(),
        }
    }

    fn device(&self) -> Device {
        match self {
            Factors::Ortho { p, .. } => p.device(),
            Factors::Plain { down, .. } => down.device(),
        }
    }
}

/// The per-call rank layout, resolved against the input.
struct Active {
    /// Ranks evaluated (the largest in the batch).
    k: i64,
    /// Per-sample 0/1 mask (B, k), only when samples differ in rank.
    mask: Option<Tensor>,
}

fn resolve_ranks(ranks: Option<&[i64]>, r: i64, x: &Tensor) -> Result<Active> {
    let Some(ranks) = ranks else {
        return Ok(Active { k: r, mask: None });
    };
    ensure!(!ranks.is_empty(), "ranks must not be empty");
    for &rb in ranks {
        ensure!((1..=r).contains(&rb), "rank {rb} is outside 1..={r}");
    }
    let k = *ranks.iter().max().unwrap();
    if ranks.iter().all(|&rb| rb == k) {
        return Ok(Active { k, mask: None });
    }
    let batch = x.size().first().copied().unwrap_or(0);
    if x.dim() < 2 || batch != ranks.len() as i64 {
        bail!("got {} per-sample ranks for an input of shape {:?}: the input's first dimension must be the batch", ranks.len(), x.size());
    }
    let cols = Tensor::arange(k, (Kind::Int64, Device::Cpu)).unsqueeze(0);
    let mask = cols.lt_tensor(&Tensor::from_slice(ranks).unsqueeze(1));
    Ok(Active { k, mask: Some(mask) })
}

impl Active {
    /// The mask for a (..., width) intermediate of `x` (width k, or 2k: the mask repeats for the
    /// whole frozen branch; a split call with a stage runs mixed ranks sample by sample, unmasked),
    /// shaped (B, 1, ..., 1, width) to broadcast over tokens.
    fn mask_like(&self, x: &Tensor, width: i64) -> Option<Tensor> {
        let m = self.mask.as_ref()?;
        let m = cast(&m.to_device(x.device()), x.kind());
        let m = if width == self.k { m } else { m.repeat([1, width / self.k]) };
        let mut shape = vec![m.size()[0]];
        shape.extend(std::iter::repeat_n(1, x.dim() - 2));
        shape.push(width);
        Some(m.reshape(&shape))
    }
}

/// `t` in `kind`, without a dispatch when it already is.
fn cast(t: &Tensor, kind: Kind) -> Tensor {
    if t.kind() == kind {
        t.shallow_clone()
    } else {
        t.to_kind(kind)
    }
}

/// The first `k` entries of `t` along `dim`, without a dispatch when that is all of it.
fn head(t: &Tensor, dim: i64, k: i64) -> Tensor {
    if t.size()[dim as usize] == k {
        t.shallow_clone()
    } else {
        t.narrow(dim, 0, k)
    }
}

/// The low-rank operands for the active ranks k, in `kind`: (D, U') with the gains folded into
/// U' = U diag(G), so that delta = (x D^T) U'^T for a batch with one rank. For T-LoRA, the frozen
/// branch's ranks `frozen_from..k` follow the trainable ones (the ranks below `frozen_from` are
/// folded into the base weight by the caller: a [`Stage`]).
fn operands(f: &Factors, k: i64, frozen_from: i64, scale: f64, kind: Kind) -> (Tensor, Tensor) {
    match f {
        Factors::Ortho { p, lam, q, p0, lam0, q0 } => {
            let n0 = k - frozen_from;
            if n0 == 0 {
                let u = head(p, 1, k) * (head(lam, 0, k) * scale).unsqueeze(0);
                return (cast(&head(q, 0, k), kind), cast(&u, kind));
            }
            let d = Tensor::cat(&[head(q, 0, k), q0.narrow(0, frozen_from, n0)], 0);
            let g = Tensor::cat(&[head(lam, 0, k) * scale, lam0.narrow(0, frozen_from, n0) * -scale], 0);
            let mut u = Tensor::cat(&[head(p, 1, k), p0.narrow(1, frozen_from, n0)], 1);
            let _ = u.g_mul_(&g.unsqueeze(0));
            (cast(&d, kind), cast(&u, kind))
        }
        Factors::Plain { down, up } => {
            let u = head(up, 1, k);
            let u = if scale == 1.0 { u } else { u * scale };
            (cast(&head(down, 0, k), kind), cast(&u, kind))
        }
    }
}

fn check_input(x: &Tensor, f: &Factors, in_f: i64) -> Result<()> {
    let dev = f.device();
    ensure!(
        dev == x.device(),
        "the adapter is on {dev:?} but the input is on {:?}: move the model after inject, or inject after moving it",
        x.device()
    );
    ensure!(
        matches!(x.kind(), Kind::Float | Kind::Half | Kind::BFloat16 | Kind::Double),
        "input dtype {:?} is not supported: use float32, float16, bfloat16 or float64",
        x.kind()
    );
    ensure!(x.dim() >= 1 && x.size()[x.dim() - 1] == in_f, "input shape {:?} does not end in in_features = {in_f}", x.size());
    Ok(())
}

/// What the backward needs from a forward: the trainable branch's (masked) intermediate h
/// (..., k) and the operands D (k' x in) and U' (out x k') in the compute dtype, so that the
/// backward does not rebuild them.
pub struct Saved {
    pub h: Tensor,
    pub d: Tensor,
    pub u: Tensor,
}

/// Forward: h = (x D^T) * M and its product with U'^T, added into `acc` in place when given
/// (the base layer's output, dtype of x: shape (..., out), or the same rows flattened to 2-D),
/// else returned as delta.
pub fn forward_saving(x: &Tensor, f: &Factors, ranks: Option<&[i64]>, scale: f64, acc: Option<&Tensor>) -> Result<(Option<Tensor>, Saved)> {
    forward_saving_from(x, f, ranks, scale, acc, 0)
}

/// [`forward_saving`] with T-LoRA's frozen branch from rank `frozen_from` on (the ranks below it
/// are in the weight the caller's base output was computed with).
fn forward_saving_from(x: &Tensor, f: &Factors, ranks: Option<&[i64]>, scale: f64, acc: Option<&Tensor>, frozen_from: i64) -> Result<(Option<Tensor>, Saved)> {
    let (r, in_f, out_f) = f.dims()?;
    check_input(x, f, in_f)?;
    let act = resolve_ranks(ranks, r, x)?;
    let (d, u) = operands(f, act.k, frozen_from.min(act.k), scale, x.kind());
    let kk = d.size()[0];
    let mut h = x.matmul(&d.tr());
    if let Some(m) = act.mask_like(x, kk) {
        let _ = h.g_mul_(&m);
    }
    let delta = match acc {
        None => Some(h.matmul(&u.tr())),
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
            if y.is_contiguous() {
                let mut y2 = y.view([-1, out_f]);
                let _ = y2.addmm_(&h.reshape([-1, kk]), &u.tr());
            } else {
                let mut y = y.shallow_clone();
                let _ = y.g_add_(&h.matmul(&u.tr()));
            }
            None
        }
    };
    // The frozen half of h is not needed by the backward: keep a compact copy of the trainable half.
    let h = if kk > act.k { h.narrow(-1, 0, act.k).contiguous() } else { h };
    Ok((delta, Saved { h, d, u }))
}

/// Forward: returns (delta, h) with delta = the adapter's output (to add to the base layer's),
/// shape (..., out), and h the (..., k) intermediate of the trainable branch that [`backward`]
/// needs (masked per sample when the batch mixes ranks).
pub fn forward(x: &Tensor, f: &Factors, ranks: Option<&[i64]>, scale: f64) -> Result<(Tensor, Tensor)> {
    let (delta, saved) = forward_saving(x, f, ranks, scale, None)?;
    Ok((delta.expect("delta"), saved.h))
}

/// [`forward`] that adds the update into `y` (the base layer's output, shape (..., out), dtype of
/// x) in place instead of allocating delta. Returns h.
pub fn forward_into(y: &Tensor, x: &Tensor, f: &Factors, ranks: Option<&[i64]>, scale: f64) -> Result<Tensor> {
    Ok(forward_saving(x, f, ranks, scale, Some(y))?.1.h)
}

/// Backward of [`forward`] given the gradient of delta and the h it returned. `needs` = (input,
/// factor 0, 1, 2) says which gradients to compute; frozen tensors never get one.
pub fn backward(grad: &Tensor, x: &Tensor, h: &Tensor, f: &Factors, ranks: Option<&[i64]>, scale: f64, needs: [bool; 4]) -> Result<Grads> {
    backward_impl(grad, x, h, None, f, ranks, scale, needs, None)
}

/// [`backward`] with the operands a [`forward_saving`] kept.
pub fn backward_saved(grad: &Tensor, x: &Tensor, saved: &Saved, f: &Factors, ranks: Option<&[i64]>, scale: f64, needs: [bool; 4]) -> Result<Grads> {
    backward_impl(grad, x, &saved.h, Some((&saved.d, &saved.u)), f, ranks, scale, needs, None)
}

#[allow(clippy::too_many_arguments)]
fn backward_impl(
    grad: &Tensor,
    x: &Tensor,
    h: &Tensor,
    ops: Option<(&Tensor, &Tensor)>,
    f: &Factors,
    ranks: Option<&[i64]>,
    scale: f64,
    needs: [bool; 4],
    input_into: Option<&Tensor>,
) -> Result<Grads> {
    let (r, in_f, out_f) = f.dims()?;
    check_input(x, f, in_f)?;
    let act = resolve_ranks(ranks, r, x)?;
    let k = act.k;
    ensure!(h.size().last() == Some(&k), "saved intermediate has shape {:?}, expected (..., {k})", h.size());
    let (d, u) = match ops {
        Some((d, u)) => {
            let kk = d.size()[0];
            ensure!(
                d.size() == [kk, in_f] && u.size() == [out_f, kk] && (k..=2 * k).contains(&kk) && d.kind() == x.kind() && u.kind() == x.kind(),
                "saved operands have shapes {:?} and {:?} ({:?}), expected ({k} to {}) x {in_f} and {out_f} x ({k} to {}) ({:?})",
                d.size(),
                u.size(),
                d.kind(),
                2 * k,
                2 * k,
                x.kind()
            );
            (d.shallow_clone(), u.shallow_clone())
        }
        None => operands(f, k, 0, scale, x.kind()),
    };
    // The gradient of an output that was added into a flattened (rows, out) tensor: back to x's rows.
    let mut lead = x.size();
    lead.pop();
    let rows: i64 = lead.iter().product();
    ensure!(
        grad.dim() >= 1 && grad.size()[grad.dim() - 1] == out_f && grad.numel() as i64 == rows * out_f,
        "gradient shape {:?} does not match {rows} rows of {out_f} features",
        grad.size()
    );
    let grad = if grad.dim() == x.dim() {
        cast(grad, x.kind())
    } else {
        lead.push(out_f);
        cast(&grad.reshape(&lead), x.kind())
    };
    let flat = |t: &Tensor, cols: i64| t.reshape([-1, cols]);
    // Accumulate half-precision reductions in float32.
    let acc = if x.kind() == Kind::Double { Kind::Double } else { Kind::Float };

    // Full-rank gradient with zeros for the ranks this call did not use.
    let pad = |g_k: Tensor, like: &Tensor, dim: i64| -> Tensor {
        let g_k = cast(&g_k, like.kind());
        if k == r {
            return g_k;
        }
        // constant_pad_nd lists (before, after) pairs from the last dimension backwards.
        let mut widths = vec![0i64; 2 * (like.dim() - dim as usize)];
        widths[2 * (like.dim() - 1 - dim as usize) + 1] = r - k;
        g_k.constant_pad_nd(&widths)
    };
    // gh = dL/dh (masked): over both branches when the input needs a gradient, else only over the
    // trainable columns (the frozen branch only feeds the input's gradient).
    let trains_d = match f {
        Factors::Ortho { .. } => needs[3],
        Factors::Plain { .. } => needs[1],
    };
    let gh = if needs[0] || trains_d {
        let width = if needs[0] { d.size()[0] } else { k };
        let mut gh = grad.matmul(&head(&u, 1, width));
        if let Some(m) = act.mask_like(x, width) {
            let _ = gh.g_mul_(&m);
        }
        Some(gh)
    } else {
        None
    };
    // The input's gradient, or (`input_into`: the (rows, in) gradient computed so far) added into it.
    let input = match (needs[0], gh.as_ref(), input_into) {
        (true, Some(gh), Some(acc)) => {
            let mut acc = acc.shallow_clone();
            let _ = acc.addmm_(&flat(gh, d.size()[0]), &d);
            None
        }
        (true, Some(gh), None) => Some(gh.matmul(&d)),
        _ => None,
    };
    let grad_d = |gh: &Tensor| flat(&gh.narrow(-1, 0, k), k).tr().matmul(&flat(x, in_f));

    let mut factors: [Option<Tensor>; 3] = [None, None, None];
    match f {
        Factors::Ortho { p, lam, q, .. } => {
            if needs[1] || needs[2] {
                // G = grad^T h (out x k) serves both: dP = G diag(scale lam), and
                // dlam_j = scale * sum_o P[o, j] G[o, j] (the mask is already in h).
                let g_mat = cast(&flat(&grad, out_f).tr().matmul(&flat(h, k)), acc);
                if needs[2] {
                    let glam = (&g_mat * cast(&head(p, 1, k), acc)).sum_dim_intlist(0, false, acc) * scale;
                    factors[1] = Some(pad(glam, lam, 0));
                }
                if needs[1] {
                    let gain = cast(&head(lam, 0, k), acc) * scale;
                    factors[0] = Some(pad(g_mat * gain.unsqueeze(0), p, 1));
                }
            }
            if needs[3] {
                factors[2] = Some(pad(grad_d(gh.as_ref().unwrap()), q, 0));
            }
        }
        Factors::Plain { down, up } => {
            if needs[1] {
                factors[0] = Some(pad(grad_d(gh.as_ref().unwrap()), down, 0));
            }
            if needs[2] {
                let g_mat = flat(&grad, out_f).tr().matmul(&flat(h, k));
                let g_mat = if scale == 1.0 { g_mat } else { cast(&g_mat, acc) * scale };
                factors[1] = Some(pad(g_mat, up, 1));
            }
        }
    }
    Ok(Grads { input, factors })
}

/// The dense update dW = U diag(G) D for one rank (no batch), in the factors' dtype: what [`forward`]
/// computes for every sample of rank `rank`, as a weight matrix (out x in). Used to fold the
/// adapter into a layer's weight (inference fast path) and as the reference in tests.
pub fn dense_update(f: &Factors, rank: Option<i64>, scale: f64) -> Result<Tensor> {
    let (r, _, _) = f.dims()?;
    let k = rank.unwrap_or(r);
    ensure!((1..=r).contains(&k), "rank {k} is outside 1..={r}");
    let kind = match f {
        Factors::Ortho { p, .. } => p.kind(),
        Factors::Plain { down, .. } => down.kind(),
    };
    let (d, u) = operands(f, k, 0, scale, kind);
    Ok(u.matmul(&d))
}

fn check_base(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, in_f: i64, out_f: i64) -> Result<()> {
    ensure!(weight.size() == [out_f, in_f], "weight has shape {:?}, expected [{out_f}, {in_f}]", weight.size());
    ensure!(
        weight.kind() == x.kind() && matches!(x.kind(), Kind::Float | Kind::Double) && weight.device() == x.device(),
        "the split forward needs a float32 or float64 input of the weight's dtype and device, got {:?} on {:?} for {:?} on {:?}",
        x.kind(),
        x.device(),
        weight.kind(),
        weight.device()
    );
    if let Some(b) = bias {
        ensure!(b.size() == [out_f] && b.kind() == x.kind(), "bias has shape {:?} ({:?}), expected [{out_f}]", b.size(), b.kind());
    }
    Ok(())
}

/// The frozen branch's first `rank` ranks folded into the base weight, W_s = W - s P0_rank
/// diag(lam0_rank) Q0_rank ([`fold_frozen`]): a split call computes x W_s^T + b and the update's
/// trainable ranks together with the frozen ranks `rank..k` only. `folded` is W_s when the caller
/// keeps it (W and the frozen factors never change during a run, and every timestep uses at least
/// r_min ranks: one fold per run), else it is folded on the spot (each way), with bitwise the same
/// result. `rank` 0: nothing folded (the factored computation).
#[derive(Clone, Copy, Default)]
pub struct Stage<'a> {
    pub rank: i64,
    pub folded: Option<&'a Tensor>,
}

/// W - s P0_rank diag(lam0_rank) Q0_rank in the weight's dtype: the [`Stage`] of this rank.
pub fn fold_frozen(weight: &Tensor, f: &Factors, rank: i64, scale: f64) -> Result<Tensor> {
    let Factors::Ortho { p0, lam0, q0, .. } = f else { bail!("only T-LoRA (orthogonal) factors have a frozen branch") };
    let (r, in_f, out_f) = f.dims()?;
    ensure!((1..=r).contains(&rank), "rank {rank} is outside 1..={r}");
    ensure!(weight.size() == [out_f, in_f], "weight has shape {:?}, expected [{out_f}, {in_f}]", weight.size());
    ensure!(
        matches!(weight.kind(), Kind::Float | Kind::Double) && weight.device() == p0.device(),
        "the frozen fold needs a float32 or float64 weight on the adapter's device, got {:?} on {:?}",
        weight.kind(),
        weight.device()
    );
    let u0 = p0.narrow(1, 0, rank) * (lam0.narrow(0, 0, rank) * -scale).unsqueeze(0);
    Ok(weight.addmm(&cast(&u0, weight.kind()), &cast(&q0.narrow(0, 0, rank), weight.kind())))
}

/// The stage's weight W_s for a call whose smallest rank is `k_min` (W itself for rank 0).
fn stage_weight(stage: &Stage, weight: &Tensor, f: &Factors, k_min: i64, scale: f64) -> Result<Tensor> {
    let (r, _, _) = f.dims()?;
    ensure!((0..=r).contains(&stage.rank), "stage rank {} is outside 0..={r}", stage.rank);
    ensure!(
        stage.rank <= k_min,
        "the stage folds {} frozen ranks but a sample uses only {k_min}: pass a stage of at most the smallest rank",
        stage.rank
    );
    match stage.folded {
        Some(w) => {
            ensure!(stage.rank > 0, "a folded stage needs its rank (> 0)");
            ensure!(
                w.size() == weight.size() && w.kind() == weight.kind() && w.device() == weight.device(),
                "the folded stage has shape {:?} ({:?} on {:?}), expected the weight's {:?} ({:?} on {:?})",
                w.size(),
                w.kind(),
                w.device(),
                weight.size(),
                weight.kind(),
                weight.device()
            );
            Ok(w.shallow_clone())
        }
        None if stage.rank == 0 => Ok(weight.shallow_clone()),
        None => fold_frozen(weight, f, stage.rank, scale),
    }
}

fn smallest_rank(ranks: Option<&[i64]>, r: i64) -> i64 {
    ranks.and_then(|rs| rs.iter().copied().min()).unwrap_or(r)
}

/// T-LoRA's training forward with the frozen branch's first ranks folded into the base weight:
/// y = x W_s^T + b + s ((x [Q_k; Q0_{rank..k}]^T) * M) [P_k diag(lam_k), -P0_{rank..k} diag(lam0_{rank..k})]^T
/// with W_s the [`Stage`]: the same sum as base + [`forward`] (float32 or float64 only: the fold
/// rounds in the weight's dtype, so the two branches no longer cancel bit for bit). With the stage
/// kept for a run, a step costs the trainable branch plus k - rank frozen ranks, with no
/// weight-sized temporaries. Returns y (shape (..., out)) and what [`backward_split`] needs.
pub fn forward_split(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    f: &Factors,
    ranks: Option<&[i64]>,
    scale: f64,
    stage: Stage,
) -> Result<(Tensor, Saved)> {
    ensure!(matches!(f, Factors::Ortho { .. }), "the split forward is for T-LoRA (orthogonal) factors");
    let (r, in_f, out_f) = f.dims()?;
    check_input(x, f, in_f)?;
    check_base(x, weight, bias, in_f, out_f)?;
    let act = resolve_ranks(ranks, r, x)?;
    let ws = stage_weight(&stage, weight, f, smallest_rank(ranks, r), scale)?;
    let rows = x.numel() as i64 / in_f;
    let x2 = x.reshape([rows, in_f]);
    let y = match bias {
        Some(b) => b.addmm(&x2, &ws.tr()),
        None => x2.mm(&ws.tr()),
    };
    let mut shape = x.size();
    shape.pop();
    shape.push(out_f);
    let saved = match (ranks, act.mask.is_some()) {
        (Some(ranks), true) => {
            // Mixed ranks: each sample's products at its own rank rather than all at the largest
            // with masked columns. h keeps each sample's intermediate, zero beyond its rank.
            let per = rows / ranks.len() as i64;
            let (d, u) = operands(f, act.k, stage.rank, scale, x.kind());
            let h = Tensor::zeros([ranks.len() as i64, per, act.k], (x.kind(), x.device()));
            for (b, &kb) in ranks.iter().enumerate() {
                let (xb, yb) = (x2.narrow(0, b as i64 * per, per), y.narrow(0, b as i64 * per, per));
                let (_, sb) = forward_saving_from(&xb, f, Some(&[kb]), scale, Some(&yb), stage.rank)?;
                let _ = h.get(b as i64).narrow(1, 0, kb).copy_(&sb.h);
            }
            let mut h_shape = x.size();
            h_shape.pop();
            h_shape.push(act.k);
            Saved { h: h.view(h_shape.as_slice()), d, u }
        }
        _ => forward_saving_from(x, f, ranks, scale, Some(&y), stage.rank)?.1,
    };
    Ok((y.view(shape.as_slice()), saved))
}

/// The operands of one sample of rank `kb` within the operands (D, U') built for the largest rank
/// `k` with the frozen ranks from `from` on: the trainable rows 0..kb and the frozen rows from..kb.
fn sample_operands(d: &Tensor, u: &Tensor, k: i64, kb: i64, from: i64) -> (Tensor, Tensor) {
    let (db, ub) = (d.narrow(0, 0, kb), u.narrow(1, 0, kb));
    if kb <= from {
        return (db, ub);
    }
    (Tensor::cat(&[&db, &d.narrow(0, k, kb - from)], 0), Tensor::cat(&[&ub, &u.narrow(1, k, kb - from)], 1))
}

/// Backward of [`forward_split`] (the same `stage`): the input's gradient through W_s and the
/// update's products, and the trainable factors' gradients (as [`backward`]).
#[allow(clippy::too_many_arguments)]
pub fn backward_split(
    grad: &Tensor,
    x: &Tensor,
    saved: &Saved,
    weight: &Tensor,
    f: &Factors,
    ranks: Option<&[i64]>,
    scale: f64,
    needs: [bool; 4],
    stage: Stage,
) -> Result<Grads> {
    ensure!(matches!(f, Factors::Ortho { .. }), "the split backward is for T-LoRA (orthogonal) factors");
    let (r, in_f, out_f) = f.dims()?;
    check_base(x, weight, None, in_f, out_f)?;
    let ws = if needs[0] { Some(stage_weight(&stage, weight, f, smallest_rank(ranks, r), scale)?) } else { None };
    let act = resolve_ranks(ranks, r, x)?;
    if let (Some(ranks), true) = (ranks, act.mask.is_some()) {
        return backward_split_per_sample(grad, x, saved, ws.as_ref(), f, ranks, act.k, scale, needs, stage.rank);
    }
    let mut g = backward_impl(grad, x, &saved.h, Some((&saved.d, &saved.u)), f, ranks, scale, needs, None)?;
    if let (Some(gx), Some(ws)) = (&g.input, ws) {
        let rows = x.numel() as i64 / in_f;
        let grad2 = cast(grad, x.kind()).reshape([rows, out_f]);
        let mut gx2 = gx.reshape([rows, in_f]);
        let _ = gx2.addmm_(&grad2, &ws);
        // reshape may have copied a non-contiguous gradient: hand back what was accumulated into.
        g.input = Some(gx2.view(x.size().as_slice()));
    }
    Ok(g)
}

/// [`backward_split`] of a batch of mixed ranks, sample by sample as [`forward_split`] ran it:
/// the input's gradient is the base product over all rows plus each sample's own update products
/// added into its rows; the factors' gradients are summed over the samples.
#[allow(clippy::too_many_arguments)]
fn backward_split_per_sample(
    grad: &Tensor,
    x: &Tensor,
    saved: &Saved,
    ws: Option<&Tensor>,
    f: &Factors,
    ranks: &[i64],
    k: i64,
    scale: f64,
    needs: [bool; 4],
    from: i64,
) -> Result<Grads> {
    let (_, in_f, out_f) = f.dims()?;
    let rows = x.numel() as i64 / in_f;
    let per = rows / ranks.len() as i64;
    let (x2, grad2) = (x.reshape([rows, in_f]), cast(grad, x.kind()).reshape([rows, out_f]));
    let h = saved.h.reshape([ranks.len() as i64, per, k]);
    ensure!(
        saved.d.size()[0] == 2 * k - from && saved.u.size()[1] == 2 * k - from,
        "saved operands have {} and {} ranks, expected {} (rank {k}, frozen ranks from {from})",
        saved.d.size()[0],
        saved.u.size()[1],
        2 * k - from
    );
    let gx = ws.map(|ws| grad2.mm(ws));
    let mut factors: [Option<Tensor>; 3] = [None, None, None];
    for (b, &kb) in ranks.iter().enumerate() {
        let start = b as i64 * per;
        let (db, ub) = sample_operands(&saved.d, &saved.u, k, kb, from);
        let hb = h.get(b as i64).narrow(1, 0, kb);
        let gxb = gx.as_ref().map(|gx| gx.narrow(0, start, per));
        let gb = backward_impl(&grad2.narrow(0, start, per), &x2.narrow(0, start, per), &hb, Some((&db, &ub)), f, Some(&[kb]), scale, needs, gxb.as_ref())?;
        for (sum, part) in factors.iter_mut().zip(gb.factors) {
            *sum = match (sum.take(), part) {
                (Some(s), Some(p)) => Some(s + p),
                (s, p) => s.or(p),
            };
        }
    }
    Ok(Grads { input: gx.map(|gx| gx.view(x.size().as_slice())), factors })
}

/// The folded weight W + dW at one rank (None: full rank) in one fused multiply-add, computed in
/// the wider of the weight's and the factors' dtypes: what the base layer plus [`forward`] compute
/// for every sample of that rank, as one weight (the inference fast path).
pub fn fold(weight: &Tensor, f: &Factors, rank: Option<i64>, scale: f64) -> Result<Tensor> {
    let (r, in_f, out_f) = f.dims()?;
    let k = rank.unwrap_or(r);
    ensure!((1..=r).contains(&k), "rank {k} is outside 1..={r}");
    ensure!(weight.size() == [out_f, in_f], "weight has shape {:?}, expected [{out_f}, {in_f}]", weight.size());
    ensure!(weight.device() == f.device(), "the weight is on {:?} but the adapter is on {:?}", weight.device(), f.device());
    let kind = if weight.kind() == Kind::Double || f.kind() == Kind::Double { Kind::Double } else { Kind::Float };
    let (d, u) = operands(f, k, 0, scale, kind);
    Ok(cast(weight, kind).addmm(&u, &d))
}

#[cfg(test)]
mod tests;
