//! Bindings of the CUDA path (`ferroquant_core::cuda::device`). The Python layer
//! (`ferroquant/cuda.py`) checks tensors (device, dtype, shape, contiguity) with torch and passes
//! raw device addresses, sizes and `torch.cuda.current_stream().cuda_stream`; outputs and the
//! workspace are torch tensors it allocated. Every entry point raises RuntimeError when CUDA is
//! missing (never a panic), ValueError / HessianNotPositiveDefiniteError exactly as the CPU path.

use fq::cuda::device::{self, ActDtype, CudaError, HessianAdd, SolveArgs};
use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::{
    damping_arg, f32_py, f32s_py, gptq_options_arg, group_size_arg, guarded, positive_usize,
    spec_arg, to_py_err, value_err,
};
use ferroquant_core as fq;

fn cuda_err(e: CudaError) -> PyErr {
    match e {
        CudaError::Core(e) => to_py_err(e),
        other => PyRuntimeError::new_err(other.to_string()),
    }
}

/// The RuntimeError of a machine without CUDA (raised after the pure argument checks, so
/// those are the same everywhere).
fn require() -> PyResult<()> {
    match fq::cuda::unavailable_reason() {
        None => Ok(()),
        Some(r) => Err(PyRuntimeError::new_err(format!(
            "CUDA is not available: {r}"
        ))),
    }
}

fn addr(arg: &str, v: u64) -> PyResult<u64> {
    if v == 0 {
        return Err(value_err(format!("{arg}: null device address")));
    }
    Ok(v)
}

fn count(arg: &str, v: i64) -> PyResult<usize> {
    usize::try_from(v).map_err(|_| value_err(format!("{arg} must be >= 0 (got {v})")))
}

/// True when the CUDA path can run (driver, CUDA 13 cuBLAS/cuSOLVER/NVRTC, a context on GPU 0).
#[pyfunction]
fn cuda_available() -> bool {
    fq::cuda::available()
}

/// Why the CUDA path cannot run here, or None.
#[pyfunction]
fn cuda_unavailable_reason() -> Option<String> {
    fq::cuda::unavailable_reason()
}

#[pyfunction]
fn cuda_device_name(py: Python<'_>, device: i64) -> PyResult<String> {
    guarded("cuda_device_name", || {
        require()?;
        let d = count("device", device)?;
        py.detach(|| device::device_name(d)).map_err(cuda_err)
    })
}

/// `H = (n_old/n_new) H + (2/n_new) XᵀX` on the GPU; `samples` = n_old, `batch` = index of this
/// batch (error messages), `flag` = 8 bytes of device scratch.
#[pyfunction]
#[pyo3(signature = (h, n, x, rows, dtype, samples, batch, flag, stream, device))]
#[allow(clippy::too_many_arguments)]
fn cuda_hessian_add(
    py: Python<'_>,
    h: u64,
    n: i64,
    x: u64,
    rows: i64,
    dtype: &str,
    samples: u64,
    batch: u64,
    flag: u64,
    stream: u64,
    device: i64,
) -> PyResult<()> {
    guarded("cuda_hessian_add", || {
        let dtype = match dtype {
            "float32" => ActDtype::F32,
            "float16" => ActDtype::F16,
            "bfloat16" => ActDtype::BF16,
            other => {
                return Err(value_err(format!(
                    "dtype must be 'float32', 'float16' or 'bfloat16' (got '{other}')"
                )))
            }
        };
        let a = HessianAdd {
            h: addr("h", h)?,
            n: positive_usize("n", n)?,
            x: addr("x", x)?,
            rows: count("rows", rows)?,
            dtype,
            samples,
            batch,
            flag: addr("flag", flag)?,
            stream,
            ordinal: count("device", device)?,
        };
        require()?;
        py.detach(|| device::hessian_add(&a)).map_err(cuda_err)
    })
}

#[pyfunction]
fn cuda_gptq_workspace_bytes(py: Python<'_>, rows: i64, cols: i64, device: i64) -> PyResult<usize> {
    guarded("cuda_gptq_workspace_bytes", || {
        let (r, c, d) = (
            positive_usize("rows", rows)?,
            positive_usize("cols", cols)?,
            count("device", device)?,
        );
        require()?;
        py.detach(|| device::solve_workspace_bytes(r, c, d))
            .map_err(cuda_err)
    })
}

/// One layer's GPTQ solve on the GPU, writing codes/scales/zeros/dequantized in place; returns
/// loss, damp_frac, damp_attempts, dead, perm (list or None), g_idx (list), n_groups.
#[pyfunction]
#[pyo3(signature = (
    weight, hessian, codes, scales, zeros, dequantized, workspace, workspace_bytes, rows, cols,
    stream, device, *, bits=4, symmetric=true, group_size=-1, act_order=false,
    static_groups=false, block_size=128, damp_percent=0.01, damp_growth=2.0, damp_max=1.0,
    observer="minmax", scale_dtype="float32"
))]
#[allow(clippy::too_many_arguments)]
fn cuda_gptq_solve<'py>(
    py: Python<'py>,
    weight: u64,
    hessian: u64,
    codes: u64,
    scales: u64,
    zeros: u64,
    dequantized: u64,
    workspace: u64,
    workspace_bytes: i64,
    rows: i64,
    cols: i64,
    stream: u64,
    device: i64,
    bits: i64,
    symmetric: bool,
    group_size: i64,
    act_order: bool,
    static_groups: bool,
    block_size: i64,
    damp_percent: f64,
    damp_growth: f64,
    damp_max: f64,
    observer: &str,
    scale_dtype: &str,
) -> PyResult<Bound<'py, PyDict>> {
    guarded("cuda_gptq_solve", || {
        let spec = spec_arg(bits, symmetric, observer, 100, 0.8, 2.4, scale_dtype)?;
        let opts = gptq_options_arg(
            spec,
            group_size,
            act_order,
            static_groups,
            block_size,
            damp_percent,
            damp_growth,
            damp_max,
        )?;
        let args = SolveArgs {
            weight: addr("weight", weight)?,
            hessian: addr("hessian", hessian)?,
            codes: addr("codes", codes)?,
            scales: addr("scales", scales)?,
            zeros: addr("zeros", zeros)?,
            dequantized: addr("dequantized", dequantized)?,
            workspace: addr("workspace", workspace)?,
            workspace_bytes: count("workspace_bytes", workspace_bytes)?,
            rows: positive_usize("rows", rows)?,
            cols: positive_usize("cols", cols)?,
            stream,
            ordinal: count("device", device)?,
        };
        // The CUDA path's own limitation (MSE observer) is an argument error too.
        fq::cuda::plan::check_observer(&opts.spec).map_err(to_py_err)?;
        require()?;
        let r = py
            .detach(|| device::gptq_solve(&args, &opts))
            .map_err(cuda_err)?;
        let d = PyDict::new(py);
        d.set_item("loss", r.loss)?;
        d.set_item("damp_frac", f32_py(r.damp_frac))?;
        d.set_item("damp_attempts", f32s_py(&r.damp_attempts))?;
        d.set_item("dead", r.dead)?;
        d.set_item("perm", r.perm)?;
        d.set_item("g_idx", r.g_idx)?;
        d.set_item("n_groups", r.n_groups)?;
        Ok(d)
    })
}

/// The option checks of `cuda_gptq_solve` alone (no CUDA needed): the same ValueErrors as the
/// CPU solver, plus the CUDA path's MSE limitation.
#[pyfunction]
#[pyo3(signature = (
    *, bits=4, symmetric=true, group_size=-1, block_size=128, damp_percent=0.01, damp_growth=2.0,
    damp_max=1.0, observer="minmax", scale_dtype="float32"
))]
#[allow(clippy::too_many_arguments)]
fn cuda_check_options(
    bits: i64,
    symmetric: bool,
    group_size: i64,
    block_size: i64,
    damp_percent: f64,
    damp_growth: f64,
    damp_max: f64,
    observer: &str,
    scale_dtype: &str,
) -> PyResult<()> {
    guarded("cuda_check_options", || {
        let spec = spec_arg(bits, symmetric, observer, 100, 0.8, 2.4, scale_dtype)?;
        group_size_arg(group_size)?;
        positive_usize("block_size", block_size)?;
        damping_arg(damp_percent, damp_growth, damp_max)?;
        fq::cuda::plan::check_observer(&spec).map_err(to_py_err)
    })
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(cuda_available, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_unavailable_reason, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_device_name, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_hessian_add, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_gptq_workspace_bytes, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_gptq_solve, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_check_options, m)?)?;
    Ok(())
}
