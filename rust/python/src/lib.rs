//! PyO3 bindings for ferroquant-core, exposed as `ferroquant._core`.
//!
//! Deliberately thin: argument checks with messages that name the argument, zero-copy reads of
//! C-contiguous numpy arrays, the GIL released around every computation, core errors mapped to
//! Python exceptions, and every entry point wrapped in `catch_unwind` so a Rust panic surfaces as
//! `RuntimeError("ferroquant internal error in <fn>: ...")` instead of aborting the interpreter.
//! No arithmetic lives here.

mod cuda;
mod observer;

use std::any::Any;
use std::collections::BTreeMap;
use std::fmt::Display;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use ferroquant_core as fq;
use fq::gptq::{GptqOptions, GptqResult};
use fq::hessian::Activations;
use fq::io::DType;
use fq::linalg::{DampingPolicy, Factorization};
use fq::quantizer::{Observer, QuantSpec, ScaleDtype};
use fq::Error;
use half::slice::HalfBitsSliceExt;
use numpy::ndarray::{Array1, Array2};
use numpy::{
    Element, IntoPyArray, PyArray1, PyArray2, PyArrayDescrMethods, PyArrayMethods,
    PyReadonlyArray2, PyUntypedArray, PyUntypedArrayMethods,
};
use pyo3::create_exception;
use pyo3::exceptions::{PyOSError, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;

create_exception!(
    ferroquant._core,
    HessianNotPositiveDefiniteError,
    PyRuntimeError,
    "The damped Hessian stayed non positive-definite after every damping step; the message lists the damping fractions tried."
);

// ---------------------------------------------------------------------------------------------
// Errors, panics, threads
// ---------------------------------------------------------------------------------------------

fn to_py_err(e: Error) -> PyErr {
    match e {
        Error::InvalidArgument(m) | Error::NonFinite(m) => PyValueError::new_err(m),
        Error::NotPositiveDefinite(m) => HessianNotPositiveDefiniteError::new_err(m),
        Error::Io(m) => PyOSError::new_err(m),
    }
}

fn value_err(msg: impl Into<String>) -> PyErr {
    PyValueError::new_err(msg.into())
}

/// A core result whose size disagrees with what the core documents is a bug, not user error.
fn internal(func: &str, what: impl Display) -> PyErr {
    PyRuntimeError::new_err(format!("ferroquant internal error in {func}: {what}"))
}

fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic with a non-string payload".to_string()
    }
}

/// Runs an entry point, turning a Rust panic into a `RuntimeError` naming the function.
/// `AssertUnwindSafe` is sound here: after a panic nothing the closure touched is reused except
/// Python objects, whose state PyO3 keeps consistent.
fn guarded<T>(func: &str, f: impl FnOnce() -> PyResult<T>) -> PyResult<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(payload) => Err(internal(func, panic_message(&*payload))),
    }
}

/// Pool installed by `set_num_threads`; `None` = rayon's global pool (RAYON_NUM_THREADS).
static POOL: RwLock<Option<Arc<rayon::ThreadPool>>> = RwLock::new(None);

fn current_pool() -> Option<Arc<rayon::ThreadPool>> {
    match POOL.read() {
        Ok(g) => g.clone(),
        Err(poisoned) => poisoned.into_inner().clone(),
    }
}

/// Runs `f` without the GIL, inside the configured thread pool.
fn compute<T: Send>(py: Python<'_>, f: impl FnOnce() -> T + Send) -> T {
    py.detach(|| match current_pool() {
        Some(pool) => pool.install(f),
        None => f(),
    })
}

// ---------------------------------------------------------------------------------------------
// Argument helpers
// ---------------------------------------------------------------------------------------------

fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "?".to_string())
}

fn as_ndarray<'a, 'py>(
    obj: &'a Bound<'py, PyAny>,
    arg: &str,
    expect: &str,
) -> PyResult<&'a Bound<'py, PyUntypedArray>> {
    obj.cast::<PyUntypedArray>().map_err(|_| {
        PyTypeError::new_err(format!(
            "{arg}: expected a numpy.ndarray ({expect}), got {}",
            type_name(obj)
        ))
    })
}

fn shape_str(shape: &[usize]) -> String {
    let parts: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    format!("[{}]", parts.join(", "))
}

/// A read-only, zero-copy view of a 2-D C-contiguous array of element type `T`.
/// `dtype` is the numpy name used in messages.
fn array2<'py, T: Element>(
    obj: &Bound<'py, PyAny>,
    arg: &str,
    dtype: &str,
) -> PyResult<PyReadonlyArray2<'py, T>> {
    let expect = format!("2-D {dtype}");
    let arr = as_ndarray(obj, arg, &expect)?;
    if arr.ndim() != 2 {
        return Err(value_err(format!(
            "{arg}: expected a 2-D {dtype} array, got {} dimensions (shape {})",
            arr.ndim(),
            shape_str(arr.shape())
        )));
    }
    let typed = arr.cast::<PyArray2<T>>().map_err(|_| {
        value_err(format!(
            "{arg}: expected dtype {dtype}, got {}",
            arr.dtype()
        ))
    })?;
    check_layout(arr, arg)?;
    typed
        .try_readonly()
        .map_err(|e| value_err(format!("{arg}: cannot borrow the array: {e}")))
}

fn check_layout(arr: &Bound<'_, PyUntypedArray>, arg: &str) -> PyResult<()> {
    if !arr.is_c_contiguous() {
        return Err(value_err(format!(
            "{arg}: array must be C-contiguous (row-major); pass numpy.ascontiguousarray(...) or tensor.contiguous()"
        )));
    }
    if !arr.is_aligned() {
        return Err(value_err(format!(
            "{arg}: array data is not aligned for its dtype; pass a copy"
        )));
    }
    Ok(())
}

fn slice<'a, T: Element>(a: &'a PyReadonlyArray2<'_, T>, arg: &str) -> PyResult<&'a [T]> {
    a.as_slice()
        .map_err(|_| value_err(format!("{arg}: array must be C-contiguous and aligned")))
}

fn dims<T: Element>(a: &PyReadonlyArray2<'_, T>) -> (usize, usize) {
    let s = a.shape();
    (s[0], s[1])
}

fn non_empty(arg: &str, shape: (usize, usize)) -> PyResult<()> {
    if shape.0 == 0 || shape.1 == 0 {
        return Err(value_err(format!(
            "{arg}: array is empty (shape [{}, {}])",
            shape.0, shape.1
        )));
    }
    Ok(())
}

fn bits_arg(bits: i64) -> PyResult<u8> {
    match bits {
        2 | 3 | 4 | 8 => Ok(bits as u8),
        _ => Err(value_err(format!(
            "bits must be one of 2, 3, 4, 8 (got {bits})"
        ))),
    }
}

fn group_size_arg(group_size: i64) -> PyResult<Option<usize>> {
    match group_size {
        -1 => Ok(None),
        g if g > 0 => Ok(Some(g as usize)),
        g => Err(value_err(format!(
            "group_size must be -1 (one group per row) or a positive integer (got {g})"
        ))),
    }
}

fn positive_usize(arg: &str, v: i64) -> PyResult<usize> {
    if v <= 0 {
        return Err(value_err(format!(
            "{arg} must be a positive integer (got {v})"
        )));
    }
    usize::try_from(v).map_err(|_| value_err(format!("{arg} is too large (got {v})")))
}

fn spec_arg(
    bits: i64,
    symmetric: bool,
    observer: &str,
    mse_grid: i64,
    mse_maxshrink: f64,
    mse_norm: f64,
    scale_dtype: &str,
) -> PyResult<QuantSpec> {
    let bits = bits_arg(bits)?;
    let search = || -> PyResult<(usize, f32)> {
        let grid = positive_usize("mse_grid", mse_grid)?;
        if !(mse_maxshrink > 0.0 && mse_maxshrink <= 1.0) {
            return Err(value_err(format!(
                "mse_maxshrink must be in (0, 1] (got {mse_maxshrink})"
            )));
        }
        Ok((grid, mse_maxshrink as f32))
    };
    let observer = match observer {
        "minmax" => Observer::MinMax,
        "mse" => {
            let (grid, max_shrink) = search()?;
            if !(mse_norm.is_finite() && mse_norm > 0.0) {
                return Err(value_err(format!(
                    "mse_norm must be a positive finite number (got {mse_norm})"
                )));
            }
            Observer::Mse {
                grid,
                max_shrink,
                norm: mse_norm as f32,
            }
        }
        // squared error weighted by diag(H): the norm is 2 by construction
        "hessian_mse" => {
            let (grid, max_shrink) = search()?;
            Observer::HessianMse { grid, max_shrink }
        }
        other => {
            return Err(value_err(format!(
                "observer must be 'minmax', 'mse' or 'hessian_mse' (got '{other}')"
            )))
        }
    };
    let spec = QuantSpec {
        bits,
        symmetric,
        observer,
        scale_dtype: ScaleDtype::from_name(scale_dtype).map_err(to_py_err)?,
    };
    spec.validate().map_err(to_py_err)?;
    Ok(spec)
}

fn damping_arg(damp_percent: f64, damp_growth: f64, damp_max: f64) -> PyResult<DampingPolicy> {
    // These bounds keep the escalation loop finite; the core decides everything else.
    if !(damp_percent.is_finite() && damp_percent > 0.0) {
        return Err(value_err(format!(
            "damp_percent must be a positive finite number (got {damp_percent})"
        )));
    }
    if !(damp_growth.is_finite() && damp_growth > 1.0) {
        return Err(value_err(format!(
            "damp_growth must be a finite number > 1 (got {damp_growth})"
        )));
    }
    if !(damp_max.is_finite() && damp_max >= damp_percent) {
        return Err(value_err(format!(
            "damp_max must be finite and >= damp_percent ({damp_percent}) (got {damp_max})"
        )));
    }
    Ok(DampingPolicy {
        initial: damp_percent as f32,
        growth: damp_growth as f32,
        max: damp_max as f32,
    })
}

/// The solver options from the keyword arguments the CPU and CUDA bindings share.
#[allow(clippy::too_many_arguments)]
fn gptq_options_arg(
    spec: QuantSpec,
    group_size: i64,
    act_order: bool,
    static_groups: bool,
    block_size: i64,
    damp_percent: f64,
    damp_growth: f64,
    damp_max: f64,
) -> PyResult<GptqOptions> {
    Ok(GptqOptions {
        spec,
        group_size: group_size_arg(group_size)?,
        act_order,
        static_groups,
        group_aware: false,
        block_size: positive_usize("block_size", block_size)?,
        damping: damping_arg(damp_percent, damp_growth, damp_max)?,
    })
}

/// `hessian` as a square float32 matrix; `cols` (when given) is the weight's column count.
fn hessian_arg<'py>(
    obj: &Bound<'py, PyAny>,
    cols: Option<usize>,
) -> PyResult<PyReadonlyArray2<'py, f32>> {
    let h = array2::<f32>(obj, "hessian", "float32")?;
    let (a, b) = dims(&h);
    if a != b {
        return Err(value_err(format!(
            "hessian: expected a square matrix, got shape [{a}, {b}]"
        )));
    }
    if let Some(c) = cols {
        if a != c {
            return Err(value_err(format!(
                "hessian: expected shape [{c}, {c}] to match the weight's {c} input columns, got [{a}, {b}]"
            )));
        }
    }
    if a == 0 {
        return Err(value_err("hessian: array is empty (shape [0, 0])"));
    }
    Ok(h)
}

fn out2<'py, T: Element>(
    py: Python<'py>,
    func: &str,
    v: Vec<T>,
    rows: usize,
    cols: usize,
) -> PyResult<Bound<'py, PyArray2<T>>> {
    let len = v.len();
    Array2::from_shape_vec((rows, cols), v)
        .map(|a| a.into_pyarray(py))
        .map_err(|_| {
            internal(
                func,
                format!("result has {len} elements, expected {rows} x {cols}"),
            )
        })
}

/// An f32 as the Python float with the same shortest decimal form (0.01f32 -> 0.01, not
/// 0.009999999776), so reported damping fractions read as they were given.
fn f32_py(x: f32) -> f64 {
    x.to_string().parse().unwrap_or(x as f64)
}

fn f32s_py(xs: &[f32]) -> Vec<f64> {
    xs.iter().map(|&x| f32_py(x)).collect()
}

fn out1<'py, T: Element>(py: Python<'py>, v: Vec<T>) -> Bound<'py, PyArray1<T>> {
    Array1::from_vec(v).into_pyarray(py)
}

// ---------------------------------------------------------------------------------------------
// GPTAQ cross term

#[pyclass(name = "CrossAccumulator", module = "ferroquant._core")]
struct PyCrossAccumulator {
    inner: fq::dxxt::CrossAccumulator,
}

#[pymethods]
impl PyCrossAccumulator {
    #[new]
    fn new(columns: i64) -> PyResult<Self> {
        guarded("CrossAccumulator.__init__", || {
            let n = positive_usize("columns", columns)?;
            Ok(Self {
                inner: fq::dxxt::CrossAccumulator::new(n).map_err(to_py_err)?,
            })
        })
    }

    /// `float_rows`, `quant_rows`: float32 `[tokens, columns]`, row t the same token.
    fn add_batch(
        &mut self,
        py: Python<'_>,
        float_rows: &Bound<'_, PyAny>,
        quant_rows: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        guarded("CrossAccumulator.add_batch", || {
            let f = array2::<f32>(float_rows, "float_rows", "float32")?;
            let q = array2::<f32>(quant_rows, "quant_rows", "float32")?;
            let (n, (rf, cf), (rq, cq)) = (self.inner.columns(), dims(&f), dims(&q));
            if cf != n || cq != n || rf != rq {
                return Err(value_err(format!(
                    "float_rows {rf}x{cf} and quant_rows {rq}x{cq}: expected the same [tokens, {n}]"
                )));
            }
            let (fs, qs) = (slice(&f, "float_rows")?, slice(&q, "quant_rows")?);
            let inner = &mut self.inner;
            compute(py, move || inner.add_batch(fs, qs, rf)).map_err(to_py_err)
        })
    }

    fn dxxt<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArray2<f32>>> {
        guarded("CrossAccumulator.dxxt", || {
            let n = self.inner.columns();
            let inner = &self.inner;
            let d = compute(py, move || inner.dxxt());
            out2(py, "CrossAccumulator.dxxt", d, n, n)
        })
    }

    #[getter]
    fn samples(&self) -> u64 {
        self.inner.samples()
    }

    #[getter]
    fn columns(&self) -> usize {
        self.inner.columns()
    }
}

// ---------------------------------------------------------------------------------------------
// Hessian accumulation
// ---------------------------------------------------------------------------------------------

/// Streaming `H = (2/n) Σ x xᵀ` for one layer. See `_core.pyi` for the Python documentation.
#[pyclass(name = "HessianAccumulator", module = "ferroquant._core")]
struct PyHessianAccumulator {
    inner: fq::hessian::HessianAccumulator,
}

enum HalfKind {
    Bf16,
    F16,
}

/// The activation batch as one of the element types the core reads.
enum Batch<'py> {
    F32(PyReadonlyArray2<'py, f32>),
    F16(PyReadonlyArray2<'py, half::f16>),
    U16(PyReadonlyArray2<'py, u16>, HalfKind),
    I16(PyReadonlyArray2<'py, i16>, HalfKind),
}

impl Batch<'_> {
    fn activations(&self) -> PyResult<Activations<'_>> {
        Ok(match self {
            Batch::F32(a) => Activations::F32(slice(a, "x")?),
            Batch::F16(a) => Activations::F16(slice(a, "x")?),
            Batch::U16(a, kind) => bits16(slice(a, "x")?, kind),
            Batch::I16(a, kind) => bits16(bytemuck::cast_slice::<i16, u16>(slice(a, "x")?), kind),
        })
    }
    fn shape(&self) -> (usize, usize) {
        match self {
            Batch::F32(a) => dims(a),
            Batch::F16(a) => dims(a),
            Batch::U16(a, _) => dims(a),
            Batch::I16(a, _) => dims(a),
        }
    }
}

fn bits16<'a>(s: &'a [u16], kind: &HalfKind) -> Activations<'a> {
    match kind {
        HalfKind::Bf16 => Activations::BF16(s.reinterpret_cast::<half::bf16>()),
        HalfKind::F16 => Activations::F16(s.reinterpret_cast::<half::f16>()),
    }
}

/// A batch of `want`-wide activation rows and its row count; a wrong width is an error that
/// says whose width (`owner`) it must match.
fn batch_of_width<'py>(
    x: &Bound<'py, PyAny>,
    dtype: Option<&str>,
    want: usize,
    owner: &str,
) -> PyResult<(Batch<'py>, usize)> {
    let batch = batch_arg(x, dtype)?;
    let (rows, n) = batch.shape();
    if n != want {
        return Err(value_err(format!(
            "x: expected shape [rows, {want}] ({owner}), got [{rows}, {n}]"
        )));
    }
    Ok((batch, rows))
}

fn batch_arg<'py>(x: &Bound<'py, PyAny>, dtype: Option<&str>) -> PyResult<Batch<'py>> {
    const EXPECT: &str =
        "float32 or float16, or uint16/int16 bit patterns with dtype='bf16' or 'f16'";
    let arr = as_ndarray(x, "x", EXPECT)?;
    if arr.ndim() != 2 {
        return Err(value_err(format!(
            "x: expected a 2-D array [rows, in_features], got shape {} (flatten leading dimensions first)",
            shape_str(arr.shape())
        )));
    }
    let f32_ = arr.cast::<PyArray2<f32>>().is_ok();
    let f16_ = arr.cast::<PyArray2<half::f16>>().is_ok();
    let u16_ = arr.cast::<PyArray2<u16>>().is_ok();
    let i16_ = arr.cast::<PyArray2<i16>>().is_ok();
    let got = arr.dtype();
    let wrong = |want: &str| {
        value_err(format!(
            "x: dtype='{want}' needs {}, got a {got} array",
            match want {
                "bf16" => "a uint16 or int16 array of bfloat16 bit patterns",
                "f16" => "a float16 array or a uint16/int16 array of float16 bit patterns",
                _ => "a float32 array",
            }
        ))
    };
    let kind = match dtype {
        None => None,
        Some("bf16" | "bfloat16") => Some("bf16"),
        Some("f16" | "fp16" | "float16") => Some("f16"),
        Some("f32" | "fp32" | "float32") => Some("f32"),
        Some(other) => {
            return Err(value_err(format!(
                "x: unknown dtype '{other}'; use 'bf16', 'f16' or 'f32' (or None)"
            )))
        }
    };
    let batch = match kind {
        None if f32_ => Batch::F32(array2(x, "x", "float32")?),
        None if f16_ => Batch::F16(array2(x, "x", "float16")?),
        None if u16_ || i16_ => {
            return Err(value_err(format!(
                "x: a {got} array holds raw 16-bit patterns; say which with dtype='bf16' or dtype='f16'"
            )))
        }
        None => return Err(value_err(format!("x: expected {EXPECT}, got dtype {got}"))),
        Some("f32") if f32_ => Batch::F32(array2(x, "x", "float32")?),
        Some("f16") if f16_ => Batch::F16(array2(x, "x", "float16")?),
        Some(k @ ("bf16" | "f16")) if u16_ || i16_ => {
            let hk = if k == "bf16" { HalfKind::Bf16 } else { HalfKind::F16 };
            if u16_ {
                Batch::U16(array2(x, "x", "uint16")?, hk)
            } else {
                Batch::I16(array2(x, "x", "int16")?, hk)
            }
        }
        Some(k) => return Err(wrong(k)),
    };
    Ok(batch)
}

#[pymethods]
impl PyHessianAccumulator {
    #[new]
    fn new(columns: i64) -> PyResult<Self> {
        guarded("HessianAccumulator.__init__", || {
            let n = positive_usize("columns", columns)?;
            Ok(Self {
                inner: fq::hessian::HessianAccumulator::new(n).map_err(to_py_err)?,
            })
        })
    }

    #[pyo3(signature = (x, dtype=None))]
    fn add_batch(
        &mut self,
        py: Python<'_>,
        x: &Bound<'_, PyAny>,
        dtype: Option<&str>,
    ) -> PyResult<()> {
        guarded("HessianAccumulator.add_batch", || {
            let (batch, rows) = batch_of_width(
                x,
                dtype,
                self.inner.columns(),
                "the accumulator's in_features",
            )?;
            let acts = batch.activations()?;
            let inner = &mut self.inner;
            compute(py, move || inner.add_batch(acts, rows)).map_err(to_py_err)
        })
    }

    fn hessian<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArray2<f32>>> {
        guarded("HessianAccumulator.hessian", || {
            let n = self.inner.columns();
            let inner = &self.inner;
            let h = compute(py, move || inner.hessian());
            out2(py, "HessianAccumulator.hessian", h, n, n)
        })
    }

    fn merge(&mut self, py: Python<'_>, other: &Bound<'_, PyHessianAccumulator>) -> PyResult<()> {
        guarded("HessianAccumulator.merge", || {
            let other = other
                .try_borrow()
                .map_err(|_| value_err("other: cannot merge an accumulator into itself (or one in use by another thread)"))?;
            if other.inner.columns() != self.inner.columns() {
                return Err(value_err(format!(
                    "other: accumulators have different in_features ({} here, {} in other)",
                    self.inner.columns(),
                    other.inner.columns()
                )));
            }
            let (inner, o) = (&mut self.inner, &other.inner);
            compute(py, move || inner.merge(o)).map_err(to_py_err)
        })
    }

    #[getter]
    fn samples(&self) -> u64 {
        self.inner.samples()
    }

    #[getter]
    fn columns(&self) -> usize {
        self.inner.columns()
    }

    fn __repr__(&self) -> String {
        format!(
            "HessianAccumulator(columns={}, samples={})",
            self.inner.columns(),
            self.inner.samples()
        )
    }
}

// ---------------------------------------------------------------------------------------------
// Damped factorisation
// ---------------------------------------------------------------------------------------------

fn factorization_dict(d: &Bound<'_, PyDict>, f: &Factorization) -> PyResult<()> {
    d.set_item("damp_frac", f32_py(f.damp_frac))?;
    d.set_item("damp_value", f32_py(f.damp_value))?;
    d.set_item("attempts", f32s_py(&f.attempts))?;
    d.set_item("dead", f.dead.clone())?;
    Ok(())
}

#[pyfunction]
#[pyo3(signature = (hessian, *, damp_percent=0.01, damp_growth=2.0, damp_max=1.0))]
fn factor_damped<'py>(
    py: Python<'py>,
    hessian: &Bound<'py, PyAny>,
    damp_percent: f64,
    damp_growth: f64,
    damp_max: f64,
) -> PyResult<Bound<'py, PyDict>> {
    guarded("factor_damped", || {
        let policy = damping_arg(damp_percent, damp_growth, damp_max)?;
        let h = hessian_arg(hessian, None)?;
        let n = dims(&h).0;
        let hs = slice(&h, "hessian")?;
        let f = compute(py, move || fq::linalg::factor_damped(hs, n, policy)).map_err(to_py_err)?;
        let d = PyDict::new(py);
        d.set_item("factor", out2(py, "factor_damped", f.factor.clone(), n, n)?)?;
        factorization_dict(&d, &f)?;
        Ok(d)
    })
}

#[pyfunction]
#[pyo3(signature = (hessian, *, damp_percent=0.01, damp_growth=2.0, damp_max=1.0))]
fn damped_inverse_upper<'py>(
    py: Python<'py>,
    hessian: &Bound<'py, PyAny>,
    damp_percent: f64,
    damp_growth: f64,
    damp_max: f64,
) -> PyResult<Bound<'py, PyDict>> {
    guarded("damped_inverse_upper", || {
        let policy = damping_arg(damp_percent, damp_growth, damp_max)?;
        let h = hessian_arg(hessian, None)?;
        let n = dims(&h).0;
        let hs = slice(&h, "hessian")?;
        let (upper, f) = compute(py, move || fq::linalg::damped_inverse_upper(hs, n, policy))
            .map_err(to_py_err)?;
        let d = PyDict::new(py);
        d.set_item("upper", out2(py, "damped_inverse_upper", upper, n, n)?)?;
        factorization_dict(&d, &f)?;
        Ok(d)
    })
}

// ---------------------------------------------------------------------------------------------
// Quantization
// ---------------------------------------------------------------------------------------------

fn result_dict<'py>(py: Python<'py>, func: &str, r: GptqResult) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    let (rows, cols, ng) = (r.rows, r.cols, r.n_groups);
    d.set_item("codes", out2(py, func, r.codes, rows, cols)?)?;
    d.set_item("scales", out2(py, func, r.scales, rows, ng)?)?;
    d.set_item("zeros", out2(py, func, r.zeros, rows, ng)?)?;
    if r.g_idx.len() != cols {
        return Err(internal(
            func,
            format!("g_idx has {} entries for {cols} columns", r.g_idx.len()),
        ));
    }
    d.set_item("g_idx", out1(py, r.g_idx))?;
    d.set_item("dequantized", out2(py, func, r.dequantized, rows, cols)?)?;
    d.set_item("loss", r.loss)?;
    match r.perm {
        Some(p) => d.set_item(
            "perm",
            out1(py, p.into_iter().map(|i| i as i64).collect::<Vec<i64>>()),
        )?,
        None => d.set_item("perm", py.None())?,
    }
    d.set_item("n_groups", ng)?;
    d.set_item("damp_frac", f32_py(r.damp_frac))?;
    d.set_item("damp_attempts", f32s_py(&r.damp_attempts))?;
    d.set_item("dead", r.dead)?;
    Ok(d)
}

#[pyfunction]
#[pyo3(signature = (
    weight, hessian, *, bits=4, symmetric=true, group_size=-1, act_order=false,
    static_groups=false, block_size=128, damp_percent=0.01, damp_growth=2.0, damp_max=1.0,
    observer="minmax", mse_grid=100, mse_maxshrink=0.8, mse_norm=2.4, scale_dtype="float32",
    dxxt=None, gptaq_alpha=0.25, qronos=false, group_aware=false
))]
#[allow(clippy::too_many_arguments)]
fn gptq_quantize<'py>(
    py: Python<'py>,
    weight: &Bound<'py, PyAny>,
    hessian: &Bound<'py, PyAny>,
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
    mse_grid: i64,
    mse_maxshrink: f64,
    mse_norm: f64,
    scale_dtype: &str,
    dxxt: Option<&Bound<'py, PyAny>>,
    gptaq_alpha: f64,
    qronos: bool,
    group_aware: bool,
) -> PyResult<Bound<'py, PyDict>> {
    guarded("gptq_quantize", || {
        let spec = spec_arg(
            bits,
            symmetric,
            observer,
            mse_grid,
            mse_maxshrink,
            mse_norm,
            scale_dtype,
        )?;
        let mut opts = gptq_options_arg(
            spec,
            group_size,
            act_order,
            static_groups,
            block_size,
            damp_percent,
            damp_growth,
            damp_max,
        )?;
        opts.group_aware = group_aware;
        let w = array2::<f32>(weight, "weight", "float32")?;
        let (rows, cols) = dims(&w);
        non_empty("weight", (rows, cols))?;
        let h = hessian_arg(hessian, Some(cols))?;
        let (ws, hs) = (slice(&w, "weight")?, slice(&h, "hessian")?);
        // with the cross term: Qronos or GPTAQ (same shape checks as the Hessian)
        let d = dxxt.map(|d| hessian_arg(d, Some(cols))).transpose()?;
        let ds = d.as_ref().map(|d| slice(d, "dxxt")).transpose()?;
        if qronos && ds.is_none() {
            return Err(PyValueError::new_err(
                "gptq_quantize: qronos=True needs dxxt",
            ));
        }
        let alpha = gptaq_alpha as f32;
        let r = compute(py, move || match ds {
            Some(ds) if qronos => fq::qronos::qronos_quantize(ws, rows, cols, hs, ds, &opts),
            Some(ds) => fq::gptq::gptaq_quantize(ws, rows, cols, hs, ds, alpha, &opts),
            None => fq::gptq::gptq_quantize(ws, rows, cols, hs, &opts),
        })
        .map_err(to_py_err)?;
        result_dict(py, "gptq_quantize", r)
    })
}

#[pyfunction]
#[pyo3(signature = (
    weight, *, bits=4, symmetric=true, group_size=-1, observer="minmax", mse_grid=100,
    mse_maxshrink=0.8, mse_norm=2.4, hessian=None, scale_dtype="float32"
))]
#[allow(clippy::too_many_arguments)]
fn rtn_quantize<'py>(
    py: Python<'py>,
    weight: &Bound<'py, PyAny>,
    bits: i64,
    symmetric: bool,
    group_size: i64,
    observer: &str,
    mse_grid: i64,
    mse_maxshrink: f64,
    mse_norm: f64,
    hessian: Option<&Bound<'py, PyAny>>,
    scale_dtype: &str,
) -> PyResult<Bound<'py, PyDict>> {
    guarded("rtn_quantize", || {
        let spec = spec_arg(
            bits,
            symmetric,
            observer,
            mse_grid,
            mse_maxshrink,
            mse_norm,
            scale_dtype,
        )?;
        let gs = group_size_arg(group_size)?;
        let w = array2::<f32>(weight, "weight", "float32")?;
        let (rows, cols) = dims(&w);
        non_empty("weight", (rows, cols))?;
        let h = hessian.map(|h| hessian_arg(h, Some(cols))).transpose()?;
        let ws = slice(&w, "weight")?;
        let hs = h.as_ref().map(|h| slice(h, "hessian")).transpose()?;
        let r = compute(py, move || {
            fq::gptq::rtn_quantize(ws, rows, cols, hs, &spec, gs)
        })
        .map_err(to_py_err)?;
        result_dict(py, "rtn_quantize", r)
    })
}

// ---------------------------------------------------------------------------------------------
// Packing
// ---------------------------------------------------------------------------------------------

/// Turns a packed buffer into `[len / fixed, fixed]` (`fixed_is_cols`) or `[fixed, len / fixed]`.
fn packed_out<'py, T: Element>(
    py: Python<'py>,
    func: &str,
    v: Vec<T>,
    fixed: usize,
    fixed_is_cols: bool,
) -> PyResult<Bound<'py, PyArray2<T>>> {
    if fixed == 0 || !v.len().is_multiple_of(fixed) {
        return Err(internal(
            func,
            format!("packed length {} is not a multiple of {fixed}", v.len()),
        ));
    }
    let other = v.len() / fixed;
    if fixed_is_cols {
        out2(py, func, v, other, fixed)
    } else {
        out2(py, func, v, fixed, other)
    }
}

/// How a packed int32 array relates to the unpacked `[rows, cols]` codes it holds: which
/// unpacked dimension it keeps as is, and at which end.
#[derive(Clone, Copy)]
enum Packed {
    /// `[packed, rows]`: GPTQ `qweight` (codes packed along the input, stored transposed)
    RowsLast,
    /// `[rows, packed]`: GPTQ `qzeros`, compressed-tensors `weight_packed`
    RowsFirst,
    /// `[packed, cols]`: compressed-tensors `weight_zero_point` (packed along dim 0)
    ColsLast,
}

/// The body every pack binding shares: checks, then `pack(codes, rows, cols, bits)` without the
/// GIL, then the packed buffer shaped as `layout` says.
fn pack_binding<'py, T: Element + Sync>(
    py: Python<'py>,
    func: &str,
    (arg, dtype): (&str, &str),
    codes: &Bound<'py, PyAny>,
    bits: i64,
    layout: Packed,
    pack: impl FnOnce(&[T], usize, usize, u8) -> fq::Result<Vec<i32>> + Send,
) -> PyResult<Bound<'py, PyArray2<i32>>> {
    guarded(func, || {
        let bits = bits_arg(bits)?;
        let c = array2::<T>(codes, arg, dtype)?;
        let (rows, cols) = dims(&c);
        non_empty(arg, (rows, cols))?;
        let cs = slice(&c, arg)?;
        let p = compute(py, move || pack(cs, rows, cols, bits)).map_err(to_py_err)?;
        match layout {
            Packed::RowsLast => packed_out(py, func, p, rows, true),
            Packed::RowsFirst => packed_out(py, func, p, rows, false),
            Packed::ColsLast => packed_out(py, func, p, cols, true),
        }
    })
}

/// The body every unpack binding shares: the packed array's kept dimension (see [`Packed`]) and
/// the caller's `count` give the unpacked `[rows, cols]`; `unpack(packed, rows, cols, bits)`
/// runs without the GIL.
#[allow(clippy::too_many_arguments)]
fn unpack_binding<'py, T: Element>(
    py: Python<'py>,
    func: &str,
    arg: &str,
    packed: &Bound<'py, PyAny>,
    bits: i64,
    (count_name, count): (&str, i64),
    layout: Packed,
    unpack: impl FnOnce(&[i32], usize, usize, u8) -> fq::Result<Vec<T>> + Send,
) -> PyResult<Bound<'py, PyArray2<T>>> {
    guarded(func, || {
        let bits = bits_arg(bits)?;
        let count = positive_usize(count_name, count)?;
        let p = array2::<i32>(packed, arg, "int32")?;
        let (first, last) = dims(&p);
        non_empty(arg, (first, last))?;
        let (rows, cols) = match layout {
            Packed::RowsLast => (last, count),
            Packed::RowsFirst => (first, count),
            Packed::ColsLast => (count, last),
        };
        let ps = slice(&p, arg)?;
        let c = compute(py, move || unpack(ps, rows, cols, bits)).map_err(to_py_err)?;
        out2(py, func, c, rows, cols)
    })
}

#[pyfunction]
fn pack_gptq_qweight<'py>(
    py: Python<'py>,
    codes: &Bound<'py, PyAny>,
    bits: i64,
) -> PyResult<Bound<'py, PyArray2<i32>>> {
    pack_binding(
        py,
        "pack_gptq_qweight",
        ("codes", "uint8"),
        codes,
        bits,
        Packed::RowsLast,
        fq::pack::pack_gptq_qweight,
    )
}

#[pyfunction]
fn unpack_gptq_qweight<'py>(
    py: Python<'py>,
    qweight: &Bound<'py, PyAny>,
    bits: i64,
    in_features: i64,
) -> PyResult<Bound<'py, PyArray2<u8>>> {
    unpack_binding(
        py,
        "unpack_gptq_qweight",
        "qweight",
        qweight,
        bits,
        ("in_features", in_features),
        Packed::RowsLast,
        fq::pack::unpack_gptq_qweight,
    )
}

#[pyfunction]
#[pyo3(signature = (zeros, bits, v1=true))]
fn pack_gptq_qzeros<'py>(
    py: Python<'py>,
    zeros: &Bound<'py, PyAny>,
    bits: i64,
    v1: bool,
) -> PyResult<Bound<'py, PyArray2<i32>>> {
    pack_binding(
        py,
        "pack_gptq_qzeros",
        ("zeros", "int32"),
        zeros,
        bits,
        Packed::RowsFirst,
        move |z: &[i32], ng, out, b| fq::pack::pack_gptq_qzeros(z, ng, out, b, v1),
    )
}

#[pyfunction]
#[pyo3(signature = (qzeros, bits, out_features, v1=true))]
fn unpack_gptq_qzeros<'py>(
    py: Python<'py>,
    qzeros: &Bound<'py, PyAny>,
    bits: i64,
    out_features: i64,
    v1: bool,
) -> PyResult<Bound<'py, PyArray2<i32>>> {
    unpack_binding(
        py,
        "unpack_gptq_qzeros",
        "qzeros",
        qzeros,
        bits,
        ("out_features", out_features),
        Packed::RowsFirst,
        move |q: &[i32], ng, out, b| fq::pack::unpack_gptq_qzeros(q, ng, out, b, v1),
    )
}

#[pyfunction]
fn pack_ct_weight<'py>(
    py: Python<'py>,
    codes: &Bound<'py, PyAny>,
    bits: i64,
) -> PyResult<Bound<'py, PyArray2<i32>>> {
    pack_binding(
        py,
        "pack_ct_weight",
        ("codes", "uint8"),
        codes,
        bits,
        Packed::RowsFirst,
        fq::pack::pack_ct_weight,
    )
}

#[pyfunction]
fn unpack_ct_weight<'py>(
    py: Python<'py>,
    packed: &Bound<'py, PyAny>,
    bits: i64,
    in_features: i64,
) -> PyResult<Bound<'py, PyArray2<u8>>> {
    unpack_binding(
        py,
        "unpack_ct_weight",
        "packed",
        packed,
        bits,
        ("in_features", in_features),
        Packed::RowsFirst,
        fq::pack::unpack_ct_weight,
    )
}

#[pyfunction]
fn pack_ct_zero_point<'py>(
    py: Python<'py>,
    zeros: &Bound<'py, PyAny>,
    bits: i64,
) -> PyResult<Bound<'py, PyArray2<i32>>> {
    pack_binding(
        py,
        "pack_ct_zero_point",
        ("zeros", "uint8"),
        zeros,
        bits,
        Packed::ColsLast,
        fq::pack::pack_ct_zero_point,
    )
}

#[pyfunction]
fn unpack_ct_zero_point<'py>(
    py: Python<'py>,
    packed: &Bound<'py, PyAny>,
    bits: i64,
    out_features: i64,
) -> PyResult<Bound<'py, PyArray2<u8>>> {
    unpack_binding(
        py,
        "unpack_ct_zero_point",
        "packed",
        packed,
        bits,
        ("out_features", out_features),
        Packed::ColsLast,
        fq::pack::unpack_ct_zero_point,
    )
}

// ---------------------------------------------------------------------------------------------
// safetensors
// ---------------------------------------------------------------------------------------------

fn dtype_arg(name: &str, s: &str) -> PyResult<(DType, usize)> {
    Ok(match s {
        "I32" => (DType::I32, 4),
        "I64" => (DType::I64, 8),
        "I8" => (DType::I8, 1),
        "U8" => (DType::U8, 1),
        "F16" => (DType::F16, 2),
        "BF16" => (DType::BF16, 2),
        "F32" => (DType::F32, 4),
        "F8_E4M3" => (DType::F8E4M3, 1),
        other => {
            return Err(value_err(format!(
                "tensor '{name}': unknown safetensors dtype '{other}'; use one of I32, I64, I8, U8, F16, BF16, F32, F8_E4M3"
            )))
        }
    })
}

/// One tensor of the shard being gathered: a borrowed uint8 view of the array's buffer.
struct Pending<'py> {
    name: String,
    dtype: DType,
    shape: Vec<usize>,
    bytes: numpy::PyReadonlyArray1<'py, u8>,
}

/// Checks an item's dtype, byte order and layout and borrows its bytes (no copy).
fn pending_tensor<'py>(
    name: String,
    obj: &Bound<'py, PyAny>,
    dtype: &str,
) -> PyResult<Pending<'py>> {
    let arg = format!("tensor '{name}'");
    let (dt, size) = dtype_arg(&name, dtype)?;
    let arr = as_ndarray(obj, &arg, dtype)?;
    let descr = arr.dtype();
    if descr.itemsize() != size {
        return Err(value_err(format!(
            "{arg}: dtype {dtype} needs {size}-byte elements, got a {descr} array ({}-byte elements)",
            descr.itemsize()
        )));
    }
    let big_endian =
        descr.byteorder() == b'>' || (cfg!(target_endian = "big") && descr.byteorder() == b'=');
    if big_endian {
        return Err(value_err(format!(
            "{arg}: array is big-endian; safetensors stores little-endian data"
        )));
    }
    check_layout(arr, &arg)?;
    let shape = arr.shape().to_vec();
    // A C-contiguous array flattened and viewed as bytes is a zero-copy uint8 view of its buffer.
    let bytes = arr
        .call_method1("reshape", (-1,))?
        .call_method1("view", ("u1",))?;
    let bytes = bytes
        .cast::<PyArray1<u8>>()
        .map_err(|_| internal("write_safetensors", "byte view is not a uint8 array"))?
        .try_readonly()
        .map_err(|e| value_err(format!("{arg}: cannot borrow the array: {e}")))?;
    if bytes.as_slice().is_err() {
        return Err(value_err(format!("{arg}: array must be C-contiguous")));
    }
    Ok(Pending {
        name,
        dtype: dt,
        shape,
        bytes,
    })
}

/// Writes the gathered shard from borrowed slices (GIL released) and drops the borrows.
fn flush_shard(
    py: Python<'_>,
    writer: &mut fq::io::ShardWriter,
    pending: &mut Vec<Pending<'_>>,
) -> PyResult<()> {
    let mut views = Vec::with_capacity(pending.len());
    for p in pending.iter() {
        let data = p
            .bytes
            .as_slice()
            .map_err(|_| internal("write_safetensors", "byte view lost its contiguity"))?;
        views.push(fq::io::TensorView {
            name: &p.name,
            dtype: p.dtype,
            shape: &p.shape,
            data,
        });
    }
    compute(py, || writer.write_shard(&views)).map_err(to_py_err)?;
    pending.clear();
    Ok(())
}

/// `tensors` is any iterable of `(name, array, dtype)`: it is consumed lazily and each shard is
/// written as soon as it is complete, so a generator can produce tensors shard by shard.
#[pyfunction]
#[pyo3(signature = (directory, tensors, *, stem="model", max_shard_bytes=None, metadata=None))]
fn write_safetensors(
    py: Python<'_>,
    directory: PathBuf,
    tensors: &Bound<'_, PyAny>,
    stem: &str,
    max_shard_bytes: Option<u64>,
    metadata: Option<BTreeMap<String, String>>,
) -> PyResult<Vec<PathBuf>> {
    guarded("write_safetensors", || {
        if max_shard_bytes == Some(0) {
            return Err(value_err(
                "max_shard_bytes must be positive (or None for one file)",
            ));
        }
        let items = tensors.try_iter().map_err(|_| {
            PyTypeError::new_err(format!(
                "tensors: expected an iterable of (name, array, dtype), got {}",
                type_name(tensors)
            ))
        })?;
        let mut writer = fq::io::ShardWriter::new(&directory, stem, max_shard_bytes, metadata)
            .map_err(to_py_err)?;
        let mut pending: Vec<Pending<'_>> = Vec::new();
        let mut shard_bytes = 0u64;
        for item in items {
            let (name, arr, dtype): (String, Bound<'_, PyAny>, String) = item?.extract()?;
            let p = pending_tensor(name, &arr, &dtype)?;
            let n = p.bytes.len() as u64;
            if fq::io::closes_shard(pending.len(), shard_bytes, n, writer.max_shard_bytes()) {
                flush_shard(py, &mut writer, &mut pending)?;
                shard_bytes = 0;
            }
            pending.push(p);
            shard_bytes += n;
        }
        if !pending.is_empty() {
            flush_shard(py, &mut writer, &mut pending)?;
        }
        compute(py, move || writer.finish()).map_err(to_py_err)
    })
}

// ---------------------------------------------------------------------------------------------
// Threads and test hooks
// ---------------------------------------------------------------------------------------------

#[pyfunction]
fn set_num_threads(n: i64) -> PyResult<()> {
    guarded("set_num_threads", || {
        let n = positive_usize("n", n)?;
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .thread_name(|i| format!("ferroquant-{i}"))
            .build()
            .map_err(|e| PyRuntimeError::new_err(format!("cannot start {n} threads: {e}")))?;
        let mut guard = match POOL.write() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        *guard = Some(Arc::new(pool));
        Ok(())
    })
}

#[pyfunction]
fn available_threads() -> usize {
    match current_pool() {
        Some(pool) => pool.current_num_threads(),
        None => rayon::current_num_threads(),
    }
}

/// Test hook: panics inside the guarded, GIL-released, pooled compute path.
#[pyfunction]
fn _test_panic(py: Python<'_>, message: &str) -> PyResult<()> {
    guarded("_test_panic", || {
        let message = message.to_string();
        compute::<()>(py, move || panic!("{message}"));
        Ok(())
    })
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add(
        "HessianNotPositiveDefiniteError",
        py.get_type::<HessianNotPositiveDefiniteError>(),
    )?;
    m.add_class::<PyHessianAccumulator>()?;
    m.add_function(wrap_pyfunction!(factor_damped, m)?)?;
    m.add_function(wrap_pyfunction!(damped_inverse_upper, m)?)?;
    m.add_function(wrap_pyfunction!(gptq_quantize, m)?)?;
    m.add_class::<PyCrossAccumulator>()?;
    m.add_function(wrap_pyfunction!(rtn_quantize, m)?)?;
    m.add_function(wrap_pyfunction!(pack_gptq_qweight, m)?)?;
    m.add_function(wrap_pyfunction!(unpack_gptq_qweight, m)?)?;
    m.add_function(wrap_pyfunction!(pack_gptq_qzeros, m)?)?;
    m.add_function(wrap_pyfunction!(unpack_gptq_qzeros, m)?)?;
    m.add_function(wrap_pyfunction!(pack_ct_weight, m)?)?;
    m.add_function(wrap_pyfunction!(unpack_ct_weight, m)?)?;
    m.add_function(wrap_pyfunction!(pack_ct_zero_point, m)?)?;
    m.add_function(wrap_pyfunction!(unpack_ct_zero_point, m)?)?;
    m.add_function(wrap_pyfunction!(write_safetensors, m)?)?;
    m.add_function(wrap_pyfunction!(set_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(available_threads, m)?)?;
    m.add_function(wrap_pyfunction!(_test_panic, m)?)?;
    cuda::register(m)?;
    observer::register(m)?;
    Ok(())
}
