//! Bindings of activation observers and fake quantization (`ferroquant_core::observer`).
//! Batches are read like `HessianAccumulator.add_batch` reads them (float32, float16, or
//! bf16/f16 bit patterns with a dtype flag); scales are float32 and zero points int32 arrays of
//! any shape holding the strategy's number of values (row-major).

use ferroquant_core as fq;
use fq::observer::{self, ActivationObserver, Format, ObserverKind, Strategy};
use numpy::{PyArray2, PyArrayDyn, PyArrayMethods, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::prelude::*;

use crate::{
    as_ndarray, batch_arg, batch_of_width, check_layout, compute, guarded, out2, positive_usize,
    to_py_err, value_err,
};

fn format_arg(kind: &str, num_bits: i64, symmetric: bool) -> PyResult<Format> {
    match kind {
        "int" => {
            if !(2..=8).contains(&num_bits) {
                return Err(value_err(format!(
                    "num_bits: int activations take 2..8 bits (got {num_bits})"
                )));
            }
            Ok(Format::Int {
                bits: num_bits as u8,
                symmetric,
            })
        }
        "float" | "fp8" => {
            if num_bits != 8 {
                return Err(value_err(format!(
                    "num_bits: type 'float' is FP8 E4M3 and needs num_bits=8 (got {num_bits})"
                )));
            }
            if !symmetric {
                return Err(value_err(
                    "symmetric: FP8 E4M3 quantization is symmetric only (got symmetric=False)",
                ));
            }
            Ok(Format::Fp8E4M3)
        }
        other => Err(value_err(format!(
            "type must be 'int' or 'float' (FP8 E4M3), got '{other}'"
        ))),
    }
}

fn strategy_arg(strategy: &str, group_size: Option<i64>, channel_axis: i64) -> PyResult<Strategy> {
    let s = match strategy {
        "tensor" => Strategy::Tensor,
        "token" => Strategy::Row,
        "channel" => match channel_axis {
            1 | -1 => Strategy::Column,
            0 => Strategy::Row,
            a => {
                return Err(value_err(format!(
                    "channel_axis must be 1 (one range per column: activation features) or 0 (per row: weight output channels), got {a}"
                )))
            }
        },
        "group" => match group_size {
            Some(g) => Strategy::Group(positive_usize("group_size", g)?),
            None => {
                return Err(value_err(
                    "group_size: strategy 'group' needs a group_size (got None)",
                ))
            }
        },
        other => {
            return Err(value_err(format!(
                "strategy must be 'tensor', 'channel', 'token' or 'group', got '{other}'"
            )))
        }
    };
    Ok(s)
}

fn kind_arg(
    name: &str,
    averaging_constant: f64,
    grid: i64,
    maxshrink: f64,
    norm: f64,
) -> PyResult<ObserverKind> {
    let kind = match name {
        "minmax" => ObserverKind::MinMax,
        "static_minmax" => ObserverKind::StaticMinMax,
        "moving_average_minmax" => ObserverKind::MovingAverageMinMax {
            averaging_constant: averaging_constant as f32,
        },
        "mse" => ObserverKind::Mse {
            grid: positive_usize("grid", grid)?,
            max_shrink: maxshrink as f32,
            norm: norm as f32,
        },
        other => {
            return Err(value_err(format!(
                "observer must be 'minmax', 'static_minmax', 'moving_average_minmax' or 'mse', got '{other}'"
            )))
        }
    };
    kind.validate().map_err(to_py_err)?;
    Ok(kind)
}

/// A C-contiguous array of any shape with element type `T`, read without copying.
fn flat_arg<'py, T: numpy::Element>(
    obj: &Bound<'py, PyAny>,
    arg: &str,
    dtype: &str,
) -> PyResult<PyReadonlyArrayDyn<'py, T>> {
    let arr = as_ndarray(obj, arg, dtype)?;
    let typed = arr.cast::<PyArrayDyn<T>>().map_err(|_| {
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

fn flat_slice<'a, T: numpy::Element>(
    a: &'a PyReadonlyArrayDyn<'_, T>,
    arg: &str,
) -> PyResult<&'a [T]> {
    a.as_slice()
        .map_err(|_| value_err(format!("{arg}: array must be C-contiguous and aligned")))
}

/// Streaming range statistics of one tensor. See `_core.pyi` for the Python documentation.
#[pyclass(name = "Observer", module = "ferroquant._core")]
struct PyObserver {
    inner: ActivationObserver,
}

#[pymethods]
impl PyObserver {
    #[new]
    #[pyo3(signature = (columns, observer="minmax", *, strategy="tensor", r#type="int", num_bits=8, symmetric=true, group_size=None, channel_axis=1, averaging_constant=0.01, grid=100, maxshrink=0.2, norm=2.4))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        columns: i64,
        observer: &str,
        strategy: &str,
        r#type: &str,
        num_bits: i64,
        symmetric: bool,
        group_size: Option<i64>,
        channel_axis: i64,
        averaging_constant: f64,
        grid: i64,
        maxshrink: f64,
        norm: f64,
    ) -> PyResult<Self> {
        guarded("Observer.__init__", || {
            let cols = positive_usize("columns", columns)?;
            let kind = kind_arg(observer, averaging_constant, grid, maxshrink, norm)?;
            let strategy = strategy_arg(strategy, group_size, channel_axis)?;
            let format = format_arg(r#type, num_bits, symmetric)?;
            let inner = ActivationObserver::new(kind, strategy, format, cols).map_err(to_py_err)?;
            Ok(Self { inner })
        })
    }

    #[pyo3(signature = (x, dtype=None))]
    fn update(
        &mut self,
        py: Python<'_>,
        x: &Bound<'_, PyAny>,
        dtype: Option<&str>,
    ) -> PyResult<()> {
        guarded("Observer.update", || {
            let (batch, rows) =
                batch_of_width(x, dtype, self.inner.columns(), "the observer's columns")?;
            let acts = batch.activations()?;
            let inner = &mut self.inner;
            compute(py, move || inner.update(acts, rows)).map_err(to_py_err)
        })
    }

    /// `(scales float32, zero_points int32)`, both shaped as the strategy's parameters.
    #[allow(clippy::type_complexity)]
    fn scale_zero_point<'py>(
        &self,
        py: Python<'py>,
    ) -> PyResult<(Bound<'py, PyArray2<f32>>, Bound<'py, PyArray2<i32>>)> {
        guarded("Observer.scale_zero_point", || {
            let (s, z) = self.inner.qparams().map_err(to_py_err)?;
            let (r, c) = self.shape()?;
            Ok((
                out2(py, "Observer.scale_zero_point", s, r, c)?,
                out2(py, "Observer.scale_zero_point", z, r, c)?,
            ))
        })
    }

    /// `(min, max)` the scales come from (MSE: the chosen shrunk range).
    #[allow(clippy::type_complexity)]
    fn min_max<'py>(
        &self,
        py: Python<'py>,
    ) -> PyResult<(Bound<'py, PyArray2<f32>>, Bound<'py, PyArray2<f32>>)> {
        guarded("Observer.min_max", || {
            let (lo, hi) = self.inner.min_max().map_err(to_py_err)?;
            let (r, c) = self.shape()?;
            Ok((
                out2(py, "Observer.min_max", lo, r, c)?,
                out2(py, "Observer.min_max", hi, r, c)?,
            ))
        })
    }

    #[getter]
    fn batches(&self) -> u64 {
        self.inner.batches()
    }

    #[getter]
    fn columns(&self) -> usize {
        self.inner.columns()
    }

    fn __repr__(&self) -> String {
        format!(
            "Observer(columns={}, kind={:?}, strategy={:?}, format={:?}, batches={})",
            self.inner.columns(),
            self.inner.kind(),
            self.inner.strategy(),
            self.inner.format(),
            self.inner.batches()
        )
    }
}

impl PyObserver {
    fn shape(&self) -> PyResult<(usize, usize)> {
        self.inner.param_shape().ok_or_else(|| {
            value_err("observer: no batch observed yet (calibrate on at least one sample)")
        })
    }
}

#[allow(clippy::too_many_arguments)]
fn fake_quantize_common<'py>(
    py: Python<'py>,
    func: &str,
    x: &Bound<'py, PyAny>,
    scales: &Bound<'py, PyAny>,
    zero_points: Option<&Bound<'py, PyAny>>,
    format: Format,
    strategy: Strategy,
    dtype: Option<&str>,
) -> PyResult<Bound<'py, PyArray2<f32>>> {
    let batch = batch_arg(x, dtype)?;
    let (rows, cols) = batch.shape();
    let s = flat_arg::<f32>(scales, "scales", "float32")?;
    let z = zero_points
        .map(|z| flat_arg::<i32>(z, "zero_points", "int32"))
        .transpose()?;
    let acts = batch.activations()?;
    let s = flat_slice(&s, "scales")?;
    let z = match &z {
        Some(a) => Some(flat_slice(a, "zero_points")?),
        None => None,
    };
    let out = compute(py, move || {
        observer::fake_quantize(acts, rows, cols, strategy, format, s, z)
    })
    .map_err(to_py_err)?;
    out2(py, func, out, rows, cols)
}

/// Int quantize-dequantize with given scales / signed zero points. See `_core.pyi`.
#[pyfunction]
#[pyo3(signature = (x, scales, zero_points=None, *, num_bits=8, strategy="tensor", group_size=None, channel_axis=1, dtype=None))]
#[allow(clippy::too_many_arguments)]
fn fake_quantize_int<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    scales: &Bound<'py, PyAny>,
    zero_points: Option<&Bound<'py, PyAny>>,
    num_bits: i64,
    strategy: &str,
    group_size: Option<i64>,
    channel_axis: i64,
    dtype: Option<&str>,
) -> PyResult<Bound<'py, PyArray2<f32>>> {
    guarded("fake_quantize_int", || {
        let format = format_arg("int", num_bits, zero_points.is_none())?;
        let strategy = strategy_arg(strategy, group_size, channel_axis)?;
        fake_quantize_common(
            py,
            "fake_quantize_int",
            x,
            scales,
            zero_points,
            format,
            strategy,
            dtype,
        )
    })
}

/// FP8 E4M3 quantize-dequantize with given scales. See `_core.pyi`.
#[pyfunction]
#[pyo3(signature = (x, scales, *, strategy="tensor", group_size=None, channel_axis=1, dtype=None))]
fn fake_quantize_fp8<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    scales: &Bound<'py, PyAny>,
    strategy: &str,
    group_size: Option<i64>,
    channel_axis: i64,
    dtype: Option<&str>,
) -> PyResult<Bound<'py, PyArray2<f32>>> {
    guarded("fake_quantize_fp8", || {
        let strategy = strategy_arg(strategy, group_size, channel_axis)?;
        fake_quantize_common(
            py,
            "fake_quantize_fp8",
            x,
            scales,
            None,
            Format::Fp8E4M3,
            strategy,
            dtype,
        )
    })
}

/// Dynamic per-token quantize-dequantize. See `_core.pyi`.
#[pyfunction]
#[pyo3(signature = (x, *, r#type="int", num_bits=8, symmetric=true, dtype=None))]
#[allow(clippy::type_complexity)]
fn dynamic_token_fake_quantize<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    r#type: &str,
    num_bits: i64,
    symmetric: bool,
    dtype: Option<&str>,
) -> PyResult<(
    Bound<'py, PyArray2<f32>>,
    Bound<'py, PyArray2<f32>>,
    Bound<'py, PyArray2<i32>>,
)> {
    const F: &str = "dynamic_token_fake_quantize";
    guarded(F, || {
        let format = format_arg(r#type, num_bits, symmetric)?;
        let batch = batch_arg(x, dtype)?;
        let (rows, cols) = batch.shape();
        let acts = batch.activations()?;
        let (out, s, z) = compute(py, move || {
            observer::dynamic_token_fake_quantize(acts, rows, cols, format)
        })
        .map_err(to_py_err)?;
        Ok((
            out2(py, F, out, rows, cols)?,
            out2(py, F, s, rows, 1)?,
            out2(py, F, z, rows, 1)?,
        ))
    })
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyObserver>()?;
    m.add_function(wrap_pyfunction!(fake_quantize_int, m)?)?;
    m.add_function(wrap_pyfunction!(fake_quantize_fp8, m)?)?;
    m.add_function(wrap_pyfunction!(dynamic_token_fake_quantize, m)?)?;
    Ok(())
}
