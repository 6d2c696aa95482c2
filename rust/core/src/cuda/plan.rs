//! Host-side decisions of the CUDA path ([`super::device`]) and its CPU model
//! ([`super::model`]): argument checks, processing order, dead inputs, the batch partition,
//! the damping escalation loop and the error messages. The grid layout, column order, `g_idx`,
//! dead inputs, mean diagonal, damping escalation and messages are the CPU solver's own
//! functions (`gptq.rs` / `linalg.rs`), re-exported or wrapped here, so both paths decide alike.

use crate::error::{Error, Result};
use crate::gptq::GptqOptions;
use crate::linalg;
use crate::quantizer::{Observer, QuantSpec};

pub use crate::gptq::{processing_order, GroupMode};
pub use crate::linalg::{escalate, Damping};

/// Widest batch the block kernel handles: one warp per row, 32 lanes x 4 registers.
pub const MAX_BATCH: usize = 128;
/// Lanes cooperating on one row (a warp).
pub const WARP: usize = 32;
/// Registers per lane holding the batch's columns (`MAX_BATCH / WARP`).
pub const REGS: usize = MAX_BATCH / WARP;

/// What the kernels need to know of a [`GroupMode`].
impl GroupMode {
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
    let mode = GroupMode::new(opts.group_size, opts.static_groups)?;
    if opts.block_size == 0 {
        return Err(Error::InvalidArgument(
            "gptq: block_size must be > 0 (default 128)".into(),
        ));
    }
    opts.damping.validate()?;
    check_observer(&opts.spec)?;
    // the CPU solver's rule for when group-aware reordering applies (and its errors)
    if crate::gptq::group_aware_size(opts, mode)?.is_some() {
        return Err(Error::InvalidArgument(
            "gptq (cuda): group-aware reordering is not implemented on the CUDA path yet; use \
             actorder='static' or device='cpu'"
                .into(),
        ));
    }
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
        Observer::Mse { .. } | Observer::HessianMse { .. } => Err(Error::InvalidArgument(
            "gptq (cuda): the MSE observer is not implemented on the CUDA path yet (nor its \
             Hessian-weighted form); use \
             observer='minmax' or device='cpu'"
                .into(),
        )),
    }
}

/// `gptq.rs`'s non-finite weight / Hessian message (`what` = "weight" or "hessian").
pub fn non_finite(what: &str, value: f32, row: usize, col: usize) -> Error {
    crate::gptq::non_finite(what, value, row, col)
}

/// `hessian.rs`'s message for a non-finite activation in a batch.
pub fn non_finite_activation(batch: u64, dtype: &str, row: usize, col: usize) -> Error {
    Error::NonFinite(format!(
        "Hessian batch {batch} ({dtype}): non-finite activation (NaN or Inf) at token row {row}, \
         input feature {col}; the layer's input overflowed or is NaN"
    ))
}

/// Activation dtypes of a Hessian batch (fp32 accumulation in every case).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ActDtype {
    F32,
    F16,
    BF16,
}

impl ActDtype {
    pub fn name(self) -> &'static str {
        match self {
            ActDtype::F32 => "float32",
            ActDtype::F16 => "float16",
            ActDtype::BF16 => "bfloat16",
        }
    }

    /// How a batch's kernel names its dtype in the non-finite slot.
    pub fn tag(self) -> u64 {
        self as u64
    }

    pub fn from_tag(tag: u64) -> Option<Self> {
        [ActDtype::F32, ActDtype::F16, ActDtype::BF16]
            .into_iter()
            .find(|d| d.tag() == tag)
    }

    /// Exponent bits of a 16-bit float (all ones = Inf or NaN); None for f32.
    pub fn exp_mask16(self) -> Option<u32> {
        match self {
            ActDtype::F32 => None,
            ActDtype::F16 => Some(0x7c00),
            ActDtype::BF16 => Some(0x7f80),
        }
    }
}

/// Bytes of the device slot where a Hessian's batches record their first non-finite
/// activation: three u64 `[batch, flat index in the batch, dtype tag]`, all `u64::MAX` (bytes
/// 0xff) while every batch was finite. Each batch's kernel writes it only if no earlier batch
/// did, so the host reads it once, when the Hessian is read out, instead of once per batch.
pub const NONFINITE_SLOT_BYTES: usize = 24;
/// The slot before any batch: nothing recorded.
pub const NONFINITE_SLOT_EMPTY: [u64; 3] = [u64::MAX; 3];

/// The error for what the batches recorded in the slot (`n` = in_features), the message the
/// CPU accumulator gives when that batch is added; Ok when every batch was finite.
pub fn check_nonfinite_slot(slot: [u64; 3], n: usize) -> Result<()> {
    let [batch, flat, tag] = slot;
    if batch == u64::MAX {
        return Ok(());
    }
    let dtype = ActDtype::from_tag(tag).map_or("unknown dtype", ActDtype::name);
    let flat = flat as usize;
    Err(non_finite_activation(
        batch,
        dtype,
        flat / n.max(1),
        flat % n.max(1),
    ))
}

/// Dead flags by processing position (zero diagonal), `linalg`'s error when all are dead.
pub fn dead_positions(diag: &[f32], order: &[usize]) -> Result<Vec<bool>> {
    linalg::dead_flags(&permuted(diag, order))
}

/// mean(diag H) after dead inputs got 1, summed in processing order (as `linalg` sums the
/// permuted Hessian the CPU solver factors).
pub fn mean_diag(diag: &[f32], order: &[usize], dead: &[bool]) -> f32 {
    linalg::damped_mean_diag(&permuted(diag, order), dead)
}

fn permuted(diag: &[f32], order: &[usize]) -> Vec<f32> {
    order.iter().map(|&c| diag[c]).collect()
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

/// `gptq.rs`'s check on the factor's pivots (here read from diag(Hinv) = 1/diag(U')).
pub fn check_pivots(hinv_diag: &[f32], damp_frac: f32) -> Result<()> {
    if let Some(j) = hinv_diag.iter().position(|d| !(d.is_finite() && *d > 0.0)) {
        return Err(crate::gptq::bad_pivot(1.0 / hinv_diag[j], j, damp_frac));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::linalg::DampingPolicy;

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
            group_aware: false,
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
        o.group_aware = true;
        let e = check_options(8, 8, &o).unwrap_err().to_string();
        assert!(e.contains("it needs act_order"), "{e}");
        o.act_order = true;
        let e = check_options(8, 8, &o).unwrap_err().to_string();
        assert!(
            e.contains("group-aware") && e.contains("device='cpu'"),
            "{e}"
        );
        o.group_aware = false;
        o.block_size = 0;
        assert!(check_options(8, 8, &o)
            .unwrap_err()
            .to_string()
            .contains("block_size"));
    }
}
