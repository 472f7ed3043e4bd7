//! The thin Python layer: argument conversion, GIL release and error mapping. All the work is in
//! the pure modules of this crate.

use crate::{format, init, kernel, schedule};
use pyo3::exceptions::{PyFileNotFoundError, PyOSError, PyValueError};
use pyo3::prelude::*;
use pyo3_tch::PyTensor;
use std::collections::HashMap;
use std::path::PathBuf;
use tch::Tensor;

/// Maps an error to ValueError, or to OSError / FileNotFoundError when the root cause is I/O.
fn to_py(err: anyhow::Error) -> PyErr {
    let msg = format!("{err:#}");
    match err.root_cause().downcast_ref::<std::io::Error>() {
        Some(io) if io.kind() == std::io::ErrorKind::NotFound => PyFileNotFoundError::new_err(msg),
        Some(_) => PyOSError::new_err(msg),
        None => PyValueError::new_err(msg),
    }
}

fn factors_of(tensors: &[Tensor]) -> anyhow::Result<kernel::Factors<'_>> {
    match tensors {
        [p, lam, q, p0, lam0, q0] => Ok(kernel::Factors::Ortho { p, lam, q, p0, lam0, q0 }),
        [down, up] => Ok(kernel::Factors::Plain { down, up }),
        other => anyhow::bail!("expected 6 factors (p, lam, q, p0, lam0, q0) or 2 (down, up), got {}", other.len()),
    }
}

/// Unwraps the tensors so that they can move into a closure that runs without the GIL
/// (tch tensors are Send but not Sync, so they are moved, not borrowed).
fn owned(tensors: Vec<PyTensor>) -> Vec<Tensor> {
    tensors.into_iter().map(|t| t.0).collect()
}

/// r(t) for every timestep: an int64 CPU tensor of the same shape.
#[pyfunction]
fn rank_schedule(timesteps: PyTensor, rank: i64, min_rank: i64, exponent: f64, num_train_timesteps: f64) -> PyResult<PyTensor> {
    let s = schedule::RankSchedule::new(rank, min_rank, exponent, num_train_timesteps).map_err(to_py)?;
    s.ranks(&timesteps).map(PyTensor).map_err(to_py)
}

/// (P, lam, Q), float32 on `device` ("cpu", "cuda[:N]", "mps"; default the CPU): the exact SVD
/// of `weight`, or when `weight` is None the triplets of a seeded N(0, (1/rank)^2) matrix of shape
/// out_features x in_features drawn from their law without forming the matrix (see init.rs).
#[pyfunction]
#[pyo3(signature = (out_features, in_features, rank, component, seed, weight=None, device=None))]
#[allow(clippy::too_many_arguments)]
fn orthogonal_init(
    py: Python<'_>,
    out_features: i64,
    in_features: i64,
    rank: i64,
    component: &str,
    seed: u64,
    weight: Option<PyTensor>,
    device: Option<&str>,
) -> PyResult<(PyTensor, PyTensor, PyTensor)> {
    let comp: init::Component = component.parse().map_err(to_py)?;
    let device = device.map(init::parse_device).transpose().map_err(to_py)?.unwrap_or(tch::Device::Cpu);
    let weight = weight.map(|w| w.0);
    let f = py
        .allow_threads(move || match &weight {
            Some(w) => init::orthogonal_factors(w, rank, comp)
                .map(|f| init::OrthoFactors { p: f.p.to_device(device), lam: f.lam.to_device(device), q: f.q.to_device(device) }),
            None => init::orthogonal_random_on(out_features, in_features, rank, comp, seed, device),
        })
        .map_err(to_py)?;
    Ok((PyTensor(f.p), PyTensor(f.lam), PyTensor(f.q)))
}

/// A seeded Gaussian matrix (float32, CPU) that does not touch torch's global generator.
#[pyfunction]
fn gaussian(rows: i64, cols: i64, std: f64, seed: u64) -> PyResult<PyTensor> {
    let t = init::seeded_gaussian(rows, cols, std, seed).map_err(to_py)?;
    Ok(PyTensor(t.to_kind(tch::Kind::Float)))
}

/// (delta, h, d, u): the adapter's output, and the intermediate and operands that
/// `lowrank_backward` needs.
#[pyfunction]
#[pyo3(signature = (x, factors, ranks, scale))]
fn lowrank_forward(py: Python<'_>, x: PyTensor, factors: Vec<PyTensor>, ranks: Option<Vec<i64>>, scale: f64) -> PyResult<(PyTensor, PyTensor, PyTensor, PyTensor)> {
    let (x, factors) = (x.0, owned(factors));
    let (delta, s) = py
        .allow_threads(move || kernel::forward_saving(&x, &factors_of(&factors)?, ranks.as_deref(), scale, None))
        .map_err(to_py)?;
    Ok((PyTensor(delta.expect("delta")), PyTensor(s.h), PyTensor(s.d), PyTensor(s.u)))
}

/// Adds the adapter's output for x into `y` (the base layer's output, same rows) in place;
/// returns (h, d, u) for `lowrank_backward`.
#[pyfunction]
#[pyo3(signature = (y, x, factors, ranks, scale))]
fn lowrank_forward_add(py: Python<'_>, y: PyTensor, x: PyTensor, factors: Vec<PyTensor>, ranks: Option<Vec<i64>>, scale: f64) -> PyResult<(PyTensor, PyTensor, PyTensor)> {
    let (y, x, factors) = (y.0, x.0, owned(factors));
    let (_, s) = py
        .allow_threads(move || kernel::forward_saving(&x, &factors_of(&factors)?, ranks.as_deref(), scale, Some(&y)))
        .map_err(to_py)?;
    Ok((PyTensor(s.h), PyTensor(s.d), PyTensor(s.u)))
}

type Grads4 = (Option<PyTensor>, Option<PyTensor>, Option<PyTensor>, Option<PyTensor>);

/// Gradients (input, factor 0, 1, 2) of `lowrank_forward`; `needs` says which to compute. `d` and
/// `u` are the operands the forward returned (rebuilt from the factors when omitted).
#[pyfunction]
#[pyo3(signature = (grad, x, h, factors, ranks, scale, needs, d=None, u=None))]
#[allow(clippy::too_many_arguments)]
fn lowrank_backward(
    py: Python<'_>,
    grad: PyTensor,
    x: PyTensor,
    h: PyTensor,
    factors: Vec<PyTensor>,
    ranks: Option<Vec<i64>>,
    scale: f64,
    needs: [bool; 4],
    d: Option<PyTensor>,
    u: Option<PyTensor>,
) -> PyResult<Grads4> {
    let (grad, x, h, factors) = (grad.0, x.0, h.0, owned(factors));
    let ops = match (d, u) {
        (Some(d), Some(u)) => Some((d.0, u.0)),
        (None, None) => None,
        _ => return Err(PyValueError::new_err("pass both d and u, or neither")),
    };
    let g = py
        .allow_threads(move || {
            let f = factors_of(&factors)?;
            match ops {
                Some((d, u)) => kernel::backward_saved(&grad, &x, &kernel::Saved { h, d, u }, &f, ranks.as_deref(), scale, needs),
                None => kernel::backward(&grad, &x, &h, &f, ranks.as_deref(), scale, needs),
            }
        })
        .map_err(to_py)?;
    let [a, b, c] = g.factors;
    Ok((g.input.map(PyTensor), a.map(PyTensor), b.map(PyTensor), c.map(PyTensor)))
}

/// T-LoRA's training forward with the frozen branch's first `stage_rank` ranks folded into the
/// base weight (`staged`: that fold from `fold_frozen`, else folded here): (y, h, d, u) with y the
/// base layer's output plus the update (float32 or float64).
#[pyfunction]
#[pyo3(signature = (x, weight, bias, factors, ranks, scale, stage_rank=0, staged=None))]
#[allow(clippy::too_many_arguments)]
fn lowrank_split_forward(
    py: Python<'_>,
    x: PyTensor,
    weight: PyTensor,
    bias: Option<PyTensor>,
    factors: Vec<PyTensor>,
    ranks: Option<Vec<i64>>,
    scale: f64,
    stage_rank: i64,
    staged: Option<PyTensor>,
) -> PyResult<(PyTensor, PyTensor, PyTensor, PyTensor)> {
    let (x, weight, bias, factors, staged) = (x.0, weight.0, bias.map(|b| b.0), owned(factors), staged.map(|t| t.0));
    let (y, s) = py
        .allow_threads(move || {
            let stage = kernel::Stage { rank: stage_rank, folded: staged.as_ref() };
            kernel::forward_split(&x, &weight, bias.as_ref(), &factors_of(&factors)?, ranks.as_deref(), scale, stage)
        })
        .map_err(to_py)?;
    Ok((PyTensor(y), PyTensor(s.h), PyTensor(s.d), PyTensor(s.u)))
}

/// Gradients (input, P, lam, Q) of `lowrank_split_forward`; `needs` says which to compute.
#[pyfunction]
#[pyo3(signature = (grad, x, h, d, u, weight, factors, ranks, scale, needs, stage_rank=0, staged=None))]
#[allow(clippy::too_many_arguments)]
fn lowrank_split_backward(
    py: Python<'_>,
    grad: PyTensor,
    x: PyTensor,
    h: PyTensor,
    d: PyTensor,
    u: PyTensor,
    weight: PyTensor,
    factors: Vec<PyTensor>,
    ranks: Option<Vec<i64>>,
    scale: f64,
    needs: [bool; 4],
    stage_rank: i64,
    staged: Option<PyTensor>,
) -> PyResult<Grads4> {
    let (grad, x, weight, factors, staged) = (grad.0, x.0, weight.0, owned(factors), staged.map(|t| t.0));
    let saved = kernel::Saved { h: h.0, d: d.0, u: u.0 };
    let g = py
        .allow_threads(move || {
            let stage = kernel::Stage { rank: stage_rank, folded: staged.as_ref() };
            kernel::backward_split(&grad, &x, &saved, &weight, &factors_of(&factors)?, ranks.as_deref(), scale, needs, stage)
        })
        .map_err(to_py)?;
    let [a, b, c] = g.factors;
    Ok((g.input.map(PyTensor), a.map(PyTensor), b.map(PyTensor), c.map(PyTensor)))
}

/// The dense weight update (out x in) at one rank (None: full rank).
#[pyfunction]
#[pyo3(signature = (factors, rank, scale))]
fn dense_update(py: Python<'_>, factors: Vec<PyTensor>, rank: Option<i64>, scale: f64) -> PyResult<PyTensor> {
    let factors = owned(factors);
    py.allow_threads(move || factors_of(&factors).and_then(|f| kernel::dense_update(&f, rank, scale)))
        .map(PyTensor)
        .map_err(to_py)
}

/// The folded weight W + dW at one rank (None: full rank), in the wider of the weight's and the
/// factors' dtypes.
#[pyfunction]
#[pyo3(signature = (weight, factors, rank, scale))]
fn fold_weight(py: Python<'_>, weight: PyTensor, factors: Vec<PyTensor>, rank: Option<i64>, scale: f64) -> PyResult<PyTensor> {
    let (weight, factors) = (weight.0, owned(factors));
    py.allow_threads(move || factors_of(&factors).and_then(|f| kernel::fold(&weight, &f, rank, scale)))
        .map(PyTensor)
        .map_err(to_py)
}

/// W minus T-LoRA's frozen branch at its first `rank` ranks, in the weight's dtype: the stage a
/// split call takes (the same fold it does without one, so results are bitwise equal).
#[pyfunction]
#[pyo3(signature = (weight, factors, rank, scale))]
fn fold_frozen(py: Python<'_>, weight: PyTensor, factors: Vec<PyTensor>, rank: i64, scale: f64) -> PyResult<PyTensor> {
    let (weight, factors) = (weight.0, owned(factors));
    py.allow_threads(move || factors_of(&factors).and_then(|f| kernel::fold_frozen(&weight, &f, rank, scale)))
        .map(PyTensor)
        .map_err(to_py)
}

/// Writes tensors and string metadata to a safetensors file, atomically.
#[pyfunction]
fn save_file(py: Python<'_>, path: PathBuf, tensors: Vec<(String, PyTensor)>, metadata: HashMap<String, String>) -> PyResult<()> {
    let tensors: Vec<(String, Tensor)> = tensors.into_iter().map(|(n, t)| (n, t.0)).collect();
    py.allow_threads(move || format::write(&path, &tensors, &metadata)).map_err(to_py)
}

/// Reads a safetensors file: ([(name, tensor)] in file order, metadata).
#[pyfunction]
fn load_file(py: Python<'_>, path: PathBuf) -> PyResult<(Vec<(String, PyTensor)>, HashMap<String, String>)> {
    let (tensors, meta) = py.allow_threads(move || format::read(&path)).map_err(to_py)?;
    Ok((tensors.into_iter().map(|(n, t)| (n, PyTensor(t))).collect(), meta))
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(rank_schedule, m)?)?;
    m.add_function(wrap_pyfunction!(orthogonal_init, m)?)?;
    m.add_function(wrap_pyfunction!(gaussian, m)?)?;
    m.add_function(wrap_pyfunction!(lowrank_forward, m)?)?;
    m.add_function(wrap_pyfunction!(lowrank_forward_add, m)?)?;
    m.add_function(wrap_pyfunction!(lowrank_backward, m)?)?;
    m.add_function(wrap_pyfunction!(lowrank_split_forward, m)?)?;
    m.add_function(wrap_pyfunction!(lowrank_split_backward, m)?)?;
    m.add_function(wrap_pyfunction!(dense_update, m)?)?;
    m.add_function(wrap_pyfunction!(fold_weight, m)?)?;
    m.add_function(wrap_pyfunction!(fold_frozen, m)?)?;
    m.add_function(wrap_pyfunction!(save_file, m)?)?;
    m.add_function(wrap_pyfunction!(load_file, m)?)?;
    Ok(())
}
