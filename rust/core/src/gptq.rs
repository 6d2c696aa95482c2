//! The GPTQ column solver.
//!
//! Formulation. `linalg::factor_damped` gives the upper-triangular `U'` with
//! `H_damped = U' U'ᵀ`; `U = U'⁻¹` is the reference's `Hinv` (upper Cholesky factor of
//! `H_damped⁻¹`). The reference recurrence `W'_j = W_j - Σ_{k<j} E_k U_kj`,
//! `E_j = (W'_j - Q_j) / U_jj` says `W - Q = E U`, i.e. `E = (W - Q) U'`. Reading column j of
//! that identity, with `D = W - Q` (ORIGINAL weight minus quantized) and `V = U' diag(U')⁻¹`:
//!
//! ```text
//!   W'_j = W_j + Σ_{k<j} D_k V_kj,      E_j = (W'_j - Q_j) U'_jj
//! ```
//!
//! so no inverse is ever formed (saves ~n³/3 flops against the reference chain). Columns are
//! processed in lazy batches of `block_size`: inside a batch every ROW is independent, so the
//! batch runs in parallel over tiles of 8 rows (one SIMD lane per row: the per-column chain
//! quantize -> residual -> update is latency-bound within one row); then one GEMM
//! `W'[:, i2:] += D[:, i1:i2] V[i1:i2, i2:]` applies the batch to all later columns. The proxy
//! loss needs no GEMM either: `Σ E² = tr(D H_damped Dᵀ)` exactly, so
//! `tr(D H Dᵀ) = Σ E² - damp·‖D‖²_F`.
//!
//! Group grids. The running `W'` above is exact for a column only when that column is
//! quantized; the state of LATER columns differs from the reference's intermediate `W`. A
//! dynamic group's grid is fitted when the group starts at position p on the reference state
//! `W^(p)[p..p+g]` (every column `< p` applied), recovered per row with a `g²/2` forward
//! substitution (see `SolveCtx::fit_tile_group`). That is the reference exactly whenever its
//! groups start on batch boundaries (the default group 128 / block 128). When a group starts
//! mid-batch the reference fits on its lazily-updated `W`, which still lacks the current
//! batch's updates, so its result depends on the block size (by up to ~20% loss at 2 bits on
//! small tests, either way); ours equals the unbatched algorithm for every block size.
//!
//! GPTAQ ([`gptaq_quantize`]; Li et al., ICML 2025). With `X` the float model's inputs of the
//! layer and `X~` the partly quantized model's, `H = X~ X~ᵀ` and `dXXᵀ = (X - X~) X~ᵀ` (same
//! per-sample scaling). Quantizing column k leaves the error `w_k X_k - q_k X~_k =
//! (w_k - q_k) X~_k + w_k dX_k`; GPTQ spreads the first term over the later columns, GPTAQ also
//! the second: the least-squares compensation of `w_k dX_k` by the columns `F = {l > k}` is
//! `w_k dXXᵀ[k, F] H_FF⁻¹`, and `H_FF⁻¹ = U_FFᵀ U_FF` (U the upper Cholesky factor of `H⁻¹`),
//! which for every k at once is the strictly upper matrix
//!
//! ```text
//!   P = α · triu₁(dXXᵀ Uᵀ) · U,        W'_j = W_j + Σ_{k<j} (W'_k P_kj - E_k U_kj)
//! ```
//!
//! with `W'_k` the column's value just before it is quantized and `α` (0.25 in the paper) a
//! damping of the extra term. Writing `A_j = W_j + Σ_{k<j} W'_k P_kj` (the target the column
//! holds when it is quantized), the GPTQ identity above holds with `W` replaced by `A`, so the
//! same kernel runs it with `D = A - Q` and a second rank update `W'_k P_k,:` applied to both
//! `W'` and `A`; group grids are recovered the same way from `A`. `P` costs two triangular
//! solves with `U'` (`Uᵀ = U'⁻ᵀ`, `U = U'⁻¹`). The peers' implementations (the paper's code,
//! GPTQModel) apply the term across lazy batches with the QUANTIZED batch (their `W1` holds
//! `Q1` once the batch is done) and within a batch with the pre-quantization value, so their
//! result depends on the block size; here it is the pre-quantization value throughout, which
//! is theirs exactly for layers of at most one block. The reported loss is
//! `tr((A - Q) H (A - Q)ᵀ)` (the quantity the recurrence minimises column by column).

use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::linalg::{self, DampingPolicy};
use crate::quantizer::{
    check_scales, dequantize_code, fit_group_weighted, minmax_params, quantize_code, GroupParams,
    Observer, QuantSpec,
};

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
    /// With act_order and groups, group-aware reordering (GAR; GPTQModel's `act_group_aware`):
    /// whole original groups are processed one after another, by descending max diag(H), and
    /// the columns of each by descending diag(H); every grid is fitted when its group starts,
    /// on its current (compensated) columns, and g_idx stays `col / group_size`. A ragged last
    /// group is processed last. Not together with `static_groups`.
    pub group_aware: bool,
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
pub fn gptq_quantize(
    weight: &[f32],
    rows: usize,
    cols: usize,
    hessian: &[f32],
    opts: &GptqOptions,
) -> Result<GptqResult> {
    solve(weight, rows, cols, hessian, None, opts)
}

/// GPTAQ: GPTQ fitted to the float model's output (see the module documentation).
/// `dxxt` is `(X - X~) X~ᵀ` (`[cols, cols]`, row-major, row = float-minus-quantized input
/// feature) scaled like `hessian`; `alpha` weighs the extra term (0.25 in the paper; 0 gives
/// plain GPTQ's result).
pub fn gptaq_quantize(
    weight: &[f32],
    rows: usize,
    cols: usize,
    hessian: &[f32],
    dxxt: &[f32],
    alpha: f32,
    opts: &GptqOptions,
) -> Result<GptqResult> {
    if cols.checked_mul(cols) != Some(dxxt.len()) {
        return Err(Error::InvalidArgument(format!(
            "gptaq: dxxt has {} values, expected cols*cols = {cols}*{cols}",
            dxxt.len()
        )));
    }
    if !alpha.is_finite() {
        return Err(Error::InvalidArgument(format!(
            "gptaq: alpha must be finite, got {alpha}"
        )));
    }
    check_finite(dxxt, cols, "dxxt")?;
    solve(weight, rows, cols, hessian, Some((dxxt, alpha)), opts)
}

fn solve(
    weight: &[f32],
    rows: usize,
    cols: usize,
    hessian: &[f32],
    gptaq: Option<(&[f32], f32)>,
    opts: &GptqOptions,
) -> Result<GptqResult> {
    let grid = check_common(
        weight,
        rows,
        cols,
        &opts.spec,
        opts.group_size,
        opts.static_groups,
    )?;
    if opts.block_size == 0 {
        return Err(Error::InvalidArgument(
            "gptq: block_size must be > 0 (default 128)".into(),
        ));
    }
    check_hessian(hessian, cols)?;
    check_finite(weight, cols, "weight")?;
    check_finite(hessian, cols, "hessian")?;
    let n_groups = grid.n_groups(cols);
    let maxq = opts.spec.maxq();

    let diag_h: Vec<f32> = (0..cols).map(|i| hessian[i * cols + i]).collect();
    let gar = group_aware_size(opts, grid)?;
    let order = match gar {
        Some(g) => group_aware_order(&diag_h, g),
        None => processing_order(&diag_h, opts.act_order),
    };
    let hdiag_p: Vec<f32> = order.iter().map(|&c| diag_h[c]).collect();
    let fact = if opts.act_order {
        let mut hp = vec![0.0f32; cols * cols];
        hp.par_chunks_mut(cols).enumerate().for_each(|(i, row)| {
            let src = &hessian[order[i] * cols..(order[i] + 1) * cols];
            for (x, &o) in row.iter_mut().zip(&order) {
                *x = src[o];
            }
        });
        linalg::factor_damped(&hp, cols, opts.damping)?
    } else {
        linalg::factor_damped(hessian, cols, opts.damping)?
    };
    let linalg::Factorization {
        factor,
        damp_frac,
        damp_value,
        attempts,
        dead: dead_pos,
        ..
    } = fact;
    if factor.len() != cols * cols {
        return Err(Error::InvalidArgument(format!(
            "gptq: factorisation returned {} values for a {cols}x{cols} Hessian (internal error)",
            factor.len()
        )));
    }
    let mut dead_p = vec![false; cols];
    for &d in &dead_pos {
        if d < cols {
            dead_p[d] = true;
        }
    }
    let mut dead_orig = vec![false; cols];
    for (p, &c) in order.iter().enumerate() {
        dead_orig[c] = dead_p[p];
    }
    let dead: Vec<usize> = (0..cols).filter(|&c| dead_orig[c]).collect();

    // V = U' diag(U')⁻¹: unit diagonal, so W'_j = W_j + Σ_{k<j} D_k V_kj.
    let diag: Vec<f32> = (0..cols).map(|j| factor[j * cols + j]).collect();
    if let Some(j) = diag.iter().position(|d| !(d.is_finite() && *d > 0.0)) {
        return Err(bad_pivot(diag[j], j, damp_frac));
    }
    let inv_diag: Vec<f32> = diag.iter().map(|d| 1.0 / d).collect();
    let pmat = gptaq.map(|(dxxt, alpha)| gptaq_p(dxxt, alpha, &factor, cols, &order, &dead_orig));
    let mut v = factor;
    v.par_chunks_mut(cols).enumerate().for_each(|(k, row)| {
        for (x, s) in row[k + 1..].iter_mut().zip(&inv_diag[k + 1..]) {
            *x *= s;
        }
    });

    // Working matrix W' in processing order, dead columns zeroed. Each column is overwritten
    // by its dequantized value once quantized, so at the end it holds Q.
    let mut wp = vec![0.0f32; rows * cols];
    wp.par_chunks_mut(cols)
        .zip(weight.par_chunks(cols))
        .for_each(|(dst, src)| {
            for (p, x) in dst.iter_mut().enumerate() {
                *x = if dead_p[p] { 0.0 } else { src[order[p]] };
            }
        });

    let mut scales = vec![0.0f32; rows * n_groups];
    let mut zeros = vec![0i32; rows * n_groups];
    // Grids fixed up front: per-channel on the whole (dead-zeroed) row, static groups on the
    // (dead-zeroed) contiguous original groups.
    match grid {
        GroupMode::PerChannel => {
            wp.par_chunks(cols)
                .zip(scales.par_iter_mut())
                .zip(zeros.par_iter_mut())
                .for_each(|((row, s), z)| {
                    let gp = fit_group_weighted(row, Some(&hdiag_p), &opts.spec);
                    *s = gp.scale;
                    *z = gp.zero;
                });
        }
        GroupMode::Static(g) => fit_groups_natural(
            weight,
            cols,
            g,
            Some(&dead_orig),
            Some(&diag_h),
            &opts.spec,
            &mut scales,
            &mut zeros,
        ),
        GroupMode::Dynamic(_) => {}
    }
    check_scales(&scales, n_groups, opts.spec.scale_dtype)?;

    let bs = opts.block_size.min(cols);
    // With act-order, reading the original weight at `order[p]` scatters over every row each
    // batch (cache misses dominate); one processing-order copy (= the initial W') avoids it.
    let weight_p = opts.act_order.then(|| wp.clone());
    // GPTAQ: the running target A (processing order, starts as the dead-zeroed W) and the
    // batch's pre-quantization columns.
    let mut amat = pmat.as_ref().map(|_| wp.clone());
    let mut wqblk = vec![0.0f32; if pmat.is_some() { rows * bs } else { 0 }];
    let ctx = SolveCtx {
        cols,
        weight_p: weight_p.as_deref().unwrap_or(weight),
        order: &order,
        dead: &dead_p,
        diag: &diag,
        hdiag: &hdiag_p,
        spec: opts.spec,
        maxq,
        grid,
    };
    let gmax = match grid {
        GroupMode::Dynamic(g) => g.min(cols),
        _ => 0,
    };
    let mut dblk = vec![0.0f32; rows * bs];
    let mut codes_p = vec![0u8; rows * cols];
    let mut sum_e2 = vec![0.0f64; rows];
    let mut sum_d2 = vec![0.0f64; rows];
    for i1 in (0..cols).step_by(bs) {
        let i2 = (i1 + bs).min(cols);
        let pack = BatchPack::new(&v, pmat.as_deref(), cols, i1, i2, grid);
        let a_tiles: Vec<Option<&mut [f32]>> = match amat.as_mut() {
            Some(a) => a.chunks_mut(LANES * cols).map(Some).collect(),
            None => (0..rows.div_ceil(LANES)).map(|_| None).collect(),
        };
        let wq_tiles: Vec<Option<&mut [f32]>> = if pmat.is_some() {
            wqblk.chunks_mut(LANES * bs).map(Some).collect()
        } else {
            (0..rows.div_ceil(LANES)).map(|_| None).collect()
        };
        // Tiles of LANES rows: every per-column step runs on all rows of a tile at once.
        wp.par_chunks_mut(LANES * cols)
            .zip(a_tiles.into_par_iter().zip(wq_tiles.into_par_iter()))
            .map(|(w, (a, wq))| (w, a, wq))
            .zip(dblk.par_chunks_mut(LANES * bs))
            .zip(codes_p.par_chunks_mut(LANES * cols))
            .zip(scales.par_chunks_mut(LANES * n_groups))
            .zip(zeros.par_chunks_mut(LANES * n_groups))
            .zip(
                sum_e2
                    .par_chunks_mut(LANES)
                    .zip(sum_d2.par_chunks_mut(LANES)),
            )
            .enumerate()
            .for_each_init(
                || TileScratch::new(bs, gmax),
                |scratch, (t, (((((w, d), c), s), z), (e2, d2)))| {
                    let (w, a, wq) = w;
                    ctx.solve_tile(
                        t * LANES,
                        &pack,
                        TileBufs {
                            w,
                            a,
                            wq,
                            d,
                            c,
                            s,
                            z,
                            e2,
                            d2,
                        },
                        scratch,
                    );
                },
            );
        if i2 < cols {
            let count = i2 - i1;
            let rest = cols - i2;
            let lhs = MatRef::from_row_major_slice_with_stride(&dblk[..], rows, count, bs);
            let rhs =
                MatRef::from_row_major_slice_with_stride(&v[i1 * cols + i2..], count, rest, cols);
            let dst = row_major_strided_mut(&mut wp[i2..], rows, rest, cols);
            matmul(dst, Accum::Add, lhs, rhs, 1.0f32, Par::rayon(0));
            if let (Some(pm), Some(a)) = (pmat.as_deref(), amat.as_mut()) {
                // GPTAQ's term: W'[:, i2:] and A[:, i2:] += W'_pre[:, i1:i2] P[i1:i2, i2:].
                let lhs = MatRef::from_row_major_slice_with_stride(&wqblk[..], rows, count, bs);
                let rhs = MatRef::from_row_major_slice_with_stride(
                    &pm[i1 * cols + i2..],
                    count,
                    rest,
                    cols,
                );
                let dst = row_major_strided_mut(&mut wp[i2..], rows, rest, cols);
                matmul(dst, Accum::Add, lhs, rhs, 1.0f32, Par::rayon(0));
                let dst = row_major_strided_mut(&mut a[i2..], rows, rest, cols);
                matmul(dst, Accum::Add, lhs, rhs, 1.0f32, Par::rayon(0));
            }
        }
        if matches!(grid, GroupMode::Dynamic(_)) {
            // Groups fitted in this batch; unfitted entries are still 0 (finite).
            check_scales(&scales, n_groups, opts.spec.scale_dtype)?;
        }
    }
    let loss = sum_e2.iter().sum::<f64>() - damp_value as f64 * sum_d2.iter().sum::<f64>();

    let g_idx = match gar {
        // processing group k is the original group order[k·g] / g: grids back to that order
        Some(g) => {
            let natural: Vec<usize> = (0..n_groups).map(|k| order[k * g] / g).collect();
            for (s, z) in scales.chunks_mut(n_groups).zip(zeros.chunks_mut(n_groups)) {
                let (s0, z0) = (s.to_vec(), z.to_vec());
                for (k, &nk) in natural.iter().enumerate() {
                    s[nk] = s0[k];
                    z[nk] = z0[k];
                }
            }
            (0..cols).map(|c| (c / g) as i32).collect()
        }
        None => grid.g_idx(cols, &order),
    };
    let (codes, dequantized, perm) = if opts.act_order {
        let mut codes = vec![0u8; rows * cols];
        codes
            .par_chunks_mut(cols)
            .zip(codes_p.par_chunks(cols))
            .for_each(|(dst, src)| {
                for (&c, &x) in order.iter().zip(src) {
                    dst[c] = x;
                }
            });
        drop(codes_p);
        wp.par_chunks_mut(cols).for_each_init(
            || vec![0.0f32; cols],
            |tmp, row| {
                for (&c, &x) in order.iter().zip(row.iter()) {
                    tmp[c] = x;
                }
                row.copy_from_slice(tmp);
            },
        );
        (codes, wp, Some(order))
    } else {
        (codes_p, wp, None)
    };

    Ok(GptqResult {
        rows,
        cols,
        n_groups,
        codes,
        scales,
        zeros,
        g_idx,
        dequantized,
        loss,
        perm,
        damp_frac,
        damp_attempts: attempts,
        dead,
    })
}

/// Round-to-nearest baseline with the same grids and output shape (no Hessian; loss = NaN
/// unless a Hessian is given).
pub fn rtn_quantize(
    weight: &[f32],
    rows: usize,
    cols: usize,
    hessian: Option<&[f32]>,
    spec: &QuantSpec,
    group_size: Option<usize>,
) -> Result<GptqResult> {
    let grid = check_common(weight, rows, cols, spec, group_size, false)?;
    check_finite(weight, cols, "weight")?;
    if let Some(h) = hessian {
        check_hessian(h, cols)?;
        check_finite(h, cols, "hessian")?;
    }
    let n_groups = grid.n_groups(cols);
    let g = group_size.unwrap_or(cols);
    let maxq = spec.maxq();
    let mut scales = vec![0.0f32; rows * n_groups];
    let mut zeros = vec![0i32; rows * n_groups];
    fit_groups_natural(weight, cols, g, None, None, spec, &mut scales, &mut zeros);
    check_scales(&scales, n_groups, spec.scale_dtype)?;
    let mut codes = vec![0u8; rows * cols];
    let mut dequantized = vec![0.0f32; rows * cols];
    codes
        .par_chunks_mut(cols)
        .zip(dequantized.par_chunks_mut(cols))
        .zip(weight.par_chunks(cols))
        .zip(scales.par_chunks(n_groups).zip(zeros.par_chunks(n_groups)))
        .for_each(|(((c, q), w), (s, z))| {
            for (k, (&scale, &zero)) in s.iter().zip(z).enumerate() {
                let gp = GroupParams { scale, zero };
                let range = k * g..((k + 1) * g).min(cols);
                for ((ci, qi), &wi) in c[range.clone()]
                    .iter_mut()
                    .zip(&mut q[range.clone()])
                    .zip(&w[range])
                {
                    *ci = quantize_code(wi, gp, maxq);
                    *qi = dequantize_code(*ci, gp);
                }
            }
        });
    let loss = match hessian {
        Some(h) => proxy_loss(weight, &dequantized, rows, cols, h)?,
        None => f64::NAN,
    };
    let identity: Vec<usize> = (0..cols).collect();
    let g_idx = grid.g_idx(cols, &identity);
    Ok(GptqResult {
        rows,
        cols,
        n_groups,
        codes,
        scales,
        zeros,
        g_idx,
        dequantized,
        loss,
        perm: None,
        damp_frac: 0.0,
        damp_attempts: Vec::new(),
        dead: Vec::new(),
    })
}

/// GPTAQ's `P = α · triu₁(dXXᵀ Uᵀ) · U` in processing order (`[cols, cols]`, row-major,
/// strictly upper), from the damped factor `U'` (`U = U'⁻¹`): `M = G U'⁻ᵀ` is the upper solve
/// `U' Mᵀ = Gᵀ` and `P = triu₁(M) U'⁻¹` the lower solve `U'ᵀ Pᵀ = triu₁(M)ᵀ` (a row-major
/// buffer read column-major is the transpose, so neither needs a copy). Dead inputs' rows and
/// columns of `dXXᵀ` are zeroed (their `X~` is zero, and their weights are zeroed).
fn gptaq_p(
    dxxt: &[f32],
    alpha: f32,
    factor: &[f32],
    cols: usize,
    order: &[usize],
    dead_orig: &[bool],
) -> Vec<f32> {
    let mut g = vec![0.0f32; cols * cols];
    g.par_chunks_mut(cols).enumerate().for_each(|(i, row)| {
        let oi = order[i];
        if dead_orig[oi] {
            return;
        }
        let src = &dxxt[oi * cols..(oi + 1) * cols];
        for (x, &o) in row.iter_mut().zip(order) {
            *x = if dead_orig[o] { 0.0 } else { src[o] };
        }
    });
    let u = MatRef::from_row_major_slice(factor, cols, cols);
    // Column-major view of row-major G = Gᵀ; solved in place it holds Mᵀ, i.e. M row-major.
    faer::linalg::triangular_solve::solve_upper_triangular_in_place(
        u,
        MatMut::from_column_major_slice_mut(&mut g, cols, cols),
        Par::rayon(0),
    );
    g.par_chunks_mut(cols).enumerate().for_each(|(i, row)| {
        row[..=i].fill(0.0);
    });
    faer::linalg::triangular_solve::solve_lower_triangular_in_place(
        u.transpose(),
        MatMut::from_column_major_slice_mut(&mut g, cols, cols),
        Par::rayon(0),
    );
    g.par_iter_mut().for_each(|x| *x *= alpha);
    g
}

/// `tr((W - Q) H (W - Q)ᵀ)` computed directly in f64 (rows in chunks, one f64 GEMM each).
/// For baselines and checks; the solver gets its loss for free from the recurrence.
pub fn proxy_loss(
    weight: &[f32],
    dequantized: &[f32],
    rows: usize,
    cols: usize,
    hessian: &[f32],
) -> Result<f64> {
    let n = rows
        .checked_mul(cols)
        .ok_or_else(|| Error::InvalidArgument(format!("proxy_loss: {rows}x{cols} overflows")))?;
    if weight.len() != n || dequantized.len() != n {
        return Err(Error::InvalidArgument(format!(
            "proxy_loss: weight has {} and dequantized {} values, expected rows*cols = {n}",
            weight.len(),
            dequantized.len()
        )));
    }
    check_hessian(hessian, cols)?;
    let h64 = MatRef::from_row_major_slice(hessian, cols, cols).map(|&x| x as f64);
    const CHUNK: usize = 256;
    let mut total = 0.0f64;
    for r0 in (0..rows).step_by(CHUNK) {
        let r1 = (r0 + CHUNK).min(rows);
        let m = r1 - r0;
        let d = faer::Mat::<f64>::from_fn(m, cols, |i, j| {
            let k = (r0 + i) * cols + j;
            weight[k] as f64 - dequantized[k] as f64
        });
        let mut dh = faer::Mat::<f64>::zeros(m, cols);
        matmul(
            dh.as_mut(),
            Accum::Replace,
            d.as_ref(),
            h64.as_ref(),
            1.0f64,
            Par::rayon(0),
        );
        for j in 0..cols {
            let (a, b) = (dh.col(j), d.col(j));
            for i in 0..m {
                total += a[i] * b[i];
            }
        }
    }
    Ok(total)
}

/// Row-major `nrows x ncols` view with row stride `row_stride`. Built as a transposed
/// column-major view because faer 0.24.4's `MatMut::from_row_major_slice_with_stride_mut`
/// passes the strides swapped (element (i, j) lands at `i + j*row_stride`), which silently
/// writes the wrong elements and can write out of bounds.
fn row_major_strided_mut(
    slice: &mut [f32],
    nrows: usize,
    ncols: usize,
    row_stride: usize,
) -> MatMut<'_, f32> {
    MatMut::from_column_major_slice_with_stride_mut(slice, ncols, nrows, row_stride).transpose_mut()
}

/// How scale grids are laid out over a layer's columns. The CPU solver and the CUDA path
/// (`cuda::plan`) both take their grid, column order and `g_idx` from here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GroupMode {
    /// One grid per row, fitted up front on the whole (dead-zeroed) row.
    PerChannel,
    /// A grid fitted when processing position `p % g == 0` (natural order or act-order), on the
    /// reference state.
    Dynamic(usize),
    /// Grids fitted up front per contiguous ORIGINAL group (act-order + static groups).
    Static(usize),
}

impl GroupMode {
    /// From the options: `None` = per channel; `static_groups` only matters with groups.
    pub fn new(group_size: Option<usize>, static_groups: bool) -> Result<Self> {
        match group_size {
            None => Ok(GroupMode::PerChannel),
            Some(0) => Err(Error::InvalidArgument(
                "gptq: group_size must be > 0 (use None / -1 for one group per output row)".into(),
            )),
            Some(g) if static_groups => Ok(GroupMode::Static(g)),
            Some(g) => Ok(GroupMode::Dynamic(g)),
        }
    }

    pub fn n_groups(self, cols: usize) -> usize {
        match self {
            GroupMode::PerChannel => 1,
            GroupMode::Dynamic(g) | GroupMode::Static(g) => cols.div_ceil(g),
        }
    }

    /// Group of every ORIGINAL column, given the processing order (`order[p]` = column).
    pub fn g_idx(self, cols: usize, order: &[usize]) -> Vec<i32> {
        match self {
            GroupMode::PerChannel => vec![0; cols],
            GroupMode::Static(g) => (0..cols).map(|c| (c / g) as i32).collect(),
            GroupMode::Dynamic(g) => {
                let mut gi = vec![0i32; cols];
                for (p, &c) in order.iter().enumerate() {
                    gi[c] = (p / g) as i32;
                }
                gi
            }
        }
    }
}

/// The group size when `opts` ask for group-aware reordering on dynamic groups (`None`
/// otherwise: per channel it is plain act-order); errors for the combinations it excludes.
pub(crate) fn group_aware_size(opts: &GptqOptions, grid: GroupMode) -> Result<Option<usize>> {
    if !opts.group_aware {
        return Ok(None);
    }
    if !opts.act_order {
        return Err(Error::InvalidArgument(
            "gptq: group_aware reorders the columns: it needs act_order".into(),
        ));
    }
    match grid {
        GroupMode::PerChannel => Ok(None),
        GroupMode::Dynamic(g) => Ok(Some(g)),
        GroupMode::Static(_) => Err(Error::InvalidArgument(
            "gptq: group_aware and static_groups are two ways of keeping g_idx trivial; give \
             one of them"
                .into(),
        )),
    }
}

/// GAR's processing order: whole groups of `g` original columns by descending max of the key
/// (stable), each group's columns by descending key (stable); a ragged last group goes last so
/// that processing positions `k·g..` hold exactly one original group. The key is diag(H) with
/// dead inputs counted as 1, as in [`processing_order`].
pub fn group_aware_order(diag: &[f32], g: usize) -> Vec<usize> {
    let n = diag.len();
    let key = |c: usize| order_key(diag[c]);
    let full = n / g;
    let mut groups: Vec<usize> = (0..full).collect();
    let top = |k: usize| {
        (k * g..(k + 1) * g)
            .map(key)
            .fold(f32::NEG_INFINITY, f32::max)
    };
    groups.sort_by(|&a, &b| top(b).total_cmp(&top(a)));
    if n % g != 0 {
        groups.push(full);
    }
    let mut order = Vec::with_capacity(n);
    for k in groups {
        let mut cols: Vec<usize> = (k * g..((k + 1) * g).min(n)).collect();
        cols.sort_by(|&a, &b| key(b).total_cmp(&key(a)));
        order.extend(cols);
    }
    order
}

/// Processing order: the identity, or with `act_order` descending diag(H) (stable), dead inputs
/// (zero diagonal) counted as 1 as the reference sorts after setting their `H_ii = 1`.
pub fn processing_order(diag: &[f32], act_order: bool) -> Vec<usize> {
    let mut order: Vec<usize> = (0..diag.len()).collect();
    if act_order {
        let key: Vec<f32> = diag.iter().map(|&d| order_key(d)).collect();
        order.sort_by(|&a, &b| key[b].total_cmp(&key[a]));
    }
    order
}

/// A column's act-order sort key: its diag(H), a dead input (zero diagonal) counted as 1.
#[inline]
fn order_key(d: f32) -> f32 {
    if d == 0.0 {
        1.0
    } else {
        d
    }
}

/// The error for a non-positive or non-finite pivot `value` of the damped factor at column `j`.
pub(crate) fn bad_pivot(value: f32, j: usize, damp_frac: f32) -> Error {
    Error::NotPositiveDefinite(format!(
        "gptq: Cholesky factor has a non-positive or non-finite pivot {value} at column {j} after \
         damping {damp_frac}; increase the damping"
    ))
}

/// The error for a NaN/Inf `value` of the weight or Hessian (`what`) at (`row`, `col`).
pub(crate) fn non_finite(what: &str, value: f32, row: usize, col: usize) -> Error {
    let kind = if value.is_nan() { "NaN" } else { "Inf" };
    Error::NonFinite(format!(
        "gptq: {what} contains {kind} at row {row}, column {col}; fix the {what} before quantizing"
    ))
}

/// Rows per tile: the column recurrence is sequential within a row, so a tile of rows runs it
/// in SIMD lanes (one AVX2 register of f32) instead of one latency-bound chain per row.
const LANES: usize = 8;
type Lanes = [f32; LANES];

/// `xs[i] += a * v[i]` for every lane (mul then add, no FMA, so both paths round alike).
#[inline(always)]
fn lanes_axpy<const AVX: bool>(xs: &mut [Lanes], a: &Lanes, v: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if AVX {
            // SAFETY: AVX is only true inside functions compiled for (and run on) AVX2.
            unsafe { lanes_axpy_avx2(xs, a, v) };
            return;
        }
    }
    for (x, &vv) in xs.iter_mut().zip(v) {
        for l in 0..LANES {
            x[l] += a[l] * vv;
        }
    }
}

/// One ymm register per lane vector: autovectorisation of the lane loops interleaves across
/// columns instead (shuffle-bound, several times slower).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn lanes_axpy_avx2(xs: &mut [Lanes], a: &Lanes, v: &[f32]) {
    use std::arch::x86_64::{
        _mm256_add_ps, _mm256_loadu_ps, _mm256_mul_ps, _mm256_set1_ps, _mm256_storeu_ps,
    };
    const _: () = assert!(LANES == 8);
    // SAFETY: every pointer is to a whole [f32; 8].
    unsafe {
        let av = _mm256_loadu_ps(a.as_ptr());
        for (x, &vv) in xs.iter_mut().zip(v) {
            let p = x.as_mut_ptr();
            _mm256_storeu_ps(
                p,
                _mm256_add_ps(_mm256_loadu_ps(p), _mm256_mul_ps(av, _mm256_set1_ps(vv))),
            );
        }
    }
}

/// The buffers of one tile of `nr <= LANES` rows (row-major, `nr` rows each).
struct TileBufs<'a> {
    /// W' rows (processing order); quantized columns hold their dequantized value.
    w: &'a mut [f32],
    /// GPTAQ: the running target A rows (processing order; see the module documentation).
    a: Option<&'a mut [f32]>,
    /// GPTAQ: this batch's columns just before quantization, `[nr, bs]`.
    wq: Option<&'a mut [f32]>,
    /// D = W - Q of this batch's columns, `[nr, bs]`.
    d: &'a mut [f32],
    /// Codes (processing order).
    c: &'a mut [u8],
    /// Scales / zeros, `[nr, n_groups]`.
    s: &'a mut [f32],
    z: &'a mut [i32],
    /// Per-row Σ E² and Σ D².
    e2: &'a mut [f64],
    d2: &'a mut [f64],
}

/// Per-thread work space, allocated once per rayon job (never per column).
struct TileScratch {
    /// The batch's W' columns of the tile, lane = row.
    xs: Vec<Lanes>,
    /// The batch's D columns of the tile.
    ds: Vec<Lanes>,
    /// The batch's original (dead-zeroed) weights of the tile, gathered once per batch
    /// (GPTAQ: the running target A, updated column by column).
    os: Vec<Lanes>,
    /// GPTAQ: the batch's columns just before quantization.
    ws: Vec<Lanes>,
    /// A group's state while its grid is fitted.
    t: Vec<Lanes>,
    /// One row's group values (MSE observer).
    vals: Vec<f32>,
}

impl TileScratch {
    fn new(bs: usize, g: usize) -> Self {
        TileScratch {
            xs: vec![[0.0; LANES]; bs],
            ds: vec![[0.0; LANES]; bs],
            os: vec![[0.0; LANES]; bs],
            ws: vec![[0.0; LANES]; bs],
            t: vec![[0.0; LANES]; g],
            vals: vec![0.0; g],
        }
    }
}

struct SolveCtx<'a> {
    cols: usize,
    /// Original weight in PROCESSING order (not necessarily dead-zeroed: `dead` masks it).
    weight_p: &'a [f32],
    /// order[p] = original column processed at position p.
    order: &'a [usize],
    /// Dead flag by processing position.
    dead: &'a [bool],
    /// diag(U').
    diag: &'a [f32],
    /// diag(H) by processing position (the Hessian-weighted grid search's weights).
    hdiag: &'a [f32],
    spec: QuantSpec,
    maxq: u32,
    grid: GroupMode,
}

// Lane loops index several parallel [f32; LANES] arrays: plain indices read clearest and
// vectorise the same.
#[allow(clippy::needless_range_loop)]
impl SolveCtx<'_> {
    /// Original (dead-zeroed) weight of rows `r0..r0+nr` at processing position `p`, or with
    /// GPTAQ the running target `a` (the tile's rows).
    #[inline(always)]
    fn orig(&self, a: Option<&[f32]>, r0: usize, nr: usize, p: usize) -> Lanes {
        let mut o = [0.0; LANES];
        if !self.dead[p] {
            for (l, x) in o.iter_mut().enumerate().take(nr) {
                *x = match a {
                    Some(a) => a[l * self.cols + p],
                    None => self.weight_p[(r0 + l) * self.cols + p],
                };
            }
        }
        o
    }

    /// Columns `pack.i1..pack.i2` of the tile of rows `r0..`, sequentially.
    fn solve_tile(&self, r0: usize, pack: &BatchPack, b: TileBufs<'_>, sc: &mut TileScratch) {
        #[cfg(target_arch = "x86_64")]
        {
            #[cfg(test)]
            let forced = tests::FORCE_GENERIC.load(std::sync::atomic::Ordering::Relaxed);
            #[cfg(not(test))]
            let forced = false;
            if !forced
                && std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                // SAFETY: the CPU supports the features the function is compiled for.
                return unsafe { self.solve_tile_avx2(r0, pack, b, sc) };
            }
        }
        self.solve_tile_generic::<false>(r0, pack, b, sc)
    }

    /// The same code compiled for AVX2 (wheels target baseline x86-64: SSE2 only, where
    /// `round_ties_even` would be a libm call and the lanes half as wide).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn solve_tile_avx2(
        &self,
        r0: usize,
        pack: &BatchPack,
        b: TileBufs<'_>,
        sc: &mut TileScratch,
    ) {
        self.solve_tile_generic::<true>(r0, pack, b, sc)
    }

    /// `AVX`: the caller is compiled for AVX2 and the lane updates may use its intrinsics.
    #[inline(always)]
    fn solve_tile_generic<const AVX: bool>(
        &self,
        r0: usize,
        pack: &BatchPack,
        mut b: TileBufs<'_>,
        sc: &mut TileScratch,
    ) {
        let cols = self.cols;
        let nr = b.e2.len();
        let ng = b.s.len() / nr;
        let bs = b.d.len() / nr;
        let (i1, i2) = (pack.i1, pack.i2);
        let count = i2 - i1;
        let maxq = self.maxq as f32;
        let xs = &mut sc.xs[..count];
        for (j, x) in xs.iter_mut().enumerate() {
            for l in 0..LANES {
                x[l] = if l < nr { b.w[l * cols + i1 + j] } else { 0.0 };
            }
        }
        // Gathered up front (with act-order these are scattered loads) to keep them off the
        // per-column dependency chain.
        let os = &mut sc.os[..count];
        for (j, o) in os.iter_mut().enumerate() {
            *o = self.orig(b.a.as_deref(), r0, nr, i1 + j);
        }
        // Unused lanes (nr < LANES) run on zeros with a harmless grid and are never stored.
        let (mut scale, mut zero): (Lanes, Lanes) = ([1.0; LANES], [0.0; LANES]);
        let mut cur_k = usize::MAX;
        // Grid k of every row of the tile into the lanes.
        fn load(s: &[f32], z: &[i32], ng: usize, k: usize, scale: &mut Lanes, zero: &mut Lanes) {
            for (l, (sc, zr)) in scale
                .iter_mut()
                .zip(zero.iter_mut())
                .enumerate()
                .take(s.len() / ng)
            {
                *sc = s[l * ng + k];
                *zr = z[l * ng + k] as f32;
            }
        }
        let (mut se, mut sd) = ([0.0f64; LANES], [0.0f64; LANES]);
        let mut next_group = pack.groups.iter();
        let mut off = 0;
        for j in 0..count {
            let p = i1 + j;
            match self.grid {
                GroupMode::PerChannel => {
                    if cur_k != 0 {
                        load(b.s, b.z, ng, 0, &mut scale, &mut zero);
                        cur_k = 0;
                    }
                }
                GroupMode::Static(g) => {
                    let k = self.order[p] / g;
                    if k != cur_k {
                        load(b.s, b.z, ng, k, &mut scale, &mut zero);
                        cur_k = k;
                    }
                }
                GroupMode::Dynamic(g) => {
                    let k = p / g;
                    if p % g == 0 {
                        let gpk = next_group
                            .next()
                            .expect("a group pack for every group start in the batch");
                        debug_assert_eq!(gpk.p, p);
                        let params = self.fit_tile_group::<AVX>(
                            r0,
                            nr,
                            gpk,
                            pack,
                            xs,
                            os,
                            &sc.ds[..count],
                            &sc.ws[..count],
                            &b,
                            &mut sc.t,
                            &mut sc.vals,
                        );
                        for (l, gp) in params.iter().enumerate().take(nr) {
                            b.s[l * ng + k] = gp.scale;
                            b.z[l * ng + k] = gp.zero;
                            scale[l] = gp.scale;
                            zero[l] = gp.zero as f32;
                        }
                        cur_k = k;
                    } else if k != cur_k {
                        // The group started in an earlier batch.
                        load(b.s, b.z, ng, k, &mut scale, &mut zero);
                        cur_k = k;
                    }
                }
            }
            let w = if self.dead[p] { [0.0; LANES] } else { xs[j] };
            let orig = os[j];
            let dp = self.diag[p];
            let (mut code, mut q, mut d) = ([0.0f32; LANES], [0.0f32; LANES], [0.0f32; LANES]);
            for l in 0..LANES {
                // Same arithmetic as quantize_code / dequantize_code (codes and zeros are small
                // integers, exact in f32).
                code[l] = ((w[l] / scale[l]).round_ties_even() + zero[l]).clamp(0.0, maxq);
                q[l] = scale[l] * (code[l] - zero[l]);
                d[l] = orig[l] - q[l];
                let e = (w[l] - q[l]) * dp;
                se[l] += e as f64 * e as f64;
                sd[l] += d[l] as f64 * d[l] as f64;
            }
            for l in 0..nr {
                b.c[l * cols + p] = code[l] as u8;
            }
            sc.ds[j] = d;
            // Spread this column's residual over the rest of the batch.
            let (head, tail) = xs.split_at_mut(j + 1);
            head[j] = q;
            let vrow = &pack.tri[off..off + tail.len()];
            if let Some(ptri) = pack.ptri.as_deref() {
                // GPTAQ: W' and A of the later columns += w_pre P[p, later].
                let prow = &ptri[off..off + tail.len()];
                lanes_axpy::<AVX>(tail, &w, prow);
                lanes_axpy::<AVX>(&mut os[j + 1..], &w, prow);
                sc.ws[j] = w;
            }
            off += tail.len();
            lanes_axpy::<AVX>(tail, &d, vrow);
        }
        for l in 0..nr {
            for j in 0..count {
                b.w[l * cols + i1 + j] = xs[j][l];
                b.d[l * bs + j] = sc.ds[j][l];
            }
            if let (Some(a), Some(wq)) = (b.a.as_deref_mut(), b.wq.as_deref_mut()) {
                for j in 0..count {
                    a[l * cols + i1 + j] = os[j][l];
                    wq[l * bs + j] = sc.ws[j][l];
                }
            }
            b.e2[l] += se[l];
            b.d2[l] += sd[l];
        }
    }

    /// Fits the grids of the group starting at `gp.p` for every row of the tile, on the
    /// weights `W^(p)[p..end]` the reference algorithm holds once columns `< p` are quantized
    /// (its `W[:, p:p+g]` with every earlier column's update applied).
    ///
    /// Our running `X = W + D_{<p} B diag(C)⁻¹` (with `U' = [[A, B], [0, C]]` split at p) is
    /// exact only for column p itself; the reference state is `W + D_{<p} B C⁻¹`
    /// (`H12 H22⁻¹ = B C⁻¹`), i.e. `W + (X - W) V_pp⁻¹` where `V_pp = C diag(C)⁻¹`. Restricted
    /// to the group's columns only its diagonal block `V[p..end, p..end]` (unit upper) enters,
    /// so a forward substitution of `g²/2` per row recovers it.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn fit_tile_group<const AVX: bool>(
        &self,
        r0: usize,
        nr: usize,
        gp: &GroupPack,
        pack: &BatchPack,
        xs: &[Lanes],
        os: &[Lanes],
        ds: &[Lanes],
        ws: &[Lanes],
        b: &TileBufs<'_>,
        t: &mut [Lanes],
        vals: &mut [f32],
    ) -> [GroupParams; LANES] {
        let cols = self.cols;
        let (i1, i2) = (pack.i1, pack.i2);
        let (p, end) = (gp.p, gp.end);
        let t = &mut t[..end - p];
        for (a, x) in t.iter_mut().enumerate() {
            let c = p + a;
            if c < i2 {
                *x = xs[c - i1];
            } else {
                for l in 0..LANES {
                    x[l] = if l < nr { b.w[l * cols + c] } else { 0.0 };
                }
            }
        }
        // GPTAQ: the target A of the columns past the batch, with this batch's columns i1..p.
        let mut ao = Vec::new();
        if end > i2 {
            // Columns past the batch still lack the update of this batch's columns i1..p.
            for (dk, vrow) in ds[..p - i1].iter().zip(gp.rect.chunks_exact(end - i2)) {
                lanes_axpy::<AVX>(&mut t[i2 - p..], dk, vrow);
            }
            if let Some(prect) = gp.prect.as_deref() {
                ao = (i2..end)
                    .map(|c| self.orig(b.a.as_deref(), r0, nr, c))
                    .collect();
                for (wk, prow) in ws[..p - i1].iter().zip(prect.chunks_exact(end - i2)) {
                    lanes_axpy::<AVX>(&mut t[i2 - p..], wk, prow);
                    lanes_axpy::<AVX>(&mut ao, wk, prow);
                }
                for (x, &c) in ao.iter_mut().zip(&(i2..end).collect::<Vec<_>>()) {
                    if self.dead[c] {
                        *x = [0.0; LANES];
                    }
                }
            }
        }
        let orig = |c: usize| {
            if c < i2 {
                os[c - i1]
            } else if !ao.is_empty() {
                ao[c - i2]
            } else {
                self.orig(b.a.as_deref(), r0, nr, c)
            }
        };
        for (a, x) in t.iter_mut().enumerate() {
            let o = orig(p + a);
            for l in 0..LANES {
                x[l] -= o[l];
            }
        }
        // t <- t V[p..end, p..end]⁻¹ (row vectors times the inverse of a unit upper triangle).
        let mut off = 0;
        for a in 0..t.len() {
            let (head, tail) = t.split_at_mut(a + 1);
            // x - z*v == x + (-z)*v exactly.
            let z = head[a].map(|x| -x);
            let vrow = &gp.tri[off..off + tail.len()];
            off += tail.len();
            lanes_axpy::<AVX>(tail, &z, vrow);
        }
        for (a, x) in t.iter_mut().enumerate() {
            let o = orig(p + a);
            for l in 0..LANES {
                x[l] += o[l];
            }
        }
        let mut out = [GroupParams {
            scale: 1.0,
            zero: 0,
        }; LANES];
        match self.spec.observer {
            Observer::MinMax => {
                let (mut lo, mut hi) = ([0.0f32; LANES], [0.0f32; LANES]);
                for x in t.iter() {
                    for l in 0..LANES {
                        lo[l] = lo[l].min(x[l]);
                        hi[l] = hi[l].max(x[l]);
                    }
                }
                for l in 0..nr {
                    out[l] = minmax_params(lo[l], hi[l], &self.spec);
                }
            }
            Observer::Mse { .. } | Observer::HessianMse { .. } => {
                let vals = &mut vals[..t.len()];
                let h = &self.hdiag[p..end];
                for (l, o) in out.iter_mut().enumerate().take(nr) {
                    for (v, x) in vals.iter_mut().zip(t.iter()) {
                        *v = x[l];
                    }
                    *o = fit_group_weighted(vals, Some(h), &self.spec);
                }
            }
        }
        out
    }
}

/// The entries of V one batch reads, copied contiguous and built once per batch for all rows.
/// Rows of V lie `cols` floats apart (a power of two for most layers), so reading them in place
/// maps a batch's rows onto a few cache sets and every row pass misses.
struct BatchPack {
    i1: usize,
    i2: usize,
    /// Row j: `V[i1+j, i1+j+1..i2]`, rows back to back.
    tri: Vec<f32>,
    /// GPTAQ: the same entries of P.
    ptri: Option<Vec<f32>>,
    /// Dynamic groups starting in this batch, in order.
    groups: Vec<GroupPack>,
}

struct GroupPack {
    p: usize,
    end: usize,
    /// When the group runs past the batch: rows `kk in i1..p` of `V[kk, i2..end]`.
    rect: Vec<f32>,
    /// GPTAQ: the same entries of P.
    prect: Option<Vec<f32>>,
    /// Row a: `V[p+a, p+a+1..end]`, rows back to back.
    tri: Vec<f32>,
}

impl BatchPack {
    fn new(
        v: &[f32],
        pm: Option<&[f32]>,
        cols: usize,
        i1: usize,
        i2: usize,
        grid: GroupMode,
    ) -> Self {
        let upper = |m: &[f32], from: usize, to: usize| -> Vec<f32> {
            let mut out = Vec::with_capacity((to - from) * (to - from).saturating_sub(1) / 2);
            for j in from..to {
                out.extend_from_slice(&m[j * cols + j + 1..j * cols + to]);
            }
            out
        };
        let rect_of = |m: &[f32], p: usize, end: usize| -> Vec<f32> {
            let mut rect = Vec::with_capacity((p - i1) * (end - i2));
            for kk in i1..p {
                rect.extend_from_slice(&m[kk * cols + i2..kk * cols + end]);
            }
            rect
        };
        let mut groups = Vec::new();
        if let GroupMode::Dynamic(g) = grid {
            for p in (i1.div_ceil(g) * g..i2).step_by(g) {
                let end = (p + g).min(cols);
                let (rect, prect) = if end > i2 {
                    (rect_of(v, p, end), pm.map(|m| rect_of(m, p, end)))
                } else {
                    (Vec::new(), None)
                };
                groups.push(GroupPack {
                    p,
                    end,
                    rect,
                    prect,
                    tri: upper(v, p, end),
                });
            }
        }
        BatchPack {
            i1,
            i2,
            tri: upper(v, i1, i2),
            ptri: pm.map(|m| upper(m, i1, i2)),
            groups,
        }
    }
}

/// Fit grids per contiguous group of `g` original columns (optionally dead-zeroed).
#[allow(clippy::too_many_arguments)]
fn fit_groups_natural(
    weight: &[f32],
    cols: usize,
    g: usize,
    dead: Option<&[bool]>,
    hdiag: Option<&[f32]>,
    spec: &QuantSpec,
    scales: &mut [f32],
    zeros: &mut [i32],
) {
    let n_groups = cols.div_ceil(g);
    let has_dead = dead.is_some_and(|d| d.iter().any(|&x| x));
    scales
        .par_chunks_mut(n_groups)
        .zip(zeros.par_chunks_mut(n_groups))
        .zip(weight.par_chunks(cols))
        .for_each_init(
            || vec![0.0f32; if has_dead { g.min(cols) } else { 0 }],
            |tmp, ((s, z), row)| {
                for k in 0..n_groups {
                    let range = k * g..((k + 1) * g).min(cols);
                    let h = hdiag.map(|h| &h[range.clone()]);
                    let gp = match dead {
                        Some(dead) if has_dead => {
                            let vals = &mut tmp[..range.len()];
                            for ((x, &w), &dd) in vals
                                .iter_mut()
                                .zip(&row[range.clone()])
                                .zip(&dead[range.clone()])
                            {
                                *x = if dd { 0.0 } else { w };
                            }
                            fit_group_weighted(vals, h, spec)
                        }
                        _ => fit_group_weighted(&row[range], h, spec),
                    };
                    s[k] = gp.scale;
                    z[k] = gp.zero;
                }
            },
        );
}

fn check_common(
    weight: &[f32],
    rows: usize,
    cols: usize,
    spec: &QuantSpec,
    group_size: Option<usize>,
    static_groups: bool,
) -> Result<GroupMode> {
    spec.validate()?;
    if rows == 0 || cols == 0 {
        return Err(Error::InvalidArgument(format!(
            "gptq: weight must have at least one row and one column, got {rows}x{cols}"
        )));
    }
    let n = rows.checked_mul(cols).ok_or_else(|| {
        Error::InvalidArgument(format!("gptq: weight shape {rows}x{cols} overflows"))
    })?;
    if weight.len() != n {
        return Err(Error::InvalidArgument(format!(
            "gptq: weight has {} values, expected rows*cols = {rows}*{cols} = {n}",
            weight.len()
        )));
    }
    GroupMode::new(group_size, static_groups)
}

fn check_hessian(hessian: &[f32], cols: usize) -> Result<()> {
    if cols.checked_mul(cols) != Some(hessian.len()) {
        return Err(Error::InvalidArgument(format!(
            "gptq: hessian has {} values, expected cols*cols = {cols}*{cols} (cols = weight in_features)",
            hessian.len()
        )));
    }
    Ok(())
}

fn check_finite(data: &[f32], ncols: usize, what: &str) -> Result<()> {
    // A branch-free OR over each chunk vectorises; only a failing chunk is searched in order.
    const CHUNK: usize = 1 << 14;
    let bad_chunk = data
        .par_chunks(CHUNK)
        .position_first(|c| c.iter().fold(false, |acc, v| acc | !v.is_finite()));
    if let Some(k) = bad_chunk {
        let i = k * CHUNK
            + data[k * CHUNK..]
                .iter()
                .position(|v| !v.is_finite())
                .unwrap_or(0);
        return Err(non_finite(what, data[i], i / ncols, i % ncols));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quantizer::{fit_group, ScaleDtype};
    use rand::rngs::StdRng;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// Makes the solver take its portable (non-AVX2) path, to test it on AVX2 machines.
    pub(super) static FORCE_GENERIC: AtomicBool = AtomicBool::new(false);
    use rand::{Rng, SeedableRng};

    fn normal(rng: &mut StdRng) -> f64 {
        let u1: f64 = rng.random::<f64>().max(1e-300);
        let u2: f64 = rng.random::<f64>();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }

    /// Weights with varied row scales and a few outliers, and `H = (2/t) XᵀX` from correlated
    /// activations `X = Z A + mu` (`A` Gaussian with log-normal column scales and a nonzero
    /// mean, so features are strongly correlated and diag(H) spreads). Columns in `dead` get
    /// no signal. `tokens < cols` gives a rank-deficient H.
    fn problem(
        rows: usize,
        cols: usize,
        tokens: usize,
        seed: u64,
        dead: &[usize],
    ) -> (Vec<f32>, Vec<f32>) {
        let mut rng = StdRng::seed_from_u64(seed);
        let w: Vec<f32> = (0..rows * cols)
            .map(|_| {
                let v = normal(&mut rng) * 0.05;
                (if rng.random::<f64>() < 0.005 {
                    8.0 * v
                } else {
                    v
                }) as f32
            })
            .collect();
        let row_scale: Vec<f64> = (0..rows).map(|_| (0.4 * normal(&mut rng)).exp()).collect();
        let w: Vec<f32> = w
            .iter()
            .enumerate()
            .map(|(k, &v)| v * row_scale[k / cols] as f32)
            .collect();
        let k = cols;
        let col_scale: Vec<f64> = (0..cols).map(|_| (0.7 * normal(&mut rng)).exp()).collect();
        let a = faer::Mat::<f64>::from_fn(k, cols, |_, _| 0.0)
            .as_ref()
            .map(|_: &f64| normal(&mut rng));
        let a = faer::Mat::<f64>::from_fn(k, cols, |i, j| a[(i, j)] * col_scale[j]);
        let z = faer::Mat::<f64>::from_fn(tokens, k, |_, _| 0.0)
            .as_ref()
            .map(|_: &f64| normal(&mut rng));
        let mut x = &z * &a;
        let mu: Vec<f64> = (0..cols)
            .map(|j| 0.5 * col_scale[j] * normal(&mut rng))
            .collect();
        for t in 0..tokens {
            for j in 0..cols {
                x[(t, j)] = if dead.contains(&j) {
                    0.0
                } else {
                    x[(t, j)] + mu[j] * 3.0
                };
            }
        }
        let h = x.transpose() * &x;
        let h: Vec<f32> = (0..cols * cols)
            .map(|idx| (2.0 / tokens as f64 * h[(idx / cols, idx % cols)]) as f32)
            .collect();
        (w, h)
    }

    // ---------------------------------------------------------------------------------------
    // Independent f64 re-implementation of the reference (IST-DASLab gptq.py `fasterquant`
    // and quant.py `Quantizer`): explicit inverse, upper Cholesky of the inverse, per-column
    // loop with lazy blocks, grids fitted on the lazily-updated `W` exactly as the reference.
    // ---------------------------------------------------------------------------------------

    #[derive(Clone, Copy, Debug)]
    struct Cfg {
        bits: u8,
        sym: bool,
        mse: bool,
        group: Option<usize>,
        act_order: bool,
        static_groups: bool,
        dtype: ScaleDtype,
    }

    fn ref_find_params(x: &[f64], cfg: Cfg) -> (f64, f64) {
        crate::quantizer::reference::reference_params(
            x,
            cfg.bits,
            cfg.sym,
            cfg.mse.then_some((100, 0.8, 2.4)),
            cfg.dtype,
        )
    }

    fn ref_quant(x: f64, scale: f64, zero: f64, maxq: f64) -> f64 {
        let q = ((x / scale).round_ties_even() + zero).clamp(0.0, maxq);
        scale * (q - zero)
    }

    fn chol_lower(a: &[f64], n: usize) -> Vec<f64> {
        crate::linalg::tests::chol_lower_f64(a, n).expect("reference Cholesky failed")
    }

    /// (perm, Hinv upper factor) for the reference: dead -> 1, permute, damp, chol, inverse,
    /// upper chol of the inverse.
    fn ref_prepare(h: &[f32], n: usize, act_order: bool, percdamp: f64) -> (Vec<usize>, Vec<f64>) {
        let mut h: Vec<f64> = h.iter().map(|&v| v as f64).collect();
        for i in 0..n {
            if h[i * n + i] == 0.0 {
                h[i * n + i] = 1.0;
            }
        }
        let mut perm: Vec<usize> = (0..n).collect();
        if act_order {
            perm.sort_by(|&a, &b| h[b * n + b].total_cmp(&h[a * n + a]));
            let hp: Vec<f64> = (0..n * n)
                .map(|k| h[perm[k / n] * n + perm[k % n]])
                .collect();
            h = hp;
        }
        let damp = percdamp * (0..n).map(|i| h[i * n + i]).sum::<f64>() / n as f64;
        for i in 0..n {
            h[i * n + i] += damp;
        }
        let l = chol_lower(&h, n);
        // Linv by forward substitution, then H⁻¹ = Linvᵀ Linv.
        let mut li = vec![0.0; n * n];
        for j in 0..n {
            li[j * n + j] = 1.0 / l[j * n + j];
            for i in j + 1..n {
                let mut s = 0.0;
                for k in j..i {
                    s += l[i * n + k] * li[k * n + j];
                }
                li[i * n + j] = -s / l[i * n + i];
            }
        }
        let mut hinv = vec![0.0; n * n];
        for i in 0..n {
            for j in 0..=i {
                let mut s = 0.0;
                for k in i..n {
                    s += li[k * n + i] * li[k * n + j];
                }
                hinv[i * n + j] = s;
                hinv[j * n + i] = s;
            }
        }
        let lh = chol_lower(&hinv, n);
        let mut u = vec![0.0; n * n];
        for i in 0..n {
            for j in i..n {
                u[i * n + j] = lh[j * n + i];
            }
        }
        (perm, u)
    }

    /// Returns (dequantized Q in original order, loss tr((W-Q) H (W-Q)ᵀ) with dead-zeroed W).
    fn ref_gptq(
        w: &[f32],
        rows: usize,
        n: usize,
        h: &[f32],
        cfg: Cfg,
        blocksize: usize,
        prep: &(Vec<usize>, Vec<f64>),
    ) -> (Vec<f64>, f64) {
        let (perm, u) = prep;
        let maxq = ((1u32 << cfg.bits) - 1) as f64;
        let mut w0: Vec<f64> = w.iter().map(|&v| v as f64).collect();
        // Per-channel grid is fitted before dead columns are zeroed, as the reference does.
        let mut params: Vec<(f64, f64)> = (0..rows)
            .map(|r| ref_find_params(&w0[r * n..(r + 1) * n], cfg))
            .collect();
        let dead: Vec<bool> = (0..n).map(|i| h[i * n + i] == 0.0).collect();
        for r in 0..rows {
            for c in 0..n {
                if dead[c] {
                    w0[r * n + c] = 0.0;
                }
            }
        }
        let mut groups: Vec<Vec<(f64, f64)>> = Vec::new();
        if let (Some(g), true) = (cfg.group, cfg.static_groups) {
            for i in (0..n).step_by(g) {
                let e = (i + g).min(n);
                groups.push(
                    (0..rows)
                        .map(|r| ref_find_params(&w0[r * n + i..r * n + e], cfg))
                        .collect(),
                );
            }
        }
        let mut wm: Vec<f64> = (0..rows * n)
            .map(|k| w0[(k / n) * n + perm[k % n]])
            .collect();
        let mut q = vec![0.0; rows * n];
        for i1 in (0..n).step_by(blocksize) {
            let i2 = (i1 + blocksize).min(n);
            let count = i2 - i1;
            let mut w1: Vec<f64> = (0..rows * count)
                .map(|k| wm[(k / count) * n + i1 + k % count])
                .collect();
            let mut err1 = vec![0.0; rows * count];
            for i in 0..count {
                let col = i1 + i;
                if let Some(g) = cfg.group {
                    if !cfg.static_groups {
                        if col % g == 0 {
                            let e = (col + g).min(n);
                            params = (0..rows)
                                .map(|r| ref_find_params(&wm[r * n + col..r * n + e], cfg))
                                .collect();
                        }
                    } else {
                        params = groups[perm[col] / g].clone();
                    }
                }
                let d = u[col * n + col];
                for r in 0..rows {
                    let wv = w1[r * count + i];
                    let qv = ref_quant(wv, params[r].0, params[r].1, maxq);
                    q[r * n + col] = qv;
                    let e = (wv - qv) / d;
                    for j in i..count {
                        w1[r * count + j] -= e * u[col * n + i1 + j];
                    }
                    err1[r * count + i] = e;
                }
            }
            for r in 0..rows {
                for j in i2..n {
                    let mut s = 0.0;
                    for k in 0..count {
                        s += err1[r * count + k] * u[(i1 + k) * n + j];
                    }
                    wm[r * n + j] -= s;
                }
            }
        }
        let mut qo = vec![0.0; rows * n];
        for r in 0..rows {
            for p in 0..n {
                qo[r * n + perm[p]] = q[r * n + p];
            }
        }
        let loss = trace_f64(&w0, &qo, rows, n, h);
        (qo, loss)
    }

    fn trace_f64(w: &[f64], q: &[f64], rows: usize, n: usize, h: &[f32]) -> f64 {
        let mut loss = 0.0;
        for r in 0..rows {
            let d: Vec<f64> = (0..n).map(|c| w[r * n + c] - q[r * n + c]).collect();
            for i in 0..n {
                let mut s = 0.0;
                for j in 0..n {
                    s += h[i * n + j] as f64 * d[j];
                }
                loss += d[i] * s;
            }
        }
        loss
    }

    fn opts(cfg: Cfg, block_size: usize) -> GptqOptions {
        GptqOptions {
            spec: QuantSpec {
                bits: cfg.bits,
                symmetric: cfg.sym,
                observer: if cfg.mse {
                    Observer::mse_default()
                } else {
                    Observer::MinMax
                },
                scale_dtype: cfg.dtype,
            },
            group_size: cfg.group,
            act_order: cfg.act_order,
            static_groups: cfg.static_groups,
            group_aware: false,
            block_size,
            damping: DampingPolicy::default(),
        }
    }

    /// Structural checks every result must pass.
    fn check_structure(res: &GptqResult, h: &[f32], cfg: Cfg) {
        let (rows, cols) = (res.rows, res.cols);
        let maxq = (1u32 << cfg.bits) - 1;
        let ng = match cfg.group {
            None => 1,
            Some(g) => cols.div_ceil(g),
        };
        assert_eq!(res.n_groups, ng);
        assert_eq!(res.codes.len(), rows * cols);
        assert_eq!(res.dequantized.len(), rows * cols);
        assert_eq!(res.scales.len(), rows * ng);
        assert_eq!(res.zeros.len(), rows * ng);
        assert_eq!(res.g_idx.len(), cols);
        assert!(
            res.codes.iter().all(|&c| c as u32 <= maxq),
            "code out of range"
        );
        assert!(
            res.zeros.iter().all(|&z| z >= 0 && z as u32 <= maxq),
            "zero out of range"
        );
        assert!(res.scales.iter().all(|&s| s.is_finite() && s > 0.0));
        for r in 0..rows {
            for c in 0..cols {
                let k = r * ng + res.g_idx[c] as usize;
                let expect = res.scales[k] * (res.codes[r * cols + c] as i32 - res.zeros[k]) as f32;
                assert_eq!(res.dequantized[r * cols + c].to_bits(), expect.to_bits(), "dequantized != scale*(code-zero) at ({r},{c}): {} vs {expect} code {} scale {} zero {}", res.dequantized[r * cols + c], res.codes[r * cols + c], res.scales[k], res.zeros[k]);
            }
        }
        // g_idx and perm.
        let diag: Vec<f32> = (0..cols)
            .map(|i| {
                if h[i * cols + i] == 0.0 {
                    1.0
                } else {
                    h[i * cols + i]
                }
            })
            .collect();
        match (&res.perm, cfg.act_order) {
            (Some(perm), true) => {
                let mut seen = vec![false; cols];
                perm.iter().for_each(|&c| seen[c] = true);
                assert!(seen.iter().all(|&s| s), "perm is not a permutation");
                for p in 1..cols {
                    let (a, b) = (perm[p - 1], perm[p]);
                    assert!(
                        diag[a] > diag[b] || (diag[a] == diag[b] && a < b),
                        "perm not stable-descending at {p}"
                    );
                }
                for (p, &c) in perm.iter().enumerate() {
                    let expect = match (cfg.group, cfg.static_groups) {
                        (None, _) => 0,
                        (Some(g), true) => c / g,
                        (Some(g), false) => p / g,
                    };
                    assert_eq!(
                        res.g_idx[c] as usize, expect,
                        "g_idx at original column {c}"
                    );
                }
            }
            (None, false) => {
                for c in 0..cols {
                    assert_eq!(res.g_idx[c] as usize, cfg.group.map_or(0, |g| c / g));
                }
            }
            _ => panic!("perm returned iff act_order"),
        }
        assert!(res.loss.is_finite() && res.loss > 0.0);
    }

    fn rel(a: f64, b: f64) -> f64 {
        (a - b).abs() / b.abs()
    }

    #[test]
    fn matches_reference_loss_and_beats_rtn() {
        let bit_cfgs = [
            (4u8, false, false),
            (3, true, false),
            (2, false, true),
            (8, true, false),
            (4, true, true),
            (3, false, true),
            (2, true, false),
            (8, false, true),
        ];
        let mut idx = 0;
        let mut worst: f64 = 0.0;
        for &(rows, cols, seed) in &[(45usize, 172usize, 1u64), (27, 576, 2)] {
            let (w, h) = problem(rows, cols, 2 * cols, seed, &[]);
            let preps = [
                ref_prepare(&h, cols, false, 0.01),
                ref_prepare(&h, cols, true, 0.01),
            ];
            for &group in &[None, Some(32), Some(64), Some(128), Some(50)] {
                for &(act_order, static_groups) in
                    &[(false, false), (true, false), (true, true), (false, true)]
                {
                    if group.is_none() && static_groups {
                        continue;
                    }
                    let (bits, sym, mse) = bit_cfgs[idx % bit_cfgs.len()];
                    idx += 1;
                    let cfg = Cfg {
                        bits,
                        sym,
                        mse,
                        group,
                        act_order,
                        static_groups,
                        dtype: ScaleDtype::F32,
                    };
                    let res = gptq_quantize(&w, rows, cols, &h, &opts(cfg, 128)).expect("solve");
                    check_structure(&res, &h, cfg);
                    // The reference fits a group's grid on its lazily-updated `W`, which lags by the
                    // current batch's updates when a group starts mid-batch. Its batch size equal to
                    // the group size removes that lag (then it is exactly the unbatched algorithm);
                    // per-channel and static grids do not depend on it.
                    let ref_bs = match (group, static_groups) {
                        (Some(g), false) => g,
                        _ => 128,
                    };
                    let prep = &preps[act_order as usize];
                    let (ref_q, ref_loss) = ref_gptq(&w, rows, cols, &h, cfg, ref_bs, prep);
                    let agree = ref_q
                        .iter()
                        .zip(&res.dequantized)
                        .filter(|(a, b)| (**a - **b as f64).abs() <= 1e-5 * a.abs().max(1e-2))
                        .count();
                    let agree = agree as f64 / ref_q.len() as f64;
                    // f32 vs f64 may flip a rounding tie (at 8 bits a zero point can move a whole
                    // group row); everything else is bit-for-bit the reference grid.
                    assert!(
                        agree > 0.95,
                        "{cfg:?}: only {:.2}% of dequantized weights agree with the reference",
                        100.0 * agree
                    );
                    let direct = proxy_loss(&w, &res.dequantized, rows, cols, &h).expect("loss");
                    let rtn = rtn_quantize(&w, rows, cols, Some(&h), &opts(cfg, 128).spec, group)
                        .expect("rtn");
                    let r = res.loss / ref_loss - 1.0;
                    worst = worst.max(r.abs());
                    eprintln!(
                        "{rows}x{cols} {cfg:?}: ours {:.5e} ref {ref_loss:.5e} ({:+.3}%, {:.2}% equal) direct {direct:.5e} rtn {:.5e}",
                        res.loss,
                        100.0 * r,
                        100.0 * agree,
                        rtn.loss
                    );
                    assert!(
                        r.abs() <= 0.01,
                        "{cfg:?}: loss {} vs reference {ref_loss}",
                        res.loss
                    );
                    assert!(
                        rel(res.loss, direct) < 1e-3,
                        "{cfg:?}: reported loss {} vs direct trace {direct}",
                        res.loss
                    );
                    assert!(
                        res.loss < rtn.loss,
                        "{cfg:?}: GPTQ {} not below RTN {}",
                        res.loss,
                        rtn.loss
                    );
                    assert_eq!(res.damp_frac, 0.01);
                    assert_eq!(res.damp_attempts, vec![0.01]);
                    assert!(res.dead.is_empty());
                }
            }
        }
        eprintln!(
            "worst relative loss difference vs reference: {:.3}%",
            100.0 * worst
        );
    }

    #[test]
    fn portable_and_avx2_paths_agree_bitwise() {
        let (rows, cols) = (21usize, 200usize); // 21 rows: a partial tile of 5
        let (w, h) = problem(rows, cols, 2 * cols, 8, &[3]);
        for &(group, act, st, mse) in &[
            (Some(32), true, false, false),
            (Some(50), false, false, true),
            (None, true, false, false),
            (Some(64), true, true, false),
        ] {
            let cfg = Cfg {
                bits: 3,
                sym: false,
                mse,
                group,
                act_order: act,
                static_groups: st,
                dtype: ScaleDtype::F32,
            };
            let fast = gptq_quantize(&w, rows, cols, &h, &opts(cfg, 64)).expect("solve");
            FORCE_GENERIC.store(true, Ordering::Relaxed);
            let portable = gptq_quantize(&w, rows, cols, &h, &opts(cfg, 64));
            FORCE_GENERIC.store(false, Ordering::Relaxed);
            let portable = portable.expect("solve");
            assert_eq!(fast.codes, portable.codes, "{cfg:?}");
            assert_eq!(fast.scales, portable.scales, "{cfg:?}");
            assert_eq!(fast.zeros, portable.zeros, "{cfg:?}");
            assert_eq!(fast.loss.to_bits(), portable.loss.to_bits(), "{cfg:?}");
            check_structure(&fast, &h, cfg);
        }
    }

    fn cfg4(group: Option<usize>, act_order: bool, static_groups: bool) -> Cfg {
        Cfg {
            bits: 4,
            sym: false,
            mse: false,
            group,
            act_order,
            static_groups,
            dtype: ScaleDtype::F32,
        }
    }

    #[test]
    fn block_size_does_not_change_the_result() {
        let (rows, cols) = (40usize, 300usize);
        let (w, h) = problem(rows, cols, 2 * cols, 3, &[7, 200]);
        for &(group, act, st) in &[
            (None, true, false),
            (Some(32), false, false),
            (Some(32), true, false),
            (Some(50), true, false),
            (Some(128), true, false),
            (Some(64), true, true),
        ] {
            let cfg = cfg4(group, act, st);
            let base = gptq_quantize(&w, rows, cols, &h, &opts(cfg, 128)).expect("solve");
            for &bs in &[32usize, 7, 1000] {
                let other = gptq_quantize(&w, rows, cols, &h, &opts(cfg, bs)).expect("solve");
                let same = base
                    .codes
                    .iter()
                    .zip(&other.codes)
                    .filter(|(a, b)| a == b)
                    .count();
                let frac = same as f64 / base.codes.len() as f64;
                assert!(
                    frac > 0.999,
                    "{cfg:?} block {bs}: only {:.3}% of codes equal to block 128",
                    100.0 * frac
                );
                assert!(
                    rel(other.loss, base.loss) < 1e-3,
                    "{cfg:?} block {bs}: loss {} vs {}",
                    other.loss,
                    base.loss
                );
                assert_eq!(other.g_idx, base.g_idx);
                assert_eq!(other.perm, base.perm);
            }
        }
    }

    #[test]
    fn dead_columns_are_zeroed_and_reported() {
        let (rows, cols) = (32usize, 172usize);
        let dead = [0usize, 5, 100, 171];
        let (w, h) = problem(rows, cols, 2 * cols, 4, &dead);
        for &(group, act, st) in &[
            (None, false, false),
            (Some(32), true, false),
            (Some(64), true, true),
            (Some(50), false, false),
        ] {
            let cfg = cfg4(group, act, st);
            let res = gptq_quantize(&w, rows, cols, &h, &opts(cfg, 128)).expect("solve");
            check_structure(&res, &h, cfg);
            assert_eq!(res.dead, dead.to_vec(), "{cfg:?}");
            for r in 0..rows {
                for &c in &dead {
                    assert_eq!(
                        res.dequantized[r * cols + c],
                        0.0,
                        "{cfg:?}: dead column {c} not zero"
                    );
                }
            }
            // Our grids are fitted on the dead-zeroed weight (the reference fits per-channel grids
            // before zeroing, which can only widen them), so compare one-sided there.
            let prep = ref_prepare(&h, cols, act, 0.01);
            let ref_bs = match (group, st) {
                (Some(g), false) => g,
                _ => 128,
            };
            let (_, ref_loss) = ref_gptq(&w, rows, cols, &h, cfg, ref_bs, &prep);
            let direct = proxy_loss(&w, &res.dequantized, rows, cols, &h).expect("loss");
            eprintln!(
                "dead {cfg:?}: ours {} ref {ref_loss} direct {direct}",
                res.loss
            );
            assert!(
                res.loss <= ref_loss * 1.01,
                "{cfg:?}: {} vs reference {ref_loss}",
                res.loss
            );
            if group.is_some() {
                assert!(
                    rel(res.loss, ref_loss) < 0.01,
                    "{cfg:?}: {} vs reference {ref_loss}",
                    res.loss
                );
            }
            assert!(rel(res.loss, direct) < 1e-3);
        }
    }

    /// Scales rounded to their storage dtype inside the solve: every scale is representable,
    /// `dequantized == scale * (code - zero)` exactly with it, and codes/loss follow the f64
    /// reference run on the same rounded grid.
    #[test]
    fn rounded_scales_match_reference() {
        let (rows, cols) = (30usize, 200usize);
        let (w, h) = problem(rows, cols, 2 * cols, 12, &[]);
        let preps = [
            ref_prepare(&h, cols, false, 0.01),
            ref_prepare(&h, cols, true, 0.01),
        ];
        for dtype in [ScaleDtype::F16, ScaleDtype::Bf16] {
            for &(bits, sym, mse, group, act, st) in &[
                (4u8, true, false, None, false, false),
                (3, false, false, Some(32), true, false),
                (2, false, true, Some(50), false, false),
                (4, false, false, Some(64), true, true),
                (8, true, false, Some(128), false, false),
                (4, false, true, None, true, false),
            ] {
                let cfg = Cfg {
                    bits,
                    sym,
                    mse,
                    group,
                    act_order: act,
                    static_groups: st,
                    dtype,
                };
                let res = gptq_quantize(&w, rows, cols, &h, &opts(cfg, 128)).expect("solve");
                check_structure(&res, &h, cfg);
                for &s in &res.scales {
                    assert_eq!(dtype.round(s), s, "{cfg:?}: scale {s} not representable");
                    let back = match dtype {
                        ScaleDtype::F16 => half::f16::from_f32(s).to_f32(),
                        _ => half::bf16::from_f32(s).to_f32(),
                    };
                    assert_eq!(back, s, "{cfg:?}");
                }
                let ref_bs = match (group, st) {
                    (Some(g), false) => g,
                    _ => 128,
                };
                let (ref_q, ref_loss) =
                    ref_gptq(&w, rows, cols, &h, cfg, ref_bs, &preps[act as usize]);
                let agree = ref_q
                    .iter()
                    .zip(&res.dequantized)
                    .filter(|(a, b)| (**a - **b as f64).abs() <= 1e-5 * a.abs().max(1e-2))
                    .count() as f64
                    / ref_q.len() as f64;
                let r = res.loss / ref_loss - 1.0;
                eprintln!(
                    "{cfg:?}: ours {:.5e} ref {ref_loss:.5e} ({:+.3}%, {:.2}% equal)",
                    res.loss,
                    100.0 * r,
                    100.0 * agree
                );
                assert!(agree > 0.95, "{cfg:?}: {:.2}% agree", 100.0 * agree);
                assert!(r.abs() <= 0.01, "{cfg:?}: loss {} vs {ref_loss}", res.loss);
                let direct = proxy_loss(&w, &res.dequantized, rows, cols, &h).expect("loss");
                assert!(rel(res.loss, direct) < 1e-3, "{cfg:?}");
                // The rounding is part of the solve: the float32 solve's scales differ.
                let f32_res = gptq_quantize(
                    &w,
                    rows,
                    cols,
                    &h,
                    &opts(
                        Cfg {
                            dtype: ScaleDtype::F32,
                            ..cfg
                        },
                        128,
                    ),
                )
                .expect("solve");
                assert_ne!(f32_res.scales, res.scales, "{cfg:?}");
            }
        }
    }

    #[test]
    fn rounded_scales_rtn_codes_and_edge_cases() {
        let (rows, cols) = (6usize, 96usize);
        let (w, _) = problem(rows, cols, 200, 13, &[]);
        for dtype in [ScaleDtype::F16, ScaleDtype::Bf16] {
            for &(bits, sym, group) in &[
                (4u8, false, Some(32)),
                (3, true, None),
                (8, false, Some(40)),
            ] {
                let spec = QuantSpec {
                    bits,
                    symmetric: sym,
                    observer: Observer::MinMax,
                    scale_dtype: dtype,
                };
                let res = rtn_quantize(&w, rows, cols, None, &spec, group).expect("rtn");
                let g = group.unwrap_or(cols);
                for r in 0..rows {
                    for c in 0..cols {
                        let k = r * res.n_groups + c / g;
                        let (s, z) = (res.scales[k], res.zeros[k]);
                        assert_eq!(dtype.round(s), s);
                        let x = w[r * cols + c] as f64 / s as f64;
                        let expect =
                            (x.round_ties_even() + z as f64).clamp(0.0, spec.maxq() as f64);
                        let tie = (x - x.floor() - 0.5).abs() < 1e-6;
                        let code = res.codes[r * cols + c] as f64;
                        assert!(code == expect || tie, "{dtype:?} ({r},{c})");
                        assert_eq!(res.dequantized[r * cols + c], s * (code as i32 - z) as f32);
                    }
                }
            }
        }
        // Weights beyond float16 scales: a clear error on every path; bfloat16 holds them.
        let (rows, cols) = (4usize, 64usize);
        let (w, h) = problem(rows, cols, 128, 14, &[]);
        let mut big = w.clone();
        big[2 * cols + 40] = 4.0e6;
        for (group, act) in [(None, false), (Some(16), true), (Some(16), false)] {
            let mut o = opts(cfg4(group, act, false), 128);
            o.spec.scale_dtype = ScaleDtype::F16;
            let e = gptq_quantize(&big, rows, cols, &h, &o)
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("row 2") && e.contains("float16") && e.contains("compressed-tensors"),
                "{e}"
            );
            let e = rtn_quantize(&big, rows, cols, None, &o.spec, group)
                .unwrap_err()
                .to_string();
            assert!(e.contains("float16"), "{e}");
            o.spec.scale_dtype = ScaleDtype::Bf16;
            assert!(gptq_quantize(&big, rows, cols, &h, &o).is_ok());
        }
        // Weights so small their float16 scales underflow: smallest subnormal, finite results.
        let tiny: Vec<f32> = w.iter().map(|v| v * 1e-9).collect();
        for dtype in [ScaleDtype::F16, ScaleDtype::Bf16] {
            let mut o = opts(cfg4(Some(16), true, false), 128);
            o.spec.scale_dtype = dtype;
            let res = gptq_quantize(&tiny, rows, cols, &h, &o).expect("tiny weights");
            assert!(res.scales.iter().all(|&s| s > 0.0 && dtype.round(s) == s));
            assert!(res.dequantized.iter().all(|v| v.is_finite()));
            assert!(res.loss.is_finite());
            assert!(res.zeros.iter().all(|&z| (0..=15).contains(&z)));
            if dtype == ScaleDtype::F16 {
                assert!(res.scales.contains(&dtype.min_positive()));
            }
        }
    }

    #[test]
    fn rank_deficient_and_indefinite_hessians() {
        // Fewer tokens than inputs: H is singular, the 1% damping makes it factorable.
        let (rows, cols) = (16usize, 172usize);
        let (w, h) = problem(rows, cols, 60, 5, &[]);
        let cfg = cfg4(Some(32), true, false);
        let res = gptq_quantize(&w, rows, cols, &h, &opts(cfg, 128)).expect("rank-deficient H");
        check_structure(&res, &h, cfg);
        assert_eq!(res.damp_attempts, vec![0.01]);
        let rtn =
            rtn_quantize(&w, rows, cols, Some(&h), &opts(cfg, 128).spec, Some(32)).expect("rtn");
        assert!(res.loss < rtn.loss);
        let (_, ref_loss) = ref_gptq(
            &w,
            rows,
            cols,
            &h,
            cfg,
            32,
            &ref_prepare(&h, cols, true, 0.01),
        );
        assert!(rel(res.loss, ref_loss) < 0.01, "{} vs {ref_loss}", res.loss);

        // Indefinite: subtract 5% of mean(diag) -> 1%, 2%, 4% fail; 8% succeeds and is reported.
        let mean = (0..cols).map(|i| h[i * cols + i] as f64).sum::<f64>() / cols as f64;
        let mut hi = h.clone();
        for i in 0..cols {
            hi[i * cols + i] -= (0.05 * mean) as f32;
        }
        let res = gptq_quantize(&w, rows, cols, &hi, &opts(cfg, 128)).expect("escalated damping");
        assert_eq!(res.damp_attempts, vec![0.01, 0.02, 0.04, 0.08]);
        assert_eq!(res.damp_frac, 0.08);
        assert!(res.codes.iter().all(|&c| c <= 15));

        // Hopeless: -I fails after every step with a message naming the fractions.
        let mut neg = vec![0.0f32; cols * cols];
        for i in 0..cols {
            neg[i * cols + i] = -1.0;
        }
        match gptq_quantize(&w, rows, cols, &neg, &opts(cfg, 128)) {
            Err(Error::NotPositiveDefinite(m)) => assert!(m.contains("0.01"), "{m}"),
            other => panic!("expected NotPositiveDefinite, got {other:?}"),
        }
    }

    #[test]
    fn bad_input_is_rejected_with_clear_errors() {
        let (rows, cols) = (4usize, 8usize);
        let (w, h) = problem(rows, cols, 32, 6, &[]);
        let o = opts(cfg4(Some(4), false, false), 128);
        let msg = |r: Result<GptqResult>| match r {
            Err(e) => e.to_string(),
            Ok(_) => panic!("accepted bad input"),
        };
        assert!(msg(gptq_quantize(&w[1..], rows, cols, &h, &o)).contains("weight has 31 values"));
        assert!(msg(gptq_quantize(&w, rows, cols, &h[1..], &o)).contains("hessian has 63 values"));
        assert!(msg(gptq_quantize(&[], 0, cols, &h, &o)).contains("at least one row"));
        assert!(msg(gptq_quantize(&[], rows, 0, &[], &o)).contains("at least one row"));
        assert!(msg(gptq_quantize(
            &w,
            rows,
            cols,
            &h,
            &GptqOptions { block_size: 0, ..o }
        ))
        .contains("block_size"));
        assert!(msg(gptq_quantize(
            &w,
            rows,
            cols,
            &h,
            &GptqOptions {
                group_size: Some(0),
                ..o
            }
        ))
        .contains("group_size"));
        let bad_bits = GptqOptions {
            spec: QuantSpec { bits: 5, ..o.spec },
            ..o
        };
        assert!(msg(gptq_quantize(&w, rows, cols, &h, &bad_bits)).contains("bits"));
        let mut wn = w.clone();
        wn[2 * cols + 3] = f32::NAN;
        match gptq_quantize(&wn, rows, cols, &h, &o) {
            Err(Error::NonFinite(m)) => {
                assert!(m.contains("weight contains NaN at row 2, column 3"), "{m}")
            }
            other => panic!("expected NonFinite, got {other:?}"),
        }
        let mut hn = h.clone();
        hn[cols + 2] = f32::INFINITY;
        match gptq_quantize(&w, rows, cols, &hn, &o) {
            Err(Error::NonFinite(m)) => {
                assert!(m.contains("hessian contains Inf at row 1, column 2"), "{m}")
            }
            other => panic!("expected NonFinite, got {other:?}"),
        }
        match gptq_quantize(&w, rows, cols, &vec![0.0; cols * cols], &o) {
            Err(Error::InvalidArgument(m)) => assert!(m.contains("every input column"), "{m}"),
            other => panic!("expected all-dead error, got {other:?}"),
        }
        assert!(msg(rtn_quantize(&wn, rows, cols, None, &o.spec, None)).contains("NaN"));
        assert!(
            msg(rtn_quantize(&w, rows, cols, Some(&h[..10]), &o.spec, None)).contains("hessian")
        );
        assert!(msg(rtn_quantize(&w, rows, cols, None, &o.spec, Some(0))).contains("group_size"));
    }

    #[test]
    fn rtn_uses_the_same_grids() {
        let (rows, cols) = (8usize, 100usize);
        let (w, h) = problem(rows, cols, 200, 7, &[]);
        for &(group, bits, sym, mse) in &[
            (None, 4u8, false, false),
            (Some(32), 3, true, true),
            (Some(30), 8, false, false),
            (Some(100), 2, true, false),
        ] {
            let spec = QuantSpec {
                bits,
                symmetric: sym,
                observer: if mse {
                    Observer::mse_default()
                } else {
                    Observer::MinMax
                },
                scale_dtype: ScaleDtype::F32,
            };
            let res = rtn_quantize(&w, rows, cols, None, &spec, group).expect("rtn");
            assert!(res.loss.is_nan());
            let cfg = Cfg {
                bits,
                sym,
                mse,
                group,
                act_order: false,
                static_groups: false,
                dtype: ScaleDtype::F32,
            };
            let with_h = rtn_quantize(&w, rows, cols, Some(&h), &spec, group).expect("rtn");
            let w64: Vec<f64> = w.iter().map(|&v| v as f64).collect();
            let q64: Vec<f64> = with_h.dequantized.iter().map(|&v| v as f64).collect();
            assert!(rel(with_h.loss, trace_f64(&w64, &q64, rows, cols, &h)) < 1e-9);
            check_structure(&with_h, &h, cfg);
            let g = group.unwrap_or(cols);
            for r in 0..rows {
                for (k, c0) in (0..cols).step_by(g).enumerate() {
                    let vals = &w[r * cols + c0..r * cols + (c0 + g).min(cols)];
                    let gp = fit_group(vals, &spec);
                    assert_eq!(
                        (
                            res.scales[r * res.n_groups + k],
                            res.zeros[r * res.n_groups + k]
                        ),
                        (gp.scale, gp.zero)
                    );
                    for (i, &v) in vals.iter().enumerate() {
                        assert_eq!(
                            res.codes[r * cols + c0 + i],
                            quantize_code(v, gp, spec.maxq())
                        );
                    }
                }
            }
        }
    }

    /// Dense correlated SPD Hessian in O(n²·k): `D (I + Σ_k u_k u_kᵀ) D` with 8 random
    /// directions and log-uniform scales. (A Kac-Murdock-Szegő matrix is cheaper but its factor
    /// decays geometrically into subnormals, which slows every kernel and misleads timings.)
    fn bench_hessian(n: usize, rng: &mut StdRng) -> Vec<f32> {
        let k = 8;
        let u: Vec<f32> = (0..k * n).map(|_| rng.random::<f32>() - 0.5).collect();
        let s: Vec<f32> = (0..n)
            .map(|_| (3.0 * (rng.random::<f32>() - 0.5)).exp())
            .collect();
        let mut h = vec![0.0f32; n * n];
        h.par_chunks_mut(n).enumerate().for_each(|(i, row)| {
            for (j, x) in row.iter_mut().enumerate() {
                let low: f32 = (0..k).map(|r| u[r * n + i] * u[r * n + j]).sum();
                *x = s[i] * s[j] * (low + if i == j { 1.0 } else { 0.0 });
            }
        });
        h
    }

    /// Phase timings at a real size (not part of the suite):
    /// `cargo test -p ferroquant-core --release -- --ignored --nocapture gptq_timing`.
    #[test]
    #[ignore]
    fn gptq_timing() {
        use std::time::Instant;
        let n = std::env::var("FQ_N")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(4096usize);
        let rows = std::env::var("FQ_ROWS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(n);
        let mut rng = StdRng::seed_from_u64(1);
        let w: Vec<f32> = (0..rows * n).map(|_| rng.random::<f32>() - 0.5).collect();
        let h = bench_hessian(n, &mut rng);
        // Machine GEMM rate on the solver's own update shape (rows x 128 times 128 x n).
        let a = faer::Mat::<f32>::from_fn(rows, 128, |i, j| ((i + j) % 7) as f32);
        let b = faer::Mat::<f32>::from_fn(128, n, |i, j| ((i * j) % 5) as f32);
        let mut c = faer::Mat::<f32>::zeros(rows, n);
        let t = Instant::now();
        for _ in 0..5 {
            matmul(
                c.as_mut(),
                Accum::Add,
                a.as_ref(),
                b.as_ref(),
                1.0f32,
                Par::rayon(0),
            );
        }
        let gemm_rate = 5.0 * 2.0 * (rows * 128 * n) as f64 / t.elapsed().as_secs_f64() / 1e9;
        let t = Instant::now();
        let f = linalg::factor_damped(&h, n, DampingPolicy::default()).expect("factor");
        let t_factor = t.elapsed().as_secs_f64();
        drop(f);
        for (name, cfg) in [
            ("g128", cfg4(Some(128), false, false)),
            ("g128 act_order", cfg4(Some(128), true, false)),
            ("per-channel", cfg4(None, false, false)),
        ] {
            let t = Instant::now();
            let res = gptq_quantize(&w, rows, n, &h, &opts(cfg, 128)).expect("solve");
            let total = t.elapsed().as_secs_f64();
            let upd = rows as f64 * n as f64 * n as f64;
            let fac = (n as f64).powi(3) / 3.0;
            eprintln!(
                "{rows}x{n} {name}: total {total:.3} s (factor_damped alone {t_factor:.3} s); flops: updates {:.1} G + factor {:.1} G -> {:.1} GFlop/s overall; GEMM rate {gemm_rate:.1} GFlop/s; floor at that rate {:.3} s; loss {:.4e}",
                upd / 1e9,
                fac / 1e9,
                (upd + fac) / total / 1e9,
                (upd + fac) / gemm_rate / 1e9,
                res.loss
            );
        }
    }

    // ---------------------------------------------------------------------------------------
    // GPTAQ: an f64 reference of the paper's equations, written column by column with every
    // update applied at once (no lazy batches, no `V`/`A` reformulation): explicit
    // `U = chol(H⁻¹)ᵀ`, `P = α triu₁(dXXᵀ Uᵀ) U`, and per column
    // `W[:, >p] += -E_p U[p, >p] + W_p P[p, >p]` with `W_p` the column before quantization.
    // ---------------------------------------------------------------------------------------

    /// Float inputs `X` and perturbed inputs `X~` (`X~ = X + noise`, noise relative `eps`), as
    /// (weight, H = (2/t) X~ᵀX~, dXXᵀ = (2/t) (X - X~)ᵀ X~), all f32.
    fn gptaq_problem(
        rows: usize,
        cols: usize,
        tokens: usize,
        eps: f64,
        seed: u64,
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let mut rng = StdRng::seed_from_u64(seed);
        let w: Vec<f32> = (0..rows * cols)
            .map(|_| (normal(&mut rng) * 0.05) as f32)
            .collect();
        let k = cols.min(16);
        let a: Vec<f64> = (0..k * cols).map(|_| normal(&mut rng)).collect();
        let scale: Vec<f64> = (0..cols).map(|_| (normal(&mut rng) * 0.5).exp()).collect();
        let mut x = vec![0.0f64; tokens * cols];
        let mut xq = vec![0.0f64; tokens * cols];
        for t in 0..tokens {
            let z: Vec<f64> = (0..k).map(|_| normal(&mut rng)).collect();
            for c in 0..cols {
                let mut v = 0.3 * normal(&mut rng);
                for (i, zi) in z.iter().enumerate() {
                    v += zi * a[i * cols + c];
                }
                v *= scale[c];
                x[t * cols + c] = v;
                xq[t * cols + c] = v + eps * scale[c] * normal(&mut rng);
            }
        }
        let f = 2.0 / tokens as f64;
        let mut h = vec![0.0f32; cols * cols];
        let mut d = vec![0.0f32; cols * cols];
        for i in 0..cols {
            for j in 0..cols {
                let (mut sh, mut sd) = (0.0, 0.0);
                for t in 0..tokens {
                    sh += xq[t * cols + i] * xq[t * cols + j];
                    sd += (x[t * cols + i] - xq[t * cols + i]) * xq[t * cols + j];
                }
                h[i * cols + j] = (f * sh) as f32;
                d[i * cols + j] = (f * sd) as f32;
            }
        }
        (w, h, d)
    }

    /// Returns (dequantized Q and target A in original order, loss tr((A-Q) H (A-Q)ᵀ)).
    #[allow(clippy::too_many_arguments)]
    fn ref_gptaq(
        w: &[f32],
        rows: usize,
        n: usize,
        h: &[f32],
        dxxt: &[f32],
        alpha: f64,
        cfg: Cfg,
        prep: &(Vec<usize>, Vec<f64>),
    ) -> (Vec<f64>, Vec<f64>, f64) {
        let (perm, u) = prep;
        let maxq = ((1u32 << cfg.bits) - 1) as f64;
        let dead: Vec<bool> = (0..n).map(|i| h[i * n + i] == 0.0).collect();
        let w0: Vec<f64> = (0..rows * n)
            .map(|k| if dead[k % n] { 0.0 } else { w[k] as f64 })
            .collect();
        // dXXᵀ permuted, dead rows and columns zeroed; M = G Uᵀ, P = α triu₁(M) U.
        let g: Vec<f64> = (0..n * n)
            .map(|k| {
                let (i, j) = (perm[k / n], perm[k % n]);
                if dead[i] || dead[j] {
                    0.0
                } else {
                    dxxt[i * n + j] as f64
                }
            })
            .collect();
        let mut m = vec![0.0f64; n * n];
        for i in 0..n {
            for l in i + 1..n {
                let mut acc = 0.0;
                for c in l..n {
                    acc += g[i * n + c] * u[l * n + c];
                }
                m[i * n + l] = acc;
            }
        }
        let mut pm = vec![0.0f64; n * n];
        for i in 0..n {
            for j in i + 1..n {
                let mut acc = 0.0;
                for l in i + 1..=j {
                    acc += m[i * n + l] * u[l * n + j];
                }
                pm[i * n + j] = alpha * acc;
            }
        }
        let mut params: Vec<(f64, f64)> = (0..rows)
            .map(|r| ref_find_params(&w0[r * n..(r + 1) * n], cfg))
            .collect();
        let mut groups: Vec<Vec<(f64, f64)>> = Vec::new();
        if let (Some(gs), true) = (cfg.group, cfg.static_groups) {
            for i in (0..n).step_by(gs) {
                let e = (i + gs).min(n);
                groups.push(
                    (0..rows)
                        .map(|r| ref_find_params(&w0[r * n + i..r * n + e], cfg))
                        .collect(),
                );
            }
        }
        let mut wm: Vec<f64> = (0..rows * n)
            .map(|k| w0[(k / n) * n + perm[k % n]])
            .collect();
        let mut am = wm.clone();
        let mut q = vec![0.0; rows * n];
        for p in 0..n {
            if let Some(gs) = cfg.group {
                if !cfg.static_groups {
                    if p % gs == 0 {
                        let e = (p + gs).min(n);
                        params = (0..rows)
                            .map(|r| ref_find_params(&wm[r * n + p..r * n + e], cfg))
                            .collect();
                    }
                } else {
                    params = groups[perm[p] / gs].clone();
                }
            }
            for r in 0..rows {
                let wv = wm[r * n + p];
                let qv = ref_quant(wv, params[r].0, params[r].1, maxq);
                q[r * n + p] = qv;
                let e = (wv - qv) / u[p * n + p];
                for j in p + 1..n {
                    wm[r * n + j] += -e * u[p * n + j] + wv * pm[p * n + j];
                    am[r * n + j] += wv * pm[p * n + j];
                }
            }
        }
        let (mut qo, mut ao) = (vec![0.0; rows * n], vec![0.0; rows * n]);
        for r in 0..rows {
            for p in 0..n {
                qo[r * n + perm[p]] = q[r * n + p];
                ao[r * n + perm[p]] = am[r * n + p];
            }
        }
        let loss = trace_f64(&ao, &qo, rows, n, h);
        (qo, ao, loss)
    }

    fn all_cfgs() -> Vec<Cfg> {
        let mut out = Vec::new();
        for (i, &(group, act_order, static_groups)) in [
            (None, false, false),
            (None, true, false),
            (Some(16), false, false),
            (Some(16), true, false),
            (Some(24), true, true),
            (Some(20), false, false),
        ]
        .iter()
        .enumerate()
        {
            out.push(Cfg {
                bits: [4u8, 3, 4, 2, 3, 4][i],
                sym: i % 2 == 1,
                mse: i == 3,
                group,
                act_order,
                static_groups,
                dtype: ScaleDtype::F32,
            });
        }
        out
    }

    #[test]
    fn gptaq_matches_reference() {
        let mut worst: f64 = 0.0;
        for &(rows, cols, seed) in &[(16usize, 64usize, 11u64), (24, 96, 12)] {
            let (w, h, dxxt) = gptaq_problem(rows, cols, 4 * cols, 0.2, seed);
            for cfg in all_cfgs() {
                let prep = ref_prepare(&h, cols, cfg.act_order, 0.01);
                // Block 32 < cols: lazy batches, and groups of 20/24 starting mid-batch.
                let res =
                    gptaq_quantize(&w, rows, cols, &h, &dxxt, 0.25, &opts(cfg, 32)).expect("solve");
                check_structure(&res, &h, cfg);
                let (ref_q, ref_a, ref_loss) =
                    ref_gptaq(&w, rows, cols, &h, &dxxt, 0.25, cfg, &prep);
                let equal = ref_q
                    .iter()
                    .zip(&res.dequantized)
                    .filter(|(a, b)| (**a - **b as f64).abs() <= 1e-5 * a.abs().max(1e-2))
                    .count();
                // f32 against f64 can flip a rounding tie: the MSE observer's grid search, or a
                // symmetric grid's largest weight, which sits exactly on a half step (seen once:
                // one row's group of 20 at 4 bits). Anything more is a bug.
                let need = ref_q.len() * 98 / 100;
                assert!(
                    equal >= need,
                    "{cfg:?}: {} of {} dequantized weights differ from the reference",
                    ref_q.len() - equal,
                    ref_q.len()
                );
                let r = rel(res.loss, ref_loss);
                eprintln!(
                    "{rows}x{cols} {cfg:?}: loss {:.6e} ref {ref_loss:.6e} rel {r:.2e}, {} differ",
                    res.loss,
                    ref_q.len() - equal
                );
                // f32 against f64 arithmetic: observed up to ~2.3e-6 with every weight equal.
                let tol = if equal == ref_q.len() {
                    worst = worst.max(r);
                    1e-5
                } else {
                    1e-2
                };
                assert!(
                    r < tol,
                    "{cfg:?}: loss {} vs reference {ref_loss}",
                    res.loss
                );
                // The extra term moves the target; plain GPTQ's target is W.
                let shift: f64 = ref_a
                    .iter()
                    .zip(&w)
                    .map(|(a, &b)| (a - b as f64).abs())
                    .sum();
                assert!(shift > 0.0);
            }
        }
        eprintln!(
            "worst relative loss difference vs the reference (all weights equal): {worst:.2e}"
        );
    }

    #[test]
    fn gptaq_with_zero_dxxt_or_alpha_is_gptq_bit_for_bit() {
        let (rows, cols) = (21usize, 100usize);
        let (w, h, dxxt) = gptaq_problem(rows, cols, 3 * cols, 0.2, 5);
        let zeros = vec![0.0f32; cols * cols];
        for cfg in all_cfgs() {
            for &bs in &[32usize, 128] {
                let o = opts(cfg, bs);
                let plain = gptq_quantize(&w, rows, cols, &h, &o).expect("gptq");
                for (d, alpha) in [(&zeros, 0.25f32), (&dxxt, 0.0)] {
                    let aq = gptaq_quantize(&w, rows, cols, &h, d, alpha, &o).expect("gptaq");
                    assert_eq!(aq.codes, plain.codes, "{cfg:?} bs {bs} alpha {alpha}");
                    assert_eq!(aq.scales, plain.scales, "{cfg:?} bs {bs} alpha {alpha}");
                    assert_eq!(aq.zeros, plain.zeros, "{cfg:?} bs {bs} alpha {alpha}");
                    assert_eq!(aq.g_idx, plain.g_idx);
                    assert_eq!(aq.perm, plain.perm);
                    assert_eq!(aq.loss.to_bits(), plain.loss.to_bits(), "{cfg:?}");
                }
            }
        }
    }

    #[test]
    fn gptaq_block_size_paths_and_dead_columns() {
        let (rows, cols) = (19usize, 150usize);
        let (w, mut h, mut dxxt) = gptaq_problem(rows, cols, 3 * cols, 0.2, 6);
        for &c in &[3usize, 77] {
            for k in 0..cols {
                h[c * cols + k] = 0.0;
                h[k * cols + c] = 0.0;
                dxxt[k * cols + c] = 0.0;
                // Float inputs may differ where the quantized ones are zero.
                dxxt[c * cols + k] = 0.01;
            }
        }
        for cfg in all_cfgs() {
            let base =
                gptaq_quantize(&w, rows, cols, &h, &dxxt, 0.25, &opts(cfg, 128)).expect("solve");
            check_structure(&base, &h, cfg);
            assert_eq!(base.dead, vec![3, 77]);
            for &bs in &[7usize, 50, 1000] {
                let other =
                    gptaq_quantize(&w, rows, cols, &h, &dxxt, 0.25, &opts(cfg, bs)).expect("solve");
                let same = base
                    .codes
                    .iter()
                    .zip(&other.codes)
                    .filter(|(a, b)| a == b)
                    .count();
                assert!(
                    same as f64 / base.codes.len() as f64 > 0.999,
                    "{cfg:?} block {bs}: {same} of {} codes equal",
                    base.codes.len()
                );
                assert!(rel(other.loss, base.loss) < 1e-3, "{cfg:?} block {bs}");
            }
            let fast = gptaq_quantize(&w, rows, cols, &h, &dxxt, 0.25, &opts(cfg, 32)).unwrap();
            FORCE_GENERIC.store(true, Ordering::Relaxed);
            let portable = gptaq_quantize(&w, rows, cols, &h, &dxxt, 0.25, &opts(cfg, 32));
            FORCE_GENERIC.store(false, Ordering::Relaxed);
            let portable = portable.unwrap();
            assert_eq!(fast.codes, portable.codes, "{cfg:?}");
            assert_eq!(fast.scales, portable.scales, "{cfg:?}");
        }
        let e = gptaq_quantize(
            &w,
            rows,
            cols,
            &h,
            &dxxt[1..],
            0.25,
            &opts(all_cfgs()[0], 128),
        )
        .unwrap_err();
        assert!(format!("{e}").contains("dxxt"), "{e}");
        let mut bad = dxxt.clone();
        bad[5] = f32::NAN;
        let e =
            gptaq_quantize(&w, rows, cols, &h, &bad, 0.25, &opts(all_cfgs()[0], 128)).unwrap_err();
        assert!(format!("{e}").contains("dxxt"), "{e}");
    }

    /// GAR's order: groups by descending max key, a ragged group last, columns by key; dead
    /// inputs count as 1.
    #[test]
    fn group_aware_order_sorts_groups_then_columns() {
        let diag = [1.0, 5.0, 2.0, 9.0, 0.5, 3.0, 8.0, 0.0, 7.0, 100.0];
        // groups of 3: {1,5,2} max 5, {9,.5,3} max 9, {8,0->1,7} max 8, ragged {100} last
        let order = group_aware_order(&diag, 3);
        assert_eq!(order, vec![3, 5, 4, 6, 8, 7, 1, 2, 0, 9]);
    }
}
