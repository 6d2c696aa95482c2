//! Lower-triangular rank-k update `H += alpha · XᵀX` straight from bf16 activations with the
//! AVX512-BF16 dot-product instruction (`vdpbf16ps`), for [`crate::hessian`].
//!
//! Numerics: a bf16 × bf16 product is exact in f32, and `vdpbf16ps` adds two such products per
//! f32 lane per instruction, so this is an f32-accumulated `XᵀX` like the f32 path's GEMM on the
//! converted values - only the summation order differs. Two differences by construction: bf16
//! subnormal inputs (|x| < 1.2e-38) count as zero, and f32 subnormal partial sums are flushed
//! (the instruction's DAZ/FTZ semantics); neither matters at activation scales. Twice the
//! products per instruction of an f32 FMA make it roughly 2x the f32 path where the CPU has the
//! instruction (AMD Zen 4+, Intel Cooper Lake / Sapphire Rapids+); elsewhere
//! [`available`] is false and the caller keeps its f32 path.
//!
//! Layout: a chunk of `KC` tokens is packed into panels of `MR = 32` features; panel `p` holds,
//! per token pair `k`, 32 `u32`s `x[2k, 32p + l] | x[2k+1, 32p + l] << 16` - the operand
//! `vdpbf16ps` multiplies pairwise (padding features and an odd last token are zero). A 32 x 8
//! tile of `H` (two 16-lane registers x 8 columns, 16 accumulators) then reads its 32 rows as
//! two vector loads and each of its 8 columns as one 32-bit broadcast per token pair. Tiles
//! touching the diagonal are stored under a mask, so only the lower triangle is written.

use half::bf16;
use rayon::prelude::*;

/// Features per panel = rows of a tile (two AVX-512 registers of f32).
const MR: usize = 32;
/// Columns of a tile (8 columns x 2 registers = 16 accumulators; divides MR).
const NR: usize = 8;
/// Tokens per packed chunk: a 32-feature panel of 128 token pairs is 16 KiB (stays in L1).
const KC: usize = 256;

/// Whether this CPU runs [`rank_k_update`].
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `h` (column-major `n x n`, lower triangle only) `+= alpha · XᵀX` for row-major `x`
/// `[rows, n]`. Returns false, touching nothing, when the CPU lacks AVX512-BF16.
pub fn rank_k_update(h: &mut [f32], n: usize, x: &[bf16], rows: usize, alpha: f32) -> bool {
    assert_eq!(h.len(), n * n, "h must be n x n");
    assert_eq!(x.len(), rows * n, "x must be rows x n");
    if !available() {
        return false;
    }
    #[cfg(target_arch = "x86_64")]
    {
        let panels = n.div_ceil(MR);
        let mut packed = vec![0u32; panels * (KC / 2) * MR];
        for t0 in (0..rows).step_by(KC) {
            let kc = (rows - t0).min(KC);
            let pairs = kc.div_ceil(2);
            pack(&x[t0 * n..(t0 + kc) * n], kc, n, pairs, &mut packed);
            let out = SharedOut(h.as_mut_ptr());
            // One task per 32-row band of H: bands write disjoint rows of every column.
            // Band b has b+1 tiles' worth of work per column block; rayon balances them.
            (0..panels).into_par_iter().for_each(|band| {
                // SAFETY: the CPU has AVX512F/BF16 (checked above); band `band` writes only
                // rows [32·band, 32·band + 32) ∩ [0, n) of h, disjoint between tasks, and
                // `packed` holds `panels` panels of `pairs` token pairs.
                unsafe { band_update(&out, n, &packed, pairs, band, alpha) }
            });
        }
        true
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (h, x, alpha);
        unreachable!("available() is false off x86_64")
    }
}

/// The output pointer, shared by the band tasks (each writes its own rows).
#[cfg(target_arch = "x86_64")]
struct SharedOut(*mut f32);
// SAFETY: tasks write disjoint rows; see `rank_k_update`.
#[cfg(target_arch = "x86_64")]
unsafe impl Sync for SharedOut {}

/// Packs `kc` tokens of row-major `x` into `packed` (layout in the module docs); panels are
/// `KC / 2` pairs apart, of which the first `pairs` are filled.
#[cfg(target_arch = "x86_64")]
fn pack(x: &[bf16], kc: usize, n: usize, pairs: usize, packed: &mut [u32]) {
    packed
        .par_chunks_mut((KC / 2) * MR)
        .enumerate()
        .for_each(|(p, panel)| {
            // SAFETY: only called after `available()` confirmed AVX512F (see rank_k_update).
            unsafe { pack_panel(x, kc, n, pairs, p * MR, panel) }
        });
}

/// One panel of [`pack`]; compiled for AVX-512 so the interleave vectorizes (it is a
/// measurable share of the work at small n).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn pack_panel(x: &[bf16], kc: usize, n: usize, pairs: usize, f0: usize, panel: &mut [u32]) {
    let fw = (n - f0).min(MR);
    for k in 0..pairs {
        let lo = &x[2 * k * n + f0..2 * k * n + f0 + fw];
        let dst = &mut panel[k * MR..(k + 1) * MR];
        if 2 * k + 1 < kc {
            let hi = &x[(2 * k + 1) * n + f0..(2 * k + 1) * n + f0 + fw];
            for ((d, a), b) in dst.iter_mut().zip(lo).zip(hi) {
                *d = u32::from(a.to_bits()) | u32::from(b.to_bits()) << 16;
            }
        } else {
            for (d, a) in dst.iter_mut().zip(lo) {
                *d = u32::from(a.to_bits());
            }
        }
        dst[fw..].fill(0);
    }
}

/// All tiles of the 32-row band `band` on or below the diagonal.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn band_update(
    out: &SharedOut,
    n: usize,
    packed: &[u32],
    pairs: usize,
    band: usize,
    alpha: f32,
) {
    let stride = (KC / 2) * MR;
    let i0 = band * MR;
    let a = &packed[band * stride..band * stride + pairs * MR];
    // Columns 0 ..= the band's last row, NR at a time.
    let j_end = (i0 + MR).min(n);
    for j0 in (0..j_end).step_by(NR) {
        let p = j0 / MR;
        let b = &packed[p * stride + (j0 % MR)..];
        // SAFETY: forwarded from the caller.
        unsafe { tile(out, n, a, b, pairs, i0, j0, alpha) };
    }
}

/// One 32 x 8 tile at rows `i0..`, columns `j0..`: `a` is the band's panel, `b` starts at the
/// tile's first column inside its panel (row stride MR).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
#[allow(clippy::too_many_arguments)]
unsafe fn tile(
    out: &SharedOut,
    n: usize,
    a: &[u32],
    b: &[u32],
    pairs: usize,
    i0: usize,
    j0: usize,
    alpha: f32,
) {
    use std::arch::x86_64::*;
    debug_assert!(pairs > 0 && a.len() >= pairs * MR && b.len() >= (pairs - 1) * MR + NR);
    let mut acc = [[_mm512_setzero_ps(); 2]; NR];
    let ap = a.as_ptr();
    let bp = b.as_ptr();
    for k in 0..pairs {
        // SAFETY: k < pairs, so a[k·MR .. k·MR + 32] and b[k·MR .. k·MR + NR] are in bounds.
        unsafe {
            let a0: __m512bh = std::mem::transmute(_mm512_loadu_si512(ap.add(k * MR).cast()));
            let a1: __m512bh = std::mem::transmute(_mm512_loadu_si512(ap.add(k * MR + 16).cast()));
            for (c, accj) in acc.iter_mut().enumerate() {
                let bj: __m512bh =
                    std::mem::transmute(_mm512_set1_epi32(*bp.add(k * MR + c) as i32));
                accj[0] = _mm512_dpbf16_ps(accj[0], a0, bj);
                accj[1] = _mm512_dpbf16_ps(accj[1], a1, bj);
            }
        }
    }
    let va = _mm512_set1_ps(alpha);
    for (c, accj) in acc.iter().enumerate() {
        let j = j0 + c;
        if j >= n {
            break;
        }
        for (half, &v) in accj.iter().enumerate() {
            let r0 = i0 + 16 * half;
            // lanes l with a row r0 + l inside H (< n) and on or below the diagonal (>= j)
            let lo = j.saturating_sub(r0).min(16);
            let hi = n.saturating_sub(r0).min(16);
            if lo >= hi {
                continue;
            }
            let mask = ((1u32 << hi) - 1) & !((1u32 << lo) - 1);
            // SAFETY: the masked lanes address rows < n of column j < n; masked-off lanes are
            // not accessed. Rows belong to this task's band.
            unsafe {
                let ptr = out.0.add(j * n + r0);
                let old = _mm512_maskz_loadu_ps(mask as u16, ptr);
                _mm512_mask_storeu_ps(ptr, mask as u16, _mm512_fmadd_ps(va, v, old));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::linalg::tests::{correlated, hessian_f64, rel_fro};

    /// Lower triangle of the column-major result vs the f64 reference (row-major, symmetric).
    fn lower_rel_err(h: &[f32], want: &[f64], n: usize) -> f64 {
        let mut got = vec![0.0f64; n * n];
        let mut ref_ = vec![0.0f64; n * n];
        for j in 0..n {
            for i in j..n {
                got[j * n + i] = h[j * n + i] as f64;
                ref_[j * n + i] = want[i * n + j];
            }
        }
        rel_fro(&got, &ref_)
    }

    #[test]
    fn matches_f64_reference_and_writes_only_the_lower_triangle() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX512-BF16");
            return;
        }
        // n below, at and across panel/tile edges; odd row counts; several chunks.
        for (seed, n, rows) in [
            (1u64, 1usize, 3usize),
            (2, 7, 50),
            (3, 32, 257),
            (4, 33, 64),
            (5, 172, 601),
            (6, 576, 700),
        ] {
            let x: Vec<bf16> = correlated(seed, rows, n, n / 2 + 1)
                .iter()
                .map(|&v| bf16::from_f64(v))
                .collect();
            let vals: Vec<f64> = x.iter().map(|v| v.to_f64()).collect();
            let alpha = 2.0 / rows as f32;
            let mut h = vec![0.0f32; n * n];
            // a sentinel above the diagonal must survive
            for j in 1..n {
                h[j * n] = 7.0;
            }
            assert!(rank_k_update(&mut h, n, &x, rows, alpha));
            for j in 1..n {
                assert_eq!(h[j * n], 7.0, "n={n}: wrote above the diagonal at (0,{j})");
            }
            let want = hessian_f64(&vals, rows, n);
            let e = lower_rel_err(&h, &want, n);
            assert!(e < 2e-6, "n={n} rows={rows}: rel err {e}");
        }
    }

    #[test]
    fn accumulates_onto_existing_values() {
        if !available() {
            return;
        }
        let (n, rows) = (40usize, 90usize);
        let x: Vec<bf16> = correlated(8, rows, n, 20)
            .iter()
            .map(|&v| bf16::from_f64(v))
            .collect();
        let mut once = vec![0.0f32; n * n];
        rank_k_update(&mut once, n, &x, rows, 1.0);
        let mut twice = vec![0.0f32; n * n];
        rank_k_update(&mut twice, n, &x[..50 * n], 50, 1.0);
        rank_k_update(&mut twice, n, &x[50 * n..], 40, 1.0);
        let a: Vec<f64> = once.iter().map(|&v| v as f64).collect();
        let b: Vec<f64> = twice.iter().map(|&v| v as f64).collect();
        assert!(rel_fro(&a, &b) < 1e-6);
    }
}
