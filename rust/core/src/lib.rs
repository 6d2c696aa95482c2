//! ferroquant-core: the arithmetic of GPTQ post-training quantization.
//!
//! Pure Rust; knows nothing of Python, torch or model structure. Every matrix is a
//! row-major `&[f32]` slice with explicit dimensions. One concern per module:
//!
//! - [`hessian`]   streaming `H = (2/n) Σ x xᵀ` accumulation (fp32/fp16/bf16 input, fp32 sums)
//! - [`dxxt`]      the streaming cross term `(X - X~) X~ᵀ` of float and quantized inputs
//! - [`syrk_bf16`] the same update from bf16 activations with AVX512-BF16 (`vdpbf16ps`)
//! - [`linalg`]    dead-column handling, damping and its escalation, the Cholesky factor the
//!   solver needs
//! - [`quantizer`] per-row/per-group scales and zero points (min-max, MSE grid search)
//! - [`observer`]  activation ranges (min-max, static, moving average, MSE), scales/zero points,
//!   int and FP8 quantize-dequantize, dynamic per-token fake quantization
//! - [`fp8`]       FP8 E4M3FN encoding (round to nearest even, saturating) and decoding
//! - [`gptq`]      the column solver (lazy batches, groups, act-order, static groups)
//! - [`qronos`]    Qronos: the closed-form refit against the float output GPTQ then starts from
//! - [`pack`]      int2/3/4/8 bit packing for the GPTQ and compressed-tensors layouts
//! - [`io`]        atomic, sharded safetensors writing
//! - [`error`]     the one error type every fallible function returns
//! - [`cuda`]      the same solver on NVIDIA GPUs (feature `cuda`; its CPU model always builds)

pub mod cuda;
pub mod dxxt;
pub mod error;
pub mod fp8;
pub mod gptq;
pub mod hessian;
pub mod io;
pub mod linalg;
pub mod observer;
pub mod pack;
pub mod qronos;
pub mod quantizer;
pub mod syrk_bf16;

pub use error::{Error, Result};
