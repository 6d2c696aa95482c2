//! The CUDA path through `cudarc` (feature `cuda`): the device side of [`super::model`].
//!
//! Memory: every buffer is the caller's (torch's caching allocator): inputs, outputs, one
//! workspace whose size [`solve_workspace_bytes`] reports and a Hessian's non-finite slot.
//! Nothing is allocated here except a few host scalars read back (non-finite positions,
//! `potrf` status, the diagonal, per-row loss sums).
//!
//! Streams: each device gets one stream of ours in the primary context (the one torch uses).
//! Every entry point first makes our stream wait for the caller's stream (an event recorded
//! there), and at the end makes the caller's stream wait for ours, so torch work before and
//! after is ordered without host synchronisation. The host does wait for our stream where it
//! needs a value back (the solve's non-finite checks, the Cholesky status, the loss, and a
//! Hessian's non-finite slot once, when it is read out: never per batch).
//!
//! Contexts: every entry point leaves the thread's current context as it found it
//! ([`RestoreContext`]), so torch's current device is unchanged by a call on another device.
//!
//! Safety: the caller passes raw device addresses; the bindings read them from each tensor's
//! `__cuda_array_interface__` after checking its device, dtype, shape and strides, and the
//! functions here check every size they can.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::cublas::sys as bsys;
use cudarc::cublas::CudaBlas;
use cudarc::cusolver::sys as ssys;
use cudarc::cusolver::DnHandle;
use cudarc::driver::sys as dsys;
use cudarc::driver::{CudaContext, CudaFunction, CudaStream, LaunchConfig, PushKernelArg};

use super::kernels::{self, KERNEL_NAMES, WARPS_PER_BLOCK};
use super::plan::{self, MAX_BATCH};
use crate::error::Error;
use crate::gptq::GptqOptions;
use crate::quantizer::{check_scales, ScaleDtype};

/// Errors of the CUDA path: the core's (same types and messages as on CPU), CUDA missing, or a
/// CUDA call failing.
#[derive(Debug)]
pub enum CudaError {
    Core(Error),
    Unavailable(String),
    Device(String),
}

impl std::fmt::Display for CudaError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CudaError::Core(e) => write!(f, "{e}"),
            CudaError::Unavailable(m) => write!(f, "CUDA is not available: {m}"),
            CudaError::Device(m) => write!(f, "CUDA error: {m}"),
        }
    }
}

impl From<Error> for CudaError {
    fn from(e: Error) -> Self {
        CudaError::Core(e)
    }
}

pub type CResult<T> = std::result::Result<T, CudaError>;

fn dev_err(what: &str, e: impl std::fmt::Debug) -> CudaError {
    CudaError::Device(format!("{what}: {e:?}"))
}

fn drv(what: &str, r: dsys::CUresult) -> CResult<()> {
    if r == dsys::CUresult::CUDA_SUCCESS {
        Ok(())
    } else {
        Err(dev_err(what, r))
    }
}

fn blas(what: &str, r: bsys::cublasStatus_t) -> CResult<()> {
    if r == bsys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
        Ok(())
    } else {
        Err(dev_err(what, r))
    }
}

fn solver(what: &str, r: ssys::cusolverStatus_t) -> CResult<()> {
    if r == ssys::cusolverStatus_t::CUSOLVER_STATUS_SUCCESS {
        Ok(())
    } else {
        Err(dev_err(what, r))
    }
}

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic".into())
}

// ---------------------------------------------------------------------------------------------
// Availability
// ---------------------------------------------------------------------------------------------

/// Checks, in order, without ever letting cudarc panic: the driver library loads (cudarc panics
/// on first use without it), cuBLAS / cuSOLVER / NVRTC load, a context on device 0 can be
/// created (inside `catch_unwind`: a broken driver install panics too). Cached per process.
pub fn unavailable_reason() -> Option<String> {
    static REASON: OnceLock<Option<String>> = OnceLock::new();
    REASON
        .get_or_init(|| {
            // SAFETY: only dlopen attempts by library name.
            let libs = unsafe {
                [
                    ("libcuda (NVIDIA driver)", dsys::is_culib_present()),
                    ("libcublas.so.13", bsys::is_culib_present()),
                    ("libcusolver", ssys::is_culib_present()),
                    ("libnvrtc.so.13", kernels::nvrtc_present()),
                ]
            };
            if let Some((name, _)) = libs.iter().find(|(_, ok)| !ok) {
                return Some(if name.starts_with("libcuda ") {
                    "the NVIDIA driver library (libcuda.so) could not be loaded: no NVIDIA GPU \
                     driver on this machine"
                        .to_string()
                } else {
                    format!(
                        "{name} could not be loaded: install torch's CUDA 13 wheels (they ship it) \
                         or put the CUDA 13 libraries on LD_LIBRARY_PATH"
                    )
                });
            }
            // The context made here is dropped at once; the caller's stays current.
            match catch_unwind(|| {
                let _restore = RestoreContext::save_loaded().map_err(|e| e.to_string())?;
                CudaContext::new(0).map(drop).map_err(|e| format!("{e:?}"))
            }) {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(format!("cannot create a CUDA context on device 0: {e}")),
                Err(p) => Some(format!("CUDA initialisation failed: {}", panic_text(&*p))),
            }
        })
        .clone()
}

pub fn available() -> bool {
    unavailable_reason().is_none()
}

// ---------------------------------------------------------------------------------------------
// The caller's current context
// ---------------------------------------------------------------------------------------------

/// Puts back, when dropped, the context that was current on this thread when it was made.
/// cudarc binds a device's primary context to the thread (creating it, every launch), and the
/// CUDA runtime derives its current device from the current context, so without this a call on
/// device 1 would leave torch's current device at 1. Every entry point holds one across all its
/// CUDA calls; drop runs on every exit path (errors, caught panics).
struct RestoreContext {
    prev: dsys::CUcontext,
}

impl RestoreContext {
    /// Fails with `Unavailable` without CUDA (the driver calls need libcuda loaded).
    fn save() -> CResult<Self> {
        if let Some(r) = unavailable_reason() {
            return Err(CudaError::Unavailable(r));
        }
        Self::save_loaded()
    }

    /// For callers that checked that libcuda loads.
    fn save_loaded() -> CResult<Self> {
        let mut prev: dsys::CUcontext = std::ptr::null_mut();
        // SAFETY: libcuda is loaded (caller's precondition); writes one handle.
        match unsafe { dsys::cuCtxGetCurrent(&mut prev) } {
            dsys::CUresult::CUDA_SUCCESS => {}
            // Before cuInit nothing can be current: restore "none".
            dsys::CUresult::CUDA_ERROR_NOT_INITIALIZED => prev = std::ptr::null_mut(),
            other => return Err(dev_err("cuCtxGetCurrent", other)),
        }
        Ok(Self { prev })
    }
}

impl Drop for RestoreContext {
    fn drop(&mut self) {
        // SAFETY: `prev` was current on this thread when the guard was made (or null: none),
        // and the caller, blocked in this call, cannot have destroyed it meanwhile. A failure
        // cannot be reported from here; it would leave our context current, nothing worse.
        unsafe {
            dsys::cuCtxSetCurrent(self.prev);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Per-device state
// ---------------------------------------------------------------------------------------------

struct Dev {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    solver: DnHandle,
    funcs: HashMap<&'static str, CudaFunction>,
    sms: u32,
}

// SAFETY: the handles are only used while holding the device's Mutex.
unsafe impl Send for Dev {}

type DevSlot = Arc<Mutex<Dev>>;

fn devices() -> &'static Mutex<HashMap<usize, DevSlot>> {
    static DEVS: OnceLock<Mutex<HashMap<usize, DevSlot>>> = OnceLock::new();
    DEVS.get_or_init(|| Mutex::new(HashMap::new()))
}

/// The device's state, created on first use: context, stream, handles, kernels compiled by
/// NVRTC for its architecture (CUBIN; PTX for the driver to JIT if that fails).
fn device(ordinal: usize) -> CResult<DevSlot> {
    if let Some(r) = unavailable_reason() {
        return Err(CudaError::Unavailable(r));
    }
    let mut map = devices()
        .lock()
        .map_err(|_| CudaError::Device("device table poisoned".into()))?;
    if let Some(d) = map.get(&ordinal) {
        return Ok(d.clone());
    }
    let made = catch_unwind(AssertUnwindSafe(|| -> CResult<Dev> {
        let ctx = CudaContext::new(ordinal)
            .map_err(|e| dev_err(&format!("context on device {ordinal}"), e))?;
        let stream = ctx.new_stream().map_err(|e| dev_err("stream", e))?;
        let blas = CudaBlas::new(stream.clone()).map_err(|e| dev_err("cuBLAS handle", e))?;
        let solver = DnHandle::new(stream.clone()).map_err(|e| dev_err("cuSOLVER handle", e))?;
        let (maj, min) = ctx
            .compute_capability()
            .map_err(|e| dev_err("compute capability", e))?;
        let sms = ctx
            .attribute(dsys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(|e| dev_err("SM count", e))? as u32;
        let image = match kernels::compile(&format!("sm_{maj}{min}")) {
            Ok((img, _)) => cudarc::nvrtc::Ptx::from_binary(img),
            Err(cubin_err) => {
                let (ptx, _) = kernels::compile(&format!("compute_{maj}{min}"))
                    .map_err(|e| CudaError::Device(format!("{cubin_err}\nPTX fallback: {e}")))?;
                let text = String::from_utf8_lossy(&ptx)
                    .trim_end_matches('\0')
                    .to_string();
                cudarc::nvrtc::Ptx::from_src(text)
            }
        };
        let module = ctx
            .load_module(image)
            .map_err(|e| dev_err("loading the ferroquant kernels", e))?;
        let mut funcs = HashMap::new();
        for name in KERNEL_NAMES {
            funcs.insert(
                name,
                module.load_function(name).map_err(|e| dev_err(name, e))?,
            );
        }
        Ok(Dev {
            ctx,
            stream,
            blas,
            solver,
            funcs,
            sms,
        })
    }));
    let dev = match made {
        Ok(r) => r?,
        Err(p) => {
            return Err(CudaError::Device(format!(
                "CUDA initialisation panicked: {}",
                panic_text(&*p)
            )))
        }
    };
    let slot = Arc::new(Mutex::new(dev));
    map.insert(ordinal, slot.clone());
    Ok(slot)
}

impl Dev {
    fn func(&self, name: &str) -> CResult<&CudaFunction> {
        self.funcs
            .get(name)
            .ok_or_else(|| CudaError::Device(format!("kernel {name} not loaded")))
    }

    fn cu(&self) -> dsys::CUstream {
        self.stream.cu_stream()
    }

    /// `waiter` waits for everything enqueued on `signaller` so far.
    fn join(&self, waiter: dsys::CUstream, signaller: dsys::CUstream) -> CResult<()> {
        let mut ev: dsys::CUevent = std::ptr::null_mut();
        // SAFETY: the event is created, recorded, waited on and released (the driver keeps it
        // alive until the wait is resolved).
        unsafe {
            drv(
                "cuEventCreate",
                dsys::cuEventCreate(&mut ev, dsys::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32),
            )?;
            let r = drv("cuEventRecord", dsys::cuEventRecord(ev, signaller))
                .and_then(|_| drv("cuStreamWaitEvent", dsys::cuStreamWaitEvent(waiter, ev, 0)));
            dsys::cuEventDestroy_v2(ev);
            r
        }
    }

    fn sync(&self) -> CResult<()> {
        self.stream
            .synchronize()
            .map_err(|e| dev_err("stream synchronize", e))
    }

    fn to_host<T: Copy + Default>(&self, src: u64, len: usize) -> CResult<Vec<T>> {
        let mut out = vec![T::default(); len];
        // SAFETY: `out` holds `len` T's; the caller guarantees `src` holds as many.
        unsafe {
            drv(
                "cuMemcpyDtoHAsync",
                dsys::cuMemcpyDtoHAsync_v2(
                    out.as_mut_ptr() as *mut _,
                    src,
                    len * std::mem::size_of::<T>(),
                    self.cu(),
                ),
            )?;
        }
        self.sync()?;
        Ok(out)
    }

    fn to_device<T: Copy>(&self, dst: u64, src: &[T]) -> CResult<()> {
        // SAFETY: pageable source: the call returns once the data is staged, so `src` may be
        // dropped afterwards; `dst` holds as many bytes (caller's layout).
        unsafe {
            drv(
                "cuMemcpyHtoDAsync",
                dsys::cuMemcpyHtoDAsync_v2(
                    dst,
                    src.as_ptr() as *const _,
                    std::mem::size_of_val(src),
                    self.cu(),
                ),
            )
        }
    }

    fn memset(&self, dst: u64, byte: u8, len: usize) -> CResult<()> {
        // SAFETY: `dst` holds `len` bytes (caller's layout).
        unsafe {
            drv(
                "cuMemsetD8Async",
                dsys::cuMemsetD8Async(dst, byte, len, self.cu()),
            )
        }
    }

    /// A grid-stride launch shape for `total` items.
    fn flat(&self, total: u64) -> LaunchConfig {
        let blocks = total.div_ceil(256).clamp(1, self.sms as u64 * 32) as u32;
        LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// First non-finite element of a device buffer (f32, or 16-bit with its exponent mask), via
    /// atomicMin into the 8-byte `flag`.
    fn first_non_finite(
        &self,
        data: u64,
        len: usize,
        mask16: Option<u32>,
        flag: u64,
    ) -> CResult<Option<usize>> {
        self.memset(flag, 0xff, 8)?;
        let len64 = len as u64;
        let cfg = self.flat(len64);
        let mut b;
        match mask16 {
            None => {
                b = self
                    .stream
                    .launch_builder(self.func("fq_find_nonfinite_f32")?);
                b.arg(&data).arg(&len64).arg(&flag);
            }
            Some(ref m) => {
                b = self
                    .stream
                    .launch_builder(self.func("fq_find_nonfinite_u16")?);
                b.arg(&data).arg(&len64).arg(m).arg(&flag);
            }
        }
        // SAFETY: argument list matches the kernel's signature; buffers sized by the caller.
        unsafe { b.launch(cfg) }.map_err(|e| dev_err("fq_find_nonfinite", e))?;
        let v = self.to_host::<u64>(flag, 1)?[0];
        Ok((v != u64::MAX).then_some(v as usize))
    }

    /// Records a Hessian batch's first non-finite element in the device `slot` unless an
    /// earlier batch did (see [`plan::NONFINITE_SLOT_BYTES`]); nothing is read back.
    fn record_non_finite(
        &self,
        data: u64,
        len: usize,
        dtype: ActDtype,
        batch: u64,
        slot: u64,
    ) -> CResult<()> {
        let len64 = len as u64;
        let (tag, mask16) = (dtype.tag(), dtype.exp_mask16());
        let cfg = self.flat(len64);
        let mut b;
        match mask16 {
            None => {
                b = self
                    .stream
                    .launch_builder(self.func("fq_record_nonfinite_f32")?);
                b.arg(&data).arg(&len64).arg(&batch).arg(&tag).arg(&slot);
            }
            Some(ref m) => {
                b = self
                    .stream
                    .launch_builder(self.func("fq_record_nonfinite_u16")?);
                b.arg(&data)
                    .arg(&len64)
                    .arg(m)
                    .arg(&batch)
                    .arg(&tag)
                    .arg(&slot);
            }
        }
        // SAFETY: argument list matches the kernel's signature; buffers sized by the caller.
        unsafe { b.launch(cfg) }.map_err(|e| dev_err("fq_record_nonfinite", e))?;
        Ok(())
    }
}

/// Runs `f` on the device with our stream joined to the caller's stream both ways; panics in
/// the body become `CudaError::Device`.
fn on_device<T>(
    ordinal: usize,
    torch_stream: u64,
    f: impl FnOnce(&mut Dev) -> CResult<T>,
) -> CResult<T> {
    let _restore = RestoreContext::save()?;
    let slot = device(ordinal)?;
    let mut guard = slot
        .lock()
        .map_err(|_| CudaError::Device("device state poisoned by an earlier panic".into()))?;
    let dev = &mut *guard;
    dev.ctx
        .bind_to_thread()
        .map_err(|e| dev_err("bind context", e))?;
    let theirs = torch_stream as usize as dsys::CUstream;
    dev.join(dev.cu(), theirs)?;
    let out = catch_unwind(AssertUnwindSafe(|| f(dev))).unwrap_or_else(|p| {
        Err(CudaError::Device(format!(
            "panic in the CUDA path: {}",
            panic_text(&*p)
        )))
    });
    // Order the caller's later work after ours even when we failed midway.
    let joined = dev.join(theirs, dev.cu());
    let out = out?;
    joined?;
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Hessian accumulation
// ---------------------------------------------------------------------------------------------

/// Activation dtypes read by the GEMM (fp32 accumulation in every case).
pub use super::plan::ActDtype;

/// One Hessian update: `H = (n_old/n_new) H + (2/n_new) XᵀX` with `X` `[rows, n]` row-major.
pub struct HessianAdd {
    /// f32 `[n, n]`, the full symmetric matrix (both triangles maintained).
    pub h: u64,
    pub n: usize,
    pub x: u64,
    pub rows: usize,
    pub dtype: ActDtype,
    /// Tokens accumulated before this batch (`n_old`).
    pub samples: u64,
    /// Index of this batch (for error messages, as on CPU).
    pub batch: u64,
    /// The Hessian's non-finite slot ([`plan::NONFINITE_SLOT_BYTES`], all 0xff before the
    /// first batch), read by [`hessian_check`].
    pub slot: u64,
    pub stream: u64,
    pub ordinal: usize,
}

/// Records the batch's first NaN/Inf in the Hessian's device slot (unless an earlier batch
/// did; no host synchronisation), then one `cublasGemmEx` (fp16/bf16/fp32 in, fp32 out and
/// compute; tensor cores for 16-bit inputs). A non-finite batch still goes into H: the
/// Hessian must be read out through [`hessian_check`], which reports it.
pub fn hessian_add(a: &HessianAdd) -> CResult<()> {
    if a.n == 0 || a.n > i32::MAX as usize || a.rows > i32::MAX as usize {
        return Err(Error::InvalidArgument(format!(
            "Hessian (cuda): unsupported sizes n={} rows={}",
            a.n, a.rows
        ))
        .into());
    }
    if a.rows == 0 {
        return Ok(());
    }
    on_device(a.ordinal, a.stream, |dev| {
        dev.record_non_finite(a.x, a.rows * a.n, a.dtype, a.batch, a.slot)?;
        let n_new = a.samples + a.rows as u64;
        let alpha = (2.0 / n_new as f64) as f32;
        let beta = (a.samples as f64 / n_new as f64) as f32;
        let ty = match a.dtype {
            ActDtype::F32 => bsys::cudaDataType::CUDA_R_32F,
            ActDtype::F16 => bsys::cudaDataType::CUDA_R_16F,
            ActDtype::BF16 => bsys::cudaDataType::CUDA_R_16BF,
        };
        let (n, k) = (a.n as i32, a.rows as i32);
        // Column-major: X row-major [rows, n] is Xᵀ (n x rows, ld n); C = Xᵀ (Xᵀ)ᵀ = XᵀX.
        // SAFETY: pointers and sizes checked by the caller (torch tensors of these shapes).
        unsafe {
            blas(
                "cublasGemmEx (Hessian)",
                bsys::cublasGemmEx(
                    *dev.blas.handle(),
                    bsys::cublasOperation_t::CUBLAS_OP_N,
                    bsys::cublasOperation_t::CUBLAS_OP_T,
                    n,
                    n,
                    k,
                    &alpha as *const f32 as *const _,
                    a.x as *const _,
                    ty,
                    n,
                    a.x as *const _,
                    ty,
                    n,
                    &beta as *const f32 as *const _,
                    a.h as *mut _,
                    bsys::cudaDataType::CUDA_R_32F,
                    n,
                    bsys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    bsys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                ),
            )
        }
    })
}

/// Reads a Hessian's non-finite slot (one host synchronisation, when the Hessian is read out)
/// and gives the CPU accumulator's error for the first batch that had a NaN/Inf; `n` =
/// in_features. The Hessian must not be used when this fails.
pub fn hessian_check(slot: u64, n: usize, stream: u64, ordinal: usize) -> CResult<()> {
    on_device(ordinal, stream, |dev| {
        let v = dev.to_host::<u64>(slot, 3)?;
        plan::check_nonfinite_slot([v[0], v[1], v[2]], n)?;
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------------
// GPTQ solve
// ---------------------------------------------------------------------------------------------

/// Byte offsets of the solve's workspace.
#[derive(Clone, Copy, Debug)]
pub struct Layout {
    pub work: usize,
    pub wp: usize,
    pub e: usize,
    pub sums: usize,
    pub perm: usize,
    pub dead_p: usize,
    pub dead_o: usize,
    pub diag: usize,
    pub flag: usize,
    pub info: usize,
    pub potrf: usize,
    pub trtri: usize,
    pub total: usize,
    pub potrf_floats: usize,
    pub trtri_bytes: usize,
    pub trtri_host_bytes: usize,
}

impl Layout {
    pub fn new(
        rows: usize,
        cols: usize,
        potrf_floats: usize,
        trtri_bytes: usize,
        trtri_host_bytes: usize,
    ) -> Self {
        let mut at = 0usize;
        let mut take = |bytes: usize| {
            let o = at;
            at += bytes.div_ceil(256) * 256;
            o
        };
        let work = take(cols * cols * 4);
        let wp = take(rows * cols * 4);
        let e = take(rows * MAX_BATCH * 4);
        let sums = take(rows * 2 * 8);
        let perm = take(cols * 4);
        let dead_p = take(cols);
        let dead_o = take(cols);
        let diag = take(cols * 4);
        let flag = take(8);
        let info = take(4);
        let potrf = take(potrf_floats * 4);
        let trtri = take(trtri_bytes.max(1));
        Layout {
            work,
            wp,
            e,
            sums,
            perm,
            dead_p,
            dead_o,
            diag,
            flag,
            info,
            potrf,
            trtri,
            total: at,
            potrf_floats,
            trtri_bytes,
            trtri_host_bytes,
        }
    }
}

fn solver_sizes(dev: &Dev, n: usize) -> CResult<(usize, usize, usize)> {
    let mut lwork = 0i32;
    let (mut dbytes, mut hbytes) = (0usize, 0usize);
    // SAFETY: size queries; the matrix pointer is not read.
    unsafe {
        solver(
            "cusolverDnSpotrf_bufferSize",
            ssys::cusolverDnSpotrf_bufferSize(
                dev.solver.cu(),
                ssys::cublasFillMode_t::CUBLAS_FILL_MODE_UPPER,
                n as i32,
                std::ptr::null_mut(),
                n as i32,
                &mut lwork,
            ),
        )?;
        solver(
            "cusolverDnXtrtri_bufferSize",
            ssys::cusolverDnXtrtri_bufferSize(
                dev.solver.cu(),
                ssys::cublasFillMode_t::CUBLAS_FILL_MODE_UPPER,
                ssys::cublasDiagType_t::CUBLAS_DIAG_NON_UNIT,
                n as i64,
                ssys::cudaDataType::CUDA_R_32F,
                std::ptr::null_mut(),
                n as i64,
                &mut dbytes,
                &mut hbytes,
            ),
        )?;
    }
    Ok((lwork.max(0) as usize, dbytes, hbytes))
}

/// Workspace bytes [`gptq_solve`] needs for a `rows x cols` layer on device `ordinal`.
pub fn solve_workspace_bytes(rows: usize, cols: usize, ordinal: usize) -> CResult<usize> {
    if cols == 0 || cols > i32::MAX as usize || rows > i32::MAX as usize {
        return Err(Error::InvalidArgument(format!(
            "gptq (cuda): unsupported weight shape {rows}x{cols}"
        ))
        .into());
    }
    let _restore = RestoreContext::save()?;
    let slot = device(ordinal)?;
    let dev = slot
        .lock()
        .map_err(|_| CudaError::Device("device state poisoned".into()))?;
    dev.ctx
        .bind_to_thread()
        .map_err(|e| dev_err("bind context", e))?;
    let (p, t, h) = solver_sizes(&dev, cols)?;
    Ok(Layout::new(rows, cols, p, t, h).total)
}

/// Device addresses of one solve. Shapes: weight f32 `[rows, cols]`, hessian f32
/// `[cols, cols]`, codes u8 `[rows, cols]`, scales f32 / zeros i32 `[rows, n_groups]`,
/// dequantized f32 `[rows, cols]` (outputs in the original column order), workspace of
/// `workspace_bytes` >= [`solve_workspace_bytes`].
pub struct SolveArgs {
    pub weight: u64,
    pub hessian: u64,
    pub codes: u64,
    pub scales: u64,
    pub zeros: u64,
    pub dequantized: u64,
    pub workspace: u64,
    pub workspace_bytes: usize,
    pub rows: usize,
    pub cols: usize,
    pub stream: u64,
    pub ordinal: usize,
}

/// Host-side results of a solve (the tensors are written in place).
#[derive(Clone, Debug)]
pub struct SolveOutcome {
    pub n_groups: usize,
    pub loss: f64,
    pub damp_frac: f32,
    pub damp_attempts: Vec<f32>,
    pub dead: Vec<usize>,
    pub perm: Option<Vec<usize>>,
    pub g_idx: Vec<i32>,
}

/// The GPTQ solve of one layer on the GPU (see `model.rs` for the algorithm, step by step).
pub fn gptq_solve(a: &SolveArgs, opts: &GptqOptions) -> CResult<SolveOutcome> {
    let (rows, n) = (a.rows, a.cols);
    let mode = plan::check_options(rows, n, opts)?;
    on_device(a.ordinal, a.stream, |dev| {
        let (p, t, h) = solver_sizes(dev, n)?;
        let lay = Layout::new(rows, n, p, t, h);
        if a.workspace_bytes < lay.total {
            return Err(Error::InvalidArgument(format!(
                "gptq (cuda): workspace has {} bytes, the solve needs {} (ask solve_workspace_bytes)",
                a.workspace_bytes, lay.total
            ))
            .into());
        }
        let ws = |off: usize| a.workspace + off as u64;
        let flag = ws(lay.flag);

        // Same checks, same order, same messages as gptq_quantize.
        if let Some(i) = dev.first_non_finite(a.weight, rows * n, None, flag)? {
            let v = dev.to_host::<f32>(a.weight + 4 * i as u64, 1)?[0];
            return Err(plan::non_finite("weight", v, i / n, i % n).into());
        }
        if let Some(i) = dev.first_non_finite(a.hessian, n * n, None, flag)? {
            let v = dev.to_host::<f32>(a.hessian + 4 * i as u64, 1)?[0];
            return Err(plan::non_finite("hessian", v, i / n, i % n).into());
        }
        let n32 = n as i32;
        let rows32 = rows as i32;
        {
            let cfg = LaunchConfig {
                grid_dim: (n.div_ceil(256) as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            let out = ws(lay.diag);
            let mut b = dev.stream.launch_builder(dev.func("fq_diag")?);
            b.arg(&a.hessian).arg(&n32).arg(&out);
            // SAFETY: arguments match the kernel; sizes from the layout.
            unsafe { b.launch(cfg) }.map_err(|e| dev_err("fq_diag", e))?;
        }
        let diag = dev.to_host::<f32>(ws(lay.diag), n)?;
        let order = plan::processing_order(&diag, opts.act_order);
        let dead = plan::dead_positions(&diag, &order)?;
        let mean = plan::mean_diag(&diag, &order, &dead);
        let mut dead_orig = vec![0u8; n];
        for (p, &c) in order.iter().enumerate() {
            dead_orig[c] = dead[p] as u8;
        }
        let perm32: Vec<i32> = order.iter().map(|&c| c as i32).collect();
        let dead_p: Vec<u8> = dead.iter().map(|&d| d as u8).collect();
        dev.to_device(ws(lay.perm), &perm32)?;
        dev.to_device(ws(lay.dead_p), &dead_p)?;
        dev.to_device(ws(lay.dead_o), &dead_orig)?;

        // Damped, permuted, reversed H -> potrf, escalating as linalg does.
        let (work, perm_d, dead_d, info) =
            (ws(lay.work), ws(lay.perm), ws(lay.dead_p), ws(lay.info));
        let upper = ssys::cublasFillMode_t::CUBLAS_FILL_MODE_UPPER;
        let damping = plan::escalate(opts.damping, n, mean, |damp| {
            let mut b = dev.stream.launch_builder(dev.func("fq_prep_hessian")?);
            b.arg(&a.hessian)
                .arg(&perm_d)
                .arg(&dead_d)
                .arg(&n32)
                .arg(&damp)
                .arg(&work);
            // SAFETY: arguments match the kernel; sizes from the layout.
            unsafe { b.launch(dev.flat((n * n) as u64)) }
                .map_err(|e| dev_err("fq_prep_hessian", e))?;
            // SAFETY: work is n x n, the potrf workspace holds the queried floats.
            unsafe {
                solver(
                    "cusolverDnSpotrf",
                    ssys::cusolverDnSpotrf(
                        dev.solver.cu(),
                        upper,
                        n32,
                        work as *mut f32,
                        n32,
                        ws(lay.potrf) as *mut f32,
                        lay.potrf_floats as i32,
                        info as *mut i32,
                    ),
                )?;
            }
            let st = dev.to_host::<i32>(info, 1)?[0];
            match st {
                0 => Ok(None),
                // Leading minor `st` failed: pivot st-1 of the reversed matrix.
                s if s > 0 => Ok(Some(n - s as usize)),
                s => Err(CudaError::Core(Error::InvalidArgument(format!(
                    "cusolverDnSpotrf: invalid argument {}",
                    -s
                )))),
            }
        })?;
        // Hinv: invert the factor, reverse.
        let mut host_ws = vec![0u8; lay.trtri_host_bytes.max(1)];
        // SAFETY: sizes as queried; host workspace alive for the call.
        unsafe {
            solver(
                "cusolverDnXtrtri",
                ssys::cusolverDnXtrtri(
                    dev.solver.cu(),
                    upper,
                    ssys::cublasDiagType_t::CUBLAS_DIAG_NON_UNIT,
                    n as i64,
                    ssys::cudaDataType::CUDA_R_32F,
                    work as *mut _,
                    n as i64,
                    ws(lay.trtri) as *mut _,
                    lay.trtri_bytes,
                    host_ws.as_mut_ptr() as *mut _,
                    lay.trtri_host_bytes,
                    info as *mut i32,
                ),
            )?;
        }
        let st = dev.to_host::<i32>(info, 1)?[0];
        if st != 0 {
            return Err(CudaError::Device(format!(
                "cusolverDnXtrtri reported {st} (singular factor)"
            )));
        }
        {
            let nn = (n * n) as u64;
            let threads = nn.div_ceil(2);
            let cfg = LaunchConfig {
                grid_dim: (threads.div_ceil(256) as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut b = dev.stream.launch_builder(dev.func("fq_reverse_upper")?);
            b.arg(&work).arg(&n32);
            // SAFETY: arguments match the kernel.
            unsafe { b.launch(cfg) }.map_err(|e| dev_err("fq_reverse_upper", e))?;
            let cfg = LaunchConfig {
                grid_dim: (n.div_ceil(256) as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            let out = ws(lay.diag);
            let mut b = dev.stream.launch_builder(dev.func("fq_diag")?);
            b.arg(&work).arg(&n32).arg(&out);
            // SAFETY: arguments match the kernel.
            unsafe { b.launch(cfg) }.map_err(|e| dev_err("fq_diag", e))?;
        }
        plan::check_pivots(&dev.to_host::<f32>(ws(lay.diag), n)?, damping.frac)?;

        // Working weights, up-front grids, loss sums.
        let ng = mode.n_groups(n);
        let ng32 = ng as i32;
        let maxq = opts.spec.maxq() as i32;
        let sym = opts.spec.symmetric as i32;
        // ScaleDtype's declaration order is the kernels' sdt code.
        let sdt = opts.spec.scale_dtype as i32;
        let wp = ws(lay.wp);
        {
            let mut b = dev.stream.launch_builder(dev.func("fq_permute_weight")?);
            b.arg(&a.weight)
                .arg(&perm_d)
                .arg(&dead_d)
                .arg(&rows32)
                .arg(&n32)
                .arg(&wp);
            // SAFETY: arguments match the kernel.
            unsafe { b.launch(dev.flat((rows * n) as u64)) }
                .map_err(|e| dev_err("fq_permute_weight", e))?;
        }
        if let Some(g) = mode.upfront_width(n) {
            let g32 = g as i32;
            let items = (rows * ng) as u64;
            let cfg = LaunchConfig {
                grid_dim: (items.div_ceil(WARPS_PER_BLOCK as u64) as u32, 1, 1),
                block_dim: (32 * WARPS_PER_BLOCK, 1, 1),
                shared_mem_bytes: 0,
            };
            let dead_o = ws(lay.dead_o);
            let mut b = dev.stream.launch_builder(dev.func("fq_fit_groups")?);
            b.arg(&a.weight)
                .arg(&dead_o)
                .arg(&rows32)
                .arg(&n32)
                .arg(&g32)
                .arg(&ng32)
                .arg(&maxq)
                .arg(&sym)
                .arg(&sdt)
                .arg(&a.scales)
                .arg(&a.zeros);
            // SAFETY: arguments match the kernel.
            unsafe { b.launch(cfg) }.map_err(|e| dev_err("fq_fit_groups", e))?;
        }
        let sums = ws(lay.sums);
        dev.memset(sums, 0, rows * 16)?;

        // The batches: kernel, then one GEMM for the later columns.
        let (mode_code, g) = mode.kernel_code(n);
        let g32 = g as i32;
        let e = ws(lay.e);
        let cfg = LaunchConfig {
            grid_dim: (rows.div_ceil(WARPS_PER_BLOCK as usize) as u32, 1, 1),
            block_dim: (32 * WARPS_PER_BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        let (minus1, one) = (-1.0f32, 1.0f32);
        for (i1, i2) in plan::batches(n, mode, opts.block_size) {
            let (i1_32, i2_32) = (i1 as i32, i2 as i32);
            let mut b = dev.stream.launch_builder(dev.func("fq_gptq_batch")?);
            b.arg(&wp)
                .arg(&a.weight)
                .arg(&work)
                .arg(&perm_d)
                .arg(&dead_d)
                .arg(&e)
                .arg(&a.codes)
                .arg(&a.dequantized)
                .arg(&a.scales)
                .arg(&a.zeros)
                .arg(&sums)
                .arg(&rows32)
                .arg(&n32)
                .arg(&ng32)
                .arg(&i1_32)
                .arg(&i2_32)
                .arg(&mode_code)
                .arg(&g32)
                .arg(&maxq)
                .arg(&sym)
                .arg(&sdt);
            // SAFETY: arguments match the kernel; every buffer sized by the layout / caller.
            unsafe { b.launch(cfg) }.map_err(|e| dev_err("fq_gptq_batch", e))?;
            if i2 < n {
                let (m, k) = ((n - i2) as i32, (i2 - i1) as i32);
                // Column-major: W'ᵀ[i2:, :] -= Hinv[i1:i2, i2:]ᵀ Eᵀ (see model::lazy_update).
                // SAFETY: offsets inside the n x n factor, the rows x n working weights and the
                // rows x 128 error buffer.
                unsafe {
                    blas(
                        "cublasSgemm (lazy update)",
                        bsys::cublasSgemm_v2(
                            *dev.blas.handle(),
                            bsys::cublasOperation_t::CUBLAS_OP_N,
                            bsys::cublasOperation_t::CUBLAS_OP_N,
                            m,
                            rows32,
                            k,
                            &minus1,
                            (work + 4 * (i1 * n + i2) as u64) as *const f32,
                            n32,
                            e as *const f32,
                            MAX_BATCH as i32,
                            &one,
                            (wp + 4 * i2 as u64) as *mut f32,
                            n32,
                        ),
                    )?;
                }
            }
        }
        if opts.spec.scale_dtype != ScaleDtype::F32 {
            // A scale past the storage dtype's range became +inf when it was rounded.
            let scales = dev.to_host::<f32>(a.scales, rows * ng)?;
            check_scales(&scales, ng, opts.spec.scale_dtype)?;
        }
        let s = dev.to_host::<f64>(sums, 2 * rows)?;
        let se: f64 = s.iter().step_by(2).sum();
        let sd: f64 = s.iter().skip(1).step_by(2).sum();
        Ok(SolveOutcome {
            n_groups: ng,
            loss: se - damping.value as f64 * sd,
            damp_frac: damping.frac,
            damp_attempts: damping.attempts,
            dead: (0..n).filter(|&c| dead_orig[c] != 0).collect(),
            g_idx: mode.g_idx(n, &order),
            perm: opts.act_order.then_some(order),
        })
    })
}

/// The device's name (for benchmark reports).
pub fn device_name(ordinal: usize) -> CResult<String> {
    let _restore = RestoreContext::save()?;
    let slot = device(ordinal)?;
    let dev = slot
        .lock()
        .map_err(|_| CudaError::Device("device state poisoned".into()))?;
    dev.ctx.name().map_err(|e| dev_err("device name", e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::linalg::DampingPolicy;
    use crate::quantizer::{Observer, QuantSpec};

    fn opts() -> GptqOptions {
        GptqOptions {
            spec: QuantSpec {
                bits: 4,
                symmetric: true,
                observer: Observer::MinMax,
                scale_dtype: ScaleDtype::F32,
            },
            group_size: Some(128),
            act_order: false,
            static_groups: false,
            group_aware: false,
            block_size: 128,
            damping: DampingPolicy::default(),
        }
    }

    /// Without a driver every entry point returns `Unavailable` (never panics, never touches
    /// the null addresses). On a GPU machine this test only checks the reason is None.
    #[test]
    fn without_cuda_every_entry_point_fails_cleanly() {
        if available() {
            assert!(unavailable_reason().is_none());
            return;
        }
        let reason = unavailable_reason().unwrap_or_default();
        assert!(!reason.is_empty());
        let args = SolveArgs {
            weight: 0,
            hessian: 0,
            codes: 0,
            scales: 0,
            zeros: 0,
            dequantized: 0,
            workspace: 0,
            workspace_bytes: 0,
            rows: 4,
            cols: 8,
            stream: 0,
            ordinal: 0,
        };
        assert!(matches!(
            gptq_solve(&args, &opts()),
            Err(CudaError::Unavailable(_))
        ));
        assert!(matches!(
            solve_workspace_bytes(4, 8, 0),
            Err(CudaError::Unavailable(_))
        ));
        assert!(matches!(device_name(0), Err(CudaError::Unavailable(_))));
        let h = HessianAdd {
            h: 0,
            n: 8,
            x: 0,
            rows: 3,
            dtype: ActDtype::BF16,
            samples: 0,
            batch: 0,
            slot: 0,
            stream: 0,
            ordinal: 0,
        };
        assert!(matches!(hessian_add(&h), Err(CudaError::Unavailable(_))));
        assert!(matches!(
            hessian_check(0, 8, 0, 0),
            Err(CudaError::Unavailable(_))
        ));
        // Argument errors come first, as on CPU, whether or not CUDA is present.
        let mut o = opts();
        o.spec.bits = 5;
        assert!(matches!(
            gptq_solve(&args, &o),
            Err(CudaError::Core(Error::InvalidArgument(_)))
        ));
        let e = CudaError::Unavailable(reason);
        assert!(e.to_string().starts_with("CUDA is not available: "), "{e}");
    }

    #[test]
    fn workspace_layout_is_aligned_and_disjoint() {
        let l = Layout::new(7, 300, 1000, 4096, 16);
        let mut spans = vec![
            (l.work, 300 * 300 * 4),
            (l.wp, 7 * 300 * 4),
            (l.e, 7 * MAX_BATCH * 4),
            (l.sums, 7 * 16),
            (l.perm, 300 * 4),
            (l.dead_p, 300),
            (l.dead_o, 300),
            (l.diag, 300 * 4),
            (l.flag, 8),
            (l.info, 4),
            (l.potrf, 4000),
            (l.trtri, 4096),
        ];
        spans.sort();
        for w in spans.windows(2) {
            assert!(w[0].0 + w[0].1 <= w[1].0);
        }
        for (o, _) in &spans {
            assert_eq!(o % 256, 0);
        }
        let (o, len) = spans[spans.len() - 1];
        assert!(o + len <= l.total);
    }
}
