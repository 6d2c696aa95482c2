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

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct QuantSpec {
    /// 2, 3, 4 or 8.
    pub bits: u8,
    pub symmetric: bool,
    pub observer: Observer,
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
        if let Observer::Mse {
            grid,
            max_shrink,
            norm,
        } = self.observer
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
    let (xmin, xmax) = values
        .iter()
        .fold((0.0f32, 0.0f32), |(lo, hi), &v| (lo.min(v), hi.max(v)));
    match spec.observer {
        Observer::MinMax => minmax_params(xmin, xmax, spec),
        Observer::Mse {
            grid,
            max_shrink,
            norm,
        } => {
            let (xmin, xmax) = reference_range(xmin, xmax, spec.symmetric);
            let search = MseSearch {
                grid,
                max_shrink,
                norm,
                maxq: spec.maxq(),
                symmetric: spec.symmetric,
                xmin,
                xmax,
            };
            search.run(values, minmax_params(xmin, xmax, spec))
        }
    }
}

/// The min-max grid from a group's minimum and maximum (`fit_group` with `Observer::MinMax`
/// when given the values' min and max; the range is widened to include 0 here).
#[inline]
pub fn minmax_params(xmin: f32, xmax: f32, spec: &QuantSpec) -> GroupParams {
    let (xmin, xmax) = reference_range(xmin, xmax, spec.symmetric);
    let maxq = spec.maxq();
    let scale = (xmax - xmin) / maxq as f32;
    let zero = if spec.symmetric {
        sym_zero(maxq)
    } else {
        (-xmin / scale).round_ties_even() as i32
    };
    GroupParams { scale, zero }
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
    xmin: f32,
    xmax: f32,
}

impl MseSearch {
    #[inline(never)]
    fn run(&self, values: &[f32], minmax: GroupParams) -> GroupParams {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                // SAFETY: the CPU supports the features the function is compiled for.
                return unsafe { self.run_avx2(values, minmax) };
            }
        }
        self.run_generic(values, minmax)
    }

    /// Same code built for AVX2 (inlined `round_ties_even`, 8-wide loops).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn run_avx2(&self, values: &[f32], minmax: GroupParams) -> GroupParams {
        self.run_generic(values, minmax)
    }

    #[inline(always)]
    fn run_generic(&self, values: &[f32], minmax: GroupParams) -> GroupParams {
        let maxq_f = self.maxq as f32;
        let steps = (self.max_shrink as f64 * self.grid as f64).floor() as usize;
        let mut best = f64::INFINITY;
        let mut best_params = minmax;
        for i in 0..steps {
            let p = (1.0 - i as f64 / self.grid as f64) as f32;
            let (lo, hi) = (p * self.xmin, p * self.xmax);
            let scale = (hi - lo) / maxq_f;
            let zero = if self.symmetric {
                sym_zero(self.maxq)
            } else {
                (-lo / scale).round_ties_even() as i32
            };
            let cand = GroupParams { scale, zero };
            let err = shrink_error(values, cand, self.maxq, self.norm);
            // Strict `<` keeps the first (widest) of equally good grids, as the reference does.
            if err < best {
                best = err;
                best_params = cand;
            }
        }
        best_params
    }
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
    /// Independent f64 transcription of the reference `find_params` + MSE search for one row.
    pub(crate) fn reference_params(
        x: &[f64],
        bits: u8,
        sym: bool,
        mse: Option<(usize, f64, f64)>,
    ) -> (f64, f64) {
        let maxq = ((1u32 << bits) - 1) as f64;
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
        let mut scale = (xmax - xmin) / maxq;
        let mut zero = if sym {
            (maxq + 1.0) / 2.0
        } else {
            (-xmin / scale).round_ties_even()
        };
        if let Some((grid, shrink, norm)) = mse {
            let mut best = f64::INFINITY;
            for i in 0..(shrink * grid as f64) as usize {
                let p = 1.0 - i as f64 / grid as f64;
                let (lo, hi) = (p * xmin, p * xmax);
                let s1 = (hi - lo) / maxq;
                let z1 = if sym {
                    (maxq + 1.0) / 2.0
                } else {
                    (-lo / s1).round_ties_even()
                };
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
                        let (rs, rz) =
                            reference_params(&x64, bits, sym, mse.then_some((100, 0.8, 2.4)));
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
