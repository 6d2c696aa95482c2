//! A CPU model of the CUDA GPTQ solve (and of the Hessian batches' non-finite record), written
//! step for step as the device code runs it, so the kernels' logic is tested on machines
//! without a GPU (the GPU tests then compare the device against the CPU solver directly).
//!
//! Step                          | device ([`super::device`])          | here
//! ------------------------------|-------------------------------------|---------------------------
//! Hessian batch NaN/Inf record  | `fq_record_nonfinite` (device slot)  | [`record_non_finite`]
//! non-finite / diag / order     | `fq_find_nonfinite`, `fq_diag` + [`plan`] | same [`plan`] code
//! damped, permuted, reversed H  | `fq_prep_hessian`                    | [`prep_hessian`] (same indices)
//! Cholesky                      | cuSOLVER `potrf(UPPER)` column-major | faer lower Cholesky, row-major
//! inverse factor                | cuSOLVER `Xtrtri(UPPER)`             | faer lower triangular inverse
//! `Hinv` = reversed inverse     | `fq_reverse_upper`                   | [`reverse_upper`]
//! weights in processing order   | `fq_permute_weight`                  | [`permute_weight`]
//! up-front grids                | `fq_fit_groups`                      | [`fit_groups`]
//! column recurrence per batch   | `fq_gptq_batch` (warp per row)       | [`batch_kernel`]
//! lazy update per batch         | cuBLAS `sgemm` (fp32)                | faer `matmul`
//!
//! The algorithm is the GPTQ reference's (`Hinv`, the upper Cholesky factor of `H⁻¹`, and
//! `E_j = (W_j - Q_j) / Hinv_jj`), not the CPU solver's inverse-free form, because then the
//! working weights of every column in the current batch are the exact reference state and a
//! dynamic group's grid is a plain min/max over them (see [`plan::batches`] for why a group never
//! needs columns whose updates are still pending). Results equal the CPU solver's up to float
//! rounding: the tests require codes identical except at rounding ties and the loss within 0.1%.
//!
//! Scales are rounded to their storage dtype (`spec.scale_dtype`) where they are computed: the
//! kernels' `round_scale` transcribes `ScaleDtype::round`, which `minmax_params` applies here.
//!
//! The float arithmetic is the kernel's: divisions (not reciprocals) where the kernel divides,
//! products and sums as separate operations (the kernels are compiled with `--fmad=false`),
//! f64 sums of the loss terms.

use faer::dyn_stack::{MemBuffer, MemStack};
use faer::linalg::cholesky::llt::factor::{
    cholesky_in_place, cholesky_in_place_scratch, LltError, LltRegularization,
};
use faer::linalg::matmul::matmul;
use faer::linalg::triangular_inverse::invert_lower_triangular;
use faer::{Accum, MatMut, MatRef, Par};

use super::plan::{self, GroupMode, REGS, WARP};
use crate::error::Result;
use crate::gptq::{GptqOptions, GptqResult};
use crate::quantizer::{check_scales, minmax_params, QuantSpec};

/// First non-finite entry of a row-major `[rows, cols]` buffer (what `fq_find_nonfinite`'s
/// atomicMin over flat indices returns).
pub fn first_non_finite(a: &[f32]) -> Option<usize> {
    a.iter().position(|v| !v.is_finite())
}

/// One Hessian batch's activations as the record kernels read them: f32, or 16-bit floats as
/// raw bits with their exponent mask.
#[derive(Clone, Copy, Debug)]
pub enum BatchBits<'a> {
    F32(&'a [f32]),
    U16(&'a [u16], u16),
}

/// `fq_record_nonfinite_*` on batch `batch` of dtype `tag`: unless an earlier batch recorded
/// one, the batch's first non-finite element (smallest flat index: the kernel's atomicMin)
/// goes into `slot` = `[batch, flat index, tag]` (see [`plan::NONFINITE_SLOT_BYTES`]).
pub fn record_non_finite(x: BatchBits<'_>, batch: u64, tag: u64, slot: &mut [u64; 3]) {
    if slot[0] != u64::MAX && slot[0] != batch {
        return; // fq_slot_taken
    }
    let first = match x {
        BatchBits::F32(a) => a
            .iter()
            .position(|v| v.to_bits() & 0x7f80_0000 == 0x7f80_0000),
        BatchBits::U16(a, mask) => a.iter().position(|v| v & mask == mask),
    };
    if let Some(i) = first {
        // fq_slot_record: the atomicCAS claims the slot for this batch, atomicMin keeps the
        // smallest index
        slot[0] = batch;
        slot[1] = slot[1].min(i as u64);
        slot[2] = tag;
    }
}

/// `fq_prep_hessian`: `out = J P H Pᵀ J` with dead inputs isolated (diagonal 1) and `damp` added
/// to the diagonal; `P` the processing order, `J` the reversal.
pub fn prep_hessian(
    h: &[f32],
    n: usize,
    order: &[usize],
    dead: &[bool],
    damp: f32,
    out: &mut [f32],
) {
    for r in 0..n {
        for c in 0..n {
            let (pr, pc) = (n - 1 - r, n - 1 - c);
            let mut v = if dead[pr] || dead[pc] {
                if r == c {
                    1.0
                } else {
                    0.0
                }
            } else {
                h[order[pr] * n + order[pc]]
            };
            if r == c {
                v += damp;
            }
            out[r * n + c] = v;
        }
    }
}

/// cuSOLVER `potrf(UPPER)` on the column-major view = lower Cholesky of the row-major view.
/// `Err(pos)`: failed pivot, as a processing position (the buffer is reversed).
fn potrf(a: &mut [f32], n: usize) -> std::result::Result<(), usize> {
    let par = Par::Seq;
    let mut mem = MemBuffer::new(cholesky_in_place_scratch::<f32>(n, par, Default::default()));
    let stack = MemStack::new(&mut mem);
    match cholesky_in_place(
        MatMut::from_row_major_slice_mut(a, n, n),
        LltRegularization::default(),
        par,
        stack,
        Default::default(),
    ) {
        Ok(_) => Ok(()),
        Err(LltError::NonPositivePivot { index }) => Err(n - 1 - index),
    }
}

/// `fq_reverse_upper`: `dst[r][c] = src[n-1-r][n-1-c]` on and above the diagonal, 0 below
/// (the device does it in place, swapping mirrored pairs).
pub fn reverse_upper(a: &mut [f32], n: usize) {
    a.reverse();
    for r in 0..n {
        a[r * n..r * n + r].fill(0.0);
    }
}

/// `fq_permute_weight`: `wp[r][p] = dead[p] ? 0 : w[r][order[p]]`.
pub fn permute_weight(
    w: &[f32],
    rows: usize,
    cols: usize,
    order: &[usize],
    dead: &[bool],
) -> Vec<f32> {
    let mut wp = vec![0.0; rows * cols];
    for r in 0..rows {
        for p in 0..cols {
            wp[r * cols + p] = if dead[p] { 0.0 } else { w[r * cols + order[p]] };
        }
    }
    wp
}

/// `fq_fit_groups`: min-max grids of contiguous groups of `g` columns of the ORIGINAL weight
/// (dead inputs read as 0), one warp per (row, group).
#[allow(clippy::too_many_arguments)]
pub fn fit_groups(
    w: &[f32],
    rows: usize,
    cols: usize,
    g: usize,
    dead_orig: &[bool],
    spec: &QuantSpec,
    scales: &mut [f32],
    zeros: &mut [i32],
) {
    let ng = cols.div_ceil(g);
    for r in 0..rows {
        for k in 0..ng {
            let (mut lo, mut hi) = (0.0f32, 0.0f32);
            for c in k * g..((k + 1) * g).min(cols) {
                let v = if dead_orig[c] { 0.0 } else { w[r * cols + c] };
                lo = lo.min(v);
                hi = hi.max(v);
            }
            let gp = minmax_params(lo, hi, spec);
            scales[r * ng + k] = gp.scale;
            zeros[r * ng + k] = gp.zero;
        }
    }
}

/// Device buffers of the solve, as host vectors.
pub struct SolveBuffers<'a> {
    /// Working weights `[rows, cols]`, processing order.
    pub wp: &'a mut [f32],
    /// Original weight `[rows, cols]`, original order.
    pub w: &'a [f32],
    /// `Hinv`, row-major upper `[cols, cols]`, processing order.
    pub u: &'a [f32],
    pub order: &'a [usize],
    pub dead: &'a [bool],
    /// This batch's errors, `[rows, MAX_BATCH]`.
    pub e: &'a mut [f32],
    pub codes: &'a mut [u8],
    pub dq: &'a mut [f32],
    pub scales: &'a mut [f32],
    pub zeros: &'a mut [i32],
    /// Per row: Σ E², Σ D² (f64).
    pub sums: &'a mut [f64],
    /// Test instrumentation (no device counterpart): `w / scale` before rounding, `[rows, cols]`
    /// original order, to tell rounding ties from real differences.
    pub pre: Option<&'a mut [f32]>,
}

/// `fq_gptq_batch` for columns `i1..i2`: one warp per row; lane `l` holds batch columns
/// `l + 32 m` in `x[m]`. The loop structure is the kernel's (the lanes' work is done one lane
/// after the other here; every lane computes the broadcast column's quantization redundantly on
/// the device, which gives the same values).
#[allow(clippy::needless_range_loop)]
pub fn batch_kernel(
    b: &mut SolveBuffers<'_>,
    rows: usize,
    cols: usize,
    i1: usize,
    i2: usize,
    mode: GroupMode,
    spec: &QuantSpec,
) {
    let n = cols;
    let ng = mode.n_groups(cols);
    let count = i2 - i1;
    let maxq = spec.maxq() as f32;
    for row in 0..rows {
        let mut x = [[0.0f32; REGS]; WARP];
        let mut o = [[0.0f32; REGS]; WARP];
        for lane in 0..WARP {
            for m in 0..REGS {
                let k = m * WARP + lane;
                if k < count {
                    let p = i1 + k;
                    x[lane][m] = b.wp[row * n + p];
                    o[lane][m] = if b.dead[p] {
                        0.0
                    } else {
                        b.w[row * n + b.order[p]]
                    };
                }
            }
        }
        let (mut scale, mut zero) = (1.0f32, 0.0f32);
        let mut cur_k = usize::MAX;
        let (mut se, mut sd) = (0.0f64, 0.0f64);
        for m in 0..REGS {
            for jj in 0..WARP {
                let j = m * WARP + jj;
                if j >= count {
                    break;
                }
                let p = i1 + j;
                match mode {
                    GroupMode::Dynamic(g) if p.is_multiple_of(g) => {
                        let end = (p + g).min(n);
                        // Each lane: its unprocessed batch columns of the group, then a strided
                        // share of the group's columns past the batch; then a warp reduction.
                        let (mut lo, mut hi) = (0.0f32, 0.0f32);
                        for lane in 0..WARP {
                            for mm in 0..REGS {
                                let k = mm * WARP + lane;
                                if k >= j && k < count && i1 + k < end {
                                    lo = lo.min(x[lane][mm]);
                                    hi = hi.max(x[lane][mm]);
                                }
                            }
                            let mut c = i2 + lane;
                            while c < end {
                                let v = b.wp[row * n + c];
                                lo = lo.min(v);
                                hi = hi.max(v);
                                c += WARP;
                            }
                        }
                        let gp = minmax_params(lo, hi, spec);
                        let k = p / g;
                        b.scales[row * ng + k] = gp.scale;
                        b.zeros[row * ng + k] = gp.zero;
                        scale = gp.scale;
                        zero = gp.zero as f32;
                        cur_k = k;
                    }
                    _ => {
                        let k = match mode {
                            GroupMode::PerChannel => 0,
                            GroupMode::Dynamic(g) => p / g,
                            GroupMode::Static(g) => b.order[p] / g,
                        };
                        if k != cur_k {
                            scale = b.scales[row * ng + k];
                            zero = b.zeros[row * ng + k] as f32;
                            cur_k = k;
                        }
                    }
                }
                // __shfl_sync from lane jj.
                let xv = x[jj][m];
                let ov = o[jj][m];
                let w = if b.dead[p] { 0.0 } else { xv };
                let code = ((w / scale).round_ties_even() + zero).max(0.0).min(maxq);
                let q = scale * (code - zero);
                let upp = b.u[p * n + p];
                let err = (w - q) / upp;
                let d = ov - q;
                se += err as f64 * err as f64;
                sd += d as f64 * d as f64;
                let c = b.order[p];
                if let Some(pre) = b.pre.as_deref_mut() {
                    pre[row * n + c] = w / scale;
                }
                b.codes[row * n + c] = code as u8;
                b.dq[row * n + c] = q;
                b.e[row * plan::MAX_BATCH + j] = err;
                for lane in 0..WARP {
                    for mm in m..REGS {
                        let k = mm * WARP + lane;
                        if k > j && k < count {
                            x[lane][mm] -= err * b.u[p * n + i1 + k];
                        }
                    }
                }
            }
        }
        b.sums[2 * row] += se;
        b.sums[2 * row + 1] += sd;
    }
}

/// The cuBLAS call after each batch: `W'[:, i2:] -= E[:, :count] · Hinv[i1:i2, i2:]` (fp32).
pub fn lazy_update(
    wp: &mut [f32],
    e: &[f32],
    u: &[f32],
    rows: usize,
    cols: usize,
    i1: usize,
    i2: usize,
) {
    if i2 >= cols {
        return;
    }
    let (count, rest) = (i2 - i1, cols - i2);
    let lhs = MatRef::from_row_major_slice_with_stride(e, rows, count, plan::MAX_BATCH);
    let rhs = MatRef::from_row_major_slice_with_stride(&u[i1 * cols + i2..], count, rest, cols);
    // Row-major strided destination as a transposed column-major view (see gptq.rs on faer's
    // row-major strided constructor).
    let dst = MatMut::from_column_major_slice_with_stride_mut(&mut wp[i2..], rest, rows, cols)
        .transpose_mut();
    matmul(dst, Accum::Add, lhs, rhs, -1.0f32, Par::Seq);
}

/// The whole CUDA solve on the CPU: same inputs and outputs as `gptq::gptq_quantize`.
pub fn gptq_quantize_model(
    weight: &[f32],
    rows: usize,
    cols: usize,
    hessian: &[f32],
    opts: &GptqOptions,
) -> Result<GptqResult> {
    solve(weight, rows, cols, hessian, opts, None)
}

fn solve(
    weight: &[f32],
    rows: usize,
    cols: usize,
    hessian: &[f32],
    opts: &GptqOptions,
    mut pre: Option<&mut [f32]>,
) -> Result<GptqResult> {
    let mode = plan::check_options(rows, cols, opts)?;
    let n = cols;
    if weight.len() != rows * cols || hessian.len() != n * n {
        return Err(crate::Error::InvalidArgument(format!(
            "gptq: weight has {} values and hessian {}, expected {rows}*{cols} and {cols}*{cols}",
            weight.len(),
            hessian.len()
        )));
    }
    if let Some(i) = first_non_finite(weight) {
        return Err(plan::non_finite("weight", weight[i], i / cols, i % cols));
    }
    if let Some(i) = first_non_finite(hessian) {
        return Err(plan::non_finite("hessian", hessian[i], i / n, i % n));
    }
    let diag: Vec<f32> = (0..n).map(|i| hessian[i * n + i]).collect();
    let order = plan::processing_order(&diag, opts.act_order);
    let dead = plan::dead_positions(&diag, &order)?;
    let mean = plan::mean_diag(&diag, &order, &dead);

    let mut work = vec![0.0f32; n * n];
    let damping = plan::escalate::<crate::Error>(opts.damping, n, mean, |damp| {
        prep_hessian(hessian, n, &order, &dead, damp, &mut work);
        Ok(potrf(&mut work, n).err())
    })?;
    // Xtrtri on the factor, then reverse: Hinv (upper, processing order).
    let mut u = vec![0.0f32; n * n];
    invert_lower_triangular(
        MatMut::from_row_major_slice_mut(&mut u, n, n),
        MatRef::from_row_major_slice(&work, n, n),
        Par::Seq,
    );
    drop(work);
    reverse_upper(&mut u, n);
    let hinv_diag: Vec<f32> = (0..n).map(|i| u[i * n + i]).collect();
    plan::check_pivots(&hinv_diag, damping.frac)?;

    let mut dead_orig = vec![false; n];
    for (p, &c) in order.iter().enumerate() {
        dead_orig[c] = dead[p];
    }
    let ng = mode.n_groups(cols);
    let mut scales = vec![0.0f32; rows * ng];
    let mut zeros = vec![0i32; rows * ng];
    if let Some(g) = mode.upfront_width(cols) {
        fit_groups(
            weight,
            rows,
            cols,
            g,
            &dead_orig,
            &opts.spec,
            &mut scales,
            &mut zeros,
        );
    }
    let mut wp = permute_weight(weight, rows, cols, &order, &dead);
    let mut e = vec![0.0f32; rows * plan::MAX_BATCH];
    let mut codes = vec![0u8; rows * cols];
    let mut dq = vec![0.0f32; rows * cols];
    let mut sums = vec![0.0f64; 2 * rows];
    for (i1, i2) in plan::batches(cols, mode, opts.block_size) {
        let mut b = SolveBuffers {
            wp: &mut wp,
            w: weight,
            u: &u,
            order: &order,
            dead: &dead,
            e: &mut e,
            codes: &mut codes,
            dq: &mut dq,
            scales: &mut scales,
            zeros: &mut zeros,
            sums: &mut sums,
            pre: pre.as_deref_mut(),
        };
        batch_kernel(&mut b, rows, cols, i1, i2, mode, &opts.spec);
        lazy_update(&mut wp, &e, &u, rows, cols, i1, i2);
    }
    // The device reads the scales back for this check (float16/bfloat16 storage only).
    check_scales(&scales, ng, opts.spec.scale_dtype)?;
    let se: f64 = sums.iter().step_by(2).sum();
    let sd: f64 = sums.iter().skip(1).step_by(2).sum();
    let loss = se - damping.value as f64 * sd;
    Ok(GptqResult {
        rows,
        cols,
        n_groups: ng,
        codes,
        scales,
        zeros,
        g_idx: mode.g_idx(cols, &order),
        dequantized: dq,
        loss,
        perm: opts.act_order.then_some(order),
        damp_frac: damping.frac,
        damp_attempts: damping.attempts,
        dead: (0..cols).filter(|&c| dead_orig[c]).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gptq::{gptq_quantize, proxy_loss};
    use crate::linalg::tests::{correlated, hessian_f64};
    use crate::linalg::DampingPolicy;
    use crate::quantizer::{Observer, QuantSpec, ScaleDtype};
    use crate::Error;

    fn problem(seed: u64, rows: usize, cols: usize, dead: &[usize]) -> (Vec<f32>, Vec<f32>) {
        let tokens = 2 * cols + 64;
        let mut x = correlated(seed, tokens, cols, cols / 2 + 3);
        for t in 0..tokens {
            for &d in dead {
                x[t * cols + d] = 0.0;
            }
        }
        let h: Vec<f32> = hessian_f64(&x, tokens, cols)
            .iter()
            .map(|&v| v as f32)
            .collect();
        let w: Vec<f32> = correlated(seed + 100, rows, cols, cols)
            .iter()
            .map(|&v| (0.2 * v) as f32)
            .collect();
        (w, h)
    }

    fn opts(
        bits: u8,
        sym: bool,
        group: Option<usize>,
        act: bool,
        stat: bool,
        bs: usize,
    ) -> GptqOptions {
        GptqOptions {
            spec: QuantSpec {
                bits,
                symmetric: sym,
                observer: Observer::MinMax,
                scale_dtype: ScaleDtype::F32,
            },
            group_size: group,
            act_order: act,
            static_groups: stat,
            group_aware: false,
            block_size: bs,
            damping: DampingPolicy::default(),
        }
    }

    /// Model vs CPU solver. Codes may differ only through a rounding tie: in each row the first
    /// differing code is off by one and its value before rounding sits within float noise of
    /// k + 0.5 (after that the row legitimately diverges: later columns received a different
    /// error). Rows without a flip must match closely (their proxy loss within 1e-4); the total
    /// loss within 0.1%, or 1% when a tie cascaded in one of these small test layers (a GPU-sized
    /// layer dilutes one row). Returns the number of rows with a tie.
    fn compare(
        w: &[f32],
        h: &[f32],
        rows: usize,
        cols: usize,
        o: &GptqOptions,
        label: &str,
    ) -> usize {
        let cpu = gptq_quantize(w, rows, cols, h, o).unwrap();
        let mut pre = vec![0.0f32; rows * cols];
        let gpu = solve(w, rows, cols, h, o, Some(&mut pre)).unwrap();
        assert_eq!(gpu.g_idx, cpu.g_idx, "{label}: g_idx");
        assert_eq!(gpu.perm, cpu.perm, "{label}: perm");
        assert_eq!(gpu.dead, cpu.dead, "{label}: dead");
        assert_eq!(gpu.damp_attempts, cpu.damp_attempts, "{label}: damping");
        assert_eq!(gpu.n_groups, cpu.n_groups);
        let maxq = o.spec.maxq() as f32;
        let ng = cpu.n_groups;
        let order: Vec<usize> = cpu.perm.clone().unwrap_or_else(|| (0..cols).collect());
        let mut tie_rows = Vec::new();
        let wmax = w.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let dtype = o.spec.scale_dtype;
        for r in 0..rows {
            let mut tied = false;
            for &c in &order {
                let (a, b) = (gpu.codes[r * cols + c], cpu.codes[r * cols + c]);
                assert!(a as f32 <= maxq);
                let k = r * ng + cpu.g_idx[c] as usize;
                if dtype != ScaleDtype::F32 && !tied && gpu.scales[k] != cpu.scales[k] {
                    // Float noise before rounding can straddle a midpoint of the storage dtype:
                    // then the two scales are neighbouring representable values.
                    let bits = |x: f32| match dtype {
                        ScaleDtype::F16 => crate::quantizer::f32_to_f16_bits(x) as i32,
                        _ => crate::quantizer::f32_to_bf16_bits(x) as i32,
                    };
                    assert!(
                        (bits(gpu.scales[k]) - bits(cpu.scales[k])).abs() == 1,
                        "{label}: scale ({r}, {}) {} vs {} are not neighbours in {dtype:?}",
                        cpu.g_idx[c],
                        gpu.scales[k],
                        cpu.scales[k]
                    );
                    tied = true;
                }
                if a != b && !tied {
                    // Float noise in the working weights is relative to the weights' magnitude
                    // (the updates cancel), so in grid steps it is ~1e-7 * max|W| / scale; the
                    // observed ties sit within 5e-7 of that unit.
                    let x = pre[r * cols + c];
                    let dist = ((x - x.floor()) - 0.5).abs();
                    let unit = wmax / gpu.scales[r * ng + cpu.g_idx[c] as usize];
                    assert!(
                        (a as i32 - b as i32).abs() == 1 && dist <= 2e-6 * unit + 1e-6,
                        "{label}: code ({r},{c}) {a} vs {b} is not a rounding tie (w/scale = {x})"
                    );
                    tied = true;
                }
                let k = cpu.g_idx[c] as usize;
                let (s, z) = (gpu.scales[r * ng + k], gpu.zeros[r * ng + k]);
                assert_eq!(
                    gpu.dequantized[r * cols + c],
                    s * (a as i32 - z) as f32,
                    "{label}: dq ({r},{c})"
                );
            }
            if tied {
                tie_rows.push(r);
                continue;
            }
            for k in 0..ng {
                let i = r * ng + k;
                let (sa, sb) = (gpu.scales[i], cpu.scales[i]);
                // Relative to the grid a full-range group would have: tiny grids come from
                // near-cancelled values whose absolute error is what float noise bounds.
                assert!(
                    (sa - sb).abs() <= 1e-4 * sb.abs() + 1e-5 * wmax / maxq,
                    "{label}: scale ({r},{k}): {sa} vs {sb}"
                );
                assert!(
                    (gpu.zeros[i] - cpu.zeros[i]).abs() <= 1,
                    "{label}: zero ({r},{k})"
                );
            }
        }
        let keep: Vec<usize> = (0..rows).filter(|r| !tie_rows.contains(r)).collect();
        if !keep.is_empty() {
            let pick = |v: &[f32]| -> Vec<f32> {
                keep.iter()
                    .flat_map(|&r| v[r * cols..(r + 1) * cols].iter().copied())
                    .collect()
            };
            let wk = pick(w);
            let la = proxy_loss(&wk, &pick(&gpu.dequantized), keep.len(), cols, h).unwrap();
            let lb = proxy_loss(&wk, &pick(&cpu.dequantized), keep.len(), cols, h).unwrap();
            assert!(
                (la - lb).abs() <= 1e-4 * lb.abs(),
                "{label}: loss of rows without ties {la} vs {lb}"
            );
        }
        let rel = (gpu.loss - cpu.loss).abs() / cpu.loss.abs().max(1e-30);
        let tol = if tie_rows.is_empty() { 1e-3 } else { 1e-2 };
        assert!(
            rel < tol,
            "{label}: loss {} vs cpu {} (rel {rel:.2e}, tie rows {tie_rows:?})",
            gpu.loss,
            cpu.loss
        );
        // The recurrence's loss equals the directly computed one.
        let direct = proxy_loss(w, &gpu.dequantized, rows, cols, h).unwrap();
        assert!(
            (direct - gpu.loss).abs() <= 1e-3 * direct.abs(),
            "{label}: loss {} vs direct {direct}",
            gpu.loss
        );
        assert!(
            tie_rows.len() * 4 <= rows,
            "{label}: ties in {} of {rows} rows",
            tie_rows.len()
        );
        tie_rows.len()
    }

    #[test]
    fn model_matches_cpu_solver_across_configurations() {
        let (rows, cols) = (24usize, 300usize);
        let (w, h) = problem(3, rows, cols, &[5, 77]);
        let mut total = 0;
        let mut cases = 0;
        for bits in [2u8, 3, 4, 8] {
            for sym in [true, false] {
                for (group, act, stat) in [
                    (None, false, false),
                    (None, true, false),
                    (Some(128), false, false),
                    (Some(32), true, false),
                    (Some(48), false, false),
                    (Some(200), true, false),
                    (Some(64), true, true),
                    (Some(100), false, true),
                ] {
                    let o = opts(bits, sym, group, act, stat, 128);
                    let label =
                        format!("bits {bits} sym {sym} group {group:?} act {act} static {stat}");
                    total += compare(&w, &h, rows, cols, &o, &label);
                    cases += 1;
                }
            }
        }
        eprintln!(
            "{cases} configurations, {total} rows with a rounding tie of {}",
            cases * rows
        );
    }

    #[test]
    fn model_matches_cpu_solver_with_rounded_scales() {
        let (rows, cols) = (24usize, 300usize);
        let (w, h) = problem(7, rows, cols, &[11]);
        for dtype in [ScaleDtype::F16, ScaleDtype::Bf16] {
            for (bits, sym, group, act, stat) in [
                (4u8, true, None, false, false),
                (3, false, Some(128), false, false),
                (4, false, Some(32), true, false),
                (2, false, Some(200), true, false),
                (8, true, Some(64), true, true),
                (4, false, Some(100), false, true),
            ] {
                let mut o = opts(bits, sym, group, act, stat, 128);
                o.spec.scale_dtype = dtype;
                let label = format!("{dtype:?} bits {bits} sym {sym} group {group:?} act {act}");
                compare(&w, &h, rows, cols, &o, &label);
                let gpu = gptq_quantize_model(&w, rows, cols, &h, &o).unwrap();
                assert!(
                    gpu.scales.iter().all(|&s| dtype.round(s) == s),
                    "{label}: a scale is not representable"
                );
            }
        }
        // Overflow and underflow: the CPU solver's error, the smallest subnormal.
        let (rows, cols) = (4usize, 64usize);
        let (w, h) = problem(8, rows, cols, &[]);
        let mut big = w.clone();
        big[cols + 9] = 4.0e6;
        for (group, act) in [(None, false), (Some(16), true), (Some(16), false)] {
            let mut o = opts(4, false, group, act, false, 128);
            o.spec.scale_dtype = ScaleDtype::F16;
            let a = gptq_quantize(&big, rows, cols, &h, &o).unwrap_err();
            let b = gptq_quantize_model(&big, rows, cols, &h, &o).unwrap_err();
            assert_eq!(a.to_string(), b.to_string());
            assert!(b.to_string().contains("float16"), "{b}");
        }
        let tiny: Vec<f32> = w.iter().map(|v| v * 1e-9).collect();
        let mut o = opts(4, false, Some(16), true, false, 128);
        o.spec.scale_dtype = ScaleDtype::F16;
        let a = gptq_quantize(&tiny, rows, cols, &h, &o).unwrap();
        let b = gptq_quantize_model(&tiny, rows, cols, &h, &o).unwrap();
        assert_eq!(a.scales, b.scales);
        assert_eq!(a.zeros, b.zeros);
        assert!(b.dequantized.iter().all(|v| v.is_finite()));
    }

    #[test]
    fn model_batching_matches_cpu_for_other_block_sizes_and_shapes() {
        for (rows, cols, seed) in [
            (1usize, 1usize, 1u64),
            (5, 33, 2),
            (40, 129, 4),
            (9, 256, 5),
        ] {
            let (w, h) = problem(seed, rows, cols, &[]);
            for bs in [1usize, 16, 100, 128, 512] {
                for (group, act) in [
                    (None, false),
                    (Some(16), true),
                    (Some(128), false),
                    (Some(7), false),
                ] {
                    let o = opts(4, false, group, act, false, bs);
                    compare(
                        &w,
                        &h,
                        rows,
                        cols,
                        &o,
                        &format!("{rows}x{cols} bs {bs} group {group:?} act {act}"),
                    );
                }
            }
        }
    }

    /// Batches through the record kernels' model and the CPU accumulator side by side.
    fn record_batches(n: usize, batches: &[(plan::ActDtype, Vec<f32>)]) -> ([u64; 3], Error) {
        use crate::hessian::{Activations, HessianAccumulator};
        use half::{bf16, f16};

        let mut slot = plan::NONFINITE_SLOT_EMPTY;
        let mut cpu = HessianAccumulator::new(n).unwrap();
        let mut cpu_err = None;
        for (b, (dtype, x)) in batches.iter().enumerate() {
            let rows = x.len() / n;
            let (f16s, bf16s): (Vec<f16>, Vec<bf16>) = (
                x.iter().map(|&v| f16::from_f32(v)).collect(),
                x.iter().map(|&v| bf16::from_f32(v)).collect(),
            );
            let (bits, cpu_x): (Vec<u16>, Activations<'_>) = match dtype {
                plan::ActDtype::F32 => (vec![], Activations::F32(x)),
                plan::ActDtype::F16 => (
                    f16s.iter().map(|v| v.to_bits()).collect(),
                    Activations::F16(&f16s),
                ),
                plan::ActDtype::BF16 => (
                    bf16s.iter().map(|v| v.to_bits()).collect(),
                    Activations::BF16(&bf16s),
                ),
            };
            let dev_x = match dtype.exp_mask16() {
                None => BatchBits::F32(x),
                Some(m) => BatchBits::U16(&bits, m as u16),
            };
            record_non_finite(dev_x, b as u64, dtype.tag(), &mut slot);
            // the CPU raises at the bad batch itself (and its batch count stops there)
            if cpu_err.is_none() {
                if let Err(e) = cpu.add_batch(cpu_x, rows) {
                    cpu_err = Some(e);
                }
            }
        }
        (slot, cpu_err.expect("a batch is non-finite"))
    }

    #[test]
    fn model_records_the_first_non_finite_batch_until_the_hessian_is_read() {
        use plan::ActDtype::{BF16, F16, F32};
        let n = 6;
        let finite = |rows: usize, seed: f32| -> Vec<f32> {
            (0..rows * n)
                .map(|i| (i as f32 * 0.37 + seed).sin())
                .collect()
        };
        let with = |mut x: Vec<f32>, at: &[(usize, usize, f32)]| {
            for &(r, c, v) in at {
                x[r * n + c] = v;
            }
            x
        };
        // no batch non-finite: nothing recorded, the check passes
        let mut slot = plan::NONFINITE_SLOT_EMPTY;
        for b in 0..3u64 {
            record_non_finite(
                BatchBits::F32(&finite(4, b as f32)),
                b,
                F32.tag(),
                &mut slot,
            );
        }
        assert_eq!(slot, plan::NONFINITE_SLOT_EMPTY);
        assert!(plan::check_nonfinite_slot(slot, n).is_ok());

        for dtype in [F32, F16, BF16] {
            // batch 2 has two bad entries (the first in row-major order is reported); batch 3
            // has one earlier in its buffer and batch 4 is finite: neither changes the record
            let batches = vec![
                (dtype, finite(3, 0.0)),
                (dtype, finite(5, 1.0)),
                (
                    dtype,
                    with(finite(4, 2.0), &[(3, 1, f32::INFINITY), (2, 4, f32::NAN)]),
                ),
                (dtype, with(finite(4, 3.0), &[(0, 0, f32::NAN)])),
                (dtype, finite(2, 4.0)),
            ];
            let (slot, cpu) = record_batches(n, &batches);
            assert_eq!(slot, [2, (2 * n + 4) as u64, dtype.tag()], "{dtype:?}");
            let dev = plan::check_nonfinite_slot(slot, n).unwrap_err();
            assert!(matches!(dev, Error::NonFinite(_)));
            // the message the CPU accumulator gives when batch 2 is added
            assert_eq!(dev.to_string(), cpu.to_string());
            assert!(
                dev.to_string().starts_with(&format!(
                    "Hessian batch 2 ({}): non-finite activation (NaN or Inf) at token row 2, \
                     input feature 4",
                    dtype.name()
                )),
                "{dev}"
            );
        }
        // a later batch of another dtype leaves the record (and its dtype) alone
        let batches = vec![
            (F32, finite(2, 0.0)),
            (BF16, with(finite(2, 1.0), &[(1, 5, f32::NEG_INFINITY)])),
            (F16, with(finite(2, 2.0), &[(0, 1, 1e6)])), // overflows float16
        ];
        let (slot, cpu) = record_batches(n, &batches);
        assert_eq!(slot, [1, (n + 5) as u64, BF16.tag()]);
        let dev = plan::check_nonfinite_slot(slot, n).unwrap_err();
        assert_eq!(dev.to_string(), cpu.to_string());
        // the first batch's first element: index 0 is a real record, not the empty marker
        let batches = vec![(F32, with(finite(1, 0.0), &[(0, 0, f32::NAN)]))];
        let (slot, cpu) = record_batches(n, &batches);
        assert_eq!(slot, [0, 0, F32.tag()]);
        assert_eq!(
            plan::check_nonfinite_slot(slot, n).unwrap_err().to_string(),
            cpu.to_string()
        );
        for d in [F32, F16, BF16] {
            assert_eq!(plan::ActDtype::from_tag(d.tag()), Some(d));
        }
    }

    #[test]
    fn model_damping_dead_and_errors_match_cpu() {
        // Slightly indefinite: escalation to 0.08, same schedule and result as the CPU.
        let (rows, cols) = (8usize, 64usize);
        let (w, mut h) = problem(21, rows, cols, &[3]);
        let mean = (0..cols).map(|i| h[i * cols + i]).sum::<f32>() / cols as f32;
        for i in 0..cols {
            if h[i * cols + i] != 0.0 {
                h[i * cols + i] -= 0.3 * mean;
            }
        }
        let o = opts(4, true, Some(32), true, false, 128);
        let cpu = gptq_quantize(&w, rows, cols, &h, &o);
        let gpu = gptq_quantize_model(&w, rows, cols, &h, &o);
        match (cpu, gpu) {
            (Ok(c), Ok(g)) => {
                assert!(c.damp_attempts.len() > 1, "{:?}", c.damp_attempts);
                assert_eq!(c.damp_attempts, g.damp_attempts);
                assert_eq!(g.dead, vec![3]);
            }
            (c, g) => panic!(
                "cpu {:?} / model {:?}",
                c.map(|r| r.damp_attempts),
                g.map(|r| r.damp_attempts)
            ),
        }
        // Indefinite at every damping: same type and same list of fractions.
        let n = 7;
        let hi: Vec<f32> = (0..n * n)
            .map(|k| if k % (n + 1) == 0 { 1.0 } else { 3.0 })
            .collect();
        let wi = vec![0.5f32; 2 * n];
        let o = opts(4, true, None, false, false, 128);
        let ec = gptq_quantize(&wi, 2, n, &hi, &o).unwrap_err();
        let eg = gptq_quantize_model(&wi, 2, n, &hi, &o).unwrap_err();
        assert!(matches!(
            (&ec, &eg),
            (Error::NotPositiveDefinite(_), Error::NotPositiveDefinite(_))
        ));
        let head = |e: &Error| {
            e.to_string()
                .split(" (last failure")
                .next()
                .unwrap_or("")
                .to_string()
        };
        assert_eq!(head(&ec), head(&eg));
        // NaN / Inf in weight or Hessian, all-dead Hessian, bad options: identical messages.
        let (w, h) = problem(5, 4, 16, &[]);
        let mut wn = w.clone();
        wn[2 * 16 + 9] = f32::NAN;
        let mut hn = h.clone();
        hn[3 * 16 + 4] = f32::INFINITY;
        let o = opts(4, true, Some(8), false, false, 128);
        for (ww, hh) in [(&wn, &h), (&w, &hn)] {
            let a = gptq_quantize(ww, 4, 16, hh, &o).unwrap_err();
            let b = gptq_quantize_model(ww, 4, 16, hh, &o).unwrap_err();
            assert!(matches!(b, Error::NonFinite(_)));
            assert_eq!(a.to_string(), b.to_string());
        }
        let z = vec![0.0f32; 256];
        let a = gptq_quantize(&w, 4, 16, &z, &o).unwrap_err();
        let b = gptq_quantize_model(&w, 4, 16, &z, &o).unwrap_err();
        assert_eq!(a.to_string(), b.to_string());
        for bad in [
            opts(5, true, None, false, false, 128),
            opts(4, true, Some(0), false, false, 128),
            opts(4, true, None, false, false, 0),
        ] {
            let a = gptq_quantize(&w, 4, 16, &h, &bad).unwrap_err();
            let b = gptq_quantize_model(&w, 4, 16, &h, &bad).unwrap_err();
            assert_eq!(a.to_string(), b.to_string());
        }
    }
}
