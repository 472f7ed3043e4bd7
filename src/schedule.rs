//! The timestep-dependent rank of T-LoRA.
//!
//! r(t) = floor(((T - t) / T)^a * (r - r_min)) + r_min, so r(0) = r and r(T) = r_min: the noisiest
//! timesteps, which set layout and background and overfit most, get the fewest ranks.

use anyhow::{bail, Result};
use tch::{Kind, Tensor};

/// Parameters of the rank schedule.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RankSchedule {
    /// Maximum rank r (used at t = 0).
    pub rank: i64,
    /// Minimum rank r_min (used at t = T).
    pub min_rank: i64,
    /// Exponent a of the schedule (1 = linear).
    pub exponent: f64,
    /// Number of training timesteps T (1000 for DDPM).
    pub num_train_timesteps: f64,
}

impl RankSchedule {
    /// Checks the parameters, naming the one that is wrong.
    pub fn new(rank: i64, min_rank: i64, exponent: f64, num_train_timesteps: f64) -> Result<Self> {
        crate::ranks::check_schedule_ranks(rank, min_rank)?;
        if !(exponent.is_finite() && exponent > 0.0) {
            bail!("rank_exponent must be a finite number > 0, got {exponent}");
        }
        if !(num_train_timesteps.is_finite() && num_train_timesteps >= 1.0) {
            bail!("num_train_timesteps must be >= 1, got {num_train_timesteps}");
        }
        Ok(Self { rank, min_rank, exponent, num_train_timesteps })
    }

    /// The rank for one timestep.
    pub fn rank_at(&self, t: f64) -> Result<i64> {
        let big_t = self.num_train_timesteps;
        if t.is_nan() {
            bail!("timestep is NaN");
        }
        if !(0.0..=big_t).contains(&t) {
            bail!("timestep {t} is outside [0, {big_t}] (num_train_timesteps = {big_t})");
        }
        let frac = ((big_t - t) / big_t).powf(self.exponent);
        Ok((frac * (self.rank - self.min_rank) as f64).floor() as i64 + self.min_rank)
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
pub fn rank_schedule(timesteps: &Tensor, rank: i64, min_rank: i64, exponent: f64, num_train_timesteps: f64) -> Result<Tensor> {
    crate::kernel::check_device(timesteps, "the timestep tensor")?;
    RankSchedule::new(rank, min_rank, exponent, num_train_timesteps)?.ranks(timesteps)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_linear() {
        let s = RankSchedule::new(64, 32, 1.0, 1000.0).unwrap();
        // Hand-computed: floor((1000 - t) / 1000 * 32) + 32.
        for (t, r) in [(0.0, 64), (1.0, 63), (31.25, 63), (31.26, 62), (500.0, 48), (999.0, 32), (1000.0, 32)] {
            assert_eq!(s.rank_at(t).unwrap(), r, "t = {t}");
        }
    }

    #[test]
    fn table_exponent() {
        let s = RankSchedule::new(8, 2, 2.0, 1000.0).unwrap();
        // floor(((1000 - t) / 1000)^2 * 6) + 2
        for (t, r) in [(0.0, 8), (100.0, 6), (500.0, 3), (600.0, 2), (1000.0, 2)] {
            assert_eq!(s.rank_at(t).unwrap(), r, "t = {t}");
        }
    }

    #[test]
    fn equal_ranks_is_constant() {
        let s = RankSchedule::new(16, 16, 1.0, 1000.0).unwrap();
        for t in [0.0, 250.0, 999.0, 1000.0] {
            assert_eq!(s.rank_at(t).unwrap(), 16);
        }
    }

    #[test]
    fn batch_matches_scalar() {
        let s = RankSchedule::new(64, 32, 1.0, 1000.0).unwrap();
        let t = Tensor::from_slice(&[0.0f32, 250.5, 999.0, 1000.0]);
        let r = Vec::<i64>::try_from(&s.ranks(&t).unwrap()).unwrap();
        assert_eq!(r, vec![64, 55, 32, 32]);
        let ti = Tensor::from_slice(&[0i64, 500]).reshape([2, 1]);
        assert_eq!(s.ranks(&ti).unwrap().size(), vec![2, 1]);
    }

    #[test]
    fn bad_parameters() {
        assert!(RankSchedule::new(0, 1, 1.0, 1000.0).is_err());
        assert!(RankSchedule::new(8, 0, 1.0, 1000.0).is_err());
        assert!(RankSchedule::new(8, 9, 1.0, 1000.0).is_err());
        assert!(RankSchedule::new(8, 4, 0.0, 1000.0).is_err());
        assert!(RankSchedule::new(8, 4, f64::NAN, 1000.0).is_err());
        assert!(RankSchedule::new(8, 4, 1.0, 0.0).is_err());
    }

    #[test]
    fn bad_timesteps() {
        let s = RankSchedule::new(8, 4, 1.0, 1000.0).unwrap();
        for t in [f64::NAN, -0.5, 1000.5] {
            let err = s.rank_at(t).unwrap_err().to_string();
            assert!(err.contains("timestep"), "{err}");
        }
        let bad = Tensor::from_slice(&[10.0f32, f32::NAN]);
        assert!(s.ranks(&bad).unwrap_err().to_string().contains("NaN"));
    }
}
