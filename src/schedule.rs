//! The timestep-dependent rank of T-LoRA.
//!
//! r(t) = floor(((T - t) / T)^a * (r - r_min)) + r_min, so r(0) = r and r(T) = r_min: the noisiest
//! timesteps, which set layout and background and overfit most, get the fewest ranks.
//!
//! The floor sits exactly on the integers that integer timesteps often produce ((T - t)(r - r_min)/T
//! is an integer at t = 420 for r = 128, r_min = 28), where a float product can land on either side.
//! So the rule is exact arithmetic where it can be, and one snapped float rule where it cannot; the
//! device path (`layer.ranks.ranks_of_levels` in Python, tensor ops on the timestep's device) follows the
//! same two rules, so training on one path and sampling on the other uses the same ranks:
//! - a = 1: r(t) = r - ceil(t (r - r_min) / T), computed exactly from the float's binary value.
//! - a != 1: floor(((T - t) / T)^a (r - r_min) + SNAP) in float64. Products of integer timesteps
//!   that are integers stay on them (float error ~1e-13 is far below SNAP), and distinct products
//!   of integer timesteps lie much further apart than SNAP (at least 1/T^2 for a = 2, about
//!   1/(2 T r) for a = 1/2), so no integer step changes rank by it.

use anyhow::{bail, Result};
use tch::{Kind, Tensor};

/// Values of the a != 1 rule within SNAP below an integer count as that integer.
pub const SNAP: f64 = 1e-9;

/// The largest T accepted (the Python config's limit too).
pub const MAX_TIMESTEPS: i64 = 1_000_000_000;

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
        Ok(Self { rank, min_rank, rank_exponent, num_train_timesteps })
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
        let k = if self.rank_exponent == 1.0 {
            d - ceil_mul_div(t, d, big_t)
        } else {
            let frac = ((big_t as f64 - t) / big_t as f64).powf(self.rank_exponent);
            ((frac * d as f64 + SNAP).floor() as i64).min(d)
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
/// shape, after checking the parameters and every timestep.
pub fn rank_schedule(timesteps: &Tensor, rank: i64, min_rank: i64, rank_exponent: f64, num_train_timesteps: i64) -> Result<Tensor> {
    crate::kernel::check_device(timesteps, "the timestep tensor")?;
    RankSchedule::new(rank, min_rank, rank_exponent, num_train_timesteps)?.ranks(timesteps)
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
