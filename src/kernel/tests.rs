//! Kernel tests against the paper's formula written densely with tch autograd (float64), and
//! against the same formula in float64 for half-precision inputs.

use super::*;

const F64: (Kind, Device) = (Kind::Double, Device::Cpu);

fn seeded(shape: &[i64], seed: i64) -> Tensor {
    tch::manual_seed(seed);
    Tensor::randn(shape, F64)
}

fn max_rel(a: &Tensor, b: &Tensor) -> f64 {
    let b = b.to_kind(Kind::Double);
    let scale = b.abs().max().double_value(&[]).max(1e-30);
    (a.to_kind(Kind::Double) - b).abs().max().double_value(&[]) / scale
}

/// T-LoRA weights where the trainable copy has moved away from the frozen one by `drift`
/// (relative), in `kind`.
struct TLoraWeights {
    p: Tensor,
    lam: Tensor,
    q: Tensor,
    p0: Tensor,
    lam0: Tensor,
    q0: Tensor,
}

impl TLoraWeights {
    fn new(out_f: i64, in_f: i64, r: i64, seed: i64, drift: f64, kind: Kind) -> Self {
        let (p0, lam0, q0) = (seeded(&[out_f, r], seed + 3), seeded(&[r], seed + 4), seeded(&[r, in_f], seed + 5));
        let moved = |t: &Tensor, s: i64| t * (seeded(&t.size(), s) * drift + 1.0);
        TLoraWeights {
            p: moved(&p0, seed).to_kind(kind),
            lam: moved(&lam0, seed + 1).to_kind(kind),
            q: moved(&q0, seed + 2).to_kind(kind),
            p0: p0.to_kind(kind),
            lam0: lam0.to_kind(kind),
            q0: q0.to_kind(kind),
        }
    }
    fn factors(&self) -> Factors<'_> {
        Factors::TLora { p: &self.p, lam: &self.lam, q: &self.q, p0: &self.p0, lam0: &self.lam0, q0: &self.q0 }
    }
    /// The same weights in another dtype (drawing them again could interleave with other test
    /// threads' use of libtorch's global generator).
    fn cast(&self, kind: Kind) -> Self {
        let c = |t: &Tensor| t.to_kind(kind);
        TLoraWeights { p: c(&self.p), lam: c(&self.lam), q: c(&self.q), p0: c(&self.p0), lam0: c(&self.lam0), q0: c(&self.q0) }
    }
    /// The paper's dense update for one rank: P diag(lam m) Q - P0 diag(lam0 m) Q0 (float64).
    fn dense(&self, rank: i64, p: &Tensor, lam: &Tensor, q: &Tensor) -> Tensor {
        let r = self.lam.size()[0];
        let m = Tensor::arange(r, (Kind::Int64, Device::Cpu)).lt(rank).to_kind(Kind::Double);
        let d = |t: &Tensor| t.to_kind(Kind::Double);
        p.matmul(&(lam * &m).diag(0)).matmul(q) - d(&self.p0).matmul(&(d(&self.lam0) * &m).diag(0)).matmul(&d(&self.q0))
    }
}

/// The rank mask (B, blocks * r), scale included.
fn mask(ranks: &[i64], r: i64, blocks: i64, scale: f64, kind: Kind) -> Tensor {
    let rows: Vec<Tensor> = ranks
        .iter()
        .map(|&k| {
            let m = Tensor::arange(r, (Kind::Int64, Device::Cpu)).lt(k).to_kind(kind) * scale;
            m.repeat([blocks])
        })
        .collect();
    Tensor::stack(&rows, 0)
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
    let w = TLoraWeights::new(out_f, in_f, r, 10, 0.3, Kind::Double);
    let scale = 0.75;
    for ranks in [vec![4], vec![2], vec![4, 1, 3], vec![2, 2, 2]] {
        let x = seeded(&[b, n, in_f], 1);
        let m = mask(&ranks, r, 2, scale, Kind::Double);
        let ops = lowrank_operands(&w.factors(), None, Kind::Double, None).unwrap();
        let (delta, h) = lowrank_forward(&x, &ops, Some(&m), None).unwrap();
        let delta = delta.unwrap();
        let gout = seeded(&[b, n, out_f], 2);
        let grads = lowrank_backward(&gout, &x, &h, &ops, Some(&m), &w.factors(), [true; 4]).unwrap();

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
        // Without the input's gradient, Q's comes from a narrower product: the same values.
        let no_x = lowrank_backward(&gout, &x, &h, &ops, Some(&m), &w.factors(), [false, true, true, true]).unwrap();
        assert!(no_x.input.is_none());
        for (i, want) in [pr.grad(), lr.grad(), qr.grad()].iter().enumerate() {
            assert!(max_rel(no_x.factors[i].as_ref().unwrap(), want) < 1e-12, "factor {i} without dx, {ranks:?}");
        }
    }
}

#[test]
fn plain_forward_and_backward_match_dense_autograd() {
    let (b, n, in_f, out_f, r) = (2, 3, 5, 4, 3);
    let down = seeded(&[r, in_f], 20);
    let up = seeded(&[out_f, r], 21);
    let scale = 2.0;
    for ranks in [vec![3], vec![1, 3]] {
        let f = Factors::LoRA { down: &down, up: &up };
        let x = seeded(&[b, n, in_f], 22);
        let m = mask(&ranks, r, 1, scale, Kind::Double);
        let ops = lowrank_operands(&f, None, Kind::Double, None).unwrap();
        let (delta, h) = lowrank_forward(&x, &ops, Some(&m), None).unwrap();
        let gout = seeded(&[b, n, out_f], 23);
        let grads = lowrank_backward(&gout, &x, &h, &ops, Some(&m), &f, [true; 4]).unwrap();
        let dr = down.detach().set_requires_grad(true);
        let ur = up.detach().set_requires_grad(true);
        let mk = |k: i64| {
            let m = Tensor::arange(r, (Kind::Int64, Device::Cpu)).lt(k).to_kind(Kind::Double);
            (&ur * m.unsqueeze(0)).matmul(&dr)
        };
        let yref = reference(&x, &ranks, mk, scale);
        assert!(max_rel(&delta.unwrap(), &yref) < 1e-12);
        (&yref * &gout).sum(Kind::Double).backward();
        assert!(max_rel(grads.factors[0].as_ref().unwrap(), &dr.grad()) < 1e-12);
        assert!(max_rel(grads.factors[1].as_ref().unwrap(), &ur.grad()) < 1e-12);
    }
}

#[test]
fn buffers_give_the_fresh_operands_and_q_inside_its_buffer_is_not_copied() {
    let (in_f, out_f, r) = (6, 5, 3);
    let w = TLoraWeights::new(out_f, in_f, r, 30, 0.1, Kind::Float);
    let fresh = lowrank_operands(&w.factors(), None, Kind::Float, None).unwrap();
    let d = Tensor::zeros([2 * r, in_f], (Kind::Float, Device::Cpu));
    let u = Tensor::zeros([out_f, 2 * r], (Kind::Float, Device::Cpu));
    let nf = frozen_block(&w.p0, &w.lam0).unwrap();
    let s = Scratch { d: &d, u: &u, write_frozen: true };
    let ops = lowrank_operands(&w.factors(), Some(&nf), Kind::Float, Some(s)).unwrap();
    assert!(ops.d.equal(&fresh.d) && ops.u.equal(&fresh.u));
    // Q living in the buffer's first rows: used in place.
    let mut top = d.narrow(0, 0, r);
    top.copy_(&w.q);
    let q_view = d.narrow(0, 0, r);
    let f = Factors::TLora { p: &w.p, lam: &w.lam, q: &q_view, p0: &w.p0, lam0: &w.lam0, q0: &w.q0 };
    let ops = lowrank_operands(&f, Some(&nf), Kind::Float, Some(Scratch { d: &d, u: &u, write_frozen: false })).unwrap();
    assert!(ops.d.equal(&fresh.d) && ops.u.equal(&fresh.u));
}

/// The half-precision claim: the update of a trained adapter (moved by `drift` from its frozen
/// copy) keeps its relative accuracy in bf16 / fp16, in the forward and in the fold.
#[test]
fn half_precision_update_does_not_cancel() {
    let (b, n, in_f, out_f, r) = (2, 16, 64, 48, 8);
    for drift in [1e-2, 1e-3, 1e-4] {
        let w64 = TLoraWeights::new(out_f, in_f, r, 40, drift, Kind::Double);
        let w = w64.cast(Kind::Float);
        let x64 = seeded(&[b, n, in_f], 41);

        for (kind, tol) in [(Kind::BFloat16, 3e-2), (Kind::Half, 1e-2)] {
            let x = x64.to_kind(kind);
            let ops = lowrank_operands(&w.factors(), None, kind, None).unwrap();
            let (delta, _) = lowrank_forward(&x, &ops, None, None).unwrap();
            // The reference sees the same rounded input.
            let exact_x = reference(&x.to_kind(Kind::Double), &[r], |k| w64.dense(k, &w64.p, &w64.lam, &w64.q), 1.0);
            let err = max_rel(&delta.unwrap(), &exact_x);
            assert!(err < tol, "{kind:?} drift {drift}: forward relative error {err}");
            let zero = Tensor::zeros([out_f, in_f], (kind, Device::Cpu));
            let folded = fold_weight(&zero, &w.factors(), None, 1.0).unwrap().to_kind(kind);
            let err = max_rel(&folded, &w64.dense(r, &w64.p, &w64.lam, &w64.q));
            assert!(err < tol, "{kind:?} drift {drift}: fold relative error {err}");
        }
    }
}

#[test]
fn zero_update_at_init_and_frozen_tensors_get_no_gradient() {
    let w = TLoraWeights::new(6, 5, 3, 50, 0.0, Kind::Float);
    let x = seeded(&[2, 4, 5], 51).to_kind(Kind::Float);
    let ops = lowrank_operands(&w.factors(), None, Kind::Float, None).unwrap();
    let (delta, h) = lowrank_forward(&x, &ops, None, None).unwrap();
    assert_eq!(delta.unwrap().abs().max().double_value(&[]), 0.0);
    let g = lowrank_backward(
        &x.narrow(2, 0, 1).expand([2, 4, 6], false).contiguous(),
        &x,
        &h,
        &ops,
        None,
        &w.factors(),
        [false, true, false, false],
    )
    .unwrap();
    assert!(g.input.is_none() && g.factors[0].is_some() && g.factors[1].is_none() && g.factors[2].is_none());
}

#[test]
fn dense_update_and_fold_equal_forward() {
    let w = TLoraWeights::new(6, 5, 4, 60, 0.2, Kind::Double);
    let x = seeded(&[3, 5], 61);
    for k in [1, 3, 4] {
        let m = mask(&[k], 4, 2, 0.5, Kind::Double);
        let ops = lowrank_operands(&w.factors(), None, Kind::Double, None).unwrap();
        let (delta, _) = lowrank_forward(&x, &ops, Some(&m), None).unwrap();
        let dw = dense_update(&w.factors(), Some(k), 0.5).unwrap();
        assert!(max_rel(&delta.unwrap(), &x.matmul(&dw.tr())) < 1e-12);
        let weight = seeded(&[6, 5], 62);
        assert!(max_rel(&fold_weight(&weight, &w.factors(), Some(k), 0.5).unwrap(), &(&weight + &dw)) < 1e-12);
    }
}

#[test]
fn forward_into_adds_in_place() {
    let w = TLoraWeights::new(6, 5, 3, 70, 0.2, Kind::Double);
    let x = seeded(&[2, 4, 5], 71);
    let ops = lowrank_operands(&w.factors(), None, Kind::Double, None).unwrap();
    let (delta, _) = lowrank_forward(&x, &ops, None, None).unwrap();
    let y = seeded(&[8, 6], 72);
    let before = y.copy();
    let (none, _) = lowrank_forward(&x, &ops, None, Some(&y)).unwrap();
    assert!(none.is_none());
    assert!(max_rel(&y, &(before + delta.unwrap().reshape([8, 6]))) < 1e-12);
}

#[test]
fn bad_arguments_are_named() {
    let w = TLoraWeights::new(6, 5, 3, 80, 0.1, Kind::Double);
    let ops = lowrank_operands(&w.factors(), None, Kind::Double, None).unwrap();
    let err = |r: Result<(Option<Tensor>, Tensor)>| r.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err(lowrank_forward(&seeded(&[2, 4], 1), &ops, None, None)).contains("in_features = 5"));
    assert!(err(lowrank_forward(&seeded(&[2, 5], 1).to_kind(Kind::Float), &ops, None, None)).contains("operands are"));
    let m = mask(&[1, 2, 3], 3, 2, 1.0, Kind::Double);
    assert!(err(lowrank_forward(&seeded(&[2, 4, 5], 1), &ops, Some(&m), None)).contains("per-sample ranks"));
    let short = w.q.narrow(0, 0, 2);
    let f = Factors::TLora { p: &w.p, lam: &w.lam, q: &short, p0: &w.p0, lam0: &w.lam0, q0: &w.q0 };
    assert!(f.dims().unwrap_err().to_string().contains("Q has 2 rows"));
    let ints = w.lam.to_kind(Kind::Int64);
    let f = Factors::TLora { p: &w.p, lam: &ints, q: &w.q, p0: &w.p0, lam0: &w.lam0, q0: &w.q0 };
    assert!(f.dims().unwrap_err().to_string().contains("float32"));
    assert!(dense_update(&w.factors(), Some(4), 1.0).unwrap_err().to_string().contains("outside"));
}

#[test]
fn the_variant_follows_the_number_of_factors() {
    let w = TLoraWeights::new(5, 4, 3, 60, 0.1, Kind::Double);
    let six: Vec<Tensor> = [&w.p, &w.lam, &w.q, &w.p0, &w.lam0, &w.q0].iter().map(|t| t.shallow_clone()).collect();
    assert!(matches!(Factors::from_slice(&six).unwrap(), Factors::TLora { .. }));
    assert!(matches!(Factors::from_slice(&six[..2]).unwrap(), Factors::LoRA { .. }));
    let err = Factors::from_slice(&six[..3]).err().unwrap().to_string();
    assert_eq!(err, "expected 6 factors (p, lam, q, p0, lam0, q0) or 2 (down, up), got 3");
}

/// One device policy: the names `parse_device` accepts are exactly devices `check_device` lets
/// through (CPU and CUDA); MPS and meta are refused by both.
#[test]
fn one_device_policy() {
    assert_eq!(parse_device("cpu").unwrap(), Device::Cpu);
    assert_eq!(parse_device("cuda").unwrap(), Device::Cuda(0));
    assert_eq!(parse_device("cuda:3").unwrap(), Device::Cuda(3));
    for name in ["cpu", "cuda", "cuda:3"] {
        assert!(is_kernel_device(parse_device(name).unwrap()), "{name}");
    }
    for name in ["mps", "meta", "tpu", "cuda:x", "CPU"] {
        let msg = parse_device(name).unwrap_err().to_string();
        assert_eq!(msg, format!("unsupported device {name:?}: tlora's kernels run on \"cpu\", \"cuda\" or \"cuda:N\" only"));
    }
    assert!(!is_kernel_device(Device::Mps));
    assert!(check_device(&seeded(&[2], 0), "t").is_ok());
}

/// One compute-dtype rule: the names the bindings pass and the kinds the kernels check, one message.
#[test]
fn one_compute_dtype_rule() {
    for (name, kind) in [("float32", Kind::Float), ("float16", Kind::Half), ("bfloat16", Kind::BFloat16), ("float64", Kind::Double)] {
        assert_eq!(compute_kind(name).unwrap(), kind);
        assert!(check_compute_kind(kind, "input dtype").is_ok());
    }
    let use_one = "is not supported: use float32, float16, bfloat16 or float64";
    assert_eq!(compute_kind("int8").unwrap_err().to_string(), format!("compute dtype \"int8\" {use_one}"));
    assert_eq!(check_compute_kind(Kind::Int64, "input dtype").unwrap_err().to_string(), format!("input dtype Int64 {use_one}"));
}

#[test]
fn folded_training_matches_dense_autograd() {
    // Per-sample, shared and absent masks; T-LoRA and LoRA; with and without a bias.
    let (b, n, in_f, out_f, r) = (3, 4, 7, 6, 4);
    let w = TLoraWeights::new(out_f, in_f, r, 90, 0.3, Kind::Double);
    let (down, up) = (seeded(&[r, in_f], 91), seeded(&[out_f, r], 92));
    let weight = seeded(&[out_f, in_f], 93);
    let bias = seeded(&[out_f], 94);
    for ranks in [vec![4, 1, 3], vec![2], vec![4]] {
        // (full rank at scale 1: no mask)
        let full = ranks == [4];
        let scale = if full { 1.0 } else { 0.75 };
        for (tlora, with_bias) in [(true, true), (true, false), (false, true)] {
            let f = if tlora { w.factors() } else { Factors::LoRA { down: &down, up: &up } };
            let x = seeded(&[b, n, in_f], 95);
            let m = mask(&ranks, r, if tlora { 2 } else { 1 }, scale, Kind::Double);
            let m = if full { None } else { Some(&m) };
            let bias = if with_bias { Some(&bias) } else { None };
            let ops = lowrank_operands(&f, None, Kind::Double, None).unwrap();
            let (y, um, wb) = folded_forward(&x, &weight, bias, &ops, m).unwrap();
            let gout = seeded(&[b, n, out_f], 96);
            let grads = folded_backward(&gout, &x, &weight, &um, None, &ops, m, &f, [true; 4]).unwrap();
            // With the forward's folded weights kept: the same gradients.
            let kept = folded_backward(&gout, &x, &weight, &um, Some(&wb), &ops, m, &f, [true; 4]).unwrap();
            assert!(max_rel(kept.input.as_ref().unwrap(), grads.input.as_ref().unwrap()) < 1e-14);

            let xr = x.detach().set_requires_grad(true);
            let (yref, trained) = if tlora {
                let (pr, lr, qr) =
                    (w.p.detach().set_requires_grad(true), w.lam.detach().set_requires_grad(true), w.q.detach().set_requires_grad(true));
                (reference(&xr, &ranks, |k| w.dense(k, &pr, &lr, &qr), scale), vec![pr, lr, qr])
            } else {
                let (dr, ur) = (down.detach().set_requires_grad(true), up.detach().set_requires_grad(true));
                let mk = |k: i64| {
                    let mk = Tensor::arange(r, (Kind::Int64, Device::Cpu)).lt(k).to_kind(Kind::Double);
                    (&ur * mk.unsqueeze(0)).matmul(&dr)
                };
                (reference(&xr, &ranks, mk, scale), vec![dr, ur])
            };
            let base = xr.matmul(&weight.tr()) + bias.map_or_else(|| Tensor::zeros([out_f], F64), |t| t.shallow_clone());
            let yref = yref + base;
            assert!(max_rel(&y, &yref) < 1e-12, "forward, ranks {ranks:?}, tlora {tlora}");
            (&yref * &gout).sum(Kind::Double).backward();
            assert!(max_rel(grads.input.as_ref().unwrap(), &xr.grad()) < 1e-12, "dx {ranks:?}");
            for (i, t) in trained.iter().enumerate() {
                assert!(max_rel(grads.factors[i].as_ref().unwrap(), &t.grad()) < 1e-12, "factor {i}, ranks {ranks:?}, tlora {tlora}");
            }
            // Only what was asked for.
            let g = folded_backward(&gout, &x, &weight, &um, None, &ops, m, &f, [false, false, false, true]).unwrap();
            assert!(g.input.is_none() && g.factors[0].is_none() && g.factors[1].is_none() && g.factors[2].is_some() == tlora);
        }
    }
}

#[test]
fn folding_pays_with_many_tokens_per_weight_only() {
    assert_eq!((fold_plan(1024, 128, 128), fold_plan(256, 256, 256), fold_plan(200, 256, 256)), (Some(true), Some(true), Some(false)));
    assert_eq!((fold_plan(77, 256, 128), fold_plan(1, 640, 640)), (None, None));
    assert!(folds_in(Kind::Float) && folds_in(Kind::Double) && !folds_in(Kind::BFloat16) && !folds_in(Kind::Half));
    let w = TLoraWeights::new(6, 5, 3, 97, 0.1, Kind::Double);
    let ops = lowrank_operands(&w.factors(), None, Kind::BFloat16, None).unwrap();
    let x = seeded(&[2, 5], 98).to_kind(Kind::BFloat16);
    let err = folded_forward(&x, &seeded(&[6, 5], 99).to_kind(Kind::BFloat16), None, &ops, None).err().unwrap();
    assert!(err.to_string().contains("float32 or float64"), "{err}");
}
