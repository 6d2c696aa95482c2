//! Per-row, per-group quantization grids: scales and integer zero points.
//!
//! Semantics follow the GPTQ reference `Quantizer`: the range always includes 0; symmetric
//! uses zero = (maxq+1)/2; an all-zero group gets the range [-1, 1].

use crate::error::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Observer {
    /// min/max of the group.
    MinMax,
    /// Shrink-grid search minimising Σ|q(x)-x|^norm (reference: grid 100, maxshrink 0.8, norm 2.4).
    Mse {
        grid: usize,
        max_shrink: f32,
        norm: f32,
    },
    /// The shrink-grid search minimising Σ_j h_j (q(x_j) - x_j)², `h_j` the diagonal of the
    /// layer's Hessian at column j: the diagonal part of GPTQ's loss `tr(ΔW H ΔWᵀ)`, so the
    /// grid is chosen for the error the layer's outputs see (llm-compressor's `imatrix_mse`
    /// weighs by E[x²] the same way). The GPTQ solver passes `h` when it fits a group; without
    /// weights (round-to-nearest) it is the unweighted squared error.
    HessianMse { grid: usize, max_shrink: f32 },
}

impl Observer {
    pub fn mse_default() -> Self {
        Observer::Mse {
            grid: 100,
            max_shrink: 0.8,
            norm: 2.4,
        }
    }
}

/// The dtype a checkpoint stores the scales in. Every scale is rounded to it as soon as it is
/// computed, before any code is chosen with it, so the solve (codes, GPTQ error propagation,
/// loss) uses exactly the scales the checkpoint will hold. `F32` changes nothing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ScaleDtype {
    #[default]
    F32,
    /// GPTQ checkpoints (fp16 `scales`).
    F16,
    /// compressed-tensors checkpoints of bf16 models.
    Bf16,
}

impl ScaleDtype {
    /// The names the bindings accept, as torch spells the dtypes.
    pub const CHOICES: [&'static str; 3] = ["float32", "float16", "bfloat16"];

    pub fn from_name(name: &str) -> Result<Self> {
        match name {
            "float32" => Ok(ScaleDtype::F32),
            "float16" => Ok(ScaleDtype::F16),
            "bfloat16" => Ok(ScaleDtype::Bf16),
            other => Err(Error::InvalidArgument(format!(
                "scale_dtype must be one of 'float32', 'float16', 'bfloat16' (the dtype the \
                 checkpoint stores scales in), got '{other}'"
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        Self::CHOICES[self as usize]
    }

    /// Smallest positive value of the dtype (a subnormal): what a positive scale that would
    /// round to 0 becomes, so that no code is ever chosen by dividing by zero.
    pub fn min_positive(self) -> f32 {
        match self {
            ScaleDtype::F32 => f32::from_bits(1),
            ScaleDtype::F16 => f16_bits_to_f32(1),
            ScaleDtype::Bf16 => bf16_bits_to_f32(1),
        }
    }

    /// `s` rounded to the nearest value of the dtype (ties to even, as torch's `.to(dtype)`),
    /// returned as f32 (exact). Overflow gives +inf ([`check_scales`] reports it); a positive
    /// `s` that would round to 0 gives [`Self::min_positive`].
    #[inline]
    pub fn round(self, s: f32) -> f32 {
        let r = match self {
            ScaleDtype::F32 => return s,
            ScaleDtype::F16 => f16_bits_to_f32(f32_to_f16_bits(s)),
            ScaleDtype::Bf16 => bf16_bits_to_f32(f32_to_bf16_bits(s)),
        };
        if r == 0.0 && s > 0.0 {
            self.min_positive()
        } else {
            r
        }
    }
}

/// f32 -> IEEE binary16 bits, round to nearest even; overflow -> inf, NaN stays NaN. Integer
/// operations only, so the CUDA kernels (which read 16-bit values as raw bits) can do the same.
#[inline]
pub fn f32_to_f16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    let sign = ((b >> 16) & 0x8000) as u16;
    let exp = ((b >> 23) & 0xff) as i32;
    let man = b & 0x7f_ffff;
    if exp == 0xff {
        return sign | 0x7c00 | if man != 0 { 0x200 } else { 0 };
    }
    // Exponent re-biased for binary16 (bias 15 instead of 127).
    let e = exp - 112;
    if e >= 31 {
        return sign | 0x7c00;
    }
    if e <= 0 {
        // Subnormal result (or 0): the value in units of 2^-24 is m * 2^(e - 14).
        if e < -10 {
            return sign;
        }
        let m = man | 0x80_0000;
        let shift = (14 - e) as u32;
        let (h, rem, half) = (m >> shift, m & ((1 << shift) - 1), 1u32 << (shift - 1));
        let up = (rem > half || (rem == half && h & 1 == 1)) as u32;
        // A carry into bit 10 gives the smallest normal, which is exactly right.
        return sign | (h + up) as u16;
    }
    let h = ((e as u32) << 10) | (man >> 13);
    let rem = man & 0x1fff;
    let up = (rem > 0x1000 || (rem == 0x1000 && h & 1 == 1)) as u32;
    // A carry out of the mantissa bumps the exponent; out of the top exponent it gives inf.
    sign | (h + up) as u16
}

/// IEEE binary16 bits -> f32 (exact).
#[inline]
pub fn f16_bits_to_f32(h: u16) -> f32 {
    let sign = ((h as u32) & 0x8000) << 16;
    let exp = ((h >> 10) & 0x1f) as u32;
    let man = (h & 0x3ff) as u32;
    let bits = match exp {
        0 => {
            // Subnormal: man * 2^-24, exact in f32.
            let v = man as f32 * f32::from_bits(0x3380_0000);
            return if sign != 0 { -v } else { v };
        }
        31 => sign | 0x7f80_0000 | (man << 13),
        _ => sign | ((exp + 112) << 23) | (man << 13),
    };
    f32::from_bits(bits)
}

/// f32 -> bfloat16 bits, round to nearest even (torch's rounding); NaN stays NaN.
#[inline]
pub fn f32_to_bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) | 0x40) as u16;
    }
    let lsb = (b >> 16) & 1;
    (b.wrapping_add(0x7fff + lsb) >> 16) as u16
}

/// bfloat16 bits -> f32 (exact).
#[inline]
pub fn bf16_bits_to_f32(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// Errors unless every scale (`[rows, n_groups]`) is finite: a scale beyond the storage
/// dtype's range became +inf when it was rounded, and the checkpoint could not hold it.
pub fn check_scales(scales: &[f32], n_groups: usize, dtype: ScaleDtype) -> Result<()> {
    if dtype == ScaleDtype::F32 {
        return Ok(());
    }
    let Some(i) = scales.iter().position(|s| !s.is_finite()) else {
        return Ok(());
    };
    let (row, group) = (i / n_groups.max(1), i % n_groups.max(1));
    let (max, hint) = match dtype {
        ScaleDtype::F16 => (
            "65504",
            "float16 scales cannot hold it: use a format that stores float32 or bfloat16 \
             scales (compressed-tensors), or clip the weight's outliers",
        ),
        _ => (
            "3.39e38",
            "bfloat16 scales cannot hold it: store float32 scales",
        ),
    };
    Err(Error::InvalidArgument(format!(
        "quantizer: the scale of output row {row}, group {group} exceeds the {} maximum {max} \
         (the weight's range there is too large); {hint}",
        dtype.name()
    )))
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct QuantSpec {
    /// 2, 3, 4 or 8.
    pub bits: u8,
    pub symmetric: bool,
    pub observer: Observer,
    /// Scales are rounded to this dtype as they are computed.
    pub scale_dtype: ScaleDtype,
}

impl QuantSpec {
    /// Error unless bits in {2,3,4,8} and observer parameters are sane.
    pub fn validate(&self) -> Result<()> {
        if !matches!(self.bits, 2 | 3 | 4 | 8) {
            return Err(Error::InvalidArgument(format!(
                "quantizer: bits must be 2, 3, 4 or 8, got {}",
                self.bits
            )));
        }
        let (grid, max_shrink, norm) = match self.observer {
            Observer::MinMax => return Ok(()),
            Observer::Mse {
                grid,
                max_shrink,
                norm,
            } => (grid, max_shrink, norm),
            Observer::HessianMse { grid, max_shrink } => (grid, max_shrink, 2.0),
        };
        {
            if grid == 0 {
                return Err(Error::InvalidArgument(
                    "quantizer: MSE observer grid must be > 0 (reference: 100)".into(),
                ));
            }
            if !(max_shrink > 0.0 && max_shrink <= 1.0) {
                return Err(Error::InvalidArgument(format!(
                    "quantizer: MSE observer max_shrink must be in (0, 1] (reference: 0.8), got {max_shrink}"
                )));
            }
            if !(norm > 0.0 && norm.is_finite()) {
                return Err(Error::InvalidArgument(format!(
                    "quantizer: MSE observer norm must be a finite value > 0 (reference: 2.4), got {norm}"
                )));
            }
        }
        Ok(())
    }
    pub fn maxq(&self) -> u32 {
        (1u32 << self.bits) - 1
    }
}

/// Grid of one group: `dequant(q) = scale * (q - zero)`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GroupParams {
    pub scale: f32,
    pub zero: i32,
}

/// Fit a grid to the values of one group of one row.
///
/// Exactly the reference `Quantizer.find_params` for one row: the range is widened to include
/// 0, made symmetric around 0 when `symmetric` and the minimum is negative, and an all-zero
/// group gets [-1, 1]. The MSE observer then tries the range shrunk by `p = 1 - i/grid` for
/// `i < floor(max_shrink * grid)` and keeps the first grid with the smallest Σ|q(x)-x|^norm.
/// Values are assumed finite (callers validate); an empty slice behaves like an all-zero group.
#[inline]
pub fn fit_group(values: &[f32], spec: &QuantSpec) -> GroupParams {
    fit_group_weighted(values, None, spec)
}

/// [`fit_group`] with per-value weights for [`Observer::HessianMse`] (`weights[j]` belongs to
/// `values[j]`; ignored by the other observers).
#[inline]
pub fn fit_group_weighted(
    values: &[f32],
    weights: Option<&[f32]>,
    spec: &QuantSpec,
) -> GroupParams {
    let (xmin, xmax) = values
        .iter()
        .fold((0.0f32, 0.0f32), |(lo, hi), &v| (lo.min(v), hi.max(v)));
    let (grid, max_shrink, norm, weights) = match spec.observer {
        Observer::MinMax => return minmax_params(xmin, xmax, spec),
        Observer::Mse {
            grid,
            max_shrink,
            norm,
        } => (grid, max_shrink, norm, None),
        Observer::HessianMse { grid, max_shrink } => (grid, max_shrink, 2.0, weights),
    };
    let (xmin, xmax) = reference_range(xmin, xmax, spec.symmetric);
    let minmax = minmax_params(xmin, xmax, spec);
    if !minmax.scale.is_finite() {
        // The full range overflows the storage dtype: reported by `check_scales`
        // rather than hidden behind a shrunken grid.
        return minmax;
    }
    let search = MseSearch {
        grid,
        max_shrink,
        norm,
        maxq: spec.maxq(),
        symmetric: spec.symmetric,
        scale_dtype: spec.scale_dtype,
        xmin,
        xmax,
    };
    search.run(values, weights, minmax)
}

/// The min-max grid from a group's minimum and maximum (`fit_group` with `Observer::MinMax`
/// when given the values' min and max; the range is widened to include 0 here).
#[inline]
pub fn minmax_params(xmin: f32, xmax: f32, spec: &QuantSpec) -> GroupParams {
    let (xmin, xmax) = reference_range(xmin, xmax, spec.symmetric);
    let maxq = spec.maxq();
    let scale = spec.scale_dtype.round((xmax - xmin) / maxq as f32);
    let zero = grid_zero(xmin, scale, maxq, spec.symmetric, spec.scale_dtype);
    GroupParams { scale, zero }
}

/// The zero point of a grid with (already rounded) `scale` whose range starts at `xmin <= 0`.
/// A rounded scale may sit below the exact one; then `-xmin / scale` can pass maxq (by less
/// than 0.5 for normal scales, more for subnormal ones), so the zero is clamped into the grid.
#[inline]
fn grid_zero(xmin: f32, scale: f32, maxq: u32, symmetric: bool, dtype: ScaleDtype) -> i32 {
    if symmetric {
        return sym_zero(maxq);
    }
    let z = (-xmin / scale).round_ties_even() as i32;
    if dtype == ScaleDtype::F32 {
        z
    } else {
        z.clamp(0, maxq as i32)
    }
}

/// The reference's range: include 0, symmetric around 0 when asked and the minimum is
/// negative, [-1, 1] for an all-zero group.
#[inline]
fn reference_range(xmin: f32, xmax: f32, symmetric: bool) -> (f32, f32) {
    let (mut xmin, mut xmax) = (xmin.min(0.0), xmax.max(0.0));
    if symmetric {
        xmax = xmax.max(xmin.abs());
        if xmin < 0.0 {
            xmin = -xmax;
        }
    }
    if xmin == 0.0 && xmax == 0.0 {
        (-1.0, 1.0)
    } else {
        (xmin, xmax)
    }
}

/// Reference: zero = (maxq + 1) / 2 for symmetric grids.
#[inline]
fn sym_zero(maxq: u32) -> i32 {
    maxq.div_ceil(2) as i32
}

/// The MSE shrink-grid search of one group, starting from the min-max range.
struct MseSearch {
    grid: usize,
    max_shrink: f32,
    norm: f32,
    maxq: u32,
    symmetric: bool,
    scale_dtype: ScaleDtype,
    xmin: f32,
    xmax: f32,
}

impl MseSearch {
    #[inline(never)]
    fn run(&self, values: &[f32], weights: Option<&[f32]>, minmax: GroupParams) -> GroupParams {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                // SAFETY: the CPU supports the features the function is compiled for.
                return unsafe { self.run_avx2(values, weights, minmax) };
            }
        }
        self.run_generic(values, weights, minmax)
    }

    /// Same code built for AVX2 (inlined `round_ties_even`, 8-wide loops).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn run_avx2(
        &self,
        values: &[f32],
        weights: Option<&[f32]>,
        minmax: GroupParams,
    ) -> GroupParams {
        self.run_generic(values, weights, minmax)
    }

    #[inline(always)]
    fn run_generic(
        &self,
        values: &[f32],
        weights: Option<&[f32]>,
        minmax: GroupParams,
    ) -> GroupParams {
        let maxq_f = self.maxq as f32;
        let steps = (self.max_shrink as f64 * self.grid as f64).floor() as usize;
        let mut best = f64::INFINITY;
        let mut best_params = minmax;
        for i in 0..steps {
            let p = (1.0 - i as f64 / self.grid as f64) as f32;
            let (lo, hi) = (p * self.xmin, p * self.xmax);
            // Candidates are storage-dtype grids too: the one kept is representable.
            let scale = self.scale_dtype.round((hi - lo) / maxq_f);
            let zero = grid_zero(lo, scale, self.maxq, self.symmetric, self.scale_dtype);
            let cand = GroupParams { scale, zero };
            let err = match weights {
                Some(h) => weighted_shrink_error(values, h, cand, self.maxq),
                None => shrink_error(values, cand, self.maxq, self.norm),
            };
            // Strict `<` keeps the first (widest) of equally good grids, as the reference does.
            if err < best {
                best = err;
                best_params = cand;
            }
        }
        best_params
    }
}

/// Σ h_j (dequant(quant(x_j)) - x_j)² for one candidate grid (f64 sum).
#[inline(always)]
fn weighted_shrink_error(values: &[f32], weights: &[f32], p: GroupParams, maxq: u32) -> f64 {
    let mut err = 0.0f64;
    for (&x, &h) in values.iter().zip(weights) {
        let d = dequantize_code(quantize_code(x, p, maxq), p) - x;
        err += (h * d * d) as f64;
    }
    err
}

/// Σ |dequant(quant(x)) - x|^norm for one candidate grid (f64 sum; fast path for norm 2).
#[inline(always)]
fn shrink_error(values: &[f32], p: GroupParams, maxq: u32, norm: f32) -> f64 {
    let mut err = 0.0f64;
    if norm == 2.0 {
        for &x in values {
            let d = dequantize_code(quantize_code(x, p, maxq), p) - x;
            err += (d * d) as f64;
        }
    } else {
        for &x in values {
            let d = (dequantize_code(quantize_code(x, p, maxq), p) - x).abs();
            err += d.powf(norm) as f64;
        }
    }
    err
}

/// `clamp(round(x / scale) + zero, 0, maxq)` (round half to even, as torch.round).
#[inline]
pub fn quantize_code(x: f32, p: GroupParams, maxq: u32) -> u8 {
    // Division (not a multiply by 1/scale) so ties land exactly where torch's do.
    let q = (x / p.scale).round_ties_even() + p.zero as f32;
    // `as u8` saturates and maps NaN to 0; the clamp keeps the code in [0, maxq].
    q.clamp(0.0, maxq as f32) as u8
}

#[inline]
pub fn dequantize_code(q: u8, p: GroupParams) -> f32 {
    p.scale * (q as i32 - p.zero) as f32
}

/// The reference `find_params` (+ MSE grid search) in f64, written independently of the code
/// above; the solver's tests use it too.
#[cfg(test)]
pub(crate) mod reference {
    use super::ScaleDtype;

    /// A scale rounded to the storage dtype by the `half` crate (independent of the bit code
    /// above), straight from f64; positive scales that round to 0 get the smallest subnormal.
    pub(crate) fn reference_round(s: f64, dtype: ScaleDtype) -> f64 {
        let r = match dtype {
            ScaleDtype::F32 => return s,
            ScaleDtype::F16 => half::f16::from_f64(s).to_f64(),
            ScaleDtype::Bf16 => half::bf16::from_f64(s).to_f64(),
        };
        if r == 0.0 && s > 0.0 {
            match dtype {
                ScaleDtype::F16 => half::f16::from_bits(1).to_f64(),
                _ => half::bf16::from_bits(1).to_f64(),
            }
        } else {
            r
        }
    }

    /// Independent f64 transcription of the reference `find_params` + MSE search for one row,
    /// with every scale rounded to `dtype` before its zero point and codes are derived.
    pub(crate) fn reference_params(
        x: &[f64],
        bits: u8,
        sym: bool,
        mse: Option<(usize, f64, f64)>,
        dtype: ScaleDtype,
    ) -> (f64, f64) {
        let maxq = ((1u32 << bits) - 1) as f64;
        let zero_of = |lo: f64, s: f64| {
            if sym {
                (maxq + 1.0) / 2.0
            } else if dtype == ScaleDtype::F32 {
                (-lo / s).round_ties_even()
            } else {
                (-lo / s).round_ties_even().clamp(0.0, maxq)
            }
        };
        let mut xmin = x.iter().cloned().fold(f64::INFINITY, f64::min).min(0.0);
        let mut xmax = x.iter().cloned().fold(f64::NEG_INFINITY, f64::max).max(0.0);
        if sym {
            xmax = xmax.max(xmin.abs());
            if xmin < 0.0 {
                xmin = -xmax;
            }
        }
        if xmin == 0.0 && xmax == 0.0 {
            xmin = -1.0;
            xmax = 1.0;
        }
        let mut scale = reference_round((xmax - xmin) / maxq, dtype);
        let mut zero = zero_of(xmin, scale);
        if let Some((grid, shrink, norm)) = mse {
            let mut best = f64::INFINITY;
            for i in 0..(shrink * grid as f64) as usize {
                let p = 1.0 - i as f64 / grid as f64;
                let (lo, hi) = (p * xmin, p * xmax);
                let s1 = reference_round((hi - lo) / maxq, dtype);
                let z1 = zero_of(lo, s1);
                let err: f64 = x
                    .iter()
                    .map(|&v| {
                        let q = ((v / s1).round_ties_even() + z1).clamp(0.0, maxq);
                        (s1 * (q - z1) - v).abs().powf(norm)
                    })
                    .sum();
                if err < best {
                    best = err;
                    scale = s1;
                    zero = z1;
                }
            }
        }
        (scale, zero)
    }
}

#[cfg(test)]
mod tests {
    use super::reference::reference_params;
    use super::*;

    fn spec(bits: u8, symmetric: bool, observer: Observer) -> QuantSpec {
        QuantSpec {
            bits,
            symmetric,
            observer,
            scale_dtype: ScaleDtype::F32,
        }
    }

    /// The Hessian-weighted search keeps the candidate with the least Σ h (q(x) - x)² (checked
    /// against an exhaustive pass over the same candidates), equals the squared-error search
    /// under uniform weights, and without weights is that search.
    #[test]
    fn hessian_mse_minimises_the_weighted_error() {
        let mut seed = 11u64;
        for sym in [true, false] {
            for trial in 0..20 {
                let x: Vec<f32> = (0..32).map(|_| lcg(&mut seed)).collect();
                let h: Vec<f32> = (0..32).map(|_| (3.0 * lcg(&mut seed)).exp()).collect();
                let hm = spec(
                    3,
                    sym,
                    Observer::HessianMse {
                        grid: 100,
                        max_shrink: 0.8,
                    },
                );
                let got = fit_group_weighted(&x, Some(&h), &hm);
                let err = |p: GroupParams| -> f64 {
                    x.iter()
                        .zip(&h)
                        .map(|(&v, &w)| {
                            let d = dequantize_code(quantize_code(v, p, 7), p) - v;
                            (w * d * d) as f64
                        })
                        .sum()
                };
                let (lo, hi) = reference_range(
                    x.iter().cloned().fold(0.0, f32::min),
                    x.iter().cloned().fold(0.0, f32::max),
                    sym,
                );
                let mut best = f64::INFINITY;
                for i in 0..80 {
                    let p = (1.0 - i as f64 / 100.0) as f32;
                    let cand = minmax_params(p * lo, p * hi, &hm);
                    best = best.min(err(cand));
                }
                assert_eq!(err(got), best, "trial {trial}");
                let ones = vec![1.0f32; 32];
                let mse2 = spec(
                    3,
                    sym,
                    Observer::Mse {
                        grid: 100,
                        max_shrink: 0.8,
                        norm: 2.0,
                    },
                );
                assert_eq!(
                    fit_group_weighted(&x, Some(&ones), &hm),
                    fit_group(&x, &mse2)
                );
                assert_eq!(fit_group(&x, &hm), fit_group(&x, &mse2));
            }
        }
    }

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    #[test]
    fn minmax_hand_examples() {
        let x = [-1.0f32, 0.5, 2.0];
        // asym 4-bit: range [-1, 2], scale 3/15, zero round(1/0.2) = 5.
        let p = fit_group(&x, &spec(4, false, Observer::MinMax));
        assert_eq!(
            p,
            GroupParams {
                scale: 3.0 / 15.0,
                zero: 5
            }
        );
        // sym 4-bit: xmax = 2, xmin = -2, scale 4/15, zero 8.
        let p = fit_group(&x, &spec(4, true, Observer::MinMax));
        assert_eq!(
            p,
            GroupParams {
                scale: 4.0 / 15.0,
                zero: 8
            }
        );
        // Positive-only group: range [0, 1], zero 0 (asym); sym keeps xmin = 0 (reference quirk).
        let p = fit_group(&[0.5, 1.0], &spec(2, false, Observer::MinMax));
        assert_eq!(
            p,
            GroupParams {
                scale: 1.0 / 3.0,
                zero: 0
            }
        );
        let p = fit_group(&[0.5, 1.0], &spec(2, true, Observer::MinMax));
        assert_eq!(
            p,
            GroupParams {
                scale: 1.0 / 3.0,
                zero: 2
            }
        );
        // All-zero group gets [-1, 1]. 8-bit: scale = f32(2/255) is a hair above 2/255, so
        // 1/scale = 127.49999 in f32 and the zero is 127, as torch computes it in f32.
        let p = fit_group(&[0.0; 4], &spec(8, false, Observer::MinMax));
        assert_eq!(
            p,
            GroupParams {
                scale: 2.0 / 255.0,
                zero: 127
            }
        );
        // 2-bit asym: 1/(2/3) = 1.5 exactly representable -> half to even gives 2.
        let p = fit_group(&[0.0; 4], &spec(2, false, Observer::MinMax));
        assert_eq!(
            p,
            GroupParams {
                scale: 2.0 / 3.0,
                zero: 2
            }
        );
        let p = fit_group(&[0.0; 4], &spec(3, true, Observer::MinMax));
        assert_eq!(
            p,
            GroupParams {
                scale: 2.0 / 7.0,
                zero: 4
            }
        );
    }

    #[test]
    fn rounding_is_half_to_even_and_clamped() {
        let p = GroupParams {
            scale: 0.5,
            zero: 3,
        };
        assert_eq!(quantize_code(1.25, p, 15), 2 + 3); // 2.5 -> 2
        assert_eq!(quantize_code(1.75, p, 15), 4 + 3); // 3.5 -> 4
        assert_eq!(quantize_code(-0.25, p, 15), 3); // -0.5 -> -0
        assert_eq!(quantize_code(-0.75, p, 15), 1); // -1.5 -> -2
        assert_eq!(quantize_code(100.0, p, 15), 15);
        assert_eq!(quantize_code(-100.0, p, 15), 0);
        assert_eq!(quantize_code(100.0, p, 255), 203);
        assert_eq!(dequantize_code(7, p), 2.0);
        assert_eq!(dequantize_code(0, p), -1.5);
    }

    #[test]
    fn fits_match_f64_reference_and_codes_stay_in_range() {
        let mut seed = 7u64;
        for &bits in &[2u8, 3, 4, 8] {
            for &sym in &[false, true] {
                for &mse in &[false, true] {
                    for trial in 0..20 {
                        let n = 1 + trial * 7;
                        // Skewed, outlier-bearing data so sym/asym and the shrink search matter.
                        let x: Vec<f32> = (0..n)
                            .map(|i| {
                                let v = lcg(&mut seed);
                                if i == 3 {
                                    8.0 * v
                                } else {
                                    v + 0.3 * (trial % 3) as f32
                                }
                            })
                            .collect();
                        let obs = if mse {
                            Observer::mse_default()
                        } else {
                            Observer::MinMax
                        };
                        let s = spec(bits, sym, obs);
                        let p = fit_group(&x, &s);
                        let x64: Vec<f64> = x.iter().map(|&v| v as f64).collect();
                        let (rs, rz) = reference_params(
                            &x64,
                            bits,
                            sym,
                            mse.then_some((100, 0.8, 2.4)),
                            ScaleDtype::F32,
                        );
                        assert!(
                            ((p.scale as f64 - rs) / rs).abs() < 1e-5,
                            "bits {bits} sym {sym} mse {mse} n {n}: scale {} vs {rs}",
                            p.scale
                        );
                        assert_eq!(p.zero as f64, rz, "bits {bits} sym {sym} mse {mse} n {n}");
                        assert!(p.zero >= 0 && p.zero as u32 <= s.maxq());
                        for &v in &x {
                            assert!((quantize_code(v, p, s.maxq()) as u32) <= s.maxq());
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn mse_never_worse_than_minmax_and_shrinks_outliers() {
        let mut seed = 11u64;
        let mut x: Vec<f32> = (0..128).map(|_| lcg(&mut seed)).collect();
        x[17] = 4.0; // one outlier: min-max spends much of the grid on it
        for &bits in &[2u8, 3, 4] {
            for &sym in &[false, true] {
                let mm = fit_group(&x, &spec(bits, sym, Observer::MinMax));
                let ms = fit_group(&x, &spec(bits, sym, Observer::mse_default()));
                let e_mm = shrink_error(&x, mm, (1 << bits) - 1, 2.4);
                let e_ms = shrink_error(&x, ms, (1 << bits) - 1, 2.4);
                assert!(e_ms <= e_mm, "bits {bits} sym {sym}: {e_ms} > {e_mm}");
                if bits >= 3 {
                    assert!(ms.scale < mm.scale, "bits {bits} sym {sym}: no shrink");
                }
            }
        }
    }

    #[test]
    fn f16_and_bf16_rounding_match_the_half_crate() {
        // Every 16-bit pattern converts back exactly.
        for h in 0..=u16::MAX {
            let a = f16_bits_to_f32(h);
            let b = half::f16::from_bits(h).to_f32();
            assert!(
                a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()),
                "f16 {h:#x}"
            );
            assert_eq!(bf16_bits_to_f32(h).to_bits(), (h as u32) << 16);
        }
        let check = |x: f32| {
            let (a, b) = (f32_to_f16_bits(x), half::f16::from_f32(x).to_bits());
            let nan = x.is_nan() && a & 0x7c00 == 0x7c00 && a & 0x3ff != 0;
            assert!(
                a == b || nan,
                "f16({x:e} = {:#x}): {a:#x} vs {b:#x}",
                x.to_bits()
            );
            let (a, b) = (f32_to_bf16_bits(x), half::bf16::from_f32(x).to_bits());
            let nan = x.is_nan() && a & 0x7f80 == 0x7f80 && a & 0x7f != 0;
            assert!(
                a == b || nan,
                "bf16({x:e} = {:#x}): {a:#x} vs {b:#x}",
                x.to_bits()
            );
        };
        // Around every rounding boundary (the exact midpoints, where ties go to even, and their
        // f32 neighbours), then a stride through all f32 bit patterns.
        for h in 0..=u16::MAX {
            let lo = f16_bits_to_f32(h);
            if lo.is_finite() {
                let hi = f16_bits_to_f32(h.wrapping_add(1));
                let mid = ((lo as f64 + hi as f64) / 2.0) as f32;
                for d in [-1i32, 0, 1] {
                    check(f32::from_bits(mid.to_bits().wrapping_add_signed(d)));
                }
            }
            let mid = ((h as u32) << 16) | 0x8000;
            for d in [-1i32, 0, 1] {
                check(f32::from_bits(mid.wrapping_add_signed(d)));
            }
        }
        for b in (0..=u32::MAX).step_by(997) {
            check(f32::from_bits(b));
        }
    }

    #[test]
    fn scale_rounding_edge_cases() {
        // Positive scales never round to 0 (codes are chosen by dividing by the scale).
        for (d, tiny) in [
            (ScaleDtype::F16, 2.9e-8f32),
            (ScaleDtype::F16, 1e-30),
            (ScaleDtype::F16, f32::from_bits(1)),
            (ScaleDtype::Bf16, f32::from_bits(0x8000)),
            (ScaleDtype::Bf16, f32::from_bits(1)),
        ] {
            assert_eq!(d.round(tiny), d.min_positive(), "{d:?} {tiny:e}");
        }
        for d in [ScaleDtype::F16, ScaleDtype::Bf16] {
            assert!(d.min_positive() > 0.0);
            assert_eq!(d.round(0.1), d.round(d.round(0.1)));
        }
        assert_eq!(ScaleDtype::F16.min_positive(), 2f32.powi(-24));
        assert_eq!(ScaleDtype::Bf16.min_positive(), 2f32.powi(-133));
        assert_eq!(ScaleDtype::F16.round(65504.0), 65504.0);
        assert_eq!(ScaleDtype::F16.round(65519.0), 65504.0);
        assert_eq!(ScaleDtype::F16.round(65520.0), f32::INFINITY);
        assert_eq!(ScaleDtype::Bf16.round(f32::MAX), f32::INFINITY);
        // float32 leaves every value alone.
        for x in [0.1f32, 1e-40, 7e4, 3.0e38] {
            assert_eq!(ScaleDtype::F32.round(x).to_bits(), x.to_bits());
        }
        for name in ScaleDtype::CHOICES {
            assert_eq!(ScaleDtype::from_name(name).unwrap().name(), name);
        }
        let e = ScaleDtype::from_name("half").unwrap_err().to_string();
        assert!(
            e.contains("'float32', 'float16', 'bfloat16'") && e.contains("half"),
            "{e}"
        );
    }

    #[test]
    fn rounded_grids_match_reference_and_are_representable() {
        use super::reference::reference_round;
        let mut seed = 5u64;
        for dtype in [ScaleDtype::F16, ScaleDtype::Bf16] {
            let repr = |s: f32| match dtype {
                ScaleDtype::F16 => half::f16::from_f32(s).to_f32() == s,
                _ => half::bf16::from_f32(s).to_f32() == s,
            };
            for &bits in &[2u8, 3, 4, 8] {
                for &sym in &[false, true] {
                    for &mse in &[false, true] {
                        for trial in 0..12 {
                            let n = 1 + trial * 9;
                            // Magnitudes from f16-subnormal scales up to large ones.
                            let mag = 10f32.powi(trial - 8);
                            let x: Vec<f32> = (0..n)
                                .map(|i| {
                                    let v = lcg(&mut seed);
                                    mag * if i == 2 { 6.0 * v } else { v + 0.2 }
                                })
                                .collect();
                            let obs = if mse {
                                Observer::mse_default()
                            } else {
                                Observer::MinMax
                            };
                            let s = QuantSpec {
                                scale_dtype: dtype,
                                ..spec(bits, sym, obs)
                            };
                            let p = fit_group(&x, &s);
                            let label = format!("{dtype:?} bits {bits} sym {sym} mse {mse} n {n}");
                            assert!(p.scale > 0.0 && p.scale.is_finite(), "{label}");
                            assert!(repr(p.scale), "{label}: {} not representable", p.scale);
                            assert!(p.zero >= 0 && p.zero as u32 <= s.maxq(), "{label}");
                            let x64: Vec<f64> = x.iter().map(|&v| v as f64).collect();
                            let (rs, rz) = reference_params(
                                &x64,
                                bits,
                                sym,
                                mse.then_some((100, 0.8, 2.4)),
                                dtype,
                            );
                            assert_eq!(p.scale as f64, rs, "{label}");
                            assert_eq!(p.zero as f64, rz, "{label}");
                            assert_eq!(reference_round(rs, dtype), rs);
                            for &v in &x {
                                let c = quantize_code(v, p, s.maxq()) as f64;
                                let expect = ((v as f64 / p.scale as f64).round_ties_even()
                                    + p.zero as f64)
                                    .clamp(0.0, s.maxq() as f64);
                                // f32 division vs f64 division may differ at an exact tie only.
                                let ratio = v as f64 / p.scale as f64;
                                let tie = (ratio - ratio.floor() - 0.5).abs() < 1e-6;
                                assert!(c == expect || tie, "{label}: code of {v}");
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn overflowing_scales_are_reported() {
        let x = [-3.0e6f32, 1.0, 2.0e6];
        for obs in [Observer::MinMax, Observer::mse_default()] {
            let s = QuantSpec {
                scale_dtype: ScaleDtype::F16,
                ..spec(4, false, obs)
            };
            let p = fit_group(&x, &s);
            assert!(p.scale.is_infinite(), "{obs:?}: {}", p.scale);
            let e = check_scales(&[1.0, 2.0, 3.0, p.scale], 2, ScaleDtype::F16)
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("row 1, group 1")
                    && e.contains("float16")
                    && e.contains("65504")
                    && e.contains("compressed-tensors"),
                "{e}"
            );
            // float32 / bfloat16 hold it.
            for d in [ScaleDtype::F32, ScaleDtype::Bf16] {
                let p = fit_group(
                    &x,
                    &QuantSpec {
                        scale_dtype: d,
                        ..s
                    },
                );
                assert!(p.scale.is_finite());
                assert!(check_scales(&[p.scale], 1, d).is_ok());
            }
        }
        assert!(check_scales(&[f32::INFINITY], 1, ScaleDtype::F32).is_ok());
    }

    #[test]
    fn validate_rejects_bad_specs() {
        for bits in [2u8, 3, 4, 8] {
            assert!(spec(bits, true, Observer::mse_default()).validate().is_ok());
        }
        for bits in [0u8, 1, 5, 6, 7, 9, 16] {
            let e = spec(bits, true, Observer::MinMax)
                .validate()
                .unwrap_err()
                .to_string();
            assert!(e.contains("bits"), "{e}");
        }
        let bad = [
            Observer::Mse {
                grid: 0,
                max_shrink: 0.8,
                norm: 2.4,
            },
            Observer::Mse {
                grid: 100,
                max_shrink: 0.0,
                norm: 2.4,
            },
            Observer::Mse {
                grid: 100,
                max_shrink: 1.5,
                norm: 2.4,
            },
            Observer::Mse {
                grid: 100,
                max_shrink: f32::NAN,
                norm: 2.4,
            },
            Observer::Mse {
                grid: 100,
                max_shrink: 0.8,
                norm: 0.0,
            },
            Observer::Mse {
                grid: 100,
                max_shrink: 0.8,
                norm: f32::INFINITY,
            },
        ];
        for o in bad {
            assert!(spec(4, false, o).validate().is_err(), "{o:?} accepted");
        }
        assert!(spec(
            4,
            false,
            Observer::Mse {
                grid: 100,
                max_shrink: 1.0,
                norm: 2.0
            }
        )
        .validate()
        .is_ok());
    }
}
