//! Bindings of the CUDA path (`ferroquant_core::cuda::device`). They take the tensors
//! themselves (torch CUDA tensors, or any object with `__cuda_array_interface__` and
//! `__dlpack_device__`) and check each one here, before anything touches CUDA: the device (the
//! call's ordinal), the element type, the exact shape, C-contiguity, a non-null address and, for
//! outputs, writability. Only then is a raw address handed to the core. The Python layer
//! (`ferroquant/cuda.py`) allocates outputs and the workspace with torch and passes
//! `torch.cuda.current_stream().cuda_stream`.
//!
//! Order everywhere: option and argument checks (ValueError), then CUDA availability
//! (RuntimeError "CUDA is not available: ..."), then the work (ValueError /
//! HessianNotPositiveDefiniteError exactly as the CPU path). Never a panic.

use fq::cuda::device::{self, ActDtype, CudaError, HessianAdd, SolveArgs};
use fq::cuda::plan::NONFINITE_SLOT_BYTES;
use pyo3::exceptions::{PyAttributeError, PyRuntimeError};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::{
    damping_arg, f32_py, f32s_py, gptq_options_arg, group_size_arg, guarded, positive_usize,
    shape_str, spec_arg, to_py_err, type_name, value_err,
};
use ferroquant_core as fq;

fn cuda_err(e: CudaError) -> PyErr {
    match e {
        CudaError::Core(e) => to_py_err(e),
        other => PyRuntimeError::new_err(other.to_string()),
    }
}

/// The RuntimeError of a machine without CUDA (raised after the argument checks, so those are
/// the same everywhere).
fn require() -> PyResult<()> {
    match fq::cuda::unavailable_reason() {
        None => Ok(()),
        Some(r) => Err(PyRuntimeError::new_err(format!(
            "CUDA is not available: {r}"
        ))),
    }
}

fn count(arg: &str, v: i64) -> PyResult<usize> {
    usize::try_from(v).map_err(|_| value_err(format!("{arg} must be >= 0 (got {v})")))
}

// ---------------------------------------------------------------------------------------------
// Device tensors through __cuda_array_interface__
// ---------------------------------------------------------------------------------------------

/// Element types the kernels read or write. 16-bit integers carry bfloat16 (or float16) bit
/// patterns: the interface has no bfloat16 type string.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Elem {
    F32,
    F16,
    I16,
    U16,
    U8,
    I32,
}

impl Elem {
    const ALL: [Elem; 6] = [
        Elem::F32,
        Elem::F16,
        Elem::I16,
        Elem::U16,
        Elem::U8,
        Elem::I32,
    ];

    fn code(self) -> (char, usize) {
        match self {
            Elem::F32 => ('f', 4),
            Elem::F16 => ('f', 2),
            Elem::I16 => ('i', 2),
            Elem::U16 => ('u', 2),
            Elem::U8 => ('u', 1),
            Elem::I32 => ('i', 4),
        }
    }

    fn size(self) -> usize {
        self.code().1
    }

    fn describe(self) -> String {
        let (k, s) = self.code();
        let bo = if s == 1 { '|' } else { '<' };
        format!("{} ('{bo}{k}{s}')", kind_name(k, s))
    }

    /// Little-endian (`<`), native (`=`, every CUDA host is little-endian) or, for one byte,
    /// not applicable (`|`).
    fn parse(typestr: &str) -> Option<Elem> {
        let mut ch = typestr.chars();
        let bo = ch.next()?;
        let kind = ch.next()?;
        let size: usize = ch.as_str().parse().ok()?;
        if !(bo == '<' || bo == '=' || (bo == '|' && size == 1)) {
            return None;
        }
        Elem::ALL.into_iter().find(|e| e.code() == (kind, size))
    }
}

fn kind_name(kind: char, size: usize) -> String {
    let bits = 8 * size;
    match kind {
        'f' => format!("float{bits}"),
        'i' => format!("int{bits}"),
        'u' => format!("uint{bits}"),
        'c' => format!("complex{bits}"),
        'b' => "bool".into(),
        _ => "an unknown type".into(),
    }
}

/// A type string as people know it: `'<f8' (float64)`.
fn typestr_text(t: &str) -> String {
    let mut ch = t.chars();
    let _ = ch.next();
    let name = match (ch.next(), ch.as_str().parse::<usize>()) {
        (Some(k), Ok(s)) if s > 0 => kind_name(k, s),
        _ => "an unknown type".into(),
    };
    format!("'{t}' ({name})")
}

/// The shape an argument must have, with the names used in messages.
enum Shape<'a> {
    /// Exactly these dimensions.
    Exact(&'a [(&'a str, usize)]),
    /// A non-empty `[out, in]` matrix (it defines `out` and `in`).
    Matrix,
    /// A non-empty square `[in, in]` matrix (it defines `in`).
    Square,
    /// `[..., in]`: any leading dimensions, the last one given.
    Rows(usize),
    /// A non-empty 1-D buffer.
    Bytes,
}

fn names_and_values(dims: &[(&str, usize)]) -> (String, String) {
    let names: Vec<&str> = dims.iter().map(|d| d.0).collect();
    let values: Vec<usize> = dims.iter().map(|d| d.1).collect();
    (format!("[{}]", names.join(", ")), shape_str(&values))
}

fn check_shape(arg: &str, got: &[usize], want: &Shape<'_>) -> PyResult<()> {
    let bad = |expect: String| {
        Err(value_err(format!(
            "{arg}: expected {expect}, got {}",
            shape_str(got)
        )))
    };
    match *want {
        Shape::Exact(dims) => {
            if got.len() != dims.len() || got.iter().zip(dims).any(|(g, d)| *g != d.1) {
                let (names, values) = names_and_values(dims);
                return bad(format!("{names} = {values}"));
            }
        }
        Shape::Matrix => {
            if got.len() != 2 || got.contains(&0) {
                return bad("a non-empty [out, in] matrix".into());
            }
        }
        Shape::Square => {
            if got.len() != 2 || got[0] != got[1] || got[0] == 0 {
                return bad("a non-empty square [in, in] matrix".into());
            }
        }
        Shape::Rows(n) => {
            if got.last() != Some(&n) {
                return bad(format!("[..., in] = [..., {n}]"));
            }
        }
        Shape::Bytes => {
            if got.len() != 1 || got[0] == 0 {
                return bad("a non-empty 1-D buffer".into());
            }
        }
    }
    Ok(())
}

/// A checked device tensor: its address (null only when it has no elements), element type and
/// shape.
struct DevTensor {
    ptr: u64,
    elem: Elem,
    shape: Vec<usize>,
}

impl DevTensor {
    fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

const DL_CPU: i64 = 1;
const DL_CUDA: i64 = 2;
const DL_CUDA_HOST: i64 = 3;

/// `obj.attr`, or None when the object has no such attribute (torch raises AttributeError for
/// `__cuda_array_interface__` on CPU tensors).
fn optional_attr<'py>(obj: &Bound<'py, PyAny>, name: &str) -> PyResult<Option<Bound<'py, PyAny>>> {
    match obj.getattr(name) {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.is_instance_of::<PyAttributeError>(obj.py()) => Ok(None),
        Err(e) => Err(e),
    }
}

fn item<'py>(d: &Bound<'py, PyDict>, arg: &str, key: &str) -> PyResult<Option<Bound<'py, PyAny>>> {
    let v = d.get_item(key).map_err(|e| {
        value_err(format!(
            "{arg}: unreadable __cuda_array_interface__['{key}']: {e}"
        ))
    })?;
    Ok(v.filter(|v| !v.is_none()))
}

fn bad_interface(arg: &str, what: &str) -> PyErr {
    value_err(format!("{arg}: __cuda_array_interface__ {what}"))
}

/// Where `obj` lives, from `__dlpack_device__()` (`(device_type, device_id)`), or None when it
/// does not say.
fn dlpack_device(obj: &Bound<'_, PyAny>, arg: &str) -> PyResult<Option<(i64, i64)>> {
    let Some(f) = optional_attr(obj, "__dlpack_device__")? else {
        return Ok(None);
    };
    let r = f.call0()?;
    r.extract::<(i64, i64)>().map(Some).map_err(|_| {
        value_err(format!(
            "{arg}: __dlpack_device__() must return (device_type, device_id), got {}",
            r.repr()
                .map(|s| s.to_string())
                .unwrap_or_else(|_| "?".into())
        ))
    })
}

/// Reads and checks one device tensor argument. `ordinal`: the call's device; `elems`: the
/// accepted element types; `output`: the kernels write it (a read-only view is refused).
fn dev_tensor(
    obj: &Bound<'_, PyAny>,
    arg: &str,
    ordinal: usize,
    elems: &[Elem],
    shape: Shape<'_>,
    output: bool,
) -> PyResult<DevTensor> {
    let want_dev = format!("cuda:{ordinal}");
    let dl = dlpack_device(obj, arg)?;
    if let Some((kind, _)) = dl {
        if kind != DL_CUDA {
            let place = match kind {
                DL_CPU | DL_CUDA_HOST => "in CPU memory".to_string(),
                k => format!("on DLPack device type {k}"),
            };
            return Err(value_err(format!(
                "{arg}: expected a CUDA tensor on {want_dev}, got a {} {place} \
                 (ferroquant.solver takes CPU tensors)",
                type_name(obj)
            )));
        }
    }
    let Some(cai) = optional_attr(obj, "__cuda_array_interface__")? else {
        return Err(value_err(format!(
            "{arg}: expected a CUDA tensor on {want_dev} (an object with \
             __cuda_array_interface__), got {}",
            type_name(obj)
        )));
    };
    let Some((_, id)) = dl else {
        return Err(value_err(format!(
            "{arg}: cannot tell which device this {} is on (it has no __dlpack_device__); pass a \
             torch CUDA tensor",
            type_name(obj)
        )));
    };
    if id != ordinal as i64 {
        return Err(value_err(format!(
            "{arg}: on cuda:{id}, expected {want_dev} (every tensor of a call must be on its \
             device)"
        )));
    }
    let d = cai
        .cast::<PyDict>()
        .map_err(|_| bad_interface(arg, "is not a dict"))?;

    match item(d, arg, "version")? {
        Some(v) => match v.extract::<i64>() {
            Ok(0..=3) => {}
            _ => {
                return Err(bad_interface(
                    arg,
                    &format!("version {v} is not supported (0 to 3)"),
                ))
            }
        },
        None => return Err(bad_interface(arg, "has no 'version'")),
    }
    if item(d, arg, "mask")?.is_some() {
        return Err(bad_interface(
            arg,
            "has a mask (masked arrays are not supported)",
        ));
    }

    let typestr: String = item(d, arg, "typestr")?
        .ok_or_else(|| bad_interface(arg, "has no 'typestr'"))?
        .extract()
        .map_err(|_| bad_interface(arg, "'typestr' is not a string"))?;
    let elem = match Elem::parse(&typestr) {
        Some(e) if elems.contains(&e) => e,
        _ => {
            let want: Vec<String> = elems.iter().map(|e| e.describe()).collect();
            return Err(value_err(format!(
                "{arg}: expected dtype {}, got {}",
                want.join(" or "),
                typestr_text(&typestr)
            )));
        }
    };

    let dims: Vec<usize> = item(d, arg, "shape")?
        .ok_or_else(|| bad_interface(arg, "has no 'shape'"))?
        .extract()
        .map_err(|_| bad_interface(arg, "'shape' is not a tuple of non-negative integers"))?;
    check_shape(arg, &dims, &shape)?;
    let numel = dims
        .iter()
        .try_fold(1usize, |a, &b| a.checked_mul(b))
        .filter(|n| n.checked_mul(elem.size()).is_some())
        .ok_or_else(|| value_err(format!("{arg}: shape {} overflows", shape_str(&dims))))?;

    if let Some(s) = item(d, arg, "strides")? {
        let strides: Vec<i64> = s
            .extract()
            .map_err(|_| bad_interface(arg, "'strides' is not a tuple of integers"))?;
        if !c_contiguous(&dims, &strides, elem.size()) {
            return Err(value_err(format!(
                "{arg}: expected a C-contiguous tensor, got byte strides {strides:?} for shape {} \
                 (call .contiguous() first)",
                shape_str(&dims)
            )));
        }
    }

    let data = item(d, arg, "data")?.ok_or_else(|| bad_interface(arg, "has no 'data'"))?;
    let (ptr, readonly): (u64, bool) = data
        .extract()
        .map_err(|_| bad_interface(arg, "'data' is not a (pointer, read-only) pair"))?;
    if ptr == 0 && numel > 0 {
        return Err(value_err(format!("{arg}: null device pointer")));
    }
    if output && readonly {
        return Err(value_err(format!(
            "{arg}: is read-only, but the call writes its results there"
        )));
    }
    Ok(DevTensor {
        ptr,
        elem,
        shape: dims,
    })
}

/// Whether byte `strides` describe a C-contiguous layout of `shape` (dimensions of length 1
/// may have any stride; an empty tensor is contiguous).
fn c_contiguous(shape: &[usize], strides: &[i64], itemsize: usize) -> bool {
    if strides.len() != shape.len() {
        return false;
    }
    if shape.contains(&0) {
        return true;
    }
    let mut expect = itemsize as i64;
    for (&n, &s) in shape.iter().zip(strides).rev() {
        if n != 1 && s != expect {
            return false;
        }
        expect = expect.saturating_mul(n as i64);
    }
    true
}

/// The activation dtype of a Hessian batch from its element type and the optional `dtype`
/// flag (16-bit integers carry bfloat16 or float16 bit patterns, as on the CPU path).
fn act_dtype(elem: Elem, dtype: Option<&str>) -> PyResult<ActDtype> {
    let flag = match dtype {
        None => None,
        Some("bf16" | "bfloat16") => Some(ActDtype::BF16),
        Some("f16" | "fp16" | "float16") => Some(ActDtype::F16),
        Some("f32" | "fp32" | "float32") => Some(ActDtype::F32),
        Some(other) => {
            return Err(value_err(format!(
                "dtype must be 'bfloat16', 'float16' or 'float32' (or None), got '{other}'"
            )))
        }
    };
    let bits16 = matches!(elem, Elem::I16 | Elem::U16);
    match (flag, elem) {
        (None, Elem::F32) | (Some(ActDtype::F32), Elem::F32) => Ok(ActDtype::F32),
        (None, Elem::F16) | (Some(ActDtype::F16), Elem::F16) => Ok(ActDtype::F16),
        (Some(f @ (ActDtype::BF16 | ActDtype::F16)), _) if bits16 => Ok(f),
        (None, _) if bits16 => Err(value_err(format!(
            "x: {} holds raw 16-bit patterns; say which with dtype='bfloat16' or dtype='float16'",
            elem.describe()
        ))),
        (Some(f), _) => Err(value_err(format!(
            "x: dtype='{}' does not match the tensor's {}",
            f.name(),
            elem.describe()
        ))),
        (None, _) => Err(value_err(format!("x: unsupported {}", elem.describe()))),
    }
}

// ---------------------------------------------------------------------------------------------
// Entry points
// ---------------------------------------------------------------------------------------------

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
        let d = count("device", device)?;
        require()?;
        py.detach(|| device::device_name(d)).map_err(cuda_err)
    })
}

/// `h = (n_old/n_new) h + (2/n_new) xᵀx` on the GPU, in place. `h`: float32 `[in, in]`;
/// `x`: `[..., in]` float32, float16, or int16/uint16 bfloat16 bits with `dtype='bfloat16'`;
/// `slot`: uint8 `[24]`, the Hessian's non-finite record (all 0xff before its first batch):
/// a NaN/Inf is recorded there, not raised, and [`cuda_hessian_check`] reports it when the
/// Hessian is read out; `samples` = n_old; `batch` = index of this batch (messages).
/// Returns the number of rows added.
#[pyfunction]
#[pyo3(signature = (h, x, slot, samples, batch, stream, device, *, dtype=None))]
#[allow(clippy::too_many_arguments)]
fn cuda_hessian_add(
    py: Python<'_>,
    h: &Bound<'_, PyAny>,
    x: &Bound<'_, PyAny>,
    slot: &Bound<'_, PyAny>,
    samples: u64,
    batch: u64,
    stream: u64,
    device: i64,
    dtype: Option<&str>,
) -> PyResult<usize> {
    guarded("cuda_hessian_add", || {
        let ordinal = count("device", device)?;
        let ht = dev_tensor(h, "h", ordinal, &[Elem::F32], Shape::Square, true)?;
        let n = ht.shape[0];
        let xt = dev_tensor(
            x,
            "x",
            ordinal,
            &[Elem::F32, Elem::F16, Elem::I16, Elem::U16],
            Shape::Rows(n),
            false,
        )?;
        let dtype = act_dtype(xt.elem, dtype)?;
        let st = slot_tensor(slot, ordinal)?;
        let rows = xt.numel() / n;
        let a = HessianAdd {
            h: ht.ptr,
            n,
            x: xt.ptr,
            rows,
            dtype,
            samples,
            batch,
            slot: st,
            stream,
            ordinal,
        };
        require()?;
        py.detach(|| device::hessian_add(&a)).map_err(cuda_err)?;
        Ok(rows)
    })
}

/// A Hessian's non-finite slot: uint8 `[24]` on the call's device.
fn slot_tensor(slot: &Bound<'_, PyAny>, ordinal: usize) -> PyResult<u64> {
    let t = dev_tensor(
        slot,
        "slot",
        ordinal,
        &[Elem::U8],
        Shape::Exact(&[("bytes", NONFINITE_SLOT_BYTES)]),
        true,
    )?;
    Ok(t.ptr)
}

/// Raises the CPU accumulator's error (ValueError) for the first Hessian batch that recorded
/// a NaN/Inf in `slot` (see [`cuda_hessian_add`]); `in_features` names its row and column.
/// One host synchronisation: call it once, when the Hessian is read out.
#[pyfunction]
fn cuda_hessian_check(
    py: Python<'_>,
    slot: &Bound<'_, PyAny>,
    in_features: i64,
    stream: u64,
    device: i64,
) -> PyResult<()> {
    guarded("cuda_hessian_check", || {
        let ordinal = count("device", device)?;
        let n = positive_usize("in_features", in_features)?;
        let st = slot_tensor(slot, ordinal)?;
        require()?;
        py.detach(|| device::hessian_check(st, n, stream, ordinal))
            .map_err(cuda_err)
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

/// The solve's two inputs: weight float32 `[out, in]`, hessian float32 `[in, in]`, both on
/// `ordinal`. Returns (out, in).
fn solve_inputs(
    weight: &Bound<'_, PyAny>,
    hessian: &Bound<'_, PyAny>,
    ordinal: usize,
) -> PyResult<(DevTensor, DevTensor)> {
    let w = dev_tensor(
        weight,
        "weight",
        ordinal,
        &[Elem::F32],
        Shape::Matrix,
        false,
    )?;
    let cols = w.shape[1];
    let h = dev_tensor(
        hessian,
        "hessian",
        ordinal,
        &[Elem::F32],
        Shape::Exact(&[("in", cols), ("in", cols)]),
        false,
    )?;
    Ok((w, h))
}

/// Checks the solve's inputs as [`cuda_gptq_solve`] does and returns `(out, in)`, so the caller
/// can size the outputs. No CUDA needed.
#[pyfunction]
fn cuda_gptq_inputs(
    weight: &Bound<'_, PyAny>,
    hessian: &Bound<'_, PyAny>,
    device: i64,
) -> PyResult<(usize, usize)> {
    guarded("cuda_gptq_inputs", || {
        let (w, _) = solve_inputs(weight, hessian, count("device", device)?)?;
        Ok((w.shape[0], w.shape[1]))
    })
}

/// One layer's GPTQ solve on the GPU, writing codes (uint8 `[out, in]`), scales (float32
/// `[out, groups]`), zeros (int32 `[out, groups]`) and dequantized (float32 `[out, in]`) in
/// place; `workspace`: uint8 of at least `cuda_gptq_workspace_bytes` bytes. Returns loss,
/// damp_frac, damp_attempts, dead, perm (list or None), g_idx (list), n_groups.
#[pyfunction]
#[pyo3(signature = (
    weight, hessian, codes, scales, zeros, dequantized, workspace, stream, device, *, bits=4,
    symmetric=true, group_size=-1, act_order=false, static_groups=false, block_size=128,
    damp_percent=0.01, damp_growth=2.0, damp_max=1.0, observer="minmax", scale_dtype="float32"
))]
#[allow(clippy::too_many_arguments)]
fn cuda_gptq_solve<'py>(
    py: Python<'py>,
    weight: &Bound<'py, PyAny>,
    hessian: &Bound<'py, PyAny>,
    codes: &Bound<'py, PyAny>,
    scales: &Bound<'py, PyAny>,
    zeros: &Bound<'py, PyAny>,
    dequantized: &Bound<'py, PyAny>,
    workspace: &Bound<'py, PyAny>,
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
        // The CUDA path's own limitation (MSE observer) is an argument error too.
        fq::cuda::plan::check_observer(&opts.spec).map_err(to_py_err)?;
        let ordinal = count("device", device)?;
        let (w, h) = solve_inputs(weight, hessian, ordinal)?;
        let (rows, cols) = (w.shape[0], w.shape[1]);
        let groups = fq::cuda::plan::check_options(rows, cols, &opts)
            .map_err(to_py_err)?
            .n_groups(cols);
        let full = [("out", rows), ("in", cols)];
        let grouped = [("out", rows), ("groups", groups)];
        let out = |obj: &Bound<'py, PyAny>, arg: &str, elem: Elem, dims: Shape<'_>| {
            dev_tensor(obj, arg, ordinal, &[elem], dims, true)
        };
        let c = out(codes, "codes", Elem::U8, Shape::Exact(&full))?;
        let s = out(scales, "scales", Elem::F32, Shape::Exact(&grouped))?;
        let z = out(zeros, "zeros", Elem::I32, Shape::Exact(&grouped))?;
        let q = out(dequantized, "dequantized", Elem::F32, Shape::Exact(&full))?;
        let ws = out(workspace, "workspace", Elem::U8, Shape::Bytes)?;
        let args = SolveArgs {
            weight: w.ptr,
            hessian: h.ptr,
            codes: c.ptr,
            scales: s.ptr,
            zeros: z.ptr,
            dequantized: q.ptr,
            workspace: ws.ptr,
            workspace_bytes: ws.numel(),
            rows,
            cols,
            stream,
            ordinal,
        };
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
    m.add_function(wrap_pyfunction!(cuda_hessian_check, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_gptq_workspace_bytes, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_gptq_inputs, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_gptq_solve, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_check_options, m)?)?;
    Ok(())
}
