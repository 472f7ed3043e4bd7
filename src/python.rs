//! The thin Python layer: argument conversion, GIL release and error mapping. All the work is in
//! the pure modules of this crate.

use crate::{format, init, kernel, schedule};
use pyo3::exceptions::{PyFileNotFoundError, PyOSError, PyValueError};
use pyo3::prelude::*;
use pyo3_tch::PyTensor;
use std::collections::HashMap;
use std::path::PathBuf;
use tch::{Kind, Tensor};

/// An instance of one of tlora's Python error types (`tlora.errors`, all ValueError subclasses),
/// so that what the native code refuses reaches Python as the package's own errors do. Falls back
/// to ValueError / FileNotFoundError if that module cannot be imported (it always can from `tlora`).
fn tlora_error(kind: &str, msg: String) -> PyErr {
    Python::with_gil(|py| {
        let class = py.import("tlora.errors").and_then(|m| m.getattr(kind));
        match class.and_then(|c| c.call1((msg.clone(),))) {
            Ok(err) => PyErr::from_value(err),
            Err(_) if kind == "MissingFileError" => PyFileNotFoundError::new_err(msg),
            Err(_) => PyValueError::new_err(msg),
        }
    })
}

/// The user's part of a message: libtorch appends its C++ stack, which users do not need.
fn message_of(err: &anyhow::Error) -> String {
    let full = format!("{err:#}");
    full.split("\nException raised from").next().unwrap_or(&full).trim_end().to_string()
}

/// Maps an error to tlora's ConfigError (bad arguments), MissingFileError (also a
/// FileNotFoundError) when the root cause is a missing file, or OSError for other I/O failures.
fn to_py(err: anyhow::Error) -> PyErr {
    let msg = message_of(&err);
    match err.root_cause().downcast_ref::<std::io::Error>() {
        Some(io) if io.kind() == std::io::ErrorKind::NotFound => tlora_error("MissingFileError", msg),
        Some(_) => PyOSError::new_err(msg),
        None => tlora_error("ConfigError", msg),
    }
}

/// Runs `work` without the GIL and turns both its errors and any panic (a libtorch error surfacing
/// through a non-fallible tch call) into Python exceptions: nothing unwinds into Python as
/// `PanicException`.
fn run<T: Send>(py: Python<'_>, work: impl FnOnce() -> anyhow::Result<T> + Send) -> PyResult<T> {
    py.allow_threads(move || match std::panic::catch_unwind(std::panic::AssertUnwindSafe(work)) {
        Ok(result) => result,
        Err(payload) => {
            let msg = payload
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| payload.downcast_ref::<&str>().copied())
                .unwrap_or("unknown panic");
            Err(anyhow::anyhow!("tlora's native code refused its input: {msg}"))
        }
    })
    .map_err(to_py)
}

/// Unwraps the tensors so that they can move into a closure that runs without the GIL
/// (tch tensors are Send but not Sync, so they are moved, not borrowed).
fn owned(tensors: Vec<PyTensor>) -> Vec<Tensor> {
    tensors.into_iter().map(|t| t.0).collect()
}

/// r(t) for every timestep: an int64 CPU tensor of the same shape. `shape` is the adapter's
/// `rank_schedule` ("power", "cosine", "step"), `rank_boundary` the step shape's boundary (a fraction of T).
#[pyfunction]
// rank_boundary's default is schedule::DEFAULT_BOUNDARY, written as a literal so that the signature
// Python shows (and tests/test_layout.py compares with the stub) holds the number.
#[pyo3(signature = (timesteps, rank, min_rank, rank_exponent, num_train_timesteps, shape="power", rank_boundary=0.875))]
// One Rust parameter per Python parameter (plus the GIL token): the Python signature sets the count.
#[allow(clippy::too_many_arguments)]
fn rank_schedule(
    py: Python<'_>,
    timesteps: PyTensor,
    rank: i64,
    min_rank: i64,
    rank_exponent: f64,
    num_train_timesteps: i64,
    shape: &str,
    rank_boundary: f64,
) -> PyResult<PyTensor> {
    let t = timesteps.0;
    let shape = shape.to_string();
    run(py, move || schedule::rank_schedule(&t, (rank, min_rank, rank_exponent, num_train_timesteps), &shape, rank_boundary)).map(PyTensor)
}

/// (P, lam, Q), float32 on `device` ("cpu", "cuda[:N]"; default the CPU): the exact SVD
/// of `weight`, or when `weight` is None the triplets of a seeded N(0, (1/rank)^2) matrix of shape
/// out_features x in_features drawn from their law without forming the matrix (see init.rs).
#[pyfunction]
#[pyo3(signature = (out_features, in_features, rank, init, seed, weight=None, device=None))]
// One Rust parameter per Python parameter (plus the GIL token): the Python signature sets the count.
#[allow(clippy::too_many_arguments)]
fn orthogonal_init(
    py: Python<'_>,
    out_features: i64,
    in_features: i64,
    rank: i64,
    init: &str,
    seed: u64,
    weight: Option<PyTensor>,
    device: Option<&str>,
) -> PyResult<(PyTensor, PyTensor, PyTensor)> {
    let which: init::Init = init.parse().map_err(to_py)?;
    let device = device.map(kernel::parse_device).transpose().map_err(to_py)?.unwrap_or(tch::Device::Cpu);
    let weight = weight.map(|w| w.0);
    let f = run(py, move || init::orthogonal_init(out_features, in_features, rank, which, seed, weight.as_ref(), device))?;
    Ok((PyTensor(f.p), PyTensor(f.lam), PyTensor(f.q)))
}

/// A seeded Gaussian matrix (float32, CPU) that does not touch torch's global generator.
#[pyfunction]
fn gaussian(py: Python<'_>, rows: i64, cols: i64, std: f64, seed: u64) -> PyResult<PyTensor> {
    run(py, move || Ok(init::gaussian(rows, cols, std, seed)?.f_to_kind(Kind::Float)?)).map(PyTensor)
}

/// P0 diag(lam0): T-LoRA's frozen product (U's frozen block is its negative).
#[pyfunction]
fn frozen_block(py: Python<'_>, p0: PyTensor, lam0: PyTensor) -> PyResult<PyTensor> {
    let (p0, lam0) = (p0.0, lam0.0);
    run(py, move || {
        kernel::check_device(&p0, "P0")?;
        kernel::frozen_block(&p0, &lam0)
    })
    .map(PyTensor)
}

/// (D, U): the operands at full rank in `dtype`, fresh, or written into the buffers `d_buf` and
/// `u_buf` (T-LoRA; `write_frozen`: also write the frozen block).
#[pyfunction]
#[pyo3(signature = (factors, frozen, dtype, d_buf=None, u_buf=None, write_frozen=true))]
fn lowrank_operands(
    py: Python<'_>,
    factors: Vec<PyTensor>,
    frozen: Option<PyTensor>,
    dtype: &str,
    d_buf: Option<PyTensor>,
    u_buf: Option<PyTensor>,
    write_frozen: bool,
) -> PyResult<(PyTensor, PyTensor)> {
    let (factors, nf) = (owned(factors), frozen.map(|t| t.0));
    let bufs = match (d_buf, u_buf) {
        (Some(d), Some(u)) => Some((d.0, u.0)),
        (None, None) => None,
        _ => return Err(tlora_error("ConfigError", "pass both d_buf and u_buf, or neither".into())),
    };
    let dtype = dtype.to_string();
    let ops = run(py, move || {
        let kind = kernel::compute_kind(&dtype)?;
        let scratch = bufs.as_ref().map(|(d, u)| kernel::Scratch { d, u, write_frozen });
        kernel::lowrank_operands(&kernel::Factors::from_slice(&factors)?, nf.as_ref(), kind, scratch)
    })?;
    Ok((PyTensor(ops.d), PyTensor(ops.u)))
}

/// (delta, h): delta = ((x D^T) * mask) U^T, or None when it was added into `acc` in place (the
/// base layer's output, same rows); h is what `lowrank_backward` needs.
#[pyfunction]
#[pyo3(signature = (x, d, u, mask=None, acc=None))]
fn lowrank_forward(
    py: Python<'_>,
    x: PyTensor,
    d: PyTensor,
    u: PyTensor,
    mask: Option<PyTensor>,
    acc: Option<PyTensor>,
) -> PyResult<(Option<PyTensor>, PyTensor)> {
    let (x, ops, mask, acc) = (x.0, kernel::Operands { d: d.0, u: u.0 }, mask.map(|t| t.0), acc.map(|t| t.0));
    let (delta, h) = run(py, move || kernel::lowrank_forward(&x, &ops, mask.as_ref(), acc.as_ref()))?;
    Ok((delta.map(PyTensor), PyTensor(h)))
}

type Grads4 = (Option<PyTensor>, Option<PyTensor>, Option<PyTensor>, Option<PyTensor>);

/// Gradients (input, factor 0, 1, 2) of `lowrank_forward`; `needs` says which to compute.
#[pyfunction]
#[pyo3(signature = (grad, x, h, d, u, mask, factors, needs))]
// One Rust parameter per Python parameter (plus the GIL token): the Python signature sets the count.
#[allow(clippy::too_many_arguments)]
fn lowrank_backward(
    py: Python<'_>,
    grad: PyTensor,
    x: PyTensor,
    h: PyTensor,
    d: PyTensor,
    u: PyTensor,
    mask: Option<PyTensor>,
    factors: Vec<PyTensor>,
    needs: [bool; 4],
) -> PyResult<Grads4> {
    let (grad, x, h, factors) = (grad.0, x.0, h.0, owned(factors));
    let (ops, mask) = (kernel::Operands { d: d.0, u: u.0 }, mask.map(|t| t.0));
    let g = run(py, move || kernel::lowrank_backward(&grad, &x, &h, &ops, mask.as_ref(), &kernel::Factors::from_slice(&factors)?, needs))?;
    let [a, b, c] = g.factors;
    Ok((g.input.map(PyTensor), a.map(PyTensor), b.map(PyTensor), c.map(PyTensor)))
}

/// (y, U * M, W_b): the base layer's output with the update folded into its weight,
/// y = x W_b^T + bias, W_b = W + (U * M) D, one folded weight per mask row (float32 and float64).
#[pyfunction]
#[pyo3(signature = (x, weight, bias, d, u, mask=None))]
fn folded_forward(
    py: Python<'_>,
    x: PyTensor,
    weight: PyTensor,
    bias: Option<PyTensor>,
    d: PyTensor,
    u: PyTensor,
    mask: Option<PyTensor>,
) -> PyResult<(PyTensor, PyTensor, PyTensor)> {
    let (x, weight, bias, mask) = (x.0, weight.0, bias.map(|t| t.0), mask.map(|t| t.0));
    let ops = kernel::Operands { d: d.0, u: u.0 };
    let (y, um, wb) = run(py, move || kernel::folded_forward(&x, &weight, bias.as_ref(), &ops, mask.as_ref()))?;
    Ok((PyTensor(y), PyTensor(um), PyTensor(wb)))
}

/// Gradients (input, factor 0, 1, 2) of `folded_forward`; `needs` says which to compute.
#[pyfunction]
#[pyo3(signature = (grad, x, weight, um, kept, d, u, mask, factors, needs))]
// One Rust parameter per Python parameter (plus the GIL token): the Python signature sets the count.
#[allow(clippy::too_many_arguments)]
fn folded_backward(
    py: Python<'_>,
    grad: PyTensor,
    x: PyTensor,
    weight: PyTensor,
    um: PyTensor,
    kept: Option<PyTensor>,
    d: PyTensor,
    u: PyTensor,
    mask: Option<PyTensor>,
    factors: Vec<PyTensor>,
    needs: [bool; 4],
) -> PyResult<Grads4> {
    let (grad, x, weight, um, kept, factors) = (grad.0, x.0, weight.0, um.0, kept.map(|t| t.0), owned(factors));
    let (ops, mask) = (kernel::Operands { d: d.0, u: u.0 }, mask.map(|t| t.0));
    let g = run(py, move || {
        let f = kernel::Factors::from_slice(&factors)?;
        kernel::folded_backward(&grad, &x, &weight, &um, kept.as_ref(), &ops, mask.as_ref(), &f, needs)
    })?;
    let [a, b, c] = g.factors;
    Ok((g.input.map(PyTensor), a.map(PyTensor), b.map(PyTensor), c.map(PyTensor)))
}

/// How a training call of `tokens` tokens per folded weight runs: None factored
/// (`lowrank_forward`); True / False folded (`folded_forward`), keeping the folded weights for the
/// backward or not.
#[pyfunction]
fn fold_plan(tokens: i64, in_features: i64, out_features: i64) -> Option<bool> {
    kernel::fold_plan(tokens, in_features, out_features)
}

/// The dense weight update (out x in) at one rank (None: full rank).
#[pyfunction]
#[pyo3(signature = (factors, rank, scale))]
fn dense_update(py: Python<'_>, factors: Vec<PyTensor>, rank: Option<i64>, scale: f64) -> PyResult<PyTensor> {
    let factors = owned(factors);
    run(py, move || kernel::dense_update(&kernel::Factors::from_slice(&factors)?, rank, scale)).map(PyTensor)
}

/// The folded weight W + dW at one rank (None: full rank), in float32 (float64 when the weight or
/// the factors are).
#[pyfunction]
#[pyo3(signature = (weight, factors, rank, scale))]
fn fold_weight(py: Python<'_>, weight: PyTensor, factors: Vec<PyTensor>, rank: Option<i64>, scale: f64) -> PyResult<PyTensor> {
    let (weight, factors) = (weight.0, owned(factors));
    run(py, move || kernel::fold_weight(&weight, &kernel::Factors::from_slice(&factors)?, rank, scale)).map(PyTensor)
}

/// Writes tensors and string metadata to a safetensors file, atomically.
#[pyfunction]
fn save_file(py: Python<'_>, path: PathBuf, tensors: Vec<(String, PyTensor)>, metadata: HashMap<String, String>) -> PyResult<()> {
    let tensors: Vec<(String, Tensor)> = tensors.into_iter().map(|(n, t)| (n, t.0)).collect();
    run(py, move || format::save_file(&path, &tensors, &metadata))
}

/// [`format::FileContents`] with the tensors wrapped for Python.
type PyFileContents = (Vec<(String, PyTensor)>, HashMap<String, String>);

/// Reads a safetensors file: ([(name, tensor)] in file order, metadata).
#[pyfunction]
fn load_file(py: Python<'_>, path: PathBuf) -> PyResult<PyFileContents> {
    let (tensors, meta) = run(py, move || format::load_file(&path))?;
    Ok((tensors.into_iter().map(|(n, t)| (n, PyTensor(t))).collect(), meta))
}

/// Maps an error of `format::write_atomic` to OSError: MissingFileError (a FileNotFoundError) when the folder is missing.
fn to_os_error(err: anyhow::Error) -> PyErr {
    let msg = format!("{err:#}");
    let not_found = err.downcast_ref::<format::MissingFolder>().is_some()
        || err.root_cause().downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::NotFound);
    if not_found {
        tlora_error("MissingFileError", msg)
    } else {
        PyOSError::new_err(msg)
    }
}

/// Writes `data` to `path` atomically (temporary file in the same folder, fsync, rename, fsync of
/// the folder): Python's one atomic writer.
#[pyfunction]
fn write_atomic(py: Python<'_>, path: PathBuf, data: &[u8]) -> PyResult<()> {
    py.allow_threads(|| format::write_atomic(&path, data)).map_err(to_os_error)
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    // Panics are caught and raised as Python exceptions with their message (see `run`); the
    // default hook would also print them to stderr.
    std::panic::set_hook(Box::new(|_| {}));
    m.add_function(wrap_pyfunction!(rank_schedule, m)?)?;
    m.add_function(wrap_pyfunction!(orthogonal_init, m)?)?;
    m.add_function(wrap_pyfunction!(gaussian, m)?)?;
    m.add_function(wrap_pyfunction!(frozen_block, m)?)?;
    m.add_function(wrap_pyfunction!(lowrank_operands, m)?)?;
    m.add_function(wrap_pyfunction!(lowrank_forward, m)?)?;
    m.add_function(wrap_pyfunction!(lowrank_backward, m)?)?;
    m.add_function(wrap_pyfunction!(folded_forward, m)?)?;
    m.add_function(wrap_pyfunction!(folded_backward, m)?)?;
    m.add_function(wrap_pyfunction!(fold_plan, m)?)?;
    m.add_function(wrap_pyfunction!(dense_update, m)?)?;
    m.add_function(wrap_pyfunction!(fold_weight, m)?)?;
    m.add_function(wrap_pyfunction!(save_file, m)?)?;
    m.add_function(wrap_pyfunction!(load_file, m)?)?;
    m.add_function(wrap_pyfunction!(write_atomic, m)?)?;
    Ok(())
}
