//! The GPTQ operations on NVIDIA GPUs: Hessian accumulation (cuBLAS), the damped factor
//! (cuSOLVER) and the column solve (an NVRTC kernel per batch of <= 128 columns plus one cuBLAS
//! GEMM per batch), on device memory owned by the caller (torch).
//!
//! - [`plan`]: host-side decisions (checks, order, batches, damping escalation, messages) shared
//!   by the device code and the CPU model. Always built.
//! - [`model`]: the device algorithm written as plain Rust, tested against `gptq::gptq_quantize`
//!   on every machine. Always built.
//! - [`kernels`]: the CUDA C source of the kernels (always built: it is a string) and, with the
//!   `cuda` feature, its NVRTC compilation.
//! - `device` (feature `cuda`): contexts, streams, cuBLAS/cuSOLVER calls and launches through
//!   `cudarc`, loaded at run time so the same build works on machines without CUDA.

pub mod kernels;
pub mod model;
pub mod plan;

#[cfg(feature = "cuda")]
pub mod device;

/// Whether the CUDA path can run here: built with the `cuda` feature, the driver library loads
/// and a context on device 0 can be created. Never panics.
pub fn available() -> bool {
    #[cfg(feature = "cuda")]
    {
        device::available()
    }
    #[cfg(not(feature = "cuda"))]
    {
        false
    }
}

/// Why the CUDA path is not available (None when it is).
pub fn unavailable_reason() -> Option<String> {
    #[cfg(feature = "cuda")]
    {
        device::unavailable_reason()
    }
    #[cfg(not(feature = "cuda"))]
    {
        Some("ferroquant was built without the 'cuda' feature".into())
    }
}
