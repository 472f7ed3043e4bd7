//! T-LoRA core: pure functions over `tch::Tensor`.
//!
//! - [`schedule`]: the timestep-dependent rank r(t).
//! - [`init`]: orthogonal (SVD) initialisation of the adapter factors.
//! - [`kernel`]: forward and backward of the masked, rank-adaptive low-rank update.
//! - [`ranks`]: every rank rule (schedule, adapter, init), checked in one place.
//! - [`format`]: the adapter file (safetensors + JSON metadata), written atomically.
//!
//! Nothing here knows about Python; the bindings live in `python.rs` behind the `python` feature.
//! Each binding has the name of the core function it calls (`tlora._native.fold_weight` calls
//! [`kernel::fold_weight`], `save_file` calls [`format::save_file`], ...), so that a name found on
//! one side of the boundary can be searched for on the other.

pub mod format;
pub mod init;
pub mod kernel;
pub mod ranks;
pub mod schedule;

#[cfg(feature = "python")]
mod python;
