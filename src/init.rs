//! Orthogonal initialisation of the T-LoRA factors.
//!
//! The paper's choice: take the SVD G = U S V^T of a random matrix G ~ N(0, (1/r)^2) of the
//! layer's shape (out x in) and keep r singular triplets (the LAST r in the paper):
//! P = U[:, k..k+r], lambda = S[k..k+r], Q = V^T[k..k+r, :], singular values in descending order.
//! Column j of U is paired with row j of V^T and with S[j] (the reference code pairs them
//! transposed; we do not).
//!
//! # Drawing the triplets without the matrix
//!
//! A full SVD of an out x in matrix costs O(out · in · min(out, in)) per layer, and
//! minutes on a full-size SD-XL UNet. [`orthogonal_random`] draws (P, lambda, Q) directly from
//! the law of the triplets instead, in O((out + in) · r^2 + s · min(out, in) · r) per layer (s, the
//! bisection steps per value, about 60):
//!
//! - Orthogonal invariance: G and O1 G O2 have the same law for any fixed orthogonal O1, O2, so
//!   U and V are Haar-distributed, independent of each other and of S, up to the joint sign of
//!   each pair (u_j, v_j), which an SVD fixes by convention and which the update P diag(lambda) Q
//!   does not see. Any r fixed columns of a Haar U form a Haar-random orthonormal r-frame. So
//!   P = the Q factor of the QR of an out x r standard Gaussian matrix, with the sign fix
//!   Q diag(sign R_jj) that makes it exactly Haar (Mezzadri 2007), and Q = the same in R^in,
//!   transposed, drawn independently.
//! - Singular values: Householder bidiagonalisation of an m x n Gaussian (m = max(out, in),
//!   n = min(out, in); G and G^T have the same singular values) meets, at each step, a fresh
//!   Gaussian vector whose norm becomes the next entry, so S has the law of the singular values
//!   of the upper bidiagonal B with diagonal sigma · (chi_m, chi_{m-1}, ..., chi_{m-n+1}) and
//!   superdiagonal sigma · (chi_{n-1}, ..., chi_1), all independent (Silverstein 1985;
//!   Dumitriu & Edelman 2002). The entries' squares sum to ||G||_F^2, chi^2 with m · n degrees.
//! - The r wanted singular values of B are found by bisection with Sturm counts on its 2n x 2n
//!   Golub-Kahan form (zero diagonal, off-diagonal a_1, b_1, a_2, ..., a_n; eigenvalues
//!   +-sigma_j), which keeps high relative accuracy even for the smallest ones (Demmel & Kahan
//!   1990): O(n) per count, all r values bisected together.
//! - Pairing: lambda in descending order, paired with the frame columns in order (the frames'
//!   columns are exchangeable, so any fixed pairing has the law of the SVD's).
//!
//! Every draw comes from ChaCha streams of the seed (stream 0: P, 1: Q, 2: the chi variates), never
//! from libtorch's generator, so the same seed gives the same factors on any device.
//! [`orthogonal_factors`] (an exact SVD of a given matrix) stays for `init_from = "weight"`.

use anyhow::{bail, ensure, Context, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{ChiSquared, Distribution, Normal, StandardNormal};
use tch::{Device, Kind, Tensor};

/// Which r singular triplets to keep: the `init` setting of an adapter (`AdapterConfig.init`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Init {
    /// The largest singular values (PiSSA-like when taken from the pretrained weight).
    Principal,
    /// The r triplets in the middle of the spectrum.
    Middle,
    /// The smallest singular values (the paper's choice, from a random matrix).
    Last,
}

impl Init {
    /// The first kept index in the descending spectrum of `full` singular values.
    pub fn start(self, full: i64, rank: i64) -> i64 {
        match self {
            Self::Principal => 0,
            Self::Middle => (full - rank) / 2,
            Self::Last => full - rank,
        }
    }
}

impl std::str::FromStr for Init {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "principal" => Ok(Self::Principal),
            "middle" => Ok(Self::Middle),
            "last" => Ok(Self::Last),
            other => bail!("unknown init {other:?}: expected \"principal\", \"middle\" or \"last\""),
        }
    }
}

/// The orthogonal factors: `p` (out x r), `lam` (r, descending), `q` (r x in), all float32.
#[derive(Debug)]
pub struct OrthoFactors {
    pub p: Tensor,
    pub lam: Tensor,
    pub q: Tensor,
}

/// A ChaCha stream of `seed`: independent draws for each part of one layer's init.
fn stream(seed: u64, index: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(index);
    rng
}

/// A seeded Gaussian matrix with the given standard deviation, float64 on the CPU.
///
/// Generated with a ChaCha stream rather than libtorch's generator so that initialising an adapter
/// never touches the global torch RNG that the user's training loop depends on.
pub fn gaussian(rows: i64, cols: i64, std: f64, seed: u64) -> Result<Tensor> {
    if rows < 1 || cols < 1 {
        bail!("matrix shape must be positive, got {rows} x {cols}");
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let normal = Normal::new(0.0, std)?;
    let values: Vec<f64> = (0..rows * cols).map(|_| normal.sample(&mut rng)).collect();
    Ok(Tensor::from_slice(&values).reshape([rows, cols]))
}

/// Keeps `rank` singular triplets of `matrix` (out x in) chosen by `init`: an exact SVD in
/// float64 on the CPU (for `init_from = "weight"`). Factors come back float32 on the CPU.
pub fn orthogonal_factors(matrix: &Tensor, rank: i64, init: Init) -> Result<OrthoFactors> {
    let size = matrix.size();
    if size.len() != 2 {
        bail!("expected a 2-D weight (out x in), got shape {size:?}");
    }
    let full = crate::ranks::check_init_rank(size[0], size[1], rank)?;
    let m = matrix.to_device(Device::Cpu).to_kind(Kind::Double);
    if !bool::try_from(m.isfinite().all())? {
        bail!("the matrix to decompose has NaN or infinite entries");
    }
    // Singular values come back in descending order; column k of V is row k of V^T.
    let (u, s, v) = m.svd(true, true);
    let vh = v.tr();
    let start = init.start(full, rank);
    let cast = |t: Tensor| t.to_kind(Kind::Float).contiguous();
    Ok(OrthoFactors { p: cast(u.narrow(1, start, rank)), lam: cast(s.narrow(0, start, rank)), q: cast(vh.narrow(0, start, rank)) })
}

/// A Haar-random orthonormal `cols`-frame in R^rows (rows x cols, float64; on `device` when that is
/// CUDA, else on the CPU), from `rng`: the Q factor, with R's diagonal positive, of the QR of a
/// rows x cols standard Gaussian matrix (drawn row by row).
///
/// On CUDA the QR is libtorch's, made sign-definite by Q diag(sign R_jj). On the CPU it is classical
/// Gram-Schmidt applied twice (CGS2), which gives that same Q (R_jj > 0 by construction, orthonormal
/// to rounding) in plain loops: a small libtorch QR pays its thread pool's start-up, and on a busy
/// 2-core machine that cost 20 times the work.
pub fn haar_frame(rows: i64, cols: i64, rng: &mut ChaCha8Rng, device: Device) -> Result<Tensor> {
    ensure!(rows >= cols && cols >= 1, "a {cols}-frame in R^{rows} does not exist");
    if let Device::Cuda(_) = device {
        let values: Vec<f64> = (0..rows * cols).map(|_| rng.sample(StandardNormal)).collect();
        let g = Tensor::from_slice(&values).reshape([rows, cols]).to_device(device);
        let (q, r) = Tensor::f_linalg_qr(&g, "reduced").context("QR of the Gaussian frame")?;
        // A zero diagonal entry has probability zero; it counts as +1.
        let signs = r.diagonal(0, 0, 1).ge(0.0).to_kind(Kind::Double) * 2.0 - 1.0;
        return Ok(q * signs.unsqueeze(0));
    }
    let columns = frame_columns(rows as usize, cols as usize, rng)?;
    Ok(Tensor::from_slice(&columns).reshape([cols, rows]).tr())
}

/// [`haar_frame`] on the CPU, column j at `[j * rows..(j + 1) * rows]` of the result.
fn frame_columns(rows: usize, cols: usize, rng: &mut ChaCha8Rng) -> Result<Vec<f64>> {
    let values: Vec<f64> = (0..rows * cols).map(|_| rng.sample(StandardNormal)).collect();
    let mut columns = vec![0.0f64; rows * cols];
    let mut coef = vec![0.0f64; cols];
    for j in 0..cols {
        let (done, rest) = columns.split_at_mut(j * rows);
        let v = &mut rest[..rows];
        for (i, x) in v.iter_mut().enumerate() {
            *x = values[i * cols + j];
        }
        for _pass in 0..2 {
            for (c, q) in coef.iter_mut().zip(done.chunks_exact(rows)) {
                *c = dot(q, v);
            }
            for (c, q) in coef.iter().zip(done.chunks_exact(rows)) {
                v.iter_mut().zip(q).for_each(|(x, qi)| *x -= c * qi);
            }
        }
        let norm = dot(v, v).sqrt();
        ensure!(norm > 0.0, "the Gaussian frame is rank-deficient (probability zero): column {j}");
        v.iter_mut().for_each(|x| *x /= norm);
    }
    Ok(columns)
}

/// A CPU float32 tensor holding `values`: `Tensor::from_slice` zero-fills through libtorch's
/// thread pool first, which on a busy machine costs milliseconds at these sizes.
fn cpu_tensor(values: &[f32], size: &[i64]) -> Tensor {
    let t = Tensor::empty(size, (Kind::Float, Device::Cpu));
    assert_eq!(t.numel(), values.len());
    // SAFETY: `t` is a fresh, contiguous float32 CPU tensor of exactly values.len() elements.
    unsafe { std::ptr::copy_nonoverlapping(values.as_ptr(), t.data_ptr() as *mut f32, values.len()) };
    t
}

/// A dot product with independent partial sums, so that it vectorises.
fn dot(a: &[f64], b: &[f64]) -> f64 {
    let mut acc = [0.0f64; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f64 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f64>() + tail
}

/// The diagonal and superdiagonal of an upper bidiagonal matrix whose singular values have the law
/// of those of a rows x cols standard Gaussian matrix: diagonal chi_m, ..., chi_{m-n+1},
/// superdiagonal chi_{n-1}, ..., chi_1 (m = max(rows, cols), n = min(rows, cols)).
pub fn gaussian_bidiagonal(rows: i64, cols: i64, rng: &mut ChaCha8Rng) -> Result<(Vec<f64>, Vec<f64>)> {
    ensure!(rows >= 1 && cols >= 1, "matrix shape must be positive, got {rows} x {cols}");
    let (m, n) = (rows.max(cols) as usize, rows.min(cols) as usize);
    let mut chi = |dof: usize| -> Result<f64> { Ok(ChiSquared::new(dof as f64)?.sample(rng).sqrt()) };
    let diag = (0..n).map(|i| chi(m - i)).collect::<Result<Vec<_>>>()?;
    let superdiag = (1..n).map(|i| chi(n - i)).collect::<Result<Vec<_>>>()?;
    Ok((diag, superdiag))
}

/// For each shift x > 0 in `xs`, how many eigenvalues of the zero-diagonal tridiagonal with
/// squared off-diagonals `e2` lie below x (Sturm count from the signs of the LDL^T pivots).
/// The shifts are the inner loop, so the divisions of independent shifts vectorise.
fn sturm_counts(e2: &[f64], xs: &[f64], pivmin: f64, pivots: &mut [f64], below: &mut [u32]) {
    for ((d, &x), b) in pivots.iter_mut().zip(xs).zip(below.iter_mut()) {
        *d = if x < pivmin { -pivmin } else { -x };
        *b = 1;
    }
    for &e in e2 {
        for ((d, &x), b) in pivots.iter_mut().zip(xs).zip(below.iter_mut()) {
            let t = -x - e / *d;
            // A pivot too close to zero is replaced, as LAPACK's dstebz does, to avoid dividing by it.
            let t = if t.abs() < pivmin { -pivmin } else { t };
            *d = t;
            *b += (t < 0.0) as u32;
        }
    }
}

/// The singular values of the upper bidiagonal matrix (`diag`, `superdiag`) with descending indices
/// `start..start + count`, in descending order, to full float64 relative accuracy, by bisection on
/// the Golub-Kahan form.
pub fn bidiagonal_singular_values(diag: &[f64], superdiag: &[f64], start: usize, count: usize) -> Result<Vec<f64>> {
    let n = diag.len();
    ensure!(n >= 1, "the bidiagonal matrix is empty");
    ensure!(superdiag.len() == n - 1, "a {n} x {n} bidiagonal needs {} superdiagonal entries, got {}", n - 1, superdiag.len());
    ensure!(start + count <= n, "singular values {start}..{} requested of {n}", start + count);
    ensure!(diag.iter().chain(superdiag).all(|v| v.is_finite()), "the bidiagonal has NaN or infinite entries");
    // Golub-Kahan off-diagonal a_1, b_1, a_2, ..., a_n; the eigenvalues are +-sigma_j.
    let off: Vec<f64> = (0..2 * n - 1).map(|k| if k % 2 == 0 { diag[k / 2] } else { superdiag[k / 2] }.abs()).collect();
    let e2: Vec<f64> = off.iter().map(|v| v * v).collect();
    let gershgorin = (0..=off.len()).map(|k| off.get(k.wrapping_sub(1)).unwrap_or(&0.0) + off.get(k).unwrap_or(&0.0));
    let bound = gershgorin.fold(0.0f64, f64::max);
    let pivmin = f64::MIN_POSITIVE * e2.iter().cloned().fold(1.0f64, f64::max);
    // Bisect the ascending ranks n-1-k of the wanted descending indices k, all together.
    let ascending: Vec<u32> = (start..start + count).map(|k| (n - 1 - k) as u32).collect();
    let mut lo = vec![0.0f64; count];
    let mut hi = vec![bound * (1.0 + 8.0 * f64::EPSILON) + pivmin; count];
    let (mut mid, mut pivots, mut below) = (vec![0.0f64; count], vec![0.0f64; count], vec![0u32; count]);
    // Relative accuracy needs about 53 + log2(bound / sigma) halvings; the cap only stops
    // degenerate input (exact zeros) from halving down to the subnormals forever.
    // A value stops moving once converged, so it does not depend on which others were asked for.
    let mut open = vec![true; count];
    for _ in 0..2200 {
        for j in 0..count {
            mid[j] = 0.5 * (lo[j] + hi[j]);
            open[j] &= hi[j] - lo[j] > (4.0 * f64::EPSILON * hi[j]).max(pivmin) && mid[j] > lo[j] && mid[j] < hi[j];
        }
        if !open.contains(&true) {
            break;
        }
        sturm_counts(&e2, &mid, pivmin, &mut pivots, &mut below);
        for j in 0..count {
            // below - n singular values lie under mid (the n eigenvalues -sigma_j all do).
            if !open[j] {
                continue;
            } else if below[j].saturating_sub(n as u32) <= ascending[j] {
                lo[j] = mid[j];
            } else {
                hi[j] = mid[j];
            }
        }
    }
    Ok(lo.iter().zip(&hi).map(|(l, h)| 0.5 * (l + h)).collect())
}

/// The paper's init: the `init` triplets of a seeded N(0, (1/r)^2) matrix of shape out x in, drawn
/// from their law without forming the matrix (see the module docs), float32 on `device`.
pub fn orthogonal_random_on(out_f: i64, in_f: i64, rank: i64, init: Init, seed: u64, device: Device) -> Result<OrthoFactors> {
    let full = crate::ranks::check_init_rank(out_f, in_f, rank)?;
    let (diag, superdiag) = gaussian_bidiagonal(out_f, in_f, &mut stream(seed, 2))?;
    let start = init.start(full, rank) as usize;
    let sigma = 1.0 / rank as f64;
    let lam: Vec<f32> = bidiagonal_singular_values(&diag, &superdiag, start, rank as usize)?.iter().map(|s| (s * sigma) as f32).collect();
    let lam = cpu_tensor(&lam, &[rank]).to_device(device);
    let (p_rng, q_rng) = (&mut stream(seed, 0), &mut stream(seed, 1));
    if let Device::Cuda(_) = device {
        let p = haar_frame(out_f, rank, p_rng, device)?.to_kind(Kind::Float);
        let q = haar_frame(in_f, rank, q_rng, device)?.tr().to_kind(Kind::Float).contiguous();
        return Ok(OrthoFactors { p, lam, q });
    }
    // Float32 tensors straight from the loops: on a busy machine even libtorch's elementwise casts
    // and fills of these sizes wait on its thread pool for longer than the work takes.
    let (o, i, r) = (out_f as usize, in_f as usize, rank as usize);
    let p_cols = frame_columns(o, r, p_rng)?;
    let p: Vec<f32> = (0..o * r).map(|k| p_cols[(k % r) * o + k / r] as f32).collect();
    let q: Vec<f32> = frame_columns(i, r, q_rng)?.iter().map(|&v| v as f32).collect();
    Ok(OrthoFactors { p: cpu_tensor(&p, &[out_f, rank]).to_device(device), lam, q: cpu_tensor(&q, &[rank, in_f]).to_device(device) })
}

/// The orthogonal factors, float32 on `device`: the exact SVD of `weight` (its triplets
/// chosen by `init`, see [`orthogonal_factors`]) when given, else the paper's seeded random
/// init of shape out_f x in_f ([`orthogonal_random_on`]).
pub fn orthogonal_init(
    out_f: i64,
    in_f: i64,
    rank: i64,
    init: Init,
    seed: u64,
    weight: Option<&Tensor>,
    device: Device,
) -> Result<OrthoFactors> {
    match weight {
        Some(w) => {
            crate::kernel::check_device(w, "the weight to decompose")?;
            let f = orthogonal_factors(w, rank, init)?;
            Ok(OrthoFactors { p: f.p.f_to_device(device)?, lam: f.lam.f_to_device(device)?, q: f.q.f_to_device(device)? })
        }
        None => orthogonal_random_on(out_f, in_f, rank, init, seed, device),
    }
}

/// [`orthogonal_random_on`] the CPU.
pub fn orthogonal_random(out_f: i64, in_f: i64, rank: i64, init: Init, seed: u64) -> Result<OrthoFactors> {
    orthogonal_random_on(out_f, in_f, rank, init, seed, Device::Cpu)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn max_abs(t: &Tensor) -> f64 {
        t.abs().max().double_value(&[])
    }

    #[test]
    fn factors_are_orthonormal_and_paired() {
        for &(o, i, r) in &[(24, 16, 4), (16, 24, 8), (32, 32, 32)] {
            let m = gaussian(o, i, 1.0 / r as f64, 7).unwrap();
            for init in [Init::Principal, Init::Middle, Init::Last] {
                let f = orthogonal_factors(&m, r, init).unwrap();
                assert_eq!(f.p.size(), vec![o, r]);
                assert_eq!(f.q.size(), vec![r, i]);
                assert_eq!(f.lam.size(), vec![r]);
                let eye = Tensor::eye(r, (Kind::Float, Device::Cpu));
                assert!(max_abs(&(f.p.transpose(0, 1).matmul(&f.p) - &eye)) < 1e-5);
                assert!(max_abs(&(f.q.matmul(&f.q.transpose(0, 1)) - &eye)) < 1e-5);
                // Correct pairing: P^T R Q^T = diag(lambda) exactly when U[:, k] goes with
                // V^T[k, :] and S[k].
                let proj = f.p.transpose(0, 1).matmul(&m.to_kind(Kind::Float)).matmul(&f.q.transpose(0, 1));
                assert!(max_abs(&(proj - f.lam.diag(0))) < 1e-5, "{init:?}");
            }
        }
    }

    #[test]
    fn inits_pick_the_right_singular_values() {
        let m = gaussian(20, 12, 0.1, 3).unwrap();
        let s = Vec::<f64>::try_from(&m.svd(true, false).1).unwrap();
        let lam = |c| Vec::<f32>::try_from(&orthogonal_factors(&m, 3, c).unwrap().lam).unwrap();
        let close = |a: &[f32], b: &[f64]| a.iter().zip(b).all(|(x, y)| (*x as f64 - y).abs() < 1e-5);
        assert!(close(&lam(Init::Principal), &s[0..3]));
        assert!(close(&lam(Init::Middle), &s[4..7]));
        assert!(close(&lam(Init::Last), &s[9..12]));
    }

    #[test]
    fn seeded_and_scaled() {
        let a = gaussian(64, 64, 0.25, 11).unwrap();
        let b = gaussian(64, 64, 0.25, 11).unwrap();
        let c = gaussian(64, 64, 0.25, 12).unwrap();
        assert!(a.equal(&b));
        assert!(!a.equal(&c));
        let std = a.std(true).double_value(&[]);
        assert!((std - 0.25).abs() < 0.01, "std {std}");
    }

    #[test]
    fn bad_rank_and_input() {
        let mut m = gaussian(8, 4, 1.0, 0).unwrap();
        assert!(orthogonal_factors(&m, 5, Init::Last).unwrap_err().to_string().contains("8 x 4"));
        assert!(orthogonal_factors(&m, 0, Init::Last).is_err());
        assert!(orthogonal_factors(&m.flatten(0, -1), 1, Init::Last).is_err());
        assert!("first".parse::<Init>().is_err());
        let nan = m.fill_diagonal_(f64::NAN, false);
        assert!(orthogonal_factors(&nan, 2, Init::Last).is_err());
        assert!(orthogonal_random(8, 4, 5, Init::Last, 0).unwrap_err().to_string().contains("8 x 4"));
        assert!(orthogonal_random(8, 4, 0, Init::Last, 0).is_err());
        assert!(bidiagonal_singular_values(&[1.0, 2.0], &[], 0, 1).unwrap_err().to_string().contains("superdiagonal"));
        assert!(bidiagonal_singular_values(&[1.0, 2.0], &[0.5], 1, 2).is_err());
        assert!(bidiagonal_singular_values(&[1.0, f64::NAN], &[0.5], 0, 1).is_err());
    }

    fn dense_bidiagonal(diag: &[f64], superdiag: &[f64]) -> Tensor {
        let n = diag.len() as i64;
        let mut b = Tensor::from_slice(diag).diag(0);
        if n > 1 {
            b += Tensor::from_slice(superdiag).diag(1);
        }
        b
    }

    /// Bisection against LAPACK's SVD of the same bidiagonal, to 1e-10 relative for every value.
    #[test]
    fn bisection_matches_svdvals_of_the_bidiagonal() {
        let mut rng = stream(42, 7);
        let mut cases: Vec<(Vec<f64>, Vec<f64>)> = vec![(vec![3.0], vec![]), (vec![1.0, 1.0], vec![1.0])];
        for &(rows, cols) in &[(2, 2), (24, 16), (16, 24), (100, 100), (300, 40)] {
            cases.push(gaussian_bidiagonal(rows, cols, &mut rng).unwrap());
        }
        // Graded entries: singular values over many orders of magnitude.
        cases.push(((0..12).map(|i| 10f64.powi(-i)).collect(), (0..11).map(|i| 0.5 * 10f64.powi(-i)).collect()));
        for (diag, superdiag) in &cases {
            let n = diag.len();
            let want = Vec::<f64>::try_from(&dense_bidiagonal(diag, superdiag).svd(true, false).1).unwrap();
            let got = bidiagonal_singular_values(diag, superdiag, 0, n).unwrap();
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() <= 1e-10 * w.abs(), "n {n}: {g} vs {w}");
            }
        }
    }

    #[test]
    fn selection_takes_principal_middle_and_last_indices() {
        assert_eq!([Init::Principal, Init::Middle, Init::Last].map(|c| c.start(12, 3)), [0, 4, 9]);
        let (diag, superdiag) = gaussian_bidiagonal(20, 12, &mut stream(5, 2)).unwrap();
        let all = bidiagonal_singular_values(&diag, &superdiag, 0, 12).unwrap();
        assert!(all.windows(2).all(|w| w[0] > w[1]), "descending: {all:?}");
        for (init, start) in [(Init::Principal, 0), (Init::Middle, 4), (Init::Last, 9)] {
            assert_eq!(bidiagonal_singular_values(&diag, &superdiag, start, 3).unwrap(), all[start..start + 3]);
            // orthogonal_random keeps the same indices of the same draw (stream 2 of its seed), / r.
            let lam = Vec::<f32>::try_from(&orthogonal_random(20, 12, 3, init, 5).unwrap().lam).unwrap();
            for (l, s) in lam.iter().zip(&all[start..start + 3]) {
                assert!((*l as f64 - s / 3.0).abs() < 1e-6 * s, "{init:?}");
            }
        }
    }

    #[test]
    fn random_factors_are_orthonormal_seeded_and_descending() {
        for &(o, i, r) in &[(24, 16, 4), (16, 24, 8), (32, 32, 32), (1, 5, 1)] {
            for init in [Init::Principal, Init::Middle, Init::Last] {
                let f = orthogonal_random(o, i, r, init, 9).unwrap();
                assert_eq!((f.p.size(), f.lam.size(), f.q.size()), (vec![o, r], vec![r], vec![r, i]));
                assert_eq!((f.p.kind(), f.lam.kind(), f.q.kind()), (Kind::Float, Kind::Float, Kind::Float));
                let eye = Tensor::eye(r, (Kind::Float, Device::Cpu));
                assert!(max_abs(&(f.p.transpose(0, 1).matmul(&f.p) - &eye)) < 1e-6);
                assert!(max_abs(&(f.q.matmul(&f.q.transpose(0, 1)) - &eye)) < 1e-6);
                let lam = Vec::<f32>::try_from(&f.lam).unwrap();
                assert!(lam.iter().all(|&l| l > 0.0) && lam.windows(2).all(|w| w[0] >= w[1]), "{lam:?}");
                let again = orthogonal_random(o, i, r, init, 9).unwrap();
                assert!(f.p.equal(&again.p) && f.lam.equal(&again.lam) && f.q.equal(&again.q));
                let other = orthogonal_random(o, i, r, init, 10).unwrap();
                assert!(!f.q.equal(&other.q));
            }
        }
    }

    /// The CPU frame (CGS2) is the Q of libtorch's QR of the same Gaussian draw, signs fixed.
    #[test]
    fn cpu_frame_is_the_sign_fixed_qr() {
        for &(rows, cols) in &[(40, 6), (16, 16), (1280, 64)] {
            let frame = haar_frame(rows, cols, &mut stream(4, 0), Device::Cpu).unwrap();
            let mut rng = stream(4, 0);
            let values: Vec<f64> = (0..rows * cols).map(|_| rng.sample(StandardNormal)).collect();
            let g = Tensor::from_slice(&values).reshape([rows, cols]);
            let (q, r) = Tensor::linalg_qr(&g, "reduced");
            let want = q * r.diagonal(0, 0, 1).sign().unsqueeze(0);
            assert!(max_abs(&(&frame - want)) < 1e-12, "{rows} x {cols}");
            let eye = Tensor::eye(cols, (Kind::Double, Device::Cpu));
            assert!(max_abs(&(frame.tr().matmul(&frame) - eye)) < 1e-14);
        }
    }

    /// The bidiagonal's squared entries sum to chi^2 with rows * cols degrees, the law of ||G||_F^2
    /// (mean m n, variance 2 m n): checked on the mean over 400 draws to 5 standard errors.
    #[test]
    fn bidiagonal_carries_the_gaussian_frobenius_norm() {
        for &(rows, cols) in &[(24, 16), (7, 30)] {
            let mut rng = stream(3, 2);
            let draws = 400;
            let mean = (0..draws)
                .map(|_| {
                    let (d, s) = gaussian_bidiagonal(rows, cols, &mut rng).unwrap();
                    d.iter().chain(&s).map(|v| v * v).sum::<f64>()
                })
                .sum::<f64>()
                / draws as f64;
            let dof = (rows * cols) as f64;
            assert!((mean - dof).abs() < 5.0 * (2.0 * dof / draws as f64).sqrt(), "{rows} x {cols}: {mean}");
        }
    }
}
