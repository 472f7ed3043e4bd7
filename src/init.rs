//! Orthogonal initialisation of the T-LoRA factors from an SVD.
//!
//! The paper's choice: take the SVD R = U S V^T of a random matrix R ~ N(0, (1/r)^2) of the layer's
//! shape (out x in) and keep the LAST r singular triplets: P = U[:, -r:], lambda = S[-r:],
//! Q = V^T[-r:, :]. Column k of U is paired with row k of V^T and with S[k] (the reference code
//! pairs them transposed; we do not).

use anyhow::{bail, Result};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use tch::{Device, Kind, Tensor};

/// Which r singular triplets to keep.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Component {
    /// The largest singular values (PiSSA-like when taken from the pretrained weight).
    Principal,
    /// The r triplets in the middle of the spectrum.
    Middle,
    /// The smallest singular values (the paper's choice, from a random matrix).
    Last,
}

impl std::str::FromStr for Component {
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

/// The orthogonal factors: `p` (out x r), `lam` (r), `q` (r x in), all float32 on the CPU.
#[derive(Debug)]
pub struct OrthoFactors {
    pub p: Tensor,
    pub lam: Tensor,
    pub q: Tensor,
}

/// A seeded Gaussian matrix with the given standard deviation, float64 on the CPU.
///
/// Generated with a ChaCha stream rather than libtorch's generator so that initialising an adapter
/// never touches the global torch RNG that the user's training loop depends on.
pub fn seeded_gaussian(rows: i64, cols: i64, std: f64, seed: u64) -> Result<Tensor> {
    if rows < 1 || cols < 1 {
        bail!("matrix shape must be positive, got {rows} x {cols}");
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let normal = Normal::new(0.0, std)?;
    let values: Vec<f64> = (0..rows * cols).map(|_| normal.sample(&mut rng)).collect();
    Ok(Tensor::from_slice(&values).reshape([rows, cols]))
}

/// Keeps `rank` singular triplets of `matrix` (out x in) chosen by `component`.
pub fn orthogonal_factors(matrix: &Tensor, rank: i64, component: Component) -> Result<OrthoFactors> {
    let size = matrix.size();
    if size.len() != 2 {
        bail!("expected a 2-D weight (out x in), got shape {size:?}");
    }
    let (out_f, in_f) = (size[0], size[1]);
    let full = out_f.min(in_f);
    if rank < 1 || rank > full {
        bail!("rank {rank} is outside 1..={full} for a weight of shape {out_f} x {in_f}");
    }
    let m = matrix.to_device(Device::Cpu).to_kind(Kind::Double);
    if !bool::try_from(m.isfinite().all())? {
        bail!("the matrix to decompose has NaN or infinite entries");
    }
    // Singular values come back in descending order; column k of V is row k of V^T.
    let (u, s, v) = m.svd(true, true);
    let vh = v.tr();
    let start = match component {
        Component::Principal => 0,
        Component::Middle => (full - rank) / 2,
        Component::Last => full - rank,
    };
    Ok(OrthoFactors {
        p: u.narrow(1, start, rank).to_kind(Kind::Float).contiguous(),
        lam: s.narrow(0, start, rank).to_kind(Kind::Float).contiguous(),
        q: vh.narrow(0, start, rank).to_kind(Kind::Float).contiguous(),
    })
}

/// The paper's init: `component` triplets of a seeded N(0, (1/r)^2) matrix of shape out x in.
pub fn orthogonal_random(out_f: i64, in_f: i64, rank: i64, component: Component, seed: u64) -> Result<OrthoFactors> {
    if rank < 1 {
        bail!("rank must be >= 1, got {rank}");
    }
    let r = seeded_gaussian(out_f, in_f, 1.0 / rank as f64, seed)?;
    orthogonal_factors(&r, rank, component)
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
            let m = seeded_gaussian(o, i, 1.0 / r as f64, 7).unwrap();
            for comp in [Component::Principal, Component::Middle, Component::Last] {
                let f = orthogonal_factors(&m, r, comp).unwrap();
                assert_eq!(f.p.size(), vec![o, r]);
                assert_eq!(f.q.size(), vec![r, i]);
                assert_eq!(f.lam.size(), vec![r]);
                let eye = Tensor::eye(r, (Kind::Float, Device::Cpu));
                assert!(max_abs(&(f.p.transpose(0, 1).matmul(&f.p) - &eye)) < 1e-5);
                assert!(max_abs(&(f.q.matmul(&f.q.transpose(0, 1)) - &eye)) < 1e-5);
                // Correct pairing: P^T R Q^T = diag(lambda) exactly when U[:, k] goes with
                // V^T[k, :] and S[k].
                let proj = f.p.transpose(0, 1).matmul(&m.to_kind(Kind::Float)).matmul(&f.q.transpose(0, 1));
                assert!(max_abs(&(proj - f.lam.diag(0))) < 1e-5, "{comp:?}");
            }
        }
    }

    #[test]
    fn components_pick_the_right_singular_values() {
        let m = seeded_gaussian(20, 12, 0.1, 3).unwrap();
        let s = Vec::<f64>::try_from(&m.svd(true, false).1).unwrap();
        let lam = |c| Vec::<f32>::try_from(&orthogonal_factors(&m, 3, c).unwrap().lam).unwrap();
        let close = |a: &[f32], b: &[f64]| a.iter().zip(b).all(|(x, y)| (*x as f64 - y).abs() < 1e-5);
        assert!(close(&lam(Component::Principal), &s[0..3]));
        assert!(close(&lam(Component::Middle), &s[4..7]));
        assert!(close(&lam(Component::Last), &s[9..12]));
    }

    #[test]
    fn seeded_and_scaled() {
        let a = seeded_gaussian(64, 64, 0.25, 11).unwrap();
        let b = seeded_gaussian(64, 64, 0.25, 11).unwrap();
        let c = seeded_gaussian(64, 64, 0.25, 12).unwrap();
        assert!(a.equal(&b));
        assert!(!a.equal(&c));
        let std = a.std(true).double_value(&[]);
        assert!((std - 0.25).abs() < 0.01, "std {std}");
    }

    #[test]
    fn bad_rank_and_input() {
        let mut m = seeded_gaussian(8, 4, 1.0, 0).unwrap();
        assert!(orthogonal_factors(&m, 5, Component::Last).unwrap_err().to_string().contains("8 x 4"));
        assert!(orthogonal_factors(&m, 0, Component::Last).is_err());
        assert!(orthogonal_factors(&m.flatten(0, -1), 1, Component::Last).is_err());
        assert!("first".parse::<Component>().is_err());
        let nan = m.fill_diagonal_(f64::NAN, false);
        assert!(orthogonal_factors(&nan, 2, Component::Last).is_err());
    }
}
