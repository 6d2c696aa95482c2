//! Dead-column handling, damping and the Cholesky factor used by the GPTQ solver.
//!
//! OWNER: numerics helper. CONTRACT (do not change signatures without telling the lead).

use crate::error::Result;

/// How damping starts and escalates when the factorisation fails.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DampingPolicy {
    /// First fraction of mean(diag H) added to the diagonal (GPTQ's `percdamp`, default 0.01).
    pub initial: f32,
    /// Multiplier applied after each failed attempt (default 2.0).
    pub growth: f32,
    /// Largest fraction tried before giving up (default 1.0).
    pub max: f32,
}

impl Default for DampingPolicy {
    fn default() -> Self {
        Self { initial: 0.01, growth: 2.0, max: 1.0 }
    }
}

/// Result of preparing and factoring a damped Hessian.
#[derive(Clone, Debug)]
pub struct Factorization {
    pub n: usize,
    /// Row-major upper-triangular `U'` with `H_damped = U' U'ᵀ` (the Cholesky factor of the
    /// row/column-reversed matrix, reversed back). `U'⁻¹` is the upper Cholesky factor of
    /// `H_damped⁻¹`, so the solver never forms an inverse.
    pub factor: Vec<f32>,
    /// Damping fraction finally used (of mean(diag H) after dead columns got 1).
    pub damp_frac: f32,
    /// Absolute value added to the diagonal.
    pub damp_value: f32,
    /// Every fraction tried, in order; the last one succeeded.
    pub attempts: Vec<f32>,
    /// Indices of dead inputs (zero diagonal): their H_ii was set to 1.
    pub dead: Vec<usize>,
}

/// Sets `H_ii = 1` for every zero diagonal entry (and zeros that row/column off-diagonal),
/// returning the dead indices. Error if every column is dead (no calibration signal), or on
/// NaN/Inf, or if `h.len() != n*n`.
pub fn mark_dead_columns(h: &mut [f32], n: usize) -> Result<Vec<usize>> {
    let _ = (h, n);
    todo!()
}

/// Dead-column handling, damping, and the upper-lower Cholesky factor with damping escalation.
/// `Error::NotPositiveDefinite` names every fraction tried when all fail.
pub fn factor_damped(h: &[f32], n: usize, policy: DampingPolicy) -> Result<Factorization> {
    let _ = (h, n, policy);
    todo!()
}

/// The upper Cholesky factor `U` of `H_damped⁻¹` (`H⁻¹ = Uᵀ U`), as the reference computes it;
/// returned with the factorisation details. Used by callers and tests that want the inverse.
pub fn damped_inverse_upper(h: &[f32], n: usize, policy: DampingPolicy) -> Result<(Vec<f32>, Factorization)> {
    let _ = (h, n, policy);
    todo!()
}
