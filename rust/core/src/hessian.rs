//! Streaming Hessian accumulation: `H = (2/n) Σ_t x_t x_tᵀ` over calibration tokens.
//!
//! Storage: the `n x n` buffer is viewed column-major and only its lower triangle is maintained
//! (equivalently, the upper triangle of the row-major view). Each batch is a symmetric rank-k
//! update `H += (2/n_new) XᵀX` done by faer's triangular matmul, which computes only that
//! triangle: half the flops of a full `X.T @ X`. bf16 batches use [`crate::syrk_bf16`] instead
//! where the CPU has AVX512-BF16 (about twice the rate).

use faer::linalg::matmul::triangular::{matmul as tri_matmul, BlockStructure};
use faer::{Accum, MatMut, MatRef, Par};
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::syrk_bf16;

/// One batch of activations, row-major `[rows, n]`.
#[derive(Clone, Copy, Debug)]
pub enum Activations<'a> {
    F32(&'a [f32]),
    F16(&'a [half::f16]),
    BF16(&'a [half::bf16]),
}

impl Activations<'_> {
    fn len(&self) -> usize {
        match self {
            Activations::F32(x) => x.len(),
            Activations::F16(x) => x.len(),
            Activations::BF16(x) => x.len(),
        }
    }
    fn dtype(&self) -> &'static str {
        match self {
            Activations::F32(_) => "float32",
            Activations::F16(_) => "float16",
            Activations::BF16(_) => "bfloat16",
        }
    }
}

/// Tokens per rank-k update. Each chunk is converted to f32 and transposed to `[n, tokens]`
/// (feature-major) first: with both GEMM operands contiguous along the token axis faer's kernel
/// runs ~1.8x faster than on the row-major batch directly, and the O(tokens·n) copy is noise
/// next to the O(tokens·n²) update. 256 tokens measured best (scratch = n KiB).
const CHUNK_TOKENS: usize = 256;
/// Features per parallel task of the transpose.
const TRANSPOSE_FEATURES: usize = 32;

/// Running `H = (2/n) Σ x xᵀ` for one linear layer with `n` input features.
#[derive(Clone, Debug)]
pub struct HessianAccumulator {
    n: usize,
    /// `n x n`, column-major; only the lower triangle (row >= col) is meaningful, the rest is 0.
    h: Vec<f32>,
    samples: u64,
    /// Batches accepted so far (names the batch in error messages).
    batches: u64,
    /// Tokens per converted/transposed chunk (CHUNK_TOKENS; tests shrink it).
    chunk_tokens: usize,
    /// bf16 batches go through the AVX512-BF16 kernel where the CPU has it (tests turn it off
    /// to compare with the f32 path).
    bf16_kernel: bool,
}

/// Position of the first non-finite value in a row-major `[rows, n]` batch.
fn first_non_finite<T: Sync>(
    x: &[T],
    n: usize,
    bad: impl Fn(&T) -> bool + Sync,
) -> Option<(usize, usize)> {
    x.par_chunks(n)
        .enumerate()
        .find_map_first(|(r, row)| row.iter().position(&bad).map(|c| (r, c)))
}

/// `src` row-major `[rows, n]` (any input dtype) -> `dst` row-major `[n, rows]` in f32.
/// Parallel over blocks of features; each token's feature segment is converted contiguously
/// (SIMD conversion for f16/bf16) into a small buffer, then scattered down the block's rows.
fn transpose_convert<T: Sync>(
    src: &[T],
    dst: &mut [f32],
    rows: usize,
    n: usize,
    convert: &(impl Fn(&[T], &mut [f32]) + Sync),
) {
    dst.par_chunks_mut(TRANSPOSE_FEATURES * rows)
        .enumerate()
        .for_each(|(fb, out)| {
            let f0 = fb * TRANSPOSE_FEATURES;
            let fw = out.len() / rows;
            let mut seg = [0.0f32; TRANSPOSE_FEATURES];
            for t in 0..rows {
                convert(&src[t * n + f0..t * n + f0 + fw], &mut seg[..fw]);
                for (f, &v) in seg[..fw].iter().enumerate() {
                    out[f * rows + t] = v;
                }
            }
        });
}

impl HessianAccumulator {
    /// `n` = in_features; error if 0.
    pub fn new(n: usize) -> Result<Self> {
        if n == 0 {
            return Err(Error::InvalidArgument(
                "HessianAccumulator: in_features must be at least 1, got 0".into(),
            ));
        }
        let nn = n.checked_mul(n).ok_or_else(|| {
            Error::InvalidArgument(format!("HessianAccumulator: in_features {n} is too large"))
        })?;
        Ok(Self {
            n,
            h: vec![0.0; nn],
            samples: 0,
            batches: 0,
            chunk_tokens: CHUNK_TOKENS,
            bf16_kernel: true,
        })
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
    ///
    /// The whole batch is validated before anything is added, so on error the accumulator is
    /// unchanged. A batch of 0 rows is accepted and changes nothing.
    pub fn add_batch(&mut self, x: Activations<'_>, rows: usize) -> Result<()> {
        let n = self.n;
        if rows.checked_mul(n) != Some(x.len()) {
            return Err(Error::InvalidArgument(format!(
                "Hessian batch {} ({}): got {} activation values for {rows} token rows of {n} input \
                 features (expected {rows}*{n}); activations must be [tokens, in_features]",
                self.batches,
                x.dtype(),
                x.len()
            )));
        }
        if rows == 0 {
            return Ok(());
        }
        let bad = match x {
            Activations::F32(v) => first_non_finite(v, n, |a| !a.is_finite()),
            // Exponent bits all ones = Inf or NaN.
            Activations::F16(v) => first_non_finite(v, n, |a| a.to_bits() & 0x7c00 == 0x7c00),
            Activations::BF16(v) => first_non_finite(v, n, |a| a.to_bits() & 0x7f80 == 0x7f80),
        };
        if let Some((r, c)) = bad {
            return Err(Error::NonFinite(format!(
                "Hessian batch {} ({}): non-finite activation (NaN or Inf) at token row {r}, \
                 input feature {c}; the layer's input overflowed or is NaN",
                self.batches,
                x.dtype()
            )));
        }

        let n_old = self.samples;
        let n_new = n_old + rows as u64;
        if n_old > 0 {
            self.scale_lower((n_old as f64 / n_new as f64) as f32);
        }
        let alpha = (2.0 / n_new as f64) as f32;
        match x {
            Activations::F32(v) => self.rank_k_update(v, rows, alpha, |s, d| d.copy_from_slice(s)),
            Activations::F16(v) => {
                self.rank_k_update(v, rows, alpha, |s, d| s.convert_to_f32_slice(d))
            }
            Activations::BF16(v) => {
                // vdpbf16ps where the CPU has it (products exact, f32 sums: see syrk_bf16)
                if !(self.bf16_kernel && syrk_bf16::rank_k_update(&mut self.h, n, v, rows, alpha)) {
                    self.rank_k_update(v, rows, alpha, |s, d| s.convert_to_f32_slice(d))
                }
            }
        }
        self.samples = n_new;
        self.batches += 1;
        Ok(())
    }

    /// Lower triangle += alpha · XᵀX for row-major `x` `[rows, n]`, chunk by chunk of tokens:
    /// each chunk is converted to f32 and transposed into a `[n, tokens]` scratch, then one
    /// triangular GEMM (faer, all threads) adds it.
    fn rank_k_update<T: Sync>(
        &mut self,
        x: &[T],
        rows: usize,
        alpha: f32,
        convert: impl Fn(&[T], &mut [f32]) + Sync,
    ) {
        let n = self.n;
        let chunk = self.chunk_tokens.clamp(1, rows);
        let mut scratch = vec![0.0f32; n * chunk];
        for t0 in (0..rows).step_by(chunk) {
            let kc = (rows - t0).min(chunk);
            let yt = &mut scratch[..n * kc];
            transpose_convert(&x[t0 * n..(t0 + kc) * n], yt, kc, n, &convert);
            // yt is Xcᵀ row-major [n, kc]: unit stride along tokens for both operands.
            let xt = MatRef::from_row_major_slice(yt, n, kc);
            tri_matmul(
                MatMut::from_column_major_slice_mut(&mut self.h, n, n),
                BlockStructure::TriangularLower,
                Accum::Add,
                xt,
                BlockStructure::Rectangular,
                xt.transpose(),
                BlockStructure::Rectangular,
                alpha,
                Par::rayon(0),
            );
        }
    }

    /// Multiplies the stored (lower) triangle by `s`.
    fn scale_lower(&mut self, s: f32) {
        self.h
            .par_chunks_mut(self.n)
            .enumerate()
            .for_each(|(j, col)| col[j..].iter_mut().for_each(|v| *v *= s));
    }

    /// Combine another accumulator (same n) as if its samples had been added here.
    pub fn merge(&mut self, other: &HessianAccumulator) -> Result<()> {
        if other.n != self.n {
            return Err(Error::InvalidArgument(format!(
                "cannot merge Hessian accumulators of different sizes: {} vs {} input features",
                self.n, other.n
            )));
        }
        if other.samples == 0 {
            return Ok(());
        }
        let total = self.samples + other.samples;
        let wa = (self.samples as f64 / total as f64) as f32;
        let wb = (other.samples as f64 / total as f64) as f32;
        let n = self.n;
        self.h
            .par_chunks_mut(n)
            .zip(other.h.par_chunks(n))
            .enumerate()
            .for_each(|(j, (a, b))| {
                a[j..]
                    .iter_mut()
                    .zip(&b[j..])
                    .for_each(|(x, y)| *x = wa * *x + wb * *y);
            });
        self.samples = total;
        self.batches += other.batches;
        Ok(())
    }

    /// The full symmetric `n x n` Hessian, row-major.
    pub fn hessian(&self) -> Vec<f32> {
        let n = self.n;
        // Row-major view of the storage holds the upper triangle: copy it, then mirror it into
        // the lower triangle tile by tile (cache-friendly transpose).
        let mut out = self.h.clone();
        const B: usize = 64;
        let src = &self.h;
        out.par_chunks_mut(B * n)
            .enumerate()
            .for_each(|(bi, block)| {
                let i0 = bi * B;
                let i1 = (i0 + B).min(n);
                for j0 in (0..i1).step_by(B) {
                    let j1 = (j0 + B).min(n);
                    for i in i0..i1 {
                        let row = &mut block[(i - i0) * n..(i - i0 + 1) * n];
                        for j in j0..j1.min(i) {
                            row[j] = src[j * n + i];
                        }
                    }
                }
            });
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::linalg::tests::{correlated, hessian_f64, rel_fro};
    use half::{bf16, f16};

    /// The three input precisions of the same data, plus the f64 values each one really holds.
    fn inputs(x: &[f64]) -> (Vec<f32>, Vec<f16>, Vec<bf16>) {
        (
            x.iter().map(|&v| v as f32).collect(),
            x.iter().map(|&v| f16::from_f64(v)).collect(),
            x.iter().map(|&v| bf16::from_f64(v)).collect(),
        )
    }

    fn reference(vals: &[f64], rows: usize, n: usize) -> Vec<f64> {
        hessian_f64(vals, rows, n)
    }

    fn as_f64(h: &[f32]) -> Vec<f64> {
        h.iter().map(|&v| v as f64).collect()
    }

    fn assert_symmetric(h: &[f32], n: usize) {
        for i in 0..n {
            for j in 0..i {
                assert_eq!(h[i * n + j], h[j * n + i], "H not symmetric at ({i},{j})");
            }
        }
    }

    #[test]
    fn matches_f64_reference_for_each_dtype() {
        for (seed, n, rows) in [
            (1u64, 7usize, 50usize),
            (2, 64, 300),
            (3, 172, 400),
            (4, 576, 700),
            (5, 173, 129),
        ] {
            let x = correlated(seed, rows, n, n / 2 + 1);
            let (x32, x16, xb16) = inputs(&x);
            let cases: Vec<(&str, Activations, Vec<f64>)> = vec![
                (
                    "f32",
                    Activations::F32(&x32),
                    x32.iter().map(|&v| v as f64).collect(),
                ),
                (
                    "f16",
                    Activations::F16(&x16),
                    x16.iter().map(|v| v.to_f64()).collect(),
                ),
                (
                    "bf16",
                    Activations::BF16(&xb16),
                    xb16.iter().map(|v| v.to_f64()).collect(),
                ),
            ];
            for (name, act, vals) in cases {
                let mut acc = HessianAccumulator::new(n).unwrap();
                acc.add_batch(act, rows).unwrap();
                assert_eq!(acc.samples(), rows as u64);
                let h = acc.hessian();
                assert_symmetric(&h, n);
                let e = rel_fro(&as_f64(&h), &reference(&vals, rows, n));
                assert!(e < 2e-6, "{name} n={n} rows={rows}: rel err {e}");
            }
        }
    }

    #[test]
    fn batch_splits_and_chunked_conversion_match_one_batch() {
        let (n, rows) = (172usize, 611usize);
        let x = correlated(7, rows, n, 40);
        let (x32, x16, _) = inputs(&x);
        let vals: Vec<f64> = x32.iter().map(|&v| v as f64).collect();
        let want = reference(&vals, rows, n);
        for splits in [
            vec![rows],
            vec![1, 6, 100, 504],
            vec![300, 311],
            vec![0, 611, 0],
        ] {
            let mut acc = HessianAccumulator::new(n).unwrap();
            let mut r0 = 0;
            for &r in &splits {
                acc.add_batch(Activations::F32(&x32[r0 * n..(r0 + r) * n]), r)
                    .unwrap();
                r0 += r;
            }
            assert_eq!(acc.samples(), rows as u64);
            let e = rel_fro(&as_f64(&acc.hessian()), &want);
            assert!(e < 2e-6, "splits {splits:?}: rel err {e}");
        }
        // Token chunks of 37 (not dividing the batch) and of 1: same result.
        let vals16: Vec<f64> = x16.iter().map(|v| v.to_f64()).collect();
        for chunk in [37, 1] {
            let mut acc = HessianAccumulator::new(n).unwrap();
            acc.chunk_tokens = chunk;
            acc.add_batch(Activations::F16(&x16), rows).unwrap();
            let e = rel_fro(&as_f64(&acc.hessian()), &reference(&vals16, rows, n));
            assert!(e < 2e-6, "f16 in chunks of {chunk}: rel err {e}");
        }
    }

    #[test]
    fn bf16_kernel_equals_the_f32_path() {
        // Both paths on the same bf16 batches (several adds: the running rescale included).
        let (n, rows) = (173usize, 611usize);
        let x: Vec<bf16> = correlated(11, rows, n, 60)
            .iter()
            .map(|&v| bf16::from_f64(v))
            .collect();
        let mut fast = HessianAccumulator::new(n).unwrap();
        let mut slow = HessianAccumulator::new(n).unwrap();
        slow.bf16_kernel = false;
        for (r0, r1) in [(0usize, 100usize), (100, 101), (101, 611)] {
            for acc in [&mut fast, &mut slow] {
                acc.add_batch(Activations::BF16(&x[r0 * n..r1 * n]), r1 - r0)
                    .unwrap();
            }
        }
        let (hf, hs) = (fast.hessian(), slow.hessian());
        assert_symmetric(&hf, n);
        let e = rel_fro(&as_f64(&hf), &as_f64(&hs));
        assert!(e < 1e-6, "bf16 kernel vs f32 path: rel err {e}");
    }

    #[test]
    fn merge_equals_sequential() {
        let (n, rows) = (64usize, 500usize);
        let x: Vec<f32> = correlated(9, rows, n, 64)
            .iter()
            .map(|&v| v as f32)
            .collect();
        let mut seq = HessianAccumulator::new(n).unwrap();
        seq.add_batch(Activations::F32(&x), rows).unwrap();
        let mut a = HessianAccumulator::new(n).unwrap();
        a.add_batch(Activations::F32(&x[..120 * n]), 120).unwrap();
        let mut b = HessianAccumulator::new(n).unwrap();
        b.add_batch(Activations::F32(&x[120 * n..400 * n]), 280)
            .unwrap();
        b.add_batch(Activations::F32(&x[400 * n..]), 100).unwrap();
        let empty = HessianAccumulator::new(n).unwrap();
        a.merge(&empty).unwrap();
        a.merge(&b).unwrap();
        assert_eq!(a.samples(), rows as u64);
        let e = rel_fro(&as_f64(&a.hessian()), &as_f64(&seq.hessian()));
        assert!(e < 1e-6, "merge vs sequential: {e}");
        // Merging into an empty accumulator copies.
        let mut c = HessianAccumulator::new(n).unwrap();
        c.merge(&seq).unwrap();
        assert_eq!(c.hessian(), seq.hessian());
        assert!(matches!(
            c.merge(&HessianAccumulator::new(7).unwrap()),
            Err(Error::InvalidArgument(_))
        ));
    }

    #[test]
    fn rejects_non_finite_and_bad_shapes_without_changing_state() {
        let (n, rows) = (7usize, 20usize);
        let x: Vec<f32> = correlated(3, rows, n, 7)
            .iter()
            .map(|&v| v as f32)
            .collect();
        let mut acc = HessianAccumulator::new(n).unwrap();
        acc.add_batch(Activations::F32(&x), rows).unwrap();
        let before = acc.hessian();

        let mut bad = x.clone();
        bad[3 * n + 5] = f32::NAN;
        let e = acc.add_batch(Activations::F32(&bad), rows).unwrap_err();
        assert!(matches!(e, Error::NonFinite(_)));
        let msg = e.to_string();
        assert!(
            msg.contains("batch 1") && msg.contains("row 3") && msg.contains("feature 5"),
            "{msg}"
        );

        let mut b16: Vec<f16> = x.iter().map(|&v| f16::from_f32(v)).collect();
        b16[11 * n] = f16::INFINITY;
        let msg = acc
            .add_batch(Activations::F16(&b16), rows)
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("row 11") && msg.contains("feature 0") && msg.contains("float16"),
            "{msg}"
        );
        let mut bb: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
        bb[19 * n + 6] = bf16::NAN;
        let msg = acc
            .add_batch(Activations::BF16(&bb), rows)
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("row 19") && msg.contains("feature 6") && msg.contains("bfloat16"),
            "{msg}"
        );
        assert!(matches!(
            acc.add_batch(Activations::F32(&x[1..]), rows),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            acc.add_batch(Activations::F32(&x), rows + 1),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            HessianAccumulator::new(0),
            Err(Error::InvalidArgument(_))
        ));

        assert_eq!(acc.samples(), rows as u64);
        assert_eq!(acc.hessian(), before);
        acc.add_batch(Activations::F32(&[]), 0).unwrap();
        assert_eq!(acc.hessian(), before);
    }

    #[test]
    fn feeds_factorization() {
        // End to end: accumulate, then the damped factor exists and reconstructs H.
        let (n, rows) = (64usize, 256usize);
        let x: Vec<bf16> = correlated(5, rows, n, n)
            .iter()
            .map(|&v| bf16::from_f64(v))
            .collect();
        let mut acc = HessianAccumulator::new(n).unwrap();
        acc.add_batch(Activations::BF16(&x), rows).unwrap();
        let f = crate::linalg::factor_damped(&acc.hessian(), n, Default::default()).unwrap();
        assert_eq!(f.attempts, vec![0.01]);
        assert!(f.dead.is_empty());
    }
}
