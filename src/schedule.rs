//! The timestep-dependent rank of T-LoRA.
//!
//! The paper's schedule ("power", the default): r(t) = floor(((T - t) / T)^a * (r - r_min)) + r_min,
//! so r(0) = r and r(T) = r_min: the noisiest timesteps, which set layout and background and overfit
//! most, get the fewest ranks. Two other shapes are options of the adapter (`rank_schedule`):
//! - "cosine": r(t) = floor(cos(pi t / 2T) * (r - r_min)) + r_min (r at t = 0, r_min at t = T; it
//!   keeps more ranks than the linear rule over the low-noise half and drops faster near T);
//! - "step": r(t) = r for t < b T, r_min for t >= b T, with b = `rank_boundary` in (0, 1] (0.875:
//!   the boundary 875 of T = 1000 other trainers use, scaled with T).
//!
//! The floor sits exactly on the integers that integer timesteps often produce ((T - t)(r - r_min)/T
//! is an integer at t = 420 for r = 128, r_min = 28), where a float product can land on either side.
//! So the rule is exact arithmetic where it can be, and one snapped float rule where it cannot; the
//! device path (`layer.ranks.ranks_of_levels` in Python, tensor ops on the timestep's device) follows the
//! same rules, so training on one path and sampling on the other uses the same ranks:
//! - power, a = 1: r(t) = r - ceil(t (r - r_min) / T), computed exactly from the float's binary value.
//! - power, a != 1: floor(((T - t) / T)^a (r - r_min) + SNAP) in float64. Products of integer timesteps
//!   that are integers stay on them (float error ~1e-13 is far below SNAP), and distinct products
//!   of integer timesteps lie much further apart than SNAP (at least 1/T^2 for a = 2, about
//!   1/(2 T r) for a = 1/2), so no integer step changes rank by it.
//! - cosine: floor(cos(pi t / 2T) (r - r_min) + SNAP) in float64. By Niven's theorem the only
//!   rational values of cos(pi q) for rational q in [0, 1/2] are 1, 1/2 and 0, so (r - r_min) cos(pi t / 2T)
//!   is an integer only at t = 0, t = T and (for even r - r_min) t = 2T/3, where the snap keeps the
//!   float value (within ~1e-15 (r - r_min) of it, whichever libm) on the integer. Every other value
//!   lies further than 1e-6 below the next integer for the parameters the tests scan (T = 1000 with
//!   every r - r_min up to 128, and smaller T), far above float error and SNAP, so the host and the
//!   device (another cos implementation) agree there; `cosine_snap_is_safe` checks that margin.
//! - step: t < fl(b T) in float64: one correctly rounded product and an exact comparison, the
//!   same bits on every IEEE machine (integer timesteps are exact in float64).

use anyhow::{bail, Result};
use tch::{Kind, Tensor};

/// Values of the a != 1 rule within SNAP below an integer count as that integer.
pub const SNAP: f64 = 1e-9;

/// The largest T accepted (the Python config's limit too).
pub const MAX_TIMESTEPS: i64 = 1_000_000_000;

/// The schedule's shape, by the names an adapter file stores (`rank_schedule`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    /// The paper's ((T - t) / T)^a law, a = `rank_exponent`.
    Power,
    /// cos(pi t / 2T).
    Cosine,
    /// Full rank below the boundary `rank_boundary` * T, r_min from it on.
    Step,
}

/// The shapes' names, in the order the error message lists them.
pub const SHAPES: [&str; 3] = ["power", "cosine", "step"];

impl std::str::FromStr for Shape {
    type Err = anyhow::Error;
    fn from_str(name: &str) -> Result<Self> {
        Ok(match name {
            "power" => Shape::Power,
            "cosine" => Shape::Cosine,
            "step" => Shape::Step,
            other => bail!("unknown rank_schedule {other:?}: choose one of {}", SHAPES.join(", ")),
        })
    }
}

/// The step schedule's default boundary: 875 of T = 1000 (also a literal in python.rs's signature
/// and in tlora.config's DEFAULT_RANK_BOUNDARY).
pub const DEFAULT_BOUNDARY: f64 = 0.875;

/// Parameters of the rank schedule.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RankSchedule {
    /// Maximum rank r (used at t = 0).
    pub rank: i64,
    /// Minimum rank r_min (used at t = T).
    pub min_rank: i64,
    /// Exponent a of the schedule (1 = linear): the adapter's `rank_exponent`.
    pub rank_exponent: f64,
    /// Number of training timesteps T (1000 for DDPM), an integer in 1..=MAX_TIMESTEPS.
    pub num_train_timesteps: i64,
    /// The shape of r(t) (the paper's power law by default).
    pub shape: Shape,
    /// The step shape's boundary as a fraction of T, in (0, 1].
    pub rank_boundary: f64,
}

/// ceil(t * d / big_t), exactly, for a finite t in [0, big_t], d >= 0 and big_t >= 1.
fn ceil_mul_div(t: f64, d: i64, big_t: i64) -> i64 {
    if t == 0.0 || d == 0 {
        return 0;
    }
    // t = m * 2^e exactly (t > 0 here).
    let bits = t.to_bits();
    let biased = ((bits >> 52) & 0x7ff) as i32;
    let fraction = bits & ((1u64 << 52) - 1);
    let (mut m, mut e) = if biased == 0 { (fraction, -1074) } else { (fraction | (1u64 << 52), biased - 1075) };
    let zeros = m.trailing_zeros() as i32;
    m >>= zeros;
    e += zeros;
    let (d, big_t) = (d as u128, big_t as u128);
    let (num, den) = if e >= 0 {
        // t is an integer <= T <= 1e9: m * 2^e * d fits easily.
        (((m as u128) << e) * d, big_t)
    } else {
        match 1u128.checked_shl((-e) as u32).and_then(|p| p.checked_mul(big_t)) {
            Some(den) => ((m as u128) * d, den),
            // den >= 2^128 > m * d (< 2^53 * 2^63): 0 < t d / T < 1.
            None => return 1,
        }
    };
    (num / den + u128::from(num % den != 0)) as i64
}

impl RankSchedule {
    /// Checks the parameters, naming the one that is wrong.
    pub fn new(rank: i64, min_rank: i64, rank_exponent: f64, num_train_timesteps: i64) -> Result<Self> {
        crate::ranks::check_schedule_ranks(rank, min_rank)?;
        if !(rank_exponent.is_finite() && rank_exponent > 0.0) {
            bail!("rank_exponent must be a finite number > 0, got {rank_exponent}");
        }
        if !(1..=MAX_TIMESTEPS).contains(&num_train_timesteps) {
            bail!("num_train_timesteps must be an integer in 1..={MAX_TIMESTEPS}, got {num_train_timesteps}");
        }
        Ok(Self { rank, min_rank, rank_exponent, num_train_timesteps, shape: Shape::Power, rank_boundary: DEFAULT_BOUNDARY })
    }

    /// The same parameters with another shape (and the step shape's boundary, a fraction of T).
    pub fn with_shape(self, shape: Shape, rank_boundary: f64) -> Result<Self> {
        if !(rank_boundary.is_finite() && rank_boundary > 0.0 && rank_boundary <= 1.0) {
            bail!("rank_boundary must be a fraction of T in (0, 1] (0.875: 875 of 1000), got {rank_boundary}");
        }
        Ok(Self { shape, rank_boundary, ..self })
    }

    /// The rank for one timestep.
    pub fn rank_at(&self, t: f64) -> Result<i64> {
        let big_t = self.num_train_timesteps;
        if t.is_nan() {
            bail!("timestep is NaN");
        }
        if !(0.0..=big_t as f64).contains(&t) {
            bail!("timestep {t} is outside [0, {big_t}] (num_train_timesteps = {big_t})");
        }
        let d = self.rank - self.min_rank;
        let k = match self.shape {
            Shape::Power if self.rank_exponent == 1.0 => d - ceil_mul_div(t, d, big_t),
            Shape::Power => {
                let frac = ((big_t as f64 - t) / big_t as f64).powf(self.rank_exponent);
                ((frac * d as f64 + SNAP).floor() as i64).min(d)
            }
            Shape::Cosine => {
                let frac = (std::f64::consts::FRAC_PI_2 * (t / big_t as f64)).cos();
                ((frac * d as f64 + SNAP).floor() as i64).clamp(0, d)
            }
            Shape::Step => {
                if t < self.rank_boundary * big_t as f64 {
                    d
                } else {
                    0
                }
            }
        };
        Ok(k + self.min_rank)
    }

    /// The ranks for a batch of timesteps (any shape, any real dtype, any device): an int64
    /// tensor of the same shape, on the CPU.
    pub fn ranks(&self, timesteps: &Tensor) -> Result<Tensor> {
        let t = timesteps.to_kind(Kind::Double).to_device(tch::Device::Cpu).contiguous();
        let shape = t.size();
        let values: Vec<f64> = Vec::<f64>::try_from(&t.flatten(0, -1))?;
        let ranks: Vec<i64> = values.iter().map(|&v| self.rank_at(v)).collect::<Result<_>>()?;
        Ok(Tensor::from_slice(&ranks).reshape(&shape))
    }
}

/// r(t) for every timestep (any shape, real dtype, CPU or CUDA): an int64 CPU tensor of the same
/// shape, after checking the parameters and every timestep. `shape` is a `rank_schedule` name.
pub fn rank_schedule(timesteps: &Tensor, schedule: (i64, i64, f64, i64), shape: &str, rank_boundary: f64) -> Result<Tensor> {
    crate::kernel::check_device(timesteps, "the timestep tensor")?;
    let (rank, min_rank, rank_exponent, num_train_timesteps) = schedule;
    RankSchedule::new(rank, min_rank, rank_exponent, num_train_timesteps)?.with_shape(shape.parse()?, rank_boundary)?.ranks(timesteps)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_linear() {
        let s = RankSchedule::new(64, 32, 1.0, 1000).unwrap();
        // Hand-computed: floor((1000 - t) / 1000 * 32) + 32.
        for (t, r) in [(0.0, 64), (1.0, 63), (31.25, 63), (31.26, 62), (500.0, 48), (999.0, 32), (1000.0, 32)] {
            assert_eq!(s.rank_at(t).unwrap(), r, "t = {t}");
        }
    }

    /// floor((T - t) d / T) + r_min in integers: the exact rule at integer t.
    fn exact_linear(t: i64, r: i64, r_min: i64, big_t: i64) -> i64 {
        (big_t - t) * (r - r_min) / big_t + r_min
    }

    #[test]
    fn linear_is_exact_at_every_integer_step() {
        // Includes the boundaries a float product misses (r 128 / 28 at t = 420, 430, 710; r 100 / 10 at t = 300).
        for (r, r_min, big_t) in [(128, 28, 1000), (100, 10, 1000), (64, 32, 1000), (7, 3, 1000), (33, 1, 999), (5, 2, 7)] {
            let s = RankSchedule::new(r, r_min, 1.0, big_t).unwrap();
            for t in 0..=big_t {
                assert_eq!(s.rank_at(t as f64).unwrap(), exact_linear(t, r, r_min, big_t), "r {r} / {r_min}, T {big_t}, t {t}");
            }
        }
        let s = RankSchedule::new(128, 28, 1.0, 1000).unwrap();
        assert_eq!([420.0, 430.0, 710.0].map(|t| s.rank_at(t).unwrap()), [86, 85, 57]);
    }

    #[test]
    fn linear_is_exact_between_steps() {
        // t d / T an integer exactly (31.25 * 32 / 1000 = 1), and just off it on either side.
        let s = RankSchedule::new(64, 32, 1.0, 1000).unwrap();
        assert_eq!(s.rank_at(31.25).unwrap(), 63);
        assert_eq!(s.rank_at(31.25f64.next_up()).unwrap(), 62);
        assert_eq!(s.rank_at(31.25f64.next_down()).unwrap(), 63);
        // The smallest positive timestep already drops one rank: ceil(t d / T) = 1.
        assert_eq!(s.rank_at(f64::from_bits(1)).unwrap(), 63);
        assert_eq!(s.rank_at(1e-300).unwrap(), 63);
        assert_eq!(s.rank_at(1000.0f64.next_down()).unwrap(), 32);
    }

    #[test]
    fn square_and_root_exponents_are_exact_at_integer_steps() {
        fn isqrt(n: i64) -> i64 {
            let mut x = (n as f64).sqrt() as i64;
            while x * x > n {
                x -= 1;
            }
            while (x + 1) * (x + 1) <= n {
                x += 1;
            }
            x
        }
        for (r, r_min) in [(128, 28), (64, 32), (100, 10), (8, 2)] {
            let d = r - r_min;
            let square = RankSchedule::new(r, r_min, 2.0, 1000).unwrap();
            let root = RankSchedule::new(r, r_min, 0.5, 1000).unwrap();
            for t in 0..=1000i64 {
                let want_square = (1000 - t) * (1000 - t) * d / 1_000_000 + r_min;
                // floor(sqrt((T - t) / T) d) = isqrt(floor((T - t) d^2 / T))
                let want_root = isqrt((1000 - t) * d * d / 1000) + r_min;
                assert_eq!(square.rank_at(t as f64).unwrap(), want_square, "a = 2, r {r} / {r_min}, t {t}");
                assert_eq!(root.rank_at(t as f64).unwrap(), want_root, "a = 0.5, r {r} / {r_min}, t {t}");
            }
        }
    }

    #[test]
    fn table_exponent() {
        let s = RankSchedule::new(8, 2, 2.0, 1000).unwrap();
        // floor(((1000 - t) / 1000)^2 * 6) + 2
        for (t, r) in [(0.0, 8), (100.0, 6), (500.0, 3), (600.0, 2), (1000.0, 2)] {
            assert_eq!(s.rank_at(t).unwrap(), r, "t = {t}");
        }
    }

    #[test]
    fn equal_ranks_is_constant() {
        let s = RankSchedule::new(16, 16, 1.0, 1000).unwrap();
        for t in [0.0, 250.0, 999.0, 1000.0] {
            assert_eq!(s.rank_at(t).unwrap(), 16);
        }
    }

    #[test]
    fn batch_matches_scalar() {
        let s = RankSchedule::new(64, 32, 1.0, 1000).unwrap();
        let t = Tensor::from_slice(&[0.0f32, 250.5, 999.0, 1000.0]);
        let r = Vec::<i64>::try_from(&s.ranks(&t).unwrap()).unwrap();
        assert_eq!(r, vec![64, 55, 32, 32]);
        let ti = Tensor::from_slice(&[0i64, 500]).reshape([2, 1]);
        assert_eq!(s.ranks(&ti).unwrap().size(), vec![2, 1]);
    }

    #[test]
    fn bad_parameters() {
        assert!(RankSchedule::new(0, 1, 1.0, 1000).is_err());
        assert!(RankSchedule::new(8, 0, 1.0, 1000).is_err());
        assert!(RankSchedule::new(8, 9, 1.0, 1000).is_err());
        assert!(RankSchedule::new(8, 4, 0.0, 1000).is_err());
        assert!(RankSchedule::new(8, 4, f64::NAN, 1000).is_err());
        assert!(RankSchedule::new(8, 4, 1.0, 0).is_err());
    }

    #[test]
    fn cosine_table() {
        // floor(cos(pi t / 2000) * 6) + 2, by hand: cos(pi/3) = 1/2 exactly at t = 2000/3 (not an
        // integer step); t = 500: cos(pi/4) 6 = 4.24; t = 900: cos(0.45 pi) 6 = 0.94.
        let s = RankSchedule::new(8, 2, 1.0, 1000).unwrap().with_shape(Shape::Cosine, DEFAULT_BOUNDARY).unwrap();
        for (t, r) in [(0.0, 8), (1.0, 7), (500.0, 6), (900.0, 2), (1000.0, 2)] {
            assert_eq!(s.rank_at(t).unwrap(), r, "t = {t}");
        }
        // T = 3: cos(pi/3) d = d / 2, an integer for even d, at the integer step t = 2.
        let s = RankSchedule::new(10, 2, 1.0, 3).unwrap().with_shape(Shape::Cosine, DEFAULT_BOUNDARY).unwrap();
        assert_eq!([0.0, 1.0, 2.0, 3.0].map(|t| s.rank_at(t).unwrap()), [10, 8, 6, 2]);
    }

    #[test]
    fn cosine_snap_is_safe() {
        // At every integer step, d cos(pi t / 2T) is either an integer (Niven: only at t = 0, T and
        // t = 2T/3 with d even), computed within float error of it, or further than 1e-6 below the
        // next integer, so SNAP decides nothing else and any libm's cos gives the same floor.
        for big_t in [1000i64, 999, 7, 3, 6, 30] {
            for d in 1..=128i64 {
                for t in 0..=big_t {
                    let v = (std::f64::consts::FRAC_PI_2 * (t as f64 / big_t as f64)).cos() * d as f64;
                    let gap = v.ceil() - v;
                    let near = (v - v.round()).abs() < 1e-12;
                    let integer_step = t == 0 || t == big_t || (3 * t == 2 * big_t && d % 2 == 0);
                    assert_eq!(near, integer_step, "T {big_t}, d {d}, t {t}: v = {v}");
                    assert!(near || gap > 1e-6, "T {big_t}, d {d}, t {t}: {gap} below an integer");
                }
            }
        }
    }

    #[test]
    fn step_table() {
        let s = RankSchedule::new(8, 2, 1.0, 1000).unwrap().with_shape(Shape::Step, DEFAULT_BOUNDARY).unwrap();
        for (t, r) in [(0.0, 8), (874.0, 8), (874.999, 8), (875.0, 2), (999.0, 2), (1000.0, 2)] {
            assert_eq!(s.rank_at(t).unwrap(), r, "t = {t}");
        }
        // The boundary scales with T: 0.875 * 8 = 7.
        let s = RankSchedule::new(8, 2, 1.0, 8).unwrap().with_shape(Shape::Step, DEFAULT_BOUNDARY).unwrap();
        assert_eq!([6.0, 7.0, 8.0].map(|t| s.rank_at(t).unwrap()), [8, 2, 2]);
        let s = RankSchedule::new(8, 2, 1.0, 1000).unwrap().with_shape(Shape::Step, 1.0).unwrap();
        assert_eq!([999.0, 1000.0].map(|t| s.rank_at(t).unwrap()), [8, 2]);
    }

    #[test]
    fn bad_shapes() {
        assert!("linear".parse::<Shape>().unwrap_err().to_string().contains("power, cosine, step"));
        let s = RankSchedule::new(8, 2, 1.0, 1000).unwrap();
        for b in [0.0, -0.5, 1.5, f64::NAN, f64::INFINITY] {
            assert!(s.with_shape(Shape::Step, b).unwrap_err().to_string().contains("rank_boundary"), "{b}");
        }
    }

    #[test]
    fn bad_timesteps() {
        let s = RankSchedule::new(8, 4, 1.0, 1000).unwrap();
        for t in [f64::NAN, -0.5, 1000.5] {
            let err = s.rank_at(t).unwrap_err().to_string();
            assert!(err.contains("timestep"), "{err}");
        }
        let bad = Tensor::from_slice(&[10.0f32, f32::NAN]);
        assert!(s.ranks(&bad).unwrap_err().to_string().contains("NaN"));
    }
}
