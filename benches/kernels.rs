//! Criterion bench of the Rust kernels (benches/speed.py times them through the Python bindings).
//!
//!     LD_LIBRARY_PATH=<torch>/lib cargo bench --bench kernels [-- FILTER]
//!
//! Case a of the performance issue, in Rust only: one adapted linear layer, forward + backward
//! (gradients for the input and the trainable factors), SD-XL shapes, rank 64 / r_min 32, batch 2
//! with per-sample ranks r(t) for timesteps uniform on [0, 1000) (a seeded cycle, the same for
//! every method). Methods, on the same inputs:
//! - `bare`: the base layer alone (x W^T + b, gradient for x): the limit;
//! - `reference`: the paper's equations through libtorch autograd: two full-rank branches times
//!   the rank mask, trainable minus frozen;
//! - `tlora`: [`kernel::lowrank_operands`] (difference form) + [`kernel::lowrank_forward`] into the base output +
//!   [`kernel::lowrank_backward`], at the full rank with the per-sample rank mask (ranks as data);
//! - `lora`: a plain LoRA at the full rank 64 through the same kernel (PEFT's cost).
//!
//! Every method computes the same scalar loss sum(y * g) so that autograd's seed costs the same.
//! After the runs, a table of each method's cost above `bare` relative to `reference`'s is
//! printed from criterion's estimates (target/criterion/*/new/estimates.json).
//! Also: the orthogonal (SVD) initialisation and the inference fold at one rank.

use std::cell::Cell;
use std::path::Path;

use criterion::{criterion_group, BenchmarkId, Criterion};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tch::{Kind, Tensor};
use tlora::init::{orthogonal_random, Init};
use tlora::kernel::{self, Factors};
use tlora::schedule::RankSchedule;

const RANK: i64 = 64;
const MIN_RANK: i64 = 32;
const BATCH: i64 = 2;
const SCALE: f64 = 1.0;
const SHAPES: [(i64, i64, i64); 8] = [
    (1024, 640, 640),
    (1024, 1280, 1280),
    (1024, 2048, 640),
    (1024, 2048, 1280),
    (4096, 640, 640),
    (4096, 1280, 1280),
    (4096, 2048, 640),
    (4096, 2048, 1280),
];
const METHODS: [&str; 4] = ["bare", "reference", "tlora", "lora"];

/// Per-sample ranks for a seeded cycle of uniform timesteps, the same sequence for every method.
struct RankCycle {
    pairs: Vec<Vec<i64>>,
    next: Cell<usize>,
}

impl RankCycle {
    fn new() -> Self {
        let schedule = RankSchedule::new(RANK, MIN_RANK, 1.0, 1000).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let pairs = (0..64).map(|_| (0..BATCH).map(|_| schedule.rank_at(rng.gen_range(0.0..1000.0)).unwrap()).collect()).collect();
        Self { pairs, next: Cell::new(0) }
    }

    fn take(&self) -> &[i64] {
        let i = self.next.get();
        self.next.set(i + 1);
        &self.pairs[i % self.pairs.len()]
    }
}

struct Layer {
    x: Tensor,
    g: Tensor,
    w: Tensor,
    b: Tensor,
    p: Tensor,
    lam: Tensor,
    q: Tensor,
    p0: Tensor,
    lam0: Tensor,
    q0: Tensor,
    down: Tensor,
    up: Tensor,
}

impl Layer {
    fn new(tokens: i64, in_f: i64, out_f: i64) -> Self {
        tch::manual_seed(0);
        let opts = (Kind::Float, tch::Device::Cpu);
        let init = orthogonal_random(out_f, in_f, RANK, Init::Last, 0).unwrap();
        // Trainable factors moved away from their frozen copies, as after some training steps.
        let p = &init.p + Tensor::randn([out_f, RANK], opts) * 0.01;
        let w = Tensor::randn([out_f, in_f], opts) / (in_f as f64).sqrt();
        Self {
            x: Tensor::randn([BATCH, tokens, in_f], opts),
            g: Tensor::randn([BATCH, tokens, out_f], opts),
            w,
            b: Tensor::randn([out_f], opts),
            lam: &init.lam * 1.1,
            q: &init.q + Tensor::randn([RANK, in_f], opts) * 0.01,
            p0: init.p,
            lam0: init.lam,
            q0: init.q,
            p,
            down: Tensor::randn([RANK, in_f], opts) / RANK as f64,
            up: Tensor::randn([out_f, RANK], opts) * 0.01,
        }
    }

    fn tlora(&self) -> Factors<'_> {
        Factors::TLora { p: &self.p, lam: &self.lam, q: &self.q, p0: &self.p0, lam0: &self.lam0, q0: &self.q0 }
    }

    fn loss(&self, y: &Tensor) -> Tensor {
        (y * &self.g).sum(Kind::Float)
    }

    /// Base layer forward + the input's gradient through it.
    fn bare(&self) -> Tensor {
        let x = self.x.set_requires_grad(true);
        let y = x.linear(&self.w, Some(&self.b));
        let grads = Tensor::run_backward(&[self.loss(&y)], &[&x], false, false);
        grads.into_iter().next().unwrap()
    }

    /// The paper's equations, written plainly: y = base(x) + s ((x Q^T) * m) diag(lam) P^T
    /// - s ((x Q0^T) * m) diag(lam0) P0^T at the full rank, m the per-sample rank mask.
    fn reference(&self, ranks: &[i64]) -> Vec<Tensor> {
        let x = self.x.set_requires_grad(true);
        let (p, lam, q) = (self.p.set_requires_grad(true), self.lam.set_requires_grad(true), self.q.set_requires_grad(true));
        let mask = Tensor::arange(RANK, (Kind::Int64, tch::Device::Cpu))
            .unsqueeze(0)
            .lt_tensor(&Tensor::from_slice(ranks).unsqueeze(1))
            .to_kind(Kind::Float)
            .unsqueeze(1);
        // The scale goes on the r gains, not on the tokens x out product, as a careful plain version would.
        let branch = |p: &Tensor, lam: &Tensor, q: &Tensor| (x.matmul(&q.tr()) * &mask * (lam * SCALE)).matmul(&p.tr());
        let y = x.linear(&self.w, Some(&self.b)) + branch(&p, &lam, &q) - branch(&self.p0, &self.lam0, &self.q0);
        Tensor::run_backward(&[self.loss(&y)], &[&x, &p, &lam, &q], false, false)
    }

    /// The base layer (no autograd) plus a kernel forward into its output, then the kernel
    /// backward plus the base layer's input gradient.
    fn factored(&self, f: &Factors, ranks: Option<&[i64]>) -> Vec<Tensor> {
        let _guard = tch::no_grad_guard();
        let y = self.x.linear(&self.w, Some(&self.b));
        let ops = kernel::lowrank_operands(f, None, Kind::Float, None).unwrap();
        let blocks = if matches!(f, Factors::TLora { .. }) { 2 } else { 1 };
        let mask = ranks.map(|r| {
            let cols = Tensor::arange(RANK, (Kind::Int64, tch::Device::Cpu)).repeat([blocks]);
            cols.unsqueeze(0).lt_tensor(&Tensor::from_slice(r).unsqueeze(1)).to_kind(Kind::Float) * SCALE
        });
        let (_, h) = kernel::lowrank_forward(&self.x, &ops, mask.as_ref(), Some(&y)).unwrap();
        let _ = self.loss(&y);
        let grads = kernel::lowrank_backward(&self.g, &self.x, &h, &ops, mask.as_ref(), f, [true; 4]).unwrap();
        let mut gx = grads.input.unwrap();
        let _ = gx.g_add_(&self.g.matmul(&self.w));
        let mut out = vec![gx];
        out.extend(grads.factors.into_iter().flatten());
        out
    }

    fn run(&self, method: &str, ranks: &[i64]) -> Vec<Tensor> {
        match method {
            "bare" => vec![self.bare()],
            "reference" => self.reference(ranks),
            "tlora" => self.factored(&self.tlora(), Some(ranks)),
            "lora" => self.factored(&Factors::LoRA { down: &self.down, up: &self.up }, None),
            other => unreachable!("unknown method {other}"),
        }
    }
}

fn bench_layer(c: &mut Criterion) {
    // The check that every method computes the same thing lives in src/kernel/tests.rs; here one
    // shape is compared once more so that the timed code is known to be the tested code.
    let check = Layer::new(16, 96, 80);
    let reference = check.run("reference", &[40, 50]);
    for method in ["tlora"] {
        for (a, b) in reference.iter().zip(check.run(method, &[40, 50]).iter()) {
            let tol = 1e-4 * (1.0 + a.abs().max().double_value(&[]));
            assert!((a - b).abs().max().double_value(&[]) < tol, "{method} differs from the reference");
        }
    }

    let mut group = c.benchmark_group("layer");
    group.sample_size(10);
    for &(tokens, in_f, out_f) in &SHAPES {
        let layer = Layer::new(tokens, in_f, out_f);
        for method in METHODS {
            let cycle = RankCycle::new();
            let id = BenchmarkId::new(method, format!("{tokens}x{in_f}x{out_f}"));
            group.bench_function(id, |bench| bench.iter(|| layer.run(method, cycle.take())));
        }
    }
    group.finish();
}

fn bench_init_and_fold(c: &mut Criterion) {
    let mut group = c.benchmark_group("init");
    group.sample_size(10);
    for (out_f, in_f) in [(640, 640), (1280, 1280), (1280, 2048)] {
        group.bench_function(BenchmarkId::new("orthogonal_svd", format!("{out_f}x{in_f}")), |bench| {
            bench.iter(|| orthogonal_random(out_f, in_f, RANK, Init::Last, 0).unwrap())
        });
        let layer = Layer::new(1, in_f, out_f);
        group.bench_function(BenchmarkId::new("fold_rank_48", format!("{out_f}x{in_f}")), |bench| {
            bench.iter(|| kernel::fold_weight(&layer.w, &layer.tlora(), Some(48), SCALE).unwrap())
        });
    }
    group.finish();
}

criterion_group!(benches, bench_layer, bench_init_and_fold);

/// Criterion's point estimate (mean, ns) of one benchmark, if it ran in this or an earlier run.
fn estimate(group: &str, method: &str, shape: &str) -> Option<f64> {
    let path = Path::new("target/criterion").join(group).join(method).join(shape).join("new/estimates.json");
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()?;
    json["mean"]["point_estimate"].as_f64()
}

fn print_overheads() {
    println!("\nlayer cost above bare, relative to the reference formulation's (mean times, ms)");
    println!("| tokens x in x out | bare | reference | tlora | lora | tlora / ref | lora / ref |");
    println!("|---|---|---|---|---|---|---|");
    for &(tokens, in_f, out_f) in &SHAPES {
        let shape = format!("{tokens}x{in_f}x{out_f}");
        let t: Option<Vec<f64>> = METHODS.iter().map(|m| estimate("layer", m, &shape)).collect();
        let Some(t) = t else { continue };
        let over = |i: usize| (t[i] - t[0]) / (t[1] - t[0]);
        println!(
            "| {shape} | {:.1} | {:.1} | {:.1} | {:.1} | {:.2} | {:.2} |",
            t[0] / 1e6,
            t[1] / 1e6,
            t[2] / 1e6,
            t[3] / 1e6,
            over(2),
            over(3)
        );
    }
}

fn main() {
    benches();
    criterion::Criterion::default().configure_from_args().final_summary();
    print_overheads();
}
