//! Host-side decisions shared by the CUDA path ([`super::device`]) and its CPU model
//! ([`super::model`]): argument checks, processing order, dead inputs, the batch partition,
//! the damping escalation loop and the error messages. Keeping them here means the model tests
//! exercise exactly the code the GPU path runs on the host, and the errors read like the CPU
//! solver's (`gptq.rs` / `linalg.rs`), word for word where the same condition is detected.

use crate::error::{Error, Result};
use crate::gptq::GptqOptions;
use crate::linalg::DampingPolicy;
use crate::quantizer::{Observer, QuantSpec};

/// Widest batch the block kernel handles: one warp per row, 32 lanes x 4 registers.
pub const MAX_BATCH: usize = 128;
/// Lanes cooperating on one row (a warp).
pub const WARP: usize = 32;
/// Registers per lane holding the batch's columns (`MAX_BATCH / WARP`).
pub const REGS: usize = MAX_BATCH / WARP;

/// How scale grids are chosen (the CPU solver's private `Grid`, mirrored).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GroupMode {
    /// One grid per row, fitted up front on the whole (dead-zeroed) row.
    PerChannel,
    /// A grid fitted when processing position `p % g == 0`, on the reference state.
    Dynamic(usize),
    /// Grids fitted up front per contiguous ORIGINAL group (act-order + static groups).
    Static(usize),
}

impl GroupMode {
    pub fn n_groups(self, cols: usize) -> usize {
        match self {
            GroupMode::PerChannel => 1,
            GroupMode::Dynamic(g) | GroupMode::Static(g) => cols.div_ceil(g),
        }
    }
    /// Width of the up-front groups (`cols` for per-channel); `None` for dynamic groups.
    pub fn upfront_width(self, cols: usize) -> Option<usize> {
        match self {
            GroupMode::PerChannel => Some(cols),
            GroupMode::Static(g) => Some(g),
            GroupMode::Dynamic(_) => None,
        }
    }
    /// Kernel encoding: 0 per-channel, 1 dynamic, 2 static; and the group width.
    pub fn kernel_code(self, cols: usize) -> (i32, usize) {
        match self {
            GroupMode::PerChannel => (0, cols),
            GroupMode::Dynamic(g) => (1, g),
            GroupMode::Static(g) => (2, g),
        }
    }
}

/// The checks `gptq::gptq_quantize` makes before touching data, in the same order and with the
/// same messages, plus the one limitation of the CUDA path (MSE observer).
pub fn check_options(rows: usize, cols: usize, opts: &GptqOptions) -> Result<GroupMode> {
    opts.spec.validate()?;
    if rows == 0 || cols == 0 {
        return Err(Error::InvalidArgument(format!(
            "gptq: weight must have at least one row and one column, got {rows}x{cols}"
        )));
    }
    if rows.checked_mul(cols).is_none() || cols.checked_mul(cols).is_none() {
        return Err(Error::InvalidArgument(format!(
            "gptq: weight shape {rows}x{cols} overflows"
        )));
    }
    let mode = match opts.group_size {
        None => GroupMode::PerChannel,
        Some(0) => {
            return Err(Error::InvalidArgument(
                "gptq: group_size must be > 0 (use None / -1 for one group per output row)".into(),
            ))
        }
        Some(g) if opts.static_groups => GroupMode::Static(g),
        Some(g) => GroupMode::Dynamic(g),
    };
    if opts.block_size == 0 {
        return Err(Error::InvalidArgument(
            "gptq: block_size must be > 0 (default 128)".into(),
        ));
    }
    opts.damping.validate()?;
    check_observer(&opts.spec)?;
    // Kernel indices are 32-bit.
    if rows > i32::MAX as usize || cols > i32::MAX as usize {
        return Err(Error::InvalidArgument(format!(
            "gptq (cuda): weight shape {rows}x{cols} exceeds the kernels' 32-bit indices"
        )));
    }
    Ok(mode)
}

/// The CUDA kernels fit min-max grids only.
pub fn check_observer(spec: &QuantSpec) -> Result<()> {
    match spec.observer {
        Observer::MinMax => Ok(()),
        Observer::Mse { .. } => Err(Error::InvalidArgument(
            "gptq (cuda): the MSE observer is not implemented on the CUDA path yet; use \
             observer='minmax' or device='cpu'"
                .into(),
        )),
    }
}

/// `gptq.rs`'s non-finite weight / Hessian message (`what` = "weight" or "hessian").
pub fn non_finite(what: &str, value: f32, row: usize, col: usize) -> Error {
    let kind = if value.is_nan() { "NaN" } else { "Inf" };
    Error::NonFinite(format!(
        "gptq: {what} contains {kind} at row {row}, column {col}; fix the {what} before quantizing"
    ))
}

/// `hessian.rs`'s message for a non-finite activation in a batch.
pub fn non_finite_activation(batch: u64, dtype: &str, row: usize, col: usize) -> Error {
    Error::NonFinite(format!(
        "Hessian batch {batch} ({dtype}): non-finite activation (NaN or Inf) at token row {row}, \
         input feature {col}; the layer's input overflowed or is NaN"
    ))
}

/// Processing order: identity, or descending diag(H) (stable), dead inputs counted as 1 --
/// exactly `gptq_quantize`'s sort.
pub fn processing_order(diag: &[f32], act_order: bool) -> Vec<usize> {
    let mut order: Vec<usize> = (0..diag.len()).collect();
    if act_order {
        let key: Vec<f32> = diag
            .iter()
            .map(|&d| if d == 0.0 { 1.0 } else { d })
            .collect();
        order.sort_by(|&a, &b| key[b].total_cmp(&key[a]));
    }
    order
}

/// Dead flags by processing position (zero diagonal), `linalg`'s error when all are dead.
pub fn dead_positions(diag: &[f32], order: &[usize]) -> Result<Vec<bool>> {
    let n = diag.len();
    let dead: Vec<bool> = order.iter().map(|&c| diag[c] == 0.0).collect();
    if dead.iter().all(|&d| d) {
        return Err(Error::InvalidArgument(format!(
            "no calibration signal: every input column of the Hessian is zero — did any \
             calibration token reach this layer? (n = {n})"
        )));
    }
    Ok(dead)
}

/// mean(diag H) after dead inputs got 1, summed in f64 in processing order (as `linalg` does).
pub fn mean_diag(diag: &[f32], order: &[usize], dead: &[bool]) -> f32 {
    let n = order.len();
    (order
        .iter()
        .zip(dead)
        .map(|(&c, &d)| if d { 1.0 } else { diag[c] as f64 })
        .sum::<f64>()
        / n as f64) as f32
}

/// The column batches `[i1, i2)` the block kernel runs, at most `min(block_size, 128)` wide.
/// With dynamic groups every group either lies inside one batch (g <= width: batches of a whole
/// number of groups) or starts a batch (g > width: each group split into batches), so a grid is
/// always fitted on exact reference state: columns inside the batch carry every update so far,
/// and columns past the batch have received every earlier batch's GEMM.
pub fn batches(cols: usize, mode: GroupMode, block_size: usize) -> Vec<(usize, usize)> {
    let width = block_size.clamp(1, MAX_BATCH);
    let mut out = Vec::new();
    match mode {
        GroupMode::Dynamic(g) if g <= width => {
            let w = g * (width / g);
            out.extend((0..cols).step_by(w).map(|i1| (i1, (i1 + w).min(cols))));
        }
        GroupMode::Dynamic(g) => {
            for s in (0..cols).step_by(g) {
                let e = (s + g).min(cols);
                out.extend((s..e).step_by(width).map(|i1| (i1, (i1 + width).min(e))));
            }
        }
        _ => out.extend(
            (0..cols)
                .step_by(width)
                .map(|i1| (i1, (i1 + width).min(cols))),
        ),
    }
    out
}

/// Group index of every original column (as `gptq_quantize` reports it).
pub fn g_idx(cols: usize, mode: GroupMode, order: &[usize]) -> Vec<i32> {
    match mode {
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

/// Outcome of the damping escalation.
#[derive(Clone, Debug, PartialEq)]
pub struct Damping {
    pub frac: f32,
    pub value: f32,
    pub attempts: Vec<f32>,
}

/// Runs `try_factor(damp_value)` for each fraction of `policy.schedule()` (the schedule
/// `linalg::factor_damped` uses) until it succeeds (`Ok(None)`); `Ok(Some(pos))` is a failed
/// pivot at processing position `pos`. All failing gives `linalg`'s NotPositiveDefinite message.
/// Generic over the error type so device failures pass through unchanged.
pub fn escalate<E: From<Error>>(
    policy: DampingPolicy,
    n: usize,
    mean_diag: f32,
    mut try_factor: impl FnMut(f32) -> std::result::Result<Option<usize>, E>,
) -> std::result::Result<Damping, E> {
    policy.validate()?;
    let mut attempts = Vec::new();
    let mut last_pivot = 0usize;
    for frac in policy.schedule() {
        attempts.push(frac);
        let damp = frac * mean_diag;
        match try_factor(damp)? {
            None => {
                return Ok(Damping {
                    frac,
                    value: damp,
                    attempts,
                })
            }
            Some(pos) => last_pivot = pos,
        }
    }
    let tried: Vec<String> = attempts.iter().map(|f| format!("{f}")).collect();
    Err(E::from(Error::NotPositiveDefinite(format!(
        "Hessian ({n}x{n}) is not positive definite even after damping: tried dampening fractions \
         [{}] of mean(diag H) = {mean_diag:e} (last failure at input column {last_pivot}); raise \
         dampening_frac (or the damping limit) or supply more calibration data",
        tried.join(", ")
    ))))
}

/// `gptq.rs`'s check on the factor's pivots (here read from diag(Hinv) = 1/diag(U')).
pub fn check_pivots(hinv_diag: &[f32], damp_frac: f32) -> Result<()> {
    if let Some(j) = hinv_diag.iter().position(|d| !(d.is_finite() && *d > 0.0)) {
        return Err(Error::NotPositiveDefinite(format!(
            "gptq: Cholesky factor has a non-positive or non-finite pivot {} at column {j} after \
             damping {damp_frac}; increase the damping",
            1.0 / hinv_diag[j]
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_cover_columns_and_respect_groups() {
        for cols in [1usize, 7, 127, 128, 129, 300, 1000] {
            for mode in [
                GroupMode::PerChannel,
                GroupMode::Static(32),
                GroupMode::Dynamic(1),
                GroupMode::Dynamic(32),
                GroupMode::Dynamic(48),
                GroupMode::Dynamic(128),
                GroupMode::Dynamic(200),
                GroupMode::Dynamic(256),
            ] {
                for bs in [1usize, 16, 100, 128, 4096] {
                    let b = batches(cols, mode, bs);
                    assert_eq!(b[0].0, 0);
                    assert_eq!(b.last().map(|x| x.1), Some(cols));
                    for w in b.windows(2) {
                        assert_eq!(w[0].1, w[1].0);
                    }
                    for &(i1, i2) in &b {
                        assert!(i2 > i1 && i2 - i1 <= bs.min(MAX_BATCH), "{mode:?} {bs}");
                    }
                    if let GroupMode::Dynamic(g) = mode {
                        // Every group start is a batch start, or the group ends inside its batch.
                        for p in (0..cols).step_by(g) {
                            let &(i1, i2) =
                                b.iter().find(|(i1, i2)| (*i1..*i2).contains(&p)).unwrap();
                            let end = (p + g).min(cols);
                            assert!(
                                p == i1 || end <= i2,
                                "{mode:?} bs {bs} p {p}: batch {i1}..{i2}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn escalation_uses_linalg_schedule_and_message() {
        let p = DampingPolicy::default();
        let mut seen = Vec::new();
        let d = escalate::<Error>(p, 4, 2.0, |damp| {
            seen.push(damp);
            Ok(if seen.len() < 3 { Some(1) } else { None })
        })
        .unwrap();
        assert_eq!(d.attempts, vec![0.01, 0.02, 0.04]);
        assert_eq!(d.frac, 0.04);
        assert_eq!(seen, vec![0.02, 0.04, 0.08]);
        let e = escalate::<Error>(p, 7, 1.0, |_| Ok(Some(3))).unwrap_err();
        assert!(matches!(e, Error::NotPositiveDefinite(_)));
        assert!(
            e.to_string()
                .contains("[0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1]"),
            "{e}"
        );
        assert!(e.to_string().contains("input column 3"), "{e}");
    }

    #[test]
    fn mse_observer_is_refused_clearly() {
        let mut o = GptqOptions {
            spec: QuantSpec {
                bits: 4,
                symmetric: true,
                observer: Observer::mse_default(),
                scale_dtype: crate::quantizer::ScaleDtype::F32,
            },
            group_size: Some(128),
            act_order: false,
            static_groups: false,
            block_size: 128,
            damping: DampingPolicy::default(),
        };
        let e = check_options(8, 8, &o).unwrap_err().to_string();
        assert!(
            e.contains("MSE observer") && e.contains("device='cpu'"),
            "{e}"
        );
        o.spec.observer = Observer::MinMax;
        assert_eq!(check_options(8, 8, &o).unwrap(), GroupMode::Dynamic(128));
        o.block_size = 0;
        assert!(check_options(8, 8, &o)
            .unwrap_err()
            .to_string()
            .contains("block_size"));
    }
}
