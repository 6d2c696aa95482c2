//! Streaming GPTAQ cross term: `dXXᵀ = (2/n) Σ_t (x_t - x~_t) x~_tᵀ` over calibration tokens,
//! with `x_t` the float model's input of a layer and `x~_t` the partly quantized model's input
//! for the same token.
//!
//! Same per-sample convention as [`crate::hessian::HessianAccumulator`] (`*= n_old/n_new`,
//! then `+= (2/n_new) ·` the batch's sum), so `dXXᵀ` and `H` are scaled alike and `dXXᵀ H⁻¹`
//! does not depend on the number of tokens. The matrix is not symmetric: row i is the float-
//! minus-quantized feature i, column j the quantized feature j. One f32 GEMM per batch.

use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};
use rayon::prelude::*;

use crate::error::{Error, Result};

/// Running `(2/n) Σ (x - x~) x~ᵀ` for one linear layer with `n` input features.
#[derive(Clone, Debug)]
pub struct CrossAccumulator {
    n: usize,
    /// `n x n`, row-major.
    d: Vec<f32>,
    samples: u64,
    batches: u64,
}

impl CrossAccumulator {
    /// `n` = in_features; error if 0.
    pub fn new(n: usize) -> Result<Self> {
        if n == 0 {
            return Err(Error::InvalidArgument(
                "CrossAccumulator: in_features must be at least 1, got 0".into(),
            ));
        }
        let nn = n.checked_mul(n).ok_or_else(|| {
            Error::InvalidArgument(format!("CrossAccumulator: in_features {n} is too large"))
        })?;
        Ok(Self {
            n,
            d: vec![0.0; nn],
            samples: 0,
            batches: 0,
        })
    }

    pub fn columns(&self) -> usize {
        self.n
    }

    /// Number of token rows accumulated so far.
    pub fn samples(&self) -> u64 {
        self.samples
    }

    /// Add `rows` tokens: `float_rows` and `quant_rows` row-major `[rows, n]`, row t of both
    /// the same token. Validated before anything is added (on error nothing changes).
    pub fn add_batch(&mut self, float_rows: &[f32], quant_rows: &[f32], rows: usize) -> Result<()> {
        let n = self.n;
        for (what, x) in [("float", float_rows), ("quantized", quant_rows)] {
            if rows.checked_mul(n) != Some(x.len()) {
                return Err(Error::InvalidArgument(format!(
                    "dXXᵀ batch {}: got {} {what} input values for {rows} token rows of {n} input \
                     features (expected {rows}*{n})",
                    self.batches,
                    x.len()
                )));
            }
            if let Some(i) = x.iter().position(|v| !v.is_finite()) {
                return Err(Error::NonFinite(format!(
                    "dXXᵀ batch {}: non-finite {what} input at token row {}, input feature {}",
                    self.batches,
                    i / n,
                    i % n
                )));
            }
        }
        if rows == 0 {
            return Ok(());
        }
        let n_old = self.samples;
        let n_new = n_old + rows as u64;
        if n_old > 0 {
            let s = (n_old as f64 / n_new as f64) as f32;
            self.d.par_iter_mut().for_each(|v| *v *= s);
        }
        let alpha = (2.0 / n_new as f64) as f32;
        let mut diff = vec![0.0f32; rows * n];
        diff.par_iter_mut()
            .zip(float_rows.par_iter().zip(quant_rows))
            .for_each(|(d, (&f, &q))| *d = f - q);
        // (Xf - Xq)ᵀ Xq: both [rows, n] row-major, transposed views.
        let lhs = MatRef::from_row_major_slice(&diff, rows, n).transpose();
        let rhs = MatRef::from_row_major_slice(quant_rows, rows, n);
        matmul(
            MatMut::from_row_major_slice_mut(&mut self.d, n, n),
            Accum::Add,
            lhs,
            rhs,
            alpha,
            Par::rayon(0),
        );
        self.samples = n_new;
        self.batches += 1;
        Ok(())
    }

    /// The `n x n` matrix, row-major.
    pub fn dxxt(&self) -> Vec<f32> {
        self.d.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_direct_sum_and_hessian_scaling() {
        let (n, t) = (5usize, 37usize);
        let xf: Vec<f32> = (0..t * n)
            .map(|k| ((k * 7 % 13) as f32 - 6.0) / 5.0)
            .collect();
        let xq: Vec<f32> = (0..t * n)
            .map(|k| xf[k] + ((k * 3 % 5) as f32 - 2.0) / 50.0)
            .collect();
        let mut acc = CrossAccumulator::new(n).unwrap();
        // Uneven batches, one empty.
        for (a, b) in [(0usize, 10usize), (10, 10), (10, 30), (30, 37)] {
            acc.add_batch(&xf[a * n..b * n], &xq[a * n..b * n], b - a)
                .unwrap();
        }
        assert_eq!(acc.samples(), t as u64);
        let d = acc.dxxt();
        for i in 0..n {
            for j in 0..n {
                let mut s = 0.0f64;
                for r in 0..t {
                    s += (xf[r * n + i] - xq[r * n + i]) as f64 * xq[r * n + j] as f64;
                }
                let want = 2.0 * s / t as f64;
                assert!((d[i * n + j] as f64 - want).abs() < 1e-5, "({i},{j})");
            }
        }
        // Same inputs: exactly zero.
        let mut z = CrossAccumulator::new(n).unwrap();
        z.add_batch(&xq, &xq, t).unwrap();
        assert!(z.dxxt().iter().all(|&v| v == 0.0));
        // Bad input leaves it unchanged.
        let mut bad = xq.clone();
        bad[7] = f32::NAN;
        assert!(acc.add_batch(&xf, &bad, t).is_err());
        assert!(acc.add_batch(&xf[1..], &xq, t).is_err());
        assert_eq!(acc.samples(), t as u64);
        assert_eq!(acc.dxxt(), d);
    }
}
