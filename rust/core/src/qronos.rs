//! Qronos (Zhang et al., ICLR 2026): GPTQ that corrects the past as well as shaping the future.
//!
//! With `X` the float model's inputs of a layer and `X~` the partly quantized model's inputs
//! (`H = X~ X~ᵀ`, `D = (X - X~) X~ᵀ` scaled alike; `G = X X~ᵀ = H + D`), Qronos fits the
//! quantized layer to the FLOAT output `W X`, column by column in the GPTQ order:
//!
//! 1. the first column `c` gets the value that best explains the float output with the other
//!    columns as they are, `v_c = w_c + (W D)[:, c] / H_cc`, and is quantized (`q_c`);
//! 2. every later column is refitted in closed form against the float output given `q_c`,
//!    `V_L = (W G_λ[:, L] - q_c H[c, L]) (H_LL + λI)⁻¹` (`L` the live columns after `c`, `G_λ =
//!    G + λI`, i.e. a ridge towards `W`);
//! 3. from there on plain GPTQ error diffusion: once the later columns hold the least-squares
//!    optimum, quantizing one more column and moving the rest by the OBS update keeps them at
//!    the optimum given everything quantized so far (which is why no further refit is needed).
//!
//! Steps 2-3 equal plain GPTQ started from `S`, `S_c = v_c`, `S_L = W_L + (W D[:, L] -
//! (v_c - w_c) H[c, L]) (H_LL + λI)⁻¹`: GPTQ's first update moves `S_L` by `(v_c - q_c) H[c, L]
//! (H_LL + λI)⁻¹`, which turns the refit given `v_c` into the refit given `q_c`. `S` does not
//! depend on `q_c`, so it is computed once (f64: one GEMM `W D` and one Cholesky solve) and the
//! GPTQ solver runs unchanged on it, its lazy batches, groups, act-order and storage-dtype
//! scales included. The identity needs `λ` to be the damping of GPTQ's own factorisation, so
//! the ridge is GPTQ's (`dampening_frac · mean diag H`) where the reference implementation
//! (Brevitas) uses `1e-6 · λ_max(H)` for both; should the solver have to escalate its damping,
//! the refit keeps the first value (the result is then GPTQ from a refit with a slightly
//! different ridge). When the inputs are unchanged by quantization (`D = 0`), `S = W` exactly
//! and the result is GPTQ's bit for bit.
//!
//! Grids are fitted as GPTQ fits them, on the state a group has when it starts (per channel:
//! on `S`). The reported loss is GPTQ's `tr((S - Q) H (S - Q)ᵀ)` against the refit start.

use faer::linalg::matmul::matmul;
use faer::linalg::solvers::Solve;
use faer::{Accum, Mat, Par, Side};
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::gptq::{self, GptqOptions, GptqResult};
use crate::linalg;

/// Qronos on one layer: `dxxt` is `(X - X~) X~ᵀ` (`[cols, cols]`, row-major, row = float-minus-
/// quantized input feature; [`crate::dxxt::CrossAccumulator`]) scaled like `hessian`.
pub fn qronos_quantize(
    weight: &[f32],
    rows: usize,
    cols: usize,
    hessian: &[f32],
    dxxt: &[f32],
    opts: &GptqOptions,
) -> Result<GptqResult> {
    let start = qronos_start(weight, rows, cols, hessian, dxxt, opts)?;
    gptq::gptq_quantize(&start, rows, cols, hessian, opts)
}

/// The refitted start `S` (`[rows, cols]`, row-major, original column order) from which plain
/// GPTQ gives Qronos' result; see the module documentation.
pub fn qronos_start(
    weight: &[f32],
    rows: usize,
    cols: usize,
    hessian: &[f32],
    dxxt: &[f32],
    opts: &GptqOptions,
) -> Result<Vec<f32>> {
    let n = cols;
    if rows.checked_mul(cols) != Some(weight.len()) {
        return Err(Error::InvalidArgument(format!(
            "qronos: weight has {} values, expected rows*cols = {rows}*{cols}",
            weight.len()
        )));
    }
    for (what, m) in [("hessian", hessian), ("dxxt", dxxt)] {
        if n.checked_mul(n) != Some(m.len()) {
            return Err(Error::InvalidArgument(format!(
                "qronos: {what} has {} values, expected cols*cols = {n}*{n}",
                m.len()
            )));
        }
    }
    for (what, m) in [("weight", weight), ("hessian", hessian), ("dxxt", dxxt)] {
        if let Some(i) = m.iter().position(|x| !x.is_finite()) {
            let kind = if m[i].is_nan() { "NaN" } else { "Inf" };
            return Err(Error::NonFinite(format!(
                "qronos: {what} contains {kind} at row {}, column {}",
                i / n,
                i % n
            )));
        }
    }
    opts.damping.validate()?;
    let diag: Vec<f32> = (0..n).map(|i| hessian[i * n + i]).collect();
    let dead = linalg::dead_flags(&diag)?;
    let order = gptq::processing_order(&diag, opts.act_order);
    let c = *order
        .iter()
        .find(|&&j| !dead[j])
        .expect("dead_flags guarantees a live column");
    let live: Vec<usize> = (0..n).filter(|&j| !dead[j] && j != c).collect();
    let lambda =
        f64::from(opts.damping.initial) * f64::from(linalg::damped_mean_diag(&diag, &dead));

    // M = W D (f64): the float output's pull on every column, W with its dead columns (the float
    // model still feeds them) and D's rows of dead inputs included.
    let w64 = Mat::<f64>::from_fn(rows, n, |i, j| f64::from(weight[i * n + j]));
    let d64 = Mat::<f64>::from_fn(n, n, |i, j| f64::from(dxxt[i * n + j]));
    let mut m = Mat::<f64>::zeros(rows, n);
    matmul(
        m.as_mut(),
        Accum::Replace,
        w64.as_ref(),
        d64.as_ref(),
        1.0,
        Par::rayon(0),
    );
    drop(d64);
    let hcc = f64::from(diag[c]);
    // step 1: v_c - w_c
    let dv: Vec<f64> = (0..rows).map(|i| m[(i, c)] / hcc).collect();

    // step 2: Y = R (H_LL + λI)⁻¹ with R = M[:, L] - (v_c - w_c) H[c, L], solved as
    // (H_LL + λI) Yᵀ = Rᵀ
    let k = live.len();
    let mut out: Vec<f32> = weight.to_vec();
    if k > 0 {
        let hll = Mat::<f64>::from_fn(k, k, |a, b| {
            let h = f64::from(hessian[live[a] * n + live[b]]);
            if a == b {
                h + lambda
            } else {
                h
            }
        });
        let hc: Vec<f64> = live
            .iter()
            .map(|&j| f64::from(hessian[c * n + j]))
            .collect();
        let mut rt = Mat::<f64>::from_fn(k, rows, |a, i| m[(i, live[a])] - dv[i] * hc[a]);
        let llt = hll.llt(Side::Lower).map_err(|_| {
            Error::NotPositiveDefinite(format!(
                "qronos: H + {lambda:.3e}·I over the {k} live columns is not positive definite \
                 in f64; increase the damping"
            ))
        })?;
        llt.solve_in_place(rt.as_mut());
        out.par_chunks_mut(n).enumerate().for_each(|(i, row)| {
            for (a, &j) in live.iter().enumerate() {
                row[j] = (f64::from(row[j]) + rt[(a, i)]) as f32;
            }
        });
    }
    for (i, row) in out.chunks_mut(n).enumerate() {
        row[c] = (f64::from(row[c]) + dv[i]) as f32;
    }
    // `(w + 0.0) as f32 == w`: with D = 0 the start is the weight bit for bit
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::linalg::DampingPolicy;
    use crate::quantizer::{Observer, QuantSpec, ScaleDtype};

    fn opts(group: Option<usize>, act_order: bool) -> GptqOptions {
        GptqOptions {
            spec: QuantSpec {
                bits: 3,
                symmetric: true,
                observer: Observer::MinMax,
                scale_dtype: ScaleDtype::F32,
            },
            group_size: group,
            act_order,
            static_groups: false,
            group_aware: false,
            block_size: 16,
            damping: DampingPolicy::default(),
        }
    }

    fn lcg(seed: u64, n: usize) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// H = X~X~ᵀ and D = (X - X~) X~ᵀ from random token rows.
    fn stats(n: usize, t: usize, noise: f32) -> (Vec<f32>, Vec<f32>) {
        let xq = lcg(1, t * n);
        let e = lcg(2, t * n);
        let mut h = vec![0.0f32; n * n];
        let mut d = vec![0.0f32; n * n];
        for s in 0..t {
            for i in 0..n {
                for j in 0..n {
                    h[i * n + j] += xq[s * n + i] * xq[s * n + j];
                    d[i * n + j] += noise * e[s * n + i] * xq[s * n + j];
                }
            }
        }
        (h, d)
    }

    #[test]
    fn zero_cross_term_gives_gptq_bit_for_bit() {
        let (rows, n) = (12, 24);
        let w = lcg(3, rows * n);
        let (h, _) = stats(n, 64, 0.0);
        let d = vec![0.0f32; n * n];
        for (g, ao) in [(None, false), (Some(8), true)] {
            let o = opts(g, ao);
            let a = qronos_quantize(&w, rows, n, &h, &d, &o).unwrap();
            let b = gptq::gptq_quantize(&w, rows, n, &h, &o).unwrap();
            assert_eq!(a.codes, b.codes);
            assert_eq!(a.dequantized, b.dequantized);
            assert_eq!(a.loss.to_bits(), b.loss.to_bits());
        }
    }

    /// The start is the least-squares refit: with λ → its value, S_L solves the normal
    /// equations (H_LL + λI) S_Lᵀ = (W G_λ[:, L] - v_c H[c, L])ᵀ.
    #[test]
    fn start_satisfies_the_normal_equations() {
        let (rows, n) = (5, 10);
        let w = lcg(7, rows * n);
        let (h, d) = stats(n, 40, 0.3);
        let o = opts(None, true);
        let s = qronos_start(&w, rows, n, &h, &d, &o).unwrap();
        let diag: Vec<f32> = (0..n).map(|i| h[i * n + i]).collect();
        let c = gptq::processing_order(&diag, true)[0];
        let dead = vec![false; n];
        let lam = 0.01 * f64::from(linalg::damped_mean_diag(&diag, &dead));
        let g = |i: usize, j: usize| f64::from(h[i * n + j]) + f64::from(d[i * n + j]);
        for r in 0..rows {
            let wr = |j: usize| f64::from(w[r * n + j]);
            let sr = |j: usize| f64::from(s[r * n + j]);
            // step 1: v_c = (W G[:, c] - W_{-c} H[-c, c]) / H_cc
            let num: f64 = (0..n).map(|i| wr(i) * g(i, c)).sum::<f64>()
                - (0..n)
                    .filter(|&i| i != c)
                    .map(|i| wr(i) * f64::from(h[i * n + c]))
                    .sum::<f64>();
            let vc = num / f64::from(h[c * n + c]);
            assert!(
                (sr(c) - vc).abs() <= 1e-4 * vc.abs().max(1.0),
                "{} vs {vc}",
                sr(c)
            );
            for j in (0..n).filter(|&j| j != c) {
                let lhs: f64 = (0..n)
                    .filter(|&l| l != c)
                    .map(|l| sr(l) * (f64::from(h[l * n + j]) + if l == j { lam } else { 0.0 }))
                    .sum();
                let rhs: f64 = (0..n).map(|i| wr(i) * g(i, j)).sum::<f64>() + lam * wr(j)
                    - vc * f64::from(h[c * n + j]);
                assert!(
                    (lhs - rhs).abs() <= 1e-3 * rhs.abs().max(1.0),
                    "{lhs} vs {rhs}"
                );
            }
        }
    }

    #[test]
    fn bad_shapes_and_values_are_errors() {
        let (rows, n) = (2, 4);
        let w = lcg(5, rows * n);
        let (h, d) = stats(n, 16, 0.1);
        let o = opts(None, false);
        assert!(qronos_quantize(&w, rows, n, &h, &d[..15], &o).is_err());
        let mut bad = d.clone();
        bad[5] = f32::NAN;
        let e = qronos_quantize(&w, rows, n, &h, &bad, &o).unwrap_err();
        assert!(
            format!("{e}").contains("dxxt contains NaN at row 1, column 1"),
            "{e}"
        );
    }
}
