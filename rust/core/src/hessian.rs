//! Streaming Hessian accumulation: `H = (2/n) Σ_t x_t x_tᵀ` over calibration tokens.
//!
//! OWNER: numerics helper. CONTRACT (do not change signatures without telling the lead):

use crate::error::Result;

/// One batch of activations, row-major `[rows, n]`.
#[derive(Clone, Copy, Debug)]
pub enum Activations<'a> {
    F32(&'a [f32]),
    F16(&'a [half::f16]),
    BF16(&'a [half::bf16]),
}

/// Running `H = (2/n) Σ x xᵀ` for one linear layer with `n` input features.
#[derive(Clone, Debug)]
pub struct HessianAccumulator {
    n: usize,
    // lead note: storage is the implementer's choice (e.g. lower triangle kept, fp32).
    h: Vec<f32>,
    samples: u64,
}

impl HessianAccumulator {
    /// `n` = in_features; error if 0.
    pub fn new(n: usize) -> Result<Self> {
        let _ = n;
        todo!()
    }
    pub fn columns(&self) -> usize {
        self.n
    }
    /// Number of token rows accumulated so far.
    pub fn samples(&self) -> u64 {
        self.samples
    }
    /// Add `rows` tokens; `x.len()` must be `rows * n`. Non-finite values -> `Error::NonFinite`.
    /// Rescales the running sum as samples arrive (H *= n_old/n_new; H += (2/n_new) XᵀX), symmetric
    /// rank-k update (only one triangle computed), fp32 accumulation.
    pub fn add_batch(&mut self, x: Activations<'_>, rows: usize) -> Result<()> {
        let _ = (x, rows);
        todo!()
    }
    /// Combine another accumulator (same n) as if its samples had been added here.
    pub fn merge(&mut self, other: &HessianAccumulator) -> Result<()> {
        let _ = other;
        todo!()
    }
    /// The full symmetric `n x n` Hessian, row-major.
    pub fn hessian(&self) -> Vec<f32> {
        let _ = &self.h;
        todo!()
    }
}
