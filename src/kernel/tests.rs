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

#[test]
fn forward_into_adds_in_place() {
    let w = Ortho::new(6, 5, 4, 80);
    for ranks in [vec![4], vec![3, 1]] {
        let x = seeded(&[2, 3, 5], 81);
        let (delta, h) = forward(&x, &w.factors(), Some(&ranks), 0.5).unwrap();
        let base = seeded(&[2, 3, 6], 82);
        let y = base.copy();
        let h2 = forward_into(&y, &x, &w.factors(), Some(&ranks), 0.5).unwrap();
        assert!(max_rel(&y, &(&base + &delta)) < 1e-12, "{ranks:?}");
        assert!(max_rel(&h2, &h) < 1e-15);
        // The same rows flattened to 2-D (how the layer calls it), and a non-contiguous output.
        let flat = base.copy().reshape([6, 6]);
        let _ = forward_into(&flat, &x, &w.factors(), Some(&ranks), 0.5).unwrap();
        assert!(max_rel(&flat.reshape([2, 3, 6]), &(&base + &delta)) < 1e-12);
        let yt = base.transpose(0, 1).contiguous().transpose(0, 1);
        assert!(!yt.is_contiguous());
        let _ = forward_into(&yt, &x, &w.factors(), Some(&ranks), 0.5).unwrap();
        assert!(max_rel(&yt, &(&base + &delta)) < 1e-12);
    }
    let x = seeded(&[2, 3, 5], 83);
    let bad = Tensor::zeros([2, 3, 7], F64);
    assert!(forward_into(&bad, &x, &w.factors(), None, 1.0).is_err());
    assert!(forward_into(&Tensor::zeros([5, 6], F64), &x, &w.factors(), None, 1.0).is_err());
}

#[test]
fn saved_operands_and_gradient_subsets_match_the_full_backward() {
    let w = Ortho::new(7, 6, 5, 90);
    let x = seeded(&[3, 4, 6], 91);
    let gout = seeded(&[3, 4, 7], 92);
    for ranks in [vec![5], vec![3], vec![2, 5, 4]] {
        let (_, h) = forward(&x, &w.factors(), Some(&ranks), 1.25).unwrap();
        let all = backward(&gout, &x, &h, &w.factors(), Some(&ranks), 1.25, [true; 4]).unwrap();
        let (_, saved) = forward_saving(&x, &w.factors(), Some(&ranks), 1.25, None).unwrap();
        // A (rows, out) gradient, as the layer's flattened output receives it.
        let flat_grad = gout.reshape([12, 7]);
        let needs_list = [[true; 4], [false, true, true, true], [false, false, false, true], [true, false, false, false], [false, true, false, false]];
        for needs in needs_list {
            for some in [
                backward(&gout, &x, &h, &w.factors(), Some(&ranks), 1.25, needs).unwrap(),
                backward_saved(&flat_grad, &x, &saved, &w.factors(), Some(&ranks), 1.25, needs).unwrap(),
            ] {
                assert_eq!(some.input.is_some(), needs[0]);
                if let Some(gx) = &some.input {
                    assert!(max_rel(gx, all.input.as_ref().unwrap()) < 1e-14);
                }
                for i in 0..3 {
                    assert_eq!(some.factors[i].is_some(), needs[i + 1]);
                    if let Some(g) = &some.factors[i] {
                        assert!(max_rel(g, all.factors[i].as_ref().unwrap()) < 1e-14, "{ranks:?} {needs:?} {i}");
                    }
                }
            }
        }
    }
}

#[test]
fn fold_is_weight_plus_dense_update() {
    let w = Ortho::new(6, 5, 4, 100);
    let weight = seeded(&[6, 5], 101);
    for k in [None, Some(1), Some(3)] {
        let folded = fold(&weight, &w.factors(), k, 0.75).unwrap();
        let want = &weight + dense_update(&w.factors(), k, 0.75).unwrap();
        assert!(max_rel(&folded, &want) < 1e-14);
    }
    // Half-precision weights fold in float32.
    let cast = |t: &Tensor| t.to_kind(Kind::Float);
    let (p, lam, q, p0, lam0, q0) = (cast(&w.p), cast(&w.lam), cast(&w.q), cast(&w.p0), cast(&w.lam0), cast(&w.q0));
    let f = Factors::Ortho { p: &p, lam: &lam, q: &q, p0: &p0, lam0: &lam0, q0: &q0 };
    assert_eq!(fold(&weight.to_kind(Kind::Half), &f, Some(2), 1.0).unwrap().kind(), Kind::Float);
    assert!(fold(&weight, &w.factors(), Some(5), 1.0).is_err());
    assert!(fold(&seeded(&[5, 6], 102), &w.factors(), None, 1.0).is_err());
}

#[test]
fn split_forward_and_backward_match_base_plus_update() {
    let (b, n, in_f, out_f, r) = (3, 4, 7, 6, 4);
    let w = Ortho::new(out_f, in_f, r, 110);
    let weight = seeded(&[out_f, in_f], 111);
    let bias = seeded(&[out_f], 112);
    let x = seeded(&[b, n, in_f], 113);
    let gout = seeded(&[b, n, out_f], 114);
    let staged = fold_frozen(&weight, &w.factors(), 2, 0.75).unwrap();
    let stages = [Stage::default(), Stage { rank: 2, folded: None }, Stage { rank: 2, folded: Some(&staged) }];
    for ranks in [None, Some(vec![4]), Some(vec![2]), Some(vec![4, 1, 3]), Some(vec![2, 2, 3]), Some(vec![3, 4, 2])] {
        for with_bias in [true, false] {
            let bias = if with_bias { Some(&bias) } else { None };
            let (delta, h) = forward(&x, &w.factors(), ranks.as_deref(), 0.75).unwrap();
            let want = x.linear(&weight, bias) + &delta;
            let all = backward(&gout, &x, &h, &w.factors(), ranks.as_deref(), 0.75, [true; 4]).unwrap();
            let gx_want = all.input.as_ref().unwrap() + gout.matmul(&weight);
            // (y, dx) of the stage computed on the spot, which the precomputed stage must equal bitwise.
            let mut on_the_spot: Option<(Tensor, Tensor)> = None;
            for stage in stages {
                if ranks.as_ref().is_some_and(|rs| rs.iter().any(|&rb| rb < stage.rank)) {
                    // A stage may not fold ranks that a sample does not use.
                    assert!(forward_split(&x, &weight, bias, &w.factors(), ranks.as_deref(), 0.75, stage).is_err());
                    continue;
                }
                let (y, saved) = forward_split(&x, &weight, bias, &w.factors(), ranks.as_deref(), 0.75, stage).unwrap();
                assert_eq!(y.size(), want.size());
                assert!(max_rel(&y, &want) < 1e-12, "{ranks:?}");
                for needs in [[true; 4], [false, true, true, true], [true, false, false, false]] {
                    let g = backward_split(&gout, &x, &saved, &weight, &w.factors(), ranks.as_deref(), 0.75, needs, stage).unwrap();
                    assert_eq!(g.input.is_some(), needs[0]);
                    if let Some(gx) = &g.input {
                        assert!(max_rel(gx, &gx_want) < 1e-12, "dx {ranks:?}");
                        if stage.rank == 2 && needs == [true; 4] {
                            match &on_the_spot {
                                None => on_the_spot = Some((y.copy(), gx.copy())),
                                Some((y0, gx0)) => assert!(y.equal(y0) && gx.equal(gx0), "cached stage differs {ranks:?}"),
                            }
                        }
                    }
                    for i in 0..3 {
                        if let Some(gf) = &g.factors[i] {
                            assert!(max_rel(gf, all.factors[i].as_ref().unwrap()) < 1e-12, "{ranks:?} {i}");
                        }
                    }
                }
            }
            let staged_ok = ranks.as_ref().is_none_or(|rs| rs.iter().all(|&rb| rb >= 2));
            assert_eq!(on_the_spot.is_some(), staged_ok);
        }
    }
    let plain_down = seeded(&[r, in_f], 115);
    let plain_up = seeded(&[out_f, r], 116);
    let plain = Factors::Plain { down: &plain_down, up: &plain_up };
    let none = Stage::default();
    assert!(forward_split(&x, &weight, None, &plain, None, 1.0, none).is_err());
    assert!(forward_split(&x.to_kind(Kind::Float), &weight, None, &w.factors(), None, 1.0, none).is_err());
    // A stage of the wrong shape or rank, and frozen folds the factors cannot have, are refused.
    let bad = seeded(&[out_f, in_f + 1], 117);
    assert!(forward_split(&x, &weight, None, &w.factors(), None, 1.0, Stage { rank: 2, folded: Some(&bad) }).is_err());
    assert!(forward_split(&x, &weight, None, &w.factors(), None, 1.0, Stage { rank: r + 1, folded: None }).is_err());
    assert!(fold_frozen(&weight, &plain, 2, 1.0).is_err());
    assert!(fold_frozen(&weight, &w.factors(), r + 1, 1.0).is_err());
    assert!(fold_frozen(&bad, &w.factors(), 2, 1.0).is_err());
}
