//! Kernel tests against the paper's formula written densely with tch autograd, and against
//! central finite differences in float64.

use super::*;

const F64: (Kind, Device) = (Kind::Double, Device::Cpu);

fn seeded(shape: &[i64], seed: i64) -> Tensor {
    tch::manual_seed(seed);
    Tensor::randn(shape, F64)
}

fn max_rel(a: &Tensor, b: &Tensor) -> f64 {
    let scale = b.abs().max().double_value(&[]).max(1e-12);
    (a - b).abs().max().double_value(&[]) / scale
}

/// T-LoRA weights (float64) where the trainable copy has moved away from the frozen one.
struct Ortho {
    p: Tensor,
    lam: Tensor,
    q: Tensor,
    p0: Tensor,
    lam0: Tensor,
    q0: Tensor,
}

impl Ortho {
    fn new(out_f: i64, in_f: i64, r: i64, seed: i64) -> Self {
        Ortho {
            p: seeded(&[out_f, r], seed),
            lam: seeded(&[r], seed + 1),
            q: seeded(&[r, in_f], seed + 2),
            p0: seeded(&[out_f, r], seed + 3),
            lam0: seeded(&[r], seed + 4),
            q0: seeded(&[r, in_f], seed + 5),
        }
    }
    fn factors(&self) -> Factors<'_> {
        Factors::Ortho { p: &self.p, lam: &self.lam, q: &self.q, p0: &self.p0, lam0: &self.lam0, q0: &self.q0 }
    }
    /// The paper's dense update for one rank: P diag(lam m) Q - P0 diag(lam0 m) Q0.
    fn dense(&self, rank: i64, p: &Tensor, lam: &Tensor, q: &Tensor) -> Tensor {
        let r = self.lam.size()[0];
        let m = Tensor::arange(r, (Kind::Int64, Device::Cpu)).lt(rank).to_kind(Kind::Double);
        p.matmul(&(lam * &m).diag(0)).matmul(q) - self.p0.matmul(&(&self.lam0 * &m).diag(0)).matmul(&self.q0)
    }
}

/// Reference output: every sample b uses its own dense update, computed by plain tch ops.
fn reference(x: &Tensor, ranks: &[i64], dense: impl Fn(i64) -> Tensor, scale: f64) -> Tensor {
    let outs: Vec<Tensor> = (0..x.size()[0])
        .map(|b| {
            let rb = if ranks.len() == 1 { ranks[0] } else { ranks[b as usize] };
            x.get(b).matmul(&dense(rb).tr()) * scale
        })
        .collect();
    Tensor::stack(&outs, 0)
}

#[test]
fn ortho_forward_and_backward_match_dense_autograd() {
    let (b, n, in_f, out_f, r) = (3, 5, 7, 6, 4);
    let w = Ortho::new(out_f, in_f, r, 10);
    let scale = 0.75;
    for ranks in [vec![4], vec![2], vec![4, 1, 3], vec![2, 2, 2]] {
        let x = seeded(&[b, n, in_f], 1);
        let (delta, h) = forward(&x, &w.factors(), Some(&ranks), scale).unwrap();
        let gout = seeded(&[b, n, out_f], 2);
        let grads = backward(&gout, &x, &h, &w.factors(), Some(&ranks), scale, [true; 4]).unwrap();

        // Independent reference: the dense formula, differentiated by libtorch autograd.
        let xr = x.detach().set_requires_grad(true);
        let pr = w.p.detach().set_requires_grad(true);
        let lr = w.lam.detach().set_requires_grad(true);
        let qr = w.q.detach().set_requires_grad(true);
        let yref = reference(&xr, &ranks, |k| w.dense(k, &pr, &lr, &qr), scale);
        assert!(max_rel(&delta, &yref) < 1e-12, "forward, ranks {ranks:?}");
        (&yref * &gout).sum(Kind::Double).backward();
        assert!(max_rel(grads.input.as_ref().unwrap(), &xr.grad()) < 1e-12, "dx {ranks:?}");
        assert!(max_rel(grads.factors[0].as_ref().unwrap(), &pr.grad()) < 1e-12, "dP {ranks:?}");
        assert!(max_rel(grads.factors[1].as_ref().unwrap(), &lr.grad()) < 1e-12, "dlam {ranks:?}");
        assert!(max_rel(grads.factors[2].as_ref().unwrap(), &qr.grad()) < 1e-12, "dQ {ranks:?}");
        // Ranks beyond the largest active one get exactly zero gradient.
        let k = *ranks.iter().max().unwrap();
        if k < r {
            let tail = grads.factors[2].as_ref().unwrap().narrow(0, k, r - k);
            assert_eq!(tail.abs().max().double_value(&[]), 0.0);
        }
    }
}

#[test]
fn plain_forward_and_backward_match_dense_autograd() {
    let (b, n, in_f, out_f, r) = (2, 3, 5, 4, 3);
    let down = seeded(&[r, in_f], 20);
    let up = seeded(&[out_f, r], 21);
    for ranks in [None, Some(vec![3]), Some(vec![1, 3])] {
        let x = seeded(&[b, n, in_f], 22);
        let f = Factors::Plain { down: &down, up: &up };
        let (delta, h) = forward(&x, &f, ranks.as_deref(), 2.0).unwrap();
        let gout = seeded(&[b, n, out_f], 23);
        let grads = backward(&gout, &x, &h, &f, ranks.as_deref(), 2.0, [true; 4]).unwrap();
        assert!(grads.factors[2].is_none());

        let xr = x.detach().set_requires_grad(true);
        let dr = down.detach().set_requires_grad(true);
        let ur = up.detach().set_requires_grad(true);
        let dense = |k: i64| {
            let m = Tensor::arange(r, (Kind::Int64, Device::Cpu)).lt(k).to_kind(Kind::Double);
            ur.matmul(&m.diag(0)).matmul(&dr)
        };
        let rk = ranks.clone().unwrap_or(vec![r]);
        let yref = reference(&xr, &rk, dense, 2.0);
        assert!(max_rel(&delta, &yref) < 1e-12);
        (&yref * &gout).sum(Kind::Double).backward();
        assert!(max_rel(grads.input.as_ref().unwrap(), &xr.grad()) < 1e-12);
        assert!(max_rel(grads.factors[0].as_ref().unwrap(), &dr.grad()) < 1e-12);
        assert!(max_rel(grads.factors[1].as_ref().unwrap(), &ur.grad()) < 1e-12);
    }
}

/// Central finite differences of L = sum(delta * gout) for every entry of one tensor.
fn numeric_grad(t: &Tensor, loss: &dyn Fn() -> f64) -> Tensor {
    let eps = 1e-6;
    let flat = t.view([-1]);
    let g = Tensor::zeros([flat.size()[0]], F64);
    for i in 0..flat.size()[0] {
        let v = flat.double_value(&[i]);
        let _ = flat.get(i).fill_(v + eps);
        let up = loss();
        let _ = flat.get(i).fill_(v - eps);
        let down = loss();
        let _ = flat.get(i).fill_(v);
        let _ = g.get(i).fill_((up - down) / (2.0 * eps));
    }
    g.view(t.size().as_slice())
}

#[test]
fn ortho_backward_matches_finite_differences() {
    let (b, n, in_f, out_f, r) = (2, 3, 4, 5, 3);
    let w = Ortho::new(out_f, in_f, r, 30);
    let x = seeded(&[b, n, in_f], 31);
    let gout = seeded(&[b, n, out_f], 32);
    let ranks = [3i64, 2];
    let loss = || {
        let (d, _) = forward(&x, &w.factors(), Some(&ranks), 1.5).unwrap();
        (d * &gout).sum(Kind::Double).double_value(&[])
    };
    let (_, h) = forward(&x, &w.factors(), Some(&ranks), 1.5).unwrap();
    let mut g = backward(&gout, &x, &h, &w.factors(), Some(&ranks), 1.5, [true; 4]).unwrap();
    let pairs = [
        (g.input.unwrap(), &x),
        (g.factors[0].take().unwrap(), &w.p),
        (g.factors[1].take().unwrap(), &w.lam),
        (g.factors[2].take().unwrap(), &w.q),
    ];
    for (i, (analytic, t)) in pairs.iter().enumerate() {
        let numeric = numeric_grad(t, &loss);
        assert!(max_rel(analytic, &numeric) < 1e-7, "tensor {i}: {}", max_rel(analytic, &numeric));
    }
}

#[test]
fn zero_update_at_init_and_frozen_tensors_get_no_gradient() {
    let f = crate::init::orthogonal_random(12, 10, 4, crate::init::Component::Last, 5).unwrap();
    let (p0, lam0, q0) = (f.p.copy(), f.lam.copy(), f.q.copy());
    let fac = Factors::Ortho { p: &f.p, lam: &f.lam, q: &f.q, p0: &p0, lam0: &lam0, q0: &q0 };
    let x = seeded(&[2, 3, 10], 40).to_kind(Kind::Float);
    let (d, h) = forward(&x, &fac, Some(&[4, 2]), 1.0).unwrap();
    assert!(d.abs().max().double_value(&[]) < 1e-6, "update at init must vanish");
    let g = backward(&d.ones_like(), &x, &h, &fac, Some(&[4, 2]), 1.0, [false, true, false, true]).unwrap();
    assert!(g.input.is_none() && g.factors[1].is_none());
    assert_eq!(g.factors[0].as_ref().unwrap().kind(), Kind::Float);
}

#[test]
fn half_precision_inputs_with_float_weights() {
    let (in_f, out_f, r) = (16, 12, 4);
    let w = Ortho::new(out_f, in_f, r, 50);
    let cast = |t: &Tensor| t.to_kind(Kind::Float);
    let (p, lam, q, p0, lam0, q0) = (cast(&w.p), cast(&w.lam), cast(&w.q), cast(&w.p0), cast(&w.lam0), cast(&w.q0));
    let f = Factors::Ortho { p: &p, lam: &lam, q: &q, p0: &p0, lam0: &lam0, q0: &q0 };
    let x = seeded(&[2, 8, in_f], 51);
    let (d64, _) = forward(&x.to_kind(Kind::Float), &f, Some(&[4, 3]), 1.0).unwrap();
    for kind in [Kind::BFloat16, Kind::Half] {
        let xh = x.to_kind(kind);
        let (d, h) = forward(&xh, &f, Some(&[4, 3]), 1.0).unwrap();
        assert_eq!(d.kind(), kind);
        assert!(max_rel(&d.to_kind(Kind::Double), &d64.to_kind(Kind::Double)) < 3e-2, "{kind:?}");
        let g = backward(&d.ones_like(), &xh, &h, &f, Some(&[4, 3]), 1.0, [true; 4]).unwrap();
        assert_eq!(g.input.unwrap().kind(), kind);
        for gf in g.factors.iter().flatten() {
            assert_eq!(gf.kind(), Kind::Float);
            assert!(bool::try_from(gf.isfinite().all()).unwrap());
        }
    }
}

#[test]
fn dense_update_equals_forward() {
    let w = Ortho::new(6, 5, 4, 60);
    let x = seeded(&[3, 5], 61);
    for k in 1..=4 {
        let (d, _) = forward(&x, &w.factors(), Some(&[k]), 0.5).unwrap();
        let dw = dense_update(&w.factors(), Some(k), 0.5).unwrap();
        assert!(max_rel(&x.matmul(&dw.tr()), &d) < 1e-12);
    }
}

#[test]
fn bad_arguments_are_named() {
    let w = Ortho::new(6, 5, 4, 70);
    let x = seeded(&[3, 2, 5], 71);
    let err = |r: Result<(Tensor, Tensor)>| r.err().expect("must fail").to_string();
    assert!(err(forward(&x, &w.factors(), Some(&[5]), 1.0)).contains("outside 1..=4"));
    assert!(err(forward(&x, &w.factors(), Some(&[0]), 1.0)).contains("outside 1..=4"));
    assert!(err(forward(&x, &w.factors(), Some(&[4, 2]), 1.0)).contains("per-sample ranks"));
    assert!(err(forward(&seeded(&[3, 6], 1), &w.factors(), None, 1.0)).contains("in_features = 5"));
    assert!(err(forward(&x.to_kind(Kind::Int64), &w.factors(), None, 1.0)).contains("dtype"));
    let bad_q = seeded(&[3, 5], 72);
    let f = Factors::Ortho { p: &w.p, lam: &w.lam, q: &bad_q, p0: &w.p0, lam0: &w.lam0, q0: &w.q0 };
    assert!(err(forward(&x, &f, None, 1.0)).contains("Q has 3 rows"));
}
