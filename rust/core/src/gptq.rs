//! The GPTQ column solver.
//!
//! OWNER: solver helper. CONTRACT (do not change signatures without telling the lead).

use crate::error::Result;
use crate::linalg::DampingPolicy;
use crate::quantizer::QuantSpec;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GptqOptions {
    pub spec: QuantSpec,
    /// None = one group per row (per-channel); Some(g) with g > 0, need not divide cols.
    pub group_size: Option<usize>,
    /// Process columns by descending diag(H).
    pub act_order: bool,
    /// With act_order and groups: grids fixed up front per contiguous original group,
    /// so g_idx stays `col / group_size`.
    pub static_groups: bool,
    /// Lazy-batch width (default 128).
    pub block_size: usize,
    pub damping: DampingPolicy,
}

/// Output of one layer's solve. All `[rows, cols]` arrays are row-major in the ORIGINAL
/// column order.
#[derive(Clone, Debug)]
pub struct GptqResult {
    pub rows: usize,
    pub cols: usize,
    pub n_groups: usize,
    /// Integer codes in [0, maxq], `[rows, cols]`.
    pub codes: Vec<u8>,
    /// `[rows, n_groups]`.
    pub scales: Vec<f32>,
    /// `[rows, n_groups]`, integers in [0, maxq].
    pub zeros: Vec<i32>,
    /// Group of each original column, `[cols]`.
    pub g_idx: Vec<i32>,
    /// `scale * (code - zero)`, `[rows, cols]`.
    pub dequantized: Vec<f32>,
    /// tr((W-Q) H (W-Q)ᵀ) against the undamped Hessian (dead columns are zero in both).
    pub loss: f64,
    /// Column processing order when act_order (perm[p] = original column).
    pub perm: Option<Vec<usize>>,
    pub damp_frac: f32,
    pub damp_attempts: Vec<f32>,
    pub dead: Vec<usize>,
}

/// Quantize `weight` (`[rows, cols]`, row-major) with Hessian `hessian` (`[cols, cols]`).
pub fn gptq_quantize(weight: &[f32], rows: usize, cols: usize, hessian: &[f32], opts: &GptqOptions) -> Result<GptqResult> {
    let _ = (weight, rows, cols, hessian, opts);
    todo!()
}

/// Round-to-nearest baseline with the same grids and output shape (no Hessian; loss = NaN
/// unless a Hessian is given).
pub fn rtn_quantize(weight: &[f32], rows: usize, cols: usize, hessian: Option<&[f32]>, spec: &QuantSpec, group_size: Option<usize>) -> Result<GptqResult> {
    let _ = (weight, rows, cols, hessian, spec, group_size);
    todo!()
}
