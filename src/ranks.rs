//! Every rank rule of the crate, in one place: the schedule's (r, r_min), an adapter's rank, a rank
//! asked of an adapter, and the rank an init can take from a weight's shape. The schedule, the
//! kernels and the init call these; the messages are the ones users (and the tests) see.

use anyhow::{bail, ensure, Result};

/// The schedule's maximum rank r (>= 1) and minimum rank r_min (in 1..=r).
pub fn check_schedule_ranks(rank: i64, min_rank: i64) -> Result<()> {
    if rank < 1 {
        bail!("rank must be >= 1, got {rank}");
    }
    if min_rank < 1 || min_rank > rank {
        bail!("min_rank must be in 1..=rank ({rank}), got {min_rank}");
    }
    Ok(())
}

/// The rank r of a set of adapter factors (read from their shapes): at least 1.
pub fn check_adapter_rank(r: i64) -> Result<()> {
    ensure!(r >= 1, "the adapter has rank {r}: it must be at least 1");
    Ok(())
}

/// One rank `k` asked of an adapter of rank `r`: in 1..=r.
pub fn check_rank_in(k: i64, r: i64) -> Result<()> {
    ensure!((1..=r).contains(&k), "rank {k} is outside 1..={r}");
    Ok(())
}

/// The rank to use for an adapter of rank `r`: `rank` when given (checked), else r (full rank).
pub fn rank_or_full(rank: Option<i64>, r: i64) -> Result<i64> {
    let k = rank.unwrap_or(r);
    check_rank_in(k, r)?;
    Ok(k)
}

/// The rank of an init from an out_f x in_f weight: in 1..=min(out_f, in_f), which it returns
/// (the number of singular triplets the weight has).
pub fn check_init_rank(out_f: i64, in_f: i64, rank: i64) -> Result<i64> {
    let full = out_f.min(in_f);
    if out_f < 1 || in_f < 1 {
        bail!("weight shape must be positive, got {out_f} x {in_f}");
    }
    if rank < 1 || rank > full {
        bail!("rank {rank} is outside 1..={full} for a weight of shape {out_f} x {in_f}");
    }
    Ok(full)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(result: Result<impl std::fmt::Debug>) -> String {
        result.unwrap_err().to_string()
    }

    #[test]
    fn schedule_ranks() {
        assert!(check_schedule_ranks(8, 1).is_ok() && check_schedule_ranks(8, 8).is_ok());
        assert_eq!(message(check_schedule_ranks(0, 1)), "rank must be >= 1, got 0");
        assert_eq!(message(check_schedule_ranks(4, 5)), "min_rank must be in 1..=rank (4), got 5");
        assert_eq!(message(check_schedule_ranks(4, 0)), "min_rank must be in 1..=rank (4), got 0");
    }

    #[test]
    fn adapter_and_asked_ranks() {
        assert!(check_adapter_rank(1).is_ok());
        assert_eq!(message(check_adapter_rank(0)), "the adapter has rank 0: it must be at least 1");
        assert_eq!(rank_or_full(None, 4).unwrap(), 4);
        assert_eq!(rank_or_full(Some(2), 4).unwrap(), 2);
        assert_eq!(message(rank_or_full(Some(5), 4)), "rank 5 is outside 1..=4");
        assert_eq!(message(rank_or_full(Some(0), 4)), "rank 0 is outside 1..=4");
    }

    #[test]
    fn init_ranks() {
        assert_eq!(check_init_rank(8, 4, 4).unwrap(), 4);
        assert_eq!(message(check_init_rank(8, 4, 5)), "rank 5 is outside 1..=4 for a weight of shape 8 x 4");
        assert_eq!(message(check_init_rank(8, 4, 0)), "rank 0 is outside 1..=4 for a weight of shape 8 x 4");
        assert_eq!(message(check_init_rank(0, 4, 1)), "weight shape must be positive, got 0 x 4");
    }
}
