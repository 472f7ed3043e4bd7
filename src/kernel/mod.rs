//! Forward and backward of the masked, rank-adaptive low-rank update.
//!
//! Every variant is a low-rank product evaluated on the active ranks only:
//!
//! ```text
//! delta(x) = ((x D^T) * G) U^T          D: k' x in,  U: out x k',  G: gains (per sample or shared)
//! ```
//!
//! - `Ortho` (T-LoRA): D = [Q_k; Q0_k], U = [P_k, P0_k], G = scale * [lam_k * m, -lam0_k * m].
//!   The trainable and the frozen branch share one matmul each way, and the frozen copy makes the
//!   update exactly zero at initialisation.
//! - `Plain` (Vanilla T-LoRA and LoRA): D = A_k, U = B_k, G = scale * m.
//!
//! k is the largest rank in the batch; samples with a smaller rank r_b get the mask
//! m[b, j] = (j < r_b) on the small k'-wide intermediate, never on the weights. Gradients are
//! returned only for the input and the trainable factors, padded with zeros to the full rank r
//! (the inactive ranks receive exactly zero gradient).

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
}

/// The per-call rank layout, resolved against the input.
struct Active {
    /// Ranks evaluated (the largest in the batch).
    k: i64,
    /// Per-sample 0/1 mask (B, k), only when samples differ in rank.
    mask: Option<Tensor>,
}

fn resolve_ranks(ranks: Option<&[i64]>, r: i64, x: &Tensor) -> Result<Active> {
    let Some(ranks) = ranks else { return Ok(Active { k: r, mask: None }) };
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
        bail!(
            "got {} per-sample ranks for an input of shape {:?}: the input's first dimension must be the batch",
            ranks.len(),
            x.size()
        );
    }
    let cols = Tensor::arange(k, (Kind::Int64, Device::Cpu)).unsqueeze(0);
    let mask = cols.lt_tensor(&Tensor::from_slice(ranks).unsqueeze(1));
    Ok(Active { k, mask: Some(mask) })
}

/// The low-rank operands for the active ranks, in the compute dtype and device of `x`:
/// (D, U, gain) where gain broadcasts against x D^T.
fn operands(f: &Factors, act: &Active, scale: f64, x: &Tensor) -> (Tensor, Tensor, Tensor) {
    let (kind, dev) = (x.kind(), x.device());
    let k = act.k;
    // Per-sample gains have shape (B, 1, ..., 1, k') so that they broadcast over tokens.
    let per_sample = |g: Tensor| -> Tensor {
        match &act.mask {
            None => g,
            Some(m) => {
                let reps = g.size()[0] / k;
                let m = m.to_device(dev).to_kind(Kind::Float).repeat([1, reps]);
                let mut shape = vec![m.size()[0]];
                shape.extend(std::iter::repeat(1).take(x.dim() - 2));
                shape.push(g.size()[0]);
                (m * g.unsqueeze(0)).reshape(&shape)
            }
        }
    };
    let (d, u, g) = match f {
        Factors::Ortho { p, lam, q, p0, lam0, q0 } => {
            let d = Tensor::cat(&[q.narrow(0, 0, k), q0.narrow(0, 0, k)], 0);
            let u = Tensor::cat(&[p.narrow(1, 0, k), p0.narrow(1, 0, k)], 1);
            let g = Tensor::cat(&[lam.narrow(0, 0, k), -lam0.narrow(0, 0, k)], 0) * scale;
            (d, u, per_sample(g))
        }
        Factors::Plain { down, up } => {
            let g = Tensor::full([k], scale, (Kind::Float, dev));
            (down.narrow(0, 0, k), up.narrow(1, 0, k), per_sample(g))
        }
    };
    (d.to_kind(kind), u.to_kind(kind), g.to_kind(kind))
}

fn check_input(x: &Tensor, f: &Factors, in_f: i64) -> Result<()> {
    let dev = match f {
        Factors::Ortho { p, .. } => p.device(),
        Factors::Plain { down, .. } => down.device(),
    };
    ensure!(dev == x.device(), "the adapter is on {dev:?} but the input is on {:?}: move the model after inject, or inject after moving it", x.device());
    ensure!(
        matches!(x.kind(), Kind::Float | Kind::Half | Kind::BFloat16 | Kind::Double),
        "input dtype {:?} is not supported: use float32, float16, bfloat16 or float64",
        x.kind()
    );
    ensure!(x.dim() >= 1 && x.size()[x.dim() - 1] == in_f, "input shape {:?} does not end in in_features = {in_f}", x.size());
    Ok(())
}

/// Forward: returns (delta, h) with delta = the adapter's output (to add to the base layer's),
/// shape (..., out), and h = x D^T, the (..., k') intermediate that [`backward`] needs.
pub fn forward(x: &Tensor, f: &Factors, ranks: Option<&[i64]>, scale: f64) -> Result<(Tensor, Tensor)> {
    let (r, in_f, _) = f.dims()?;
    check_input(x, f, in_f)?;
    let act = resolve_ranks(ranks, r, x)?;
    let (d, u, g) = operands(f, &act, scale, x);
    let h = x.matmul(&d.tr());
    let delta = (&h * &g).matmul(&u.tr());
    Ok((delta, h))
}

/// Backward of [`forward`] given the gradient of delta. `needs` = (input, factor 0, 1, 2) says
/// which gradients to compute; frozen tensors never get one.
pub fn backward(
    grad: &Tensor,
    x: &Tensor,
    h: &Tensor,
    f: &Factors,
    ranks: Option<&[i64]>,
    scale: f64,
    needs: [bool; 4],
) -> Result<Grads> {
    let (r, in_f, out_f) = f.dims()?;
    check_input(x, f, in_f)?;
    let act = resolve_ranks(ranks, r, x)?;
    let k = act.k;
    let (d, u, g) = operands(f, &act, scale, x);
    let grad = grad.to_kind(x.kind());
    let kk = d.size()[0];
    let flat = |t: &Tensor, cols: i64| t.reshape([-1, cols]);
    // gv = dL/d(h * g); gh = dL/dh.
    let gv = grad.matmul(&u);
    let gh = &gv * &g;
    let input = if needs[0] { Some(gh.matmul(&d)) } else { None };

    // Full-rank gradient with zeros for the ranks this call did not use.
    let pad = |g_k: Tensor, like: &Tensor, dim: i64| -> Tensor {
        if k == r {
            return g_k.to_kind(like.kind());
        }
        let full = Tensor::zeros(like.size(), (like.kind(), like.device()));
        full.narrow(dim, 0, k).copy_(&g_k);
        full
    };
    let grad_f = flat(&grad, out_f);
    let h_train = h.narrow(-1, 0, k);
    let gh_train = gh.narrow(-1, 0, k);
    let mut factors: [Option<Tensor>; 3] = [None, None, None];
    match f {
        Factors::Ortho { p, lam, q, .. } => {
            if needs[1] {
                let v_train = &h_train * g.narrow(-1, 0, k);
                factors[0] = Some(pad(grad_f.tr().matmul(&flat(&v_train, k)), p, 1));
            }
            if needs[2] {
                // d delta / d lam_j = scale * m[b, j] * h_j * gv_j, summed over samples and tokens.
                // Accumulate half-precision products in float32.
                let acc = if x.kind() == Kind::Double { Kind::Double } else { Kind::Float };
                let prod = (gv.narrow(-1, 0, k) * &h_train).to_kind(acc);
                let glam = match &act.mask {
                    None => flat(&prod, k).sum_dim_intlist(0, false, acc),
                    Some(m) => {
                        let per_b = prod.reshape([m.size()[0], -1, k]).sum_dim_intlist(1, false, acc);
                        (per_b * m.to_device(x.device()).to_kind(acc)).sum_dim_intlist(0, false, acc)
                    }
                } * scale;
                factors[1] = Some(pad(glam, lam, 0));
            }
            if needs[3] {
                factors[2] = Some(pad(flat(&gh_train, k).tr().matmul(&flat(x, in_f)), q, 0));
            }
        }
        Factors::Plain { down, up } => {
            debug_assert_eq!(kk, k);
            if needs[1] {
                factors[0] = Some(pad(flat(&gh, k).tr().matmul(&flat(x, in_f)), down, 0));
            }
            if needs[2] {
                let v = h * &g;
                factors[1] = Some(pad(grad_f.tr().matmul(&flat(&v, k)), up, 1));
            }
        }
    }
    Ok(Grads { input, factors })
}

/// The dense update dW = U diag(G) D for one rank (no batch), in the factors' dtype: what [`forward`]
/// computes for every sample of rank `rank`, as a weight matrix (out x in). Used to fold the
/// adapter into a layer's weight and as the reference in tests.
pub fn dense_update(f: &Factors, rank: Option<i64>, scale: f64) -> Result<Tensor> {
    let (r, in_f, _) = f.dims()?;
    let like = match f {
        Factors::Ortho { p, .. } => p,
        Factors::Plain { down, .. } => down,
    };
    let probe = Tensor::zeros([1, in_f], (like.kind(), like.device()));
    let ranks = rank.map(|k| vec![k]);
    let act = resolve_ranks(ranks.as_deref(), r, &probe)?;
    let (d, u, g) = operands(f, &act, scale, &probe);
    Ok((u * g.unsqueeze(0)).matmul(&d))
}

#[cfg(test)]
mod tests;
