//! Activation quantization: range statistics (observers), scales and zero points, and
//! quantize-dequantize ("fake quantization") kernels for int and FP8 E4M3 formats.
//!
//! Every batch is a row-major `[rows, columns]` matrix (activations: `[tokens, features]`).
//! Scales and zero points follow compressed-tensors (what vLLM serves and llm-compressor
//! calibrates), which uses *signed* integer codes `[-2^(b-1), 2^(b-1) - 1]`:
//!
//! - the range is widened to include 0;
//! - int symmetric: `scale = max(|min|, |max|) / ((2^b - 1) / 2)`, zero point 0 (bit for bit the
//!   weight grid of [`crate::quantizer`], whose `2·absmax / (2^b - 1)` is the same f32 quotient);
//! - int asymmetric: `scale = (max - min) / (2^b - 1)`,
//!   `zero = round_half_even(clamp(qmin - min / scale, qmin, qmax))`;
//! - FP8 E4M3: `scale = absmax / 448`, no zero point;
//! - a zero scale (an all-zero range) becomes `f32::EPSILON` (zero point 0).
//!
//! Quantize-dequantize reuses the weight grid's code ([`quantize_code`] / [`dequantize_code`]:
//! division by the scale, round half to even, clamp) with the signed zero point shifted by
//! `2^(b-1)` into its unsigned code range, so `qdq(x) = (clamp(round(x/s) + z, qmin, qmax) - z)·s`;
//! NaN stays NaN. FP8: `qdq(x) = e4m3(clamp(x/s, ±448))·s` (see [`crate::fp8`]).

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::fp8;
use crate::hessian::Activations;
use crate::quantizer::{dequantize_code, quantize_code, GroupParams};

/// Which values share one scale. The kept axis is explicit: `Row` is llm-compressor's `token`
/// for activations `[tokens, features]` and its `channel` for a weight `[out, in]`; `Column`
/// is `channel` for activations (one range per input feature).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Strategy {
    /// One range for the whole matrix.
    Tensor,
    /// One range per row.
    Row,
    /// One range per column.
    Column,
    /// One range per row and run of `group_size` consecutive columns (the last may be short).
    Group(usize),
}

impl Strategy {
    /// Parameters covering one row: the row's own for `Row`/`Group`, all of them otherwise.
    fn block(&self, cols: usize) -> usize {
        match *self {
            Strategy::Tensor | Strategy::Row => 1,
            Strategy::Column => cols,
            Strategy::Group(gs) => cols.div_ceil(gs),
        }
    }

    /// Whether each row has parameters of its own.
    fn row_local(&self) -> bool {
        matches!(self, Strategy::Row | Strategy::Group(_))
    }

    /// Shape of the scale matrix (row-major): `[1, 1]`, `[rows, 1]`, `[1, cols]` or
    /// `[rows, ceil(cols / group_size)]`.
    pub fn param_shape(&self, rows: usize, cols: usize) -> (usize, usize) {
        match *self {
            Strategy::Tensor => (1, 1),
            Strategy::Row => (rows, 1),
            Strategy::Column => (1, cols),
            Strategy::Group(gs) => (rows, cols.div_ceil(gs)),
        }
    }

    pub fn num_params(&self, rows: usize, cols: usize) -> usize {
        let (a, b) = self.param_shape(rows, cols);
        a * b
    }

    pub fn validate(&self) -> Result<()> {
        if *self == Strategy::Group(0) {
            return Err(Error::InvalidArgument(
                "observer: group strategy needs a group_size > 0".into(),
            ));
        }
        Ok(())
    }
}

/// The quantized number format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// Signed integer codes of `bits` (2..=8).
    Int { bits: u8, symmetric: bool },
    /// FP8 E4M3FN, symmetric.
    Fp8E4M3,
}

/// One scale and (signed) zero point.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct QParams {
    pub scale: f32,
    pub zero: i32,
}

impl Format {
    pub fn validate(&self) -> Result<()> {
        if let Format::Int { bits, .. } = *self {
            if !(2..=8).contains(&bits) {
                return Err(Error::InvalidArgument(format!(
                    "observer: int bits must be in 2..=8, got {bits}"
                )));
            }
        }
        Ok(())
    }

    /// `(qmin, qmax)` of the signed code range (FP8: ±448).
    pub fn range(&self) -> (f32, f32) {
        match *self {
            Format::Int { bits, .. } => {
                let half = (1i32 << (bits - 1)) as f32;
                (-half, half - 1.0)
            }
            Format::Fp8E4M3 => (-fp8::E4M3_MAX, fp8::E4M3_MAX),
        }
    }

    /// Scale and zero point for the range `[min, max]` (see the module docs).
    #[inline]
    pub fn qparams(&self, min: f32, max: f32) -> QParams {
        let (min, max) = (min.min(0.0), max.max(0.0));
        let (qmin, qmax) = self.range();
        let symmetric = match *self {
            Format::Int { symmetric, .. } => symmetric,
            Format::Fp8E4M3 => true,
        };
        let (scale, zero) = if symmetric {
            (min.abs().max(max.abs()) / ((qmax - qmin) / 2.0), 0)
        } else {
            let scale = (max - min) / (qmax - qmin);
            let zero = if scale == 0.0 {
                0 // all-zero range: any zero point reproduces 0 exactly
            } else {
                (qmin - min / scale).clamp(qmin, qmax).round_ties_even() as i32
            };
            (scale, zero)
        };
        let scale = if scale == 0.0 { f32::EPSILON } else { scale };
        QParams { scale, zero }
    }

    /// Quantize-dequantize one value.
    #[inline(always)]
    pub fn qdq(&self, x: f32, p: QParams) -> f32 {
        match *self {
            Format::Int { bits, .. } => {
                if x.is_nan() {
                    return x;
                }
                let half = 1i32 << (bits - 1);
                let g = GroupParams {
                    scale: p.scale,
                    zero: p.zero + half,
                };
                dequantize_code(quantize_code(x, g, (1u32 << bits) - 1), g)
            }
            Format::Fp8E4M3 => fp8::round(x / p.scale) * p.scale,
        }
    }
}

/// How an observer merges the ranges of successive batches.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ObserverKind {
    /// Running min / max over all batches.
    MinMax,
    /// Same statistic as `MinMax` (absolute min / max ever seen), named as llm-compressor does.
    StaticMinMax,
    /// `m <- m + c·(batch_min - m)` (and for max) per batch; the first batch sets `m`.
    MovingAverageMinMax { averaging_constant: f32 },
    /// Shrink search: candidates `p·[min, max]` for `p = 1 - i/grid`,
    /// `i < floor(max_shrink·grid)`, over the running range; the error of each `p`,
    /// `Σ |x - qdq(x)|^norm`, is summed over every batch (each batch judged against the running
    /// range after merging it), and the first `p` with the smallest total wins.
    Mse {
        grid: usize,
        max_shrink: f32,
        norm: f32,
    },
}

impl ObserverKind {
    /// llm-compressor's MSE defaults: grid 100, maxshrink 0.20, norm 2.4.
    pub fn mse_default() -> Self {
        ObserverKind::Mse {
            grid: 100,
            max_shrink: 0.2,
            norm: 2.4,
        }
    }

    pub fn validate(&self) -> Result<()> {
        match *self {
            ObserverKind::MovingAverageMinMax {
                averaging_constant: c,
            } => {
                if !(c > 0.0 && c <= 1.0) {
                    return Err(Error::InvalidArgument(format!(
                        "observer: averaging_constant must be in (0, 1], got {c}"
                    )));
                }
            }
            ObserverKind::Mse {
                grid,
                max_shrink,
                norm,
            } => {
                if !(max_shrink > 0.0 && max_shrink <= 1.0) {
                    return Err(Error::InvalidArgument(format!(
                        "observer: mse maxshrink must be in (0, 1], got {max_shrink}"
                    )));
                }
                if grid == 0 || mse_steps(grid, max_shrink) == 0 {
                    return Err(Error::InvalidArgument(format!(
                        "observer: mse grid {grid} with maxshrink {max_shrink} gives no candidate (need grid·maxshrink >= 1)"
                    )));
                }
                if !(norm > 0.0 && norm.is_finite()) {
                    return Err(Error::InvalidArgument(format!(
                        "observer: mse norm must be a finite value > 0, got {norm}"
                    )));
                }
            }
            ObserverKind::MinMax | ObserverKind::StaticMinMax => {}
        }
        Ok(())
    }
}

fn mse_steps(grid: usize, max_shrink: f32) -> usize {
    (max_shrink as f64 * grid as f64).floor() as usize
}

/// Shrink factor `i` of the MSE search, rounded to f32 as torch multiplies an f32 tensor by a
/// Python float.
fn shrink(i: usize, grid: usize) -> f32 {
    (1.0 - i as f64 / grid as f64) as f32
}

// ---------------------------------------------------------------------------------------------
// Element access and batch validation
// ---------------------------------------------------------------------------------------------

trait Elem: Copy + Send + Sync {
    fn get(self) -> f32;
}
impl Elem for f32 {
    #[inline(always)]
    fn get(self) -> f32 {
        self
    }
}
impl Elem for half::f16 {
    #[inline(always)]
    fn get(self) -> f32 {
        self.to_f32()
    }
}
impl Elem for half::bf16 {
    #[inline(always)]
    fn get(self) -> f32 {
        self.to_f32()
    }
}

/// Runs `$body` with `$s` bound to the batch's typed slice.
macro_rules! with_slice {
    ($acts:expr, $s:ident => $body:expr) => {
        match $acts {
            Activations::F32($s) => $body,
            Activations::F16($s) => $body,
            Activations::BF16($s) => $body,
        }
    };
}

fn acts_len(x: &Activations<'_>) -> usize {
    with_slice!(*x, s => s.len())
}

fn check_batch(x: &Activations<'_>, rows: usize, cols: usize) -> Result<()> {
    if rows == 0 || cols == 0 {
        return Err(Error::InvalidArgument(format!(
            "x: empty batch (shape [{rows}, {cols}])"
        )));
    }
    let len = acts_len(x);
    if rows.checked_mul(cols) != Some(len) {
        return Err(Error::InvalidArgument(format!(
            "x: {len} values do not form a [{rows}, {cols}] matrix"
        )));
    }
    Ok(())
}

fn non_finite_error<T: Elem>(x: &[T], cols: usize) -> Error {
    let pos = x.iter().position(|v| !v.get().is_finite()).unwrap_or(0);
    Error::NonFinite(format!(
        "x: non-finite value (NaN or inf) at row {}, column {} of the batch",
        pos / cols,
        pos % cols
    ))
}

/// Defines `$name`, which runs the `#[inline(always)]` kernel `$generic` compiled for AVX2+FMA
/// where the CPU has them: there `round_ties_even` is one instruction instead of a libm call
/// (baseline x86-64 lacks SSE4.1) and the loops run 8 wide. The kernels take no closures, so
/// nothing they call is left outside the feature-enabled code.
macro_rules! avx2_dispatch {
    ($name:ident, $avx2:ident, $generic:ident, ($($arg:ident: $ty:ty),*) -> $ret:ty) => {
        #[inline]
        fn $name<T: Elem>($($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            {
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the CPU supports the features the function is compiled for.
                    return unsafe { $avx2($($arg),*) };
                }
            }
            $generic($($arg),*)
        }

        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn $avx2<T: Elem>($($arg: $ty),*) -> $ret {
            $generic($($arg),*)
        }
    };
}

/// Rows per parallel task where rows share parameters.
const CHUNK_ROWS: usize = 64;
/// Independent min/max lanes for the sequential reductions (lets them vectorise).
const LANES: usize = 16;

/// (min, max, all finite) of a slice.
#[inline(always)]
fn slice_minmax<T: Elem>(s: &[T]) -> (f32, f32, bool) {
    let mut lo = [f32::INFINITY; LANES];
    let mut hi = [f32::NEG_INFINITY; LANES];
    let mut ok = [true; LANES];
    let mut it = s.chunks_exact(LANES);
    for c in &mut it {
        for j in 0..LANES {
            let v = c[j].get();
            lo[j] = lo[j].min(v);
            hi[j] = hi[j].max(v);
            ok[j] &= v.is_finite();
        }
    }
    for (j, &v) in it.remainder().iter().enumerate() {
        let v = v.get();
        lo[j] = lo[j].min(v);
        hi[j] = hi[j].max(v);
        ok[j] &= v.is_finite();
    }
    (
        lo.iter().copied().fold(f32::INFINITY, f32::min),
        hi.iter().copied().fold(f32::NEG_INFINITY, f32::max),
        ok.iter().all(|&b| b),
    )
}

/// Folds one row into the parameters covering it; false if the row has a non-finite value.
#[inline(always)]
fn row_minmax_inline<T: Elem>(
    row: &[T],
    strategy: Strategy,
    lo: &mut [f32],
    hi: &mut [f32],
) -> bool {
    match strategy {
        Strategy::Tensor | Strategy::Row => {
            let (l, h, ok) = slice_minmax(row);
            lo[0] = lo[0].min(l);
            hi[0] = hi[0].max(h);
            ok
        }
        Strategy::Column => {
            let mut ok = true;
            for ((&v, l), h) in row.iter().zip(lo.iter_mut()).zip(hi.iter_mut()) {
                let v = v.get();
                *l = l.min(v);
                *h = h.max(v);
                ok &= v.is_finite();
            }
            ok
        }
        Strategy::Group(gs) => {
            let mut ok = true;
            for ((g, l), h) in row.chunks(gs).zip(lo.iter_mut()).zip(hi.iter_mut()) {
                let (a, b, f) = slice_minmax(g);
                *l = l.min(a);
                *h = h.max(b);
                ok &= f;
            }
            ok
        }
    }
}

avx2_dispatch!(row_minmax, row_minmax_avx2, row_minmax_inline, (
    row: &[T], strategy: Strategy, lo: &mut [f32], hi: &mut [f32]
) -> bool);

fn batch_minmax_typed<T: Elem>(
    x: &[T],
    cols: usize,
    strategy: Strategy,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let rows = x.len() / cols;
    let block = strategy.block(cols);
    let ok;
    let (lo, hi) = if strategy.row_local() {
        let mut lo = vec![f32::INFINITY; rows * block];
        let mut hi = vec![f32::NEG_INFINITY; rows * block];
        ok = x
            .par_chunks(cols)
            .zip(lo.par_chunks_mut(block))
            .zip(hi.par_chunks_mut(block))
            .map(|((row, l), h)| row_minmax(row, strategy, l, h))
            .reduce(|| true, |a, b| a && b);
        (lo, hi)
    } else {
        let init = || {
            (
                vec![f32::INFINITY; block],
                vec![f32::NEG_INFINITY; block],
                true,
            )
        };
        let (lo, hi, all) = x
            .par_chunks(CHUNK_ROWS * cols)
            .fold(init, |(mut l, mut h, ok), chunk| {
                let mut ok2 = ok;
                for row in chunk.chunks(cols) {
                    ok2 &= row_minmax(row, strategy, &mut l, &mut h);
                }
                (l, h, ok2)
            })
            .reduce(init, |(mut l, mut h, a), (l2, h2, b)| {
                for (x, y) in l.iter_mut().zip(&l2) {
                    *x = x.min(*y);
                }
                for (x, y) in h.iter_mut().zip(&h2) {
                    *x = x.max(*y);
                }
                (l, h, a && b)
            });
        ok = all;
        (lo, hi)
    };
    if !ok {
        return Err(non_finite_error(x, cols));
    }
    Ok((lo, hi))
}

/// Min and max of one batch per parameter of `strategy` (layout of [`Strategy::param_shape`]).
/// Errors on an empty or mis-sized batch and on NaN/inf (naming the first position).
pub fn batch_minmax(
    x: Activations<'_>,
    rows: usize,
    cols: usize,
    strategy: Strategy,
) -> Result<(Vec<f32>, Vec<f32>)> {
    strategy.validate()?;
    check_batch(&x, rows, cols)?;
    with_slice!(x, s => batch_minmax_typed(s, cols, strategy))
}

// ---------------------------------------------------------------------------------------------
// MSE error accumulation
// ---------------------------------------------------------------------------------------------

/// `err[k] += Σ |x - qdq_k(x)|^norm` over one run of values sharing parameters.
#[inline(always)]
fn seg_errors<T: Elem>(seg: &[T], format: Format, cands: &[QParams], norm: f32, err: &mut [f64]) {
    for (q, e) in cands.iter().zip(err.iter_mut()) {
        let mut acc = 0.0f64;
        if norm == 2.0 {
            for &v in seg {
                let v = v.get();
                let d = format.qdq(v, *q) - v;
                acc += (d * d) as f64;
            }
        } else {
            for &v in seg {
                let v = v.get();
                acc += ((format.qdq(v, *q) - v).abs().powf(norm)) as f64;
            }
        }
        *e += acc;
    }
}

/// `err[p·ncand + k] += Σ |x - qdq_k(x)|^norm` over one row (`cands` laid out the same way).
#[inline(always)]
fn row_errors_inline<T: Elem>(
    row: &[T],
    strategy: Strategy,
    format: Format,
    cands: &[QParams],
    ncand: usize,
    norm: f32,
    err: &mut [f64],
) {
    match strategy {
        Strategy::Tensor | Strategy::Row => seg_errors(row, format, cands, norm, err),
        Strategy::Column => {
            for ((v, c), e) in row
                .chunks(1)
                .zip(cands.chunks(ncand))
                .zip(err.chunks_mut(ncand))
            {
                seg_errors(v, format, c, norm, e);
            }
        }
        Strategy::Group(gs) => {
            for ((v, c), e) in row
                .chunks(gs)
                .zip(cands.chunks(ncand))
                .zip(err.chunks_mut(ncand))
            {
                seg_errors(v, format, c, norm, e);
            }
        }
    }
}

avx2_dispatch!(row_errors, row_errors_avx2, row_errors_inline, (
    row: &[T], strategy: Strategy, format: Format, cands: &[QParams], ncand: usize, norm: f32,
    err: &mut [f64]
) -> ());

fn batch_errors_typed<T: Elem>(
    x: &[T],
    cols: usize,
    strategy: Strategy,
    format: Format,
    cands: &[QParams],
    ncand: usize,
    norm: f32,
) -> Vec<f64> {
    let rows = x.len() / cols;
    let block = strategy.block(cols) * ncand;
    if strategy.row_local() {
        let mut err = vec![0.0f64; rows * block];
        x.par_chunks(cols)
            .zip(err.par_chunks_mut(block))
            .zip(cands.par_chunks(block))
            .for_each(|((row, e), c)| row_errors(row, strategy, format, c, ncand, norm, e));
        err
    } else {
        let init = || vec![0.0f64; block];
        x.par_chunks(CHUNK_ROWS * cols)
            .fold(init, |mut e, chunk| {
                for row in chunk.chunks(cols) {
                    row_errors(row, strategy, format, cands, ncand, norm, &mut e);
                }
                e
            })
            .reduce(init, |mut a, b| {
                for (x, y) in a.iter_mut().zip(&b) {
                    *x += y;
                }
                a
            })
    }
}

// ---------------------------------------------------------------------------------------------
// Observer
// ---------------------------------------------------------------------------------------------

/// Streaming range statistics of one tensor over calibration batches.
#[derive(Clone, Debug)]
pub struct ActivationObserver {
    kind: ObserverKind,
    strategy: Strategy,
    format: Format,
    cols: usize,
    /// Rows of every batch, fixed by the first one for per-row strategies.
    rows: Option<usize>,
    min: Vec<f32>,
    max: Vec<f32>,
    /// MSE: total error per parameter and shrink candidate, `[param][candidate]`.
    err: Vec<f64>,
    batches: u64,
}

impl ActivationObserver {
    pub fn new(
        kind: ObserverKind,
        strategy: Strategy,
        format: Format,
        cols: usize,
    ) -> Result<Self> {
        kind.validate()?;
        strategy.validate()?;
        format.validate()?;
        if cols == 0 {
            return Err(Error::InvalidArgument(
                "observer: columns must be > 0".into(),
            ));
        }
        Ok(Self {
            kind,
            strategy,
            format,
            cols,
            rows: None,
            min: Vec::new(),
            max: Vec::new(),
            err: Vec::new(),
            batches: 0,
        })
    }

    pub fn columns(&self) -> usize {
        self.cols
    }
    pub fn batches(&self) -> u64 {
        self.batches
    }
    pub fn strategy(&self) -> Strategy {
        self.strategy
    }
    pub fn format(&self) -> Format {
        self.format
    }
    pub fn kind(&self) -> ObserverKind {
        self.kind
    }

    /// Shape of the scales, known once a batch was seen (per-row strategies need its rows).
    pub fn param_shape(&self) -> Option<(usize, usize)> {
        if self.batches == 0 {
            return None;
        }
        Some(self.strategy.param_shape(self.rows.unwrap_or(1), self.cols))
    }

    /// Folds one `[rows, columns]` batch into the statistics. A rejected batch leaves the
    /// observer unchanged.
    pub fn update(&mut self, x: Activations<'_>, rows: usize) -> Result<()> {
        check_batch(&x, rows, self.cols)?;
        if self.strategy.row_local() {
            if let Some(r) = self.rows.filter(|&r| r != rows) {
                return Err(Error::InvalidArgument(format!(
                    "x: per-row statistics need the same rows in every batch: the observer has {r}, the batch {rows}"
                )));
            }
        }
        let (bmin, bmax) = with_slice!(x, s => batch_minmax_typed(s, self.cols, self.strategy))?;
        let first = self.batches == 0;
        if first {
            self.min = bmin;
            self.max = bmax;
        } else {
            match self.kind {
                ObserverKind::MovingAverageMinMax {
                    averaging_constant: c,
                } => {
                    for (m, b) in self.min.iter_mut().zip(&bmin) {
                        *m += c * (b - *m);
                    }
                    for (m, b) in self.max.iter_mut().zip(&bmax) {
                        *m += c * (b - *m);
                    }
                }
                _ => {
                    for (m, b) in self.min.iter_mut().zip(&bmin) {
                        *m = m.min(*b);
                    }
                    for (m, b) in self.max.iter_mut().zip(&bmax) {
                        *m = m.max(*b);
                    }
                }
            }
        }
        if let ObserverKind::Mse {
            grid,
            max_shrink,
            norm,
        } = self.kind
        {
            let ncand = mse_steps(grid, max_shrink);
            let fmt = self.format;
            let cands: Vec<QParams> = self
                .min
                .iter()
                .zip(&self.max)
                .flat_map(|(&lo, &hi)| {
                    (0..ncand).map(move |i| {
                        let p = shrink(i, grid);
                        fmt.qparams(p * lo, p * hi)
                    })
                })
                .collect();
            let (strategy, format, cols) = (self.strategy, self.format, self.cols);
            let e = with_slice!(x, s => batch_errors_typed(s, cols, strategy, format, &cands, ncand, norm));
            if first {
                self.err = e;
            } else {
                for (a, b) in self.err.iter_mut().zip(&e) {
                    *a += b;
                }
            }
        }
        self.rows = Some(rows);
        self.batches += 1;
        Ok(())
    }

    /// The range each scale is computed from: the running statistic, or for MSE the running
    /// range shrunk by each parameter's best factor.
    pub fn min_max(&self) -> Result<(Vec<f32>, Vec<f32>)> {
        if self.batches == 0 {
            return Err(Error::InvalidArgument(
                "observer: no batch observed yet (calibrate on at least one sample)".into(),
            ));
        }
        match self.kind {
            ObserverKind::Mse {
                grid, max_shrink, ..
            } => {
                let ncand = mse_steps(grid, max_shrink);
                let mut lo = self.min.clone();
                let mut hi = self.max.clone();
                for (j, e) in self.err.chunks(ncand).enumerate() {
                    let mut best = 0;
                    for (k, &v) in e.iter().enumerate() {
                        // Strict `<`: the first (widest) of equally good ranges wins.
                        if v < e[best] {
                            best = k;
                        }
                    }
                    let p = shrink(best, grid);
                    lo[j] *= p;
                    hi[j] *= p;
                }
                Ok((lo, hi))
            }
            _ => Ok((self.min.clone(), self.max.clone())),
        }
    }

    /// Scales and signed zero points, row-major in [`Self::param_shape`].
    pub fn qparams(&self) -> Result<(Vec<f32>, Vec<i32>)> {
        let (lo, hi) = self.min_max()?;
        Ok(lo
            .iter()
            .zip(&hi)
            .map(|(&a, &b)| {
                let q = self.format.qparams(a, b);
                (q.scale, q.zero)
            })
            .unzip())
    }
}

// ---------------------------------------------------------------------------------------------
// Fake quantization
// ---------------------------------------------------------------------------------------------

fn check_params(
    format: Format,
    scales: &[f32],
    zeros: Option<&[i32]>,
    want: usize,
    shape: (usize, usize),
) -> Result<()> {
    if scales.len() != want {
        return Err(Error::InvalidArgument(format!(
            "scales: expected {want} values (shape [{}, {}]), got {}",
            shape.0,
            shape.1,
            scales.len()
        )));
    }
    if let Some(i) = scales.iter().position(|&s| !(s > 0.0 && s.is_finite())) {
        return Err(Error::InvalidArgument(format!(
            "scales: every scale must be finite and > 0, scales[{i}] = {}",
            scales[i]
        )));
    }
    if let Some(z) = zeros {
        if z.len() != want {
            return Err(Error::InvalidArgument(format!(
                "zero_points: expected {want} values, got {}",
                z.len()
            )));
        }
        let (qmin, qmax) = format.range();
        match format {
            Format::Fp8E4M3 => {
                if let Some(i) = z.iter().position(|&v| v != 0) {
                    return Err(Error::InvalidArgument(format!(
                        "zero_points: FP8 is symmetric, zero_points[{i}] = {} must be 0",
                        z[i]
                    )));
                }
            }
            Format::Int { .. } => {
                if let Some(i) = z
                    .iter()
                    .position(|&v| (v as f32) < qmin || (v as f32) > qmax)
                {
                    return Err(Error::InvalidArgument(format!(
                        "zero_points: zero_points[{i}] = {} outside the code range [{qmin}, {qmax}]",
                        z[i]
                    )));
                }
            }
        }
    }
    Ok(())
}

/// Parameter `i` (zero point 0 without zero points).
#[inline(always)]
fn param_at(scales: &[f32], zeros: Option<&[i32]>, i: usize) -> QParams {
    QParams {
        scale: scales[i],
        zero: zeros.map_or(0, |z| z[i]),
    }
}

/// qdq of one row into `o`; `params` are the parameters covering the row.
#[inline(always)]
fn qdq_row_inline<T: Elem>(
    row: &[T],
    o: &mut [f32],
    strategy: Strategy,
    format: Format,
    scales: &[f32],
    zeros: Option<&[i32]>,
) {
    match strategy {
        Strategy::Tensor | Strategy::Row => {
            let q = param_at(scales, zeros, 0);
            for (d, &v) in o.iter_mut().zip(row) {
                *d = format.qdq(v.get(), q);
            }
        }
        Strategy::Column => {
            for (c, (d, &v)) in o.iter_mut().zip(row).enumerate() {
                *d = format.qdq(v.get(), param_at(scales, zeros, c));
            }
        }
        Strategy::Group(gs) => {
            for (g, (dg, vg)) in o.chunks_mut(gs).zip(row.chunks(gs)).enumerate() {
                let q = param_at(scales, zeros, g);
                for (d, &v) in dg.iter_mut().zip(vg) {
                    *d = format.qdq(v.get(), q);
                }
            }
        }
    }
}

avx2_dispatch!(qdq_row, qdq_row_avx2, qdq_row_inline, (
    row: &[T], o: &mut [f32], strategy: Strategy, format: Format, scales: &[f32],
    zeros: Option<&[i32]>
) -> ());

fn fake_quantize_typed<T: Elem>(
    x: &[T],
    cols: usize,
    strategy: Strategy,
    format: Format,
    scales: &[f32],
    zeros: Option<&[i32]>,
) -> Vec<f32> {
    let block = strategy.block(cols);
    let mut out = vec![0.0f32; x.len()];
    out.par_chunks_mut(cols)
        .zip(x.par_chunks(cols))
        .enumerate()
        .for_each(|(r, (o, row))| {
            let base = if strategy.row_local() { r * block } else { 0 };
            let z = zeros.map(|z| &z[base..base + block]);
            qdq_row(row, o, strategy, format, &scales[base..base + block], z);
        });
    out
}

/// Quantize-dequantize a `[rows, cols]` batch with given scales (and signed zero points; `None`
/// = 0) laid out as [`Strategy::param_shape`]. Non-finite inputs pass through the format's
/// rules (int: NaN stays NaN, ±inf clamps; FP8: NaN stays NaN, ±inf saturates).
pub fn fake_quantize(
    x: Activations<'_>,
    rows: usize,
    cols: usize,
    strategy: Strategy,
    format: Format,
    scales: &[f32],
    zeros: Option<&[i32]>,
) -> Result<Vec<f32>> {
    strategy.validate()?;
    format.validate()?;
    check_batch(&x, rows, cols)?;
    check_params(
        format,
        scales,
        zeros,
        strategy.num_params(rows, cols),
        strategy.param_shape(rows, cols),
    )?;
    Ok(with_slice!(x, s => fake_quantize_typed(s, cols, strategy, format, scales, zeros)))
}

/// Dynamic qdq of one row into `o`: (its parameters, whether the row is finite).
#[inline(always)]
fn dynamic_row_inline<T: Elem>(row: &[T], o: &mut [f32], format: Format) -> (QParams, bool) {
    let (lo, hi, ok) = slice_minmax(row);
    let q = format.qparams(lo, hi);
    for (d, &v) in o.iter_mut().zip(row) {
        *d = format.qdq(v.get(), q);
    }
    (q, ok)
}

avx2_dispatch!(dynamic_row, dynamic_row_avx2, dynamic_row_inline, (
    row: &[T], o: &mut [f32], format: Format
) -> (QParams, bool));

fn dynamic_token_typed<T: Elem>(
    x: &[T],
    cols: usize,
    format: Format,
) -> Result<(Vec<f32>, Vec<f32>, Vec<i32>)> {
    let rows = x.len() / cols;
    let mut out = vec![0.0f32; x.len()];
    let mut scales = vec![0.0f32; rows];
    let mut zeros = vec![0i32; rows];
    let ok = out
        .par_chunks_mut(cols)
        .zip(x.par_chunks(cols))
        .zip(scales.par_iter_mut().zip(zeros.par_iter_mut()))
        .map(|((o, row), (s, z))| {
            let (q, ok) = dynamic_row(row, o, format);
            *s = q.scale;
            *z = q.zero;
            ok
        })
        .reduce(|| true, |a, b| a && b);
    if !ok {
        return Err(non_finite_error(x, cols));
    }
    Ok((out, scales, zeros))
}

/// Dynamic per-token quantize-dequantize: each row's min/max gives its scale (and zero point),
/// applied in the same pass. Returns `(qdq(x), scales [rows], zero points [rows])`; NaN/inf in
/// `x` is an error (a row's scale would be meaningless).
pub fn dynamic_token_fake_quantize(
    x: Activations<'_>,
    rows: usize,
    cols: usize,
    format: Format,
) -> Result<(Vec<f32>, Vec<f32>, Vec<i32>)> {
    format.validate()?;
    check_batch(&x, rows, cols)?;
    with_slice!(x, s => dynamic_token_typed(s, cols, format))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fp8::reference::{reference_encode, value_f64};
    use half::{bf16, f16};

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    /// Skewed data with a per-column offset and occasional outliers.
    fn data(seed: u64, rows: usize, cols: usize) -> Vec<f32> {
        let mut s = seed;
        (0..rows * cols)
            .map(|i| {
                let v = lcg(&mut s);
                let c = i % cols;
                if i % 97 == 5 {
                    6.0 * v
                } else {
                    v * (1.0 + c as f32 * 0.1) + 0.2 * (c % 3) as f32
                }
            })
            .collect()
    }

    const STRATEGIES: [Strategy; 5] = [
        Strategy::Tensor,
        Strategy::Row,
        Strategy::Column,
        Strategy::Group(4),
        Strategy::Group(3), // 10 columns: a short last group
    ];

    /// Parameter index of element (r, c), written from the layout definition.
    fn pidx(s: Strategy, r: usize, c: usize, cols: usize) -> usize {
        match s {
            Strategy::Tensor => 0,
            Strategy::Row => r,
            Strategy::Column => c,
            Strategy::Group(g) => r * cols.div_ceil(g) + c / g,
        }
    }

    fn ref_minmax(x: &[f32], rows: usize, cols: usize, s: Strategy) -> (Vec<f64>, Vec<f64>) {
        let n = s.num_params(rows, cols);
        let (mut lo, mut hi) = (vec![f64::INFINITY; n], vec![f64::NEG_INFINITY; n]);
        for r in 0..rows {
            for c in 0..cols {
                let (p, v) = (pidx(s, r, c, cols), x[r * cols + c] as f64);
                lo[p] = lo[p].min(v);
                hi[p] = hi[p].max(v);
            }
        }
        (lo, hi)
    }

    fn as64(v: &[f32]) -> Vec<f64> {
        v.iter().map(|&x| x as f64).collect()
    }

    #[test]
    fn batch_minmax_is_exact_for_every_strategy_and_dtype() {
        let (rows, cols) = (150, 10); // > CHUNK_ROWS: several parallel partials
        let x = data(3, rows, cols);
        let xh: Vec<f16> = x.iter().map(|&v| f16::from_f32(v)).collect();
        let xb: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
        let xh32: Vec<f32> = xh.iter().map(|v| v.to_f32()).collect();
        let xb32: Vec<f32> = xb.iter().map(|v| v.to_f32()).collect();
        for s in STRATEGIES {
            for (acts, exact) in [
                (Activations::F32(&x), &x),
                (Activations::F16(&xh), &xh32),
                (Activations::BF16(&xb), &xb32),
            ] {
                let (lo, hi) = batch_minmax(acts, rows, cols, s).unwrap();
                let (rl, rh) = ref_minmax(exact, rows, cols, s);
                assert_eq!(as64(&lo), rl, "{s:?} min");
                assert_eq!(as64(&hi), rh, "{s:?} max");
            }
        }
    }

    #[test]
    fn running_and_static_minmax_merge_batches_exactly() {
        let (rows, cols) = (40, 10);
        let batches: Vec<Vec<f32>> = (0..4).map(|b| data(10 + b, rows, cols)).collect();
        for s in STRATEGIES {
            for kind in [ObserverKind::MinMax, ObserverKind::StaticMinMax] {
                let mut o = ActivationObserver::new(kind, s, Format::Fp8E4M3, cols).unwrap();
                let all: Vec<f32> = batches.concat();
                for b in &batches {
                    o.update(Activations::F32(b), rows).unwrap();
                }
                let (lo, hi) = o.min_max().unwrap();
                // Reference over all batches at once (per-row strategies: rows are
                // positions within a batch, so fold batch b's row r into row r).
                let (mut rl, mut rh) = ref_minmax(&batches[0], rows, cols, s);
                for b in &batches[1..] {
                    let (l2, h2) = ref_minmax(b, rows, cols, s);
                    for i in 0..rl.len() {
                        rl[i] = rl[i].min(l2[i]);
                        rh[i] = rh[i].max(h2[i]);
                    }
                }
                if !s.row_local() {
                    assert_eq!(
                        ref_minmax(&all, 4 * rows, cols, s),
                        (rl.clone(), rh.clone())
                    );
                }
                assert_eq!((as64(&lo), as64(&hi)), (rl, rh), "{s:?} {kind:?}");
            }
        }
    }

    #[test]
    fn moving_average_follows_the_update_rule_exactly() {
        let (rows, cols) = (30, 10);
        let c = 0.25f32;
        for s in STRATEGIES {
            let kind = ObserverKind::MovingAverageMinMax {
                averaging_constant: c,
            };
            let mut o = ActivationObserver::new(kind, s, Format::Fp8E4M3, cols).unwrap();
            let mut m: Option<(Vec<f32>, Vec<f32>)> = None;
            for b in 0..5 {
                let x = data(100 + b, rows, cols);
                o.update(Activations::F32(&x), rows).unwrap();
                let (bl, bh) = ref_minmax(&x, rows, cols, s);
                m = Some(match m {
                    None => (
                        bl.iter().map(|&v| v as f32).collect(),
                        bh.iter().map(|&v| v as f32).collect(),
                    ),
                    Some((ml, mh)) => (
                        ml.iter()
                            .zip(&bl)
                            .map(|(&a, &b)| a + c * (b as f32 - a))
                            .collect(),
                        mh.iter()
                            .zip(&bh)
                            .map(|(&a, &b)| a + c * (b as f32 - a))
                            .collect(),
                    ),
                });
                assert_eq!(o.min_max().unwrap(), m.clone().unwrap(), "{s:?} batch {b}");
            }
        }
    }

    /// qdq in f64 with the scale/zero of the f32 path: `x / s` rounded to f32 as the kernel
    /// divides; the final product is exact in f64 and rounded to f32 once, as f32 arithmetic does.
    fn ref_qdq(fmt: Format, x: f32, q: QParams) -> f64 {
        let v = match fmt {
            Format::Int { bits, .. } => {
                let half = (1i64 << (bits - 1)) as f64;
                let t = (x / q.scale) as f64;
                let code = (t.round_ties_even() + q.zero as f64).clamp(-half, half - 1.0);
                (code - q.zero as f64) * q.scale as f64
            }
            Format::Fp8E4M3 => {
                let t = ((x / q.scale) as f64).clamp(-448.0, 448.0);
                value_f64(reference_encode(t)).unwrap_or(f64::NAN) * q.scale as f64
            }
        };
        v as f32 as f64
    }

    /// Scale and zero from a range, transcribed from compressed-tensors' rule in f64 (the
    /// quotients rounded to f32 once, as torch computes them in f32).
    fn ref_qparams(fmt: Format, lo: f64, hi: f64) -> (f32, i32) {
        let (lo, hi) = (lo.min(0.0), hi.max(0.0));
        let (qmin, qmax, sym) = match fmt {
            Format::Int { bits, symmetric } => {
                let h = (1i64 << (bits - 1)) as f64;
                (-h, h - 1.0, symmetric)
            }
            Format::Fp8E4M3 => (-448.0, 448.0, true),
        };
        let (s, z) = if sym {
            ((lo.abs().max(hi.abs()) / ((qmax - qmin) / 2.0)) as f32, 0)
        } else {
            let s = ((hi - lo) as f32 / (qmax - qmin) as f32) as f64;
            let z = if s == 0.0 {
                0
            } else {
                ((qmin as f32 - (lo as f32 / s as f32)) as f64)
                    .clamp(qmin, qmax)
                    .round_ties_even() as i32
            };
            (s as f32, z)
        };
        (if s == 0.0 { f32::EPSILON } else { s }, z)
    }

    const FORMATS: [Format; 5] = [
        Format::Int {
            bits: 8,
            symmetric: true,
        },
        Format::Int {
            bits: 8,
            symmetric: false,
        },
        Format::Int {
            bits: 4,
            symmetric: true,
        },
        Format::Int {
            bits: 4,
            symmetric: false,
        },
        Format::Fp8E4M3,
    ];

    #[test]
    fn qparams_follow_the_rule_and_the_weight_grid() {
        let sym8 = Format::Int {
            bits: 8,
            symmetric: true,
        };
        assert_eq!(
            sym8.qparams(-2.55, 1.0),
            QParams {
                scale: 2.55 / 127.5,
                zero: 0
            }
        );
        // Asym 8-bit on [-1, 2]: scale 3/255, zero round(-128 + 85) = -43.
        let a8 = Format::Int {
            bits: 8,
            symmetric: false,
        };
        assert_eq!(
            a8.qparams(-1.0, 2.0),
            QParams {
                scale: 3.0 / 255.0,
                zero: -43
            }
        );
        // Positive-only: the range is widened to 0, zero = qmin.
        assert_eq!(a8.qparams(0.5, 2.0).zero, -128);
        assert_eq!(
            Format::Fp8E4M3.qparams(-896.0, 3.0),
            QParams {
                scale: 2.0,
                zero: 0
            }
        );
        for f in FORMATS {
            assert_eq!(f.qparams(0.0, 0.0).scale, f32::EPSILON, "{f:?}");
        }
        // Symmetric int scales are the weight quantizer's (2·absmax / (2^b - 1)) bit for bit.
        let mut s = 5u64;
        for _ in 0..1000 {
            let (lo, hi) = (-lcg(&mut s).abs() * 10.0 - 1e-3, lcg(&mut s) * 7.0);
            for bits in [2u8, 3, 4, 8] {
                let spec = crate::quantizer::QuantSpec {
                    bits,
                    symmetric: true,
                    observer: crate::quantizer::Observer::MinMax,
                    scale_dtype: crate::quantizer::ScaleDtype::F32,
                };
                let w = crate::quantizer::minmax_params(lo, hi, &spec);
                let a = Format::Int {
                    bits,
                    symmetric: true,
                }
                .qparams(lo, hi);
                assert_eq!(a.scale.to_bits(), w.scale.to_bits(), "{lo} {hi} {bits}");
                assert_eq!(a.zero + (1 << (bits - 1)), w.zero);
            }
            for f in FORMATS {
                let q = f.qparams(lo, hi);
                assert_eq!(
                    (q.scale, q.zero),
                    ref_qparams(f, lo as f64, hi as f64),
                    "{f:?} {lo} {hi}"
                );
            }
        }
    }

    #[test]
    fn fake_quantize_matches_the_reference_formula() {
        let (rows, cols) = (70, 10);
        let mut x = data(21, rows, cols);
        // Exact ties of x / s for s = 0.5 and specials.
        x[..8].copy_from_slice(&[0.25, -0.25, 0.75, -0.75, 1e30, -1e30, 0.0, -0.0]);
        for s in STRATEGIES {
            let (lo, hi) = ref_minmax(&x, rows, cols, s);
            for f in FORMATS {
                let (scales, zeros): (Vec<f32>, Vec<i32>) = lo
                    .iter()
                    .zip(&hi)
                    .map(|(&a, &b)| {
                        // Shrunk ranges so that clamping is exercised too.
                        let q = f.qparams(0.7 * a as f32, 0.7 * b as f32);
                        (q.scale, q.zero)
                    })
                    .unzip();
                let mut scales = scales;
                if s == Strategy::Tensor {
                    scales[0] = 0.5;
                }
                let out = fake_quantize(
                    Activations::F32(&x),
                    rows,
                    cols,
                    s,
                    f,
                    &scales,
                    Some(&zeros),
                )
                .unwrap();
                for r in 0..rows {
                    for c in 0..cols {
                        let p = pidx(s, r, c, cols);
                        let q = QParams {
                            scale: scales[p],
                            zero: zeros[p],
                        };
                        let v = x[r * cols + c];
                        let want = ref_qdq(f, v, q);
                        let got = out[r * cols + c];
                        assert_eq!(
                            got as f64, want,
                            "{s:?} {f:?} x={v} s={} z={}",
                            q.scale, q.zero
                        );
                    }
                }
            }
        }
        // NaN passes through; int clamps infinities, FP8 saturates them.
        let y = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 1.0];
        for f in FORMATS {
            let out = fake_quantize(
                Activations::F32(&y),
                1,
                4,
                Strategy::Tensor,
                f,
                &[0.5],
                None,
            )
            .unwrap();
            assert!(out[0].is_nan(), "{f:?}");
            let (qmin, qmax) = f.range();
            assert_eq!(out[1], qmax * 0.5);
            assert_eq!(out[2], qmin * 0.5);
            assert_eq!(out[3], 1.0);
        }
    }

    #[test]
    fn dynamic_token_equals_per_row_scales_then_qdq() {
        let (rows, cols) = (90, 33);
        let x = data(77, rows, cols);
        let xb: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
        let xb32: Vec<f32> = xb.iter().map(|v| v.to_f32()).collect();
        for f in FORMATS {
            for (acts, exact) in [(Activations::F32(&x), &x), (Activations::BF16(&xb), &xb32)] {
                let (out, scales, zeros) =
                    dynamic_token_fake_quantize(acts, rows, cols, f).unwrap();
                let (lo, hi) = ref_minmax(exact, rows, cols, Strategy::Row);
                for r in 0..rows {
                    let (s, z) = ref_qparams(f, lo[r], hi[r]);
                    assert_eq!((scales[r], zeros[r]), (s, z), "{f:?} row {r}");
                    for c in 0..cols {
                        let want = ref_qdq(f, exact[r * cols + c], QParams { scale: s, zero: z });
                        assert_eq!(out[r * cols + c] as f64, want, "{f:?} ({r}, {c})");
                    }
                }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    /// Brute-force MSE over batches in f64: the candidates of batch b come from the running range
    /// after merging b; errors summed over batches; returns the per-parameter error table.
    fn ref_mse_errors(
        batches: &[Vec<f32>],
        rows: usize,
        cols: usize,
        s: Strategy,
        f: Format,
        grid: usize,
        shrink_max: f32,
        norm: f64,
    ) -> (Vec<Vec<f64>>, Vec<f64>, Vec<f64>) {
        let steps = (shrink_max as f64 * grid as f64).floor() as usize;
        let n = s.num_params(rows, cols);
        let mut err = vec![vec![0.0; steps]; n];
        let (mut lo, mut hi) = (vec![f64::INFINITY; n], vec![f64::NEG_INFINITY; n]);
        for x in batches {
            let (bl, bh) = ref_minmax(x, rows, cols, s);
            for i in 0..n {
                lo[i] = lo[i].min(bl[i]);
                hi[i] = hi[i].max(bh[i]);
            }
            for r in 0..rows {
                for c in 0..cols {
                    let p = pidx(s, r, c, cols);
                    for (k, e) in err[p].iter_mut().enumerate() {
                        // The candidate range in f32, as the kernel (and torch) multiply.
                        let sh = (1.0 - k as f64 / grid as f64) as f32;
                        let (a, b) = ((sh * lo[p] as f32) as f64, (sh * hi[p] as f32) as f64);
                        let (sc, z) = ref_qparams(f, a, b);
                        let v = x[r * cols + c];
                        *e += (ref_qdq(f, v, QParams { scale: sc, zero: z }) - v as f64)
                            .abs()
                            .powf(norm);
                    }
                }
            }
        }
        (err, lo, hi)
    }

    #[test]
    fn mse_choice_is_the_brute_force_optimum() {
        let (rows, cols) = (24, 10);
        for (grid, max_shrink, norm) in [(100usize, 0.2f32, 2.4f32), (20, 0.8, 2.0)] {
            let kind = ObserverKind::Mse {
                grid,
                max_shrink,
                norm,
            };
            for s in STRATEGIES {
                for f in [
                    Format::Int {
                        bits: 4,
                        symmetric: true,
                    },
                    Format::Int {
                        bits: 4,
                        symmetric: false,
                    },
                    Format::Fp8E4M3,
                ] {
                    let batches: Vec<Vec<f32>> =
                        (0..3).map(|b| data(300 + b, rows, cols)).collect();
                    let mut o = ActivationObserver::new(kind, s, f, cols).unwrap();
                    for b in &batches {
                        o.update(Activations::F32(b), rows).unwrap();
                    }
                    let (lo, hi) = o.min_max().unwrap();
                    let (err, rl, rh) =
                        ref_mse_errors(&batches, rows, cols, s, f, grid, max_shrink, norm as f64);
                    let mut shrunk = 0;
                    for p in 0..err.len() {
                        let best = err[p].iter().cloned().fold(f64::INFINITY, f64::min);
                        // The chosen factor, recovered from the shrunk range.
                        let k = (0..err[p].len())
                            .find(|&k| {
                                let sh = shrink(k, grid);
                                (sh * rl[p] as f32, sh * rh[p] as f32) == (lo[p], hi[p])
                            })
                            .expect("range is a candidate");
                        assert!(
                            err[p][k] <= best * (1.0 + 1e-6),
                            "{s:?} {f:?} param {p}: chose {k} ({}) over the best {best}",
                            err[p][k]
                        );
                        // Equally good earlier candidate would have been kept.
                        assert!(err[p][..k].iter().all(|&e| e > err[p][k] * (1.0 - 1e-6)));
                        shrunk += (k > 0) as usize;
                    }
                    if f != Format::Fp8E4M3 {
                        assert!(shrunk > 0, "{s:?} {f:?}: the search never shrank");
                    }
                    let (sc, z) = o.qparams().unwrap();
                    for p in 0..sc.len() {
                        assert_eq!(
                            f.qparams(lo[p], hi[p]),
                            QParams {
                                scale: sc[p],
                                zero: z[p]
                            }
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn bad_input_is_a_clear_error_and_leaves_state_alone() {
        let cols = 4;
        let mut o =
            ActivationObserver::new(ObserverKind::MinMax, Strategy::Row, Format::Fp8E4M3, cols)
                .unwrap();
        assert!(o.qparams().unwrap_err().to_string().contains("no batch"));
        let x = [1.0f32, 2.0, 3.0, 4.0, 5.0, f32::NAN, 7.0, 8.0];
        let e = o.update(Activations::F32(&x), 2).unwrap_err().to_string();
        assert!(e.contains("row 1, column 1"), "{e}");
        assert_eq!(o.batches(), 0);
        o.update(Activations::F32(&x[..4]), 1).unwrap();
        let e = o
            .update(Activations::F32(&[1.0; 8]), 2)
            .unwrap_err()
            .to_string();
        assert!(e.contains("same rows"), "{e}");
        assert!(o.update(Activations::F32(&x[..3]), 1).is_err());
        assert!(o.update(Activations::F32(&[]), 0).is_err());
        let bad_kinds = [
            ObserverKind::MovingAverageMinMax {
                averaging_constant: 0.0,
            },
            ObserverKind::MovingAverageMinMax {
                averaging_constant: 1.5,
            },
            ObserverKind::Mse {
                grid: 0,
                max_shrink: 0.2,
                norm: 2.4,
            },
            ObserverKind::Mse {
                grid: 3,
                max_shrink: 0.2,
                norm: 2.4,
            },
            ObserverKind::Mse {
                grid: 100,
                max_shrink: 0.2,
                norm: f32::NAN,
            },
        ];
        for k in bad_kinds {
            assert!(
                ActivationObserver::new(k, Strategy::Tensor, Format::Fp8E4M3, 4).is_err(),
                "{k:?}"
            );
        }
        assert!(ActivationObserver::new(
            ObserverKind::MinMax,
            Strategy::Group(0),
            Format::Fp8E4M3,
            4
        )
        .is_err());
        assert!(ActivationObserver::new(
            ObserverKind::MinMax,
            Strategy::Tensor,
            Format::Int {
                bits: 9,
                symmetric: true
            },
            4
        )
        .is_err());
        let f = Format::Int {
            bits: 8,
            symmetric: false,
        };
        let y = [1.0f32; 8];
        let run = |s: &[f32], z: Option<&[i32]>| {
            fake_quantize(Activations::F32(&y), 2, 4, Strategy::Row, f, s, z)
                .unwrap_err()
                .to_string()
        };
        assert!(run(&[1.0], None).contains("expected 2"));
        assert!(run(&[1.0, 0.0], None).contains("scales[1]"));
        assert!(run(&[1.0, f32::NAN], None).contains("scales[1]"));
        assert!(run(&[1.0, 1.0], Some(&[0, 128][..])).contains("zero_points[1]"));
        let e = dynamic_token_fake_quantize(Activations::F32(&[1.0, f32::INFINITY]), 1, 2, f)
            .unwrap_err();
        assert!(e.to_string().contains("column 1"), "{e}");
    }
}
