//! Dead-column handling, damping and the Cholesky factor used by the GPTQ solver.
//!
//! The GPTQ reference computes `Hinv = cholesky(inverse(cholesky(H_damped)), upper=True)`: three
//! O(n³) steps. The same upper factor is obtained more cheaply: with `J` the exchange (reversal)
//! matrix, let `L` be the ordinary lower Cholesky factor of `J H J` and `U' = J L J` (upper
//! triangular, `H = U' U'ᵀ`). Then `H⁻¹ = U'⁻ᵀ U'⁻¹`, so `U'⁻¹` is upper triangular with positive
//! diagonal and is *the* upper Cholesky factor of `H⁻¹` (it is unique). The solver only needs
//! triangular solves with `U'`, so [`factor_damped`] stops there (~n³/3 flops);
//! [`damped_inverse_upper`] forms `U'⁻¹` explicitly (~n³/3 more) for callers that want it.
//!
//! All matrices are row-major `&[f32]`. In row-major storage, reversing the flat buffer maps a
//! matrix `A` to `J A J`, which is how the reversal is done (one O(n²) pass, no index games in the
//! O(n³) part).

use faer::dyn_stack::{MemBuffer, MemStack};
use faer::linalg::cholesky::llt::factor::{
    cholesky_in_place, cholesky_in_place_scratch, LltRegularization,
};
use faer::linalg::triangular_inverse::invert_upper_triangular;
use faer::{MatMut, MatRef, Par};
use rayon::prelude::*;

use crate::error::{Error, Result};

/// How damping starts and escalates when the factorisation fails.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DampingPolicy {
    /// First fraction of mean(diag H) added to the diagonal (GPTQ's `percdamp`, default 0.01).
    pub initial: f32,
    /// Multiplier applied after each failed attempt (default 2.0).
    pub growth: f32,
    /// Largest fraction tried before giving up (default 1.0).
    pub max: f32,
}

impl Default for DampingPolicy {
    fn default() -> Self {
        Self {
            initial: 0.01,
            growth: 2.0,
            max: 1.0,
        }
    }
}

impl DampingPolicy {
    /// Checks `initial > 0`, `growth > 1`, `max >= initial`, all finite.
    pub fn validate(&self) -> Result<()> {
        let ok = self.initial.is_finite()
            && self.growth.is_finite()
            && self.max.is_finite()
            && self.initial > 0.0
            && self.growth > 1.0
            && self.max >= self.initial;
        if ok {
            Ok(())
        } else {
            Err(Error::InvalidArgument(format!(
                "invalid damping policy (initial={}, growth={}, max={}): need finite values with \
                 initial > 0, growth > 1 and max >= initial",
                self.initial, self.growth, self.max
            )))
        }
    }

    /// The fractions tried in order: `initial, initial*growth, ...`, capped so that the last one
    /// is exactly `max`. Assumes a validated policy.
    pub fn schedule(&self) -> Vec<f32> {
        let mut out = Vec::new();
        let mut f = self.initial;
        loop {
            if f >= self.max {
                out.push(self.max);
                break;
            }
            out.push(f);
            f *= self.growth;
        }
        out
    }
}

/// Result of preparing and factoring a damped Hessian.
#[derive(Clone, Debug)]
pub struct Factorization {
    pub n: usize,
    /// Row-major upper-triangular `U'` with `H_damped = U' U'ᵀ` (the Cholesky factor of the
    /// row/column-reversed matrix, reversed back). `U'⁻¹` is the upper Cholesky factor of
    /// `H_damped⁻¹`, so the solver never forms an inverse.
    pub factor: Vec<f32>,
    /// Damping fraction finally used (of mean(diag H) after dead columns got 1).
    pub damp_frac: f32,
    /// Absolute value added to the diagonal.
    pub damp_value: f32,
    /// Every fraction tried, in order; the last one succeeded.
    pub attempts: Vec<f32>,
    /// Indices of dead inputs (zero diagonal): their H_ii was set to 1.
    pub dead: Vec<usize>,
}

fn check_square(h_len: usize, n: usize, what: &str) -> Result<()> {
    if n == 0 {
        return Err(Error::InvalidArgument(format!(
            "{what}: the Hessian has 0 columns"
        )));
    }
    match n.checked_mul(n) {
        Some(nn) if nn == h_len => Ok(()),
        _ => Err(Error::InvalidArgument(format!(
            "{what}: Hessian buffer has {h_len} values, expected n*n = {n}*{n} for n = {n}"
        ))),
    }
}

/// First non-finite entry of a row-major `n x n` matrix, as (row, col, value).
fn find_non_finite(h: &[f32], n: usize) -> Option<(usize, usize, f32)> {
    h.par_chunks(n).enumerate().find_map_first(|(i, row)| {
        row.iter()
            .position(|v| !v.is_finite())
            .map(|j| (i, j, row[j]))
    })
}

fn check_finite(h: &[f32], n: usize) -> Result<()> {
    match find_non_finite(h, n) {
        Some((i, j, v)) => Err(Error::NonFinite(format!(
            "Hessian ({n}x{n}) contains a non-finite value ({v}) at row {i}, column {j}; the \
             calibration activations or the accumulated sums overflowed or were NaN"
        ))),
        None => Ok(()),
    }
}

/// Dead flags (zero diagonal entry) of a Hessian's diagonal; error if every input is dead.
pub fn dead_flags(diag: &[f32]) -> Result<Vec<bool>> {
    let n = diag.len();
    let dead: Vec<bool> = diag.iter().map(|&d| d == 0.0).collect();
    if dead.iter().all(|&d| d) {
        return Err(Error::InvalidArgument(format!(
            "no calibration signal: every input column of the Hessian is zero — did any \
             calibration token reach this layer? (n = {n})"
        )));
    }
    Ok(dead)
}

/// mean(diag H) once dead inputs got 1, summed in f64 in the order given: the base that the
/// damping fractions multiply.
pub fn damped_mean_diag(diag: &[f32], dead: &[bool]) -> f32 {
    (diag
        .iter()
        .zip(dead)
        .map(|(&d, &x)| if x { 1.0 } else { d as f64 })
        .sum::<f64>()
        / diag.len() as f64) as f32
}

/// Indices with a zero diagonal; error if that is every column.
fn dead_indices(h: &[f32], n: usize) -> Result<Vec<usize>> {
    let diag: Vec<f32> = (0..n).map(|i| h[i * n + i]).collect();
    let flags = dead_flags(&diag)?;
    Ok((0..n).filter(|&i| flags[i]).collect())
}

/// Outcome of the damping escalation.
#[derive(Clone, Debug, PartialEq)]
pub struct Damping {
    pub frac: f32,
    pub value: f32,
    pub attempts: Vec<f32>,
}

/// The damping escalation loop of every solver (CPU and CUDA): runs `try_factor(damp_value)`
/// for each fraction of `policy.schedule()` until it succeeds (`Ok(None)`); `Ok(Some(pos))` is a
/// failed pivot at input position `pos`. All failing gives the NotPositiveDefinite error naming
/// every fraction tried. Generic over the error type so device failures pass through unchanged.
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

/// Zeroes row and column `d` of a row-major `n x n` matrix and sets its diagonal to `diag`.
fn isolate(h: &mut [f32], n: usize, d: usize, diag: f32) {
    h[d * n..(d + 1) * n].fill(0.0);
    for i in 0..n {
        h[i * n + d] = 0.0;
    }
    h[d * n + d] = diag;
}

/// Sets `H_ii = 1` for every zero diagonal entry (and zeros that row/column off-diagonal),
/// returning the dead indices. Error if every column is dead (no calibration signal), or on
/// NaN/Inf, or if `h.len() != n*n`.
pub fn mark_dead_columns(h: &mut [f32], n: usize) -> Result<Vec<usize>> {
    check_square(h.len(), n, "mark_dead_columns")?;
    check_finite(h, n)?;
    let dead = dead_indices(h, n)?;
    for &d in &dead {
        isolate(h, n, d, 1.0);
    }
    Ok(dead)
}

/// Lower Cholesky of the row-major `n x n` symmetric matrix in `a` (only its lower triangle is
/// read), in place; on success the strictly upper triangle is zeroed. `Err(pivot index)` on a
/// non-positive (or NaN) pivot.
fn cholesky_lower_in_place(a: &mut [f32], n: usize, par: Par) -> std::result::Result<(), usize> {
    let mut mem = MemBuffer::new(cholesky_in_place_scratch::<f32>(n, par, Default::default()));
    let stack = MemStack::new(&mut mem);
    let m = MatMut::from_row_major_slice_mut(a, n, n);
    match cholesky_in_place(
        m,
        LltRegularization::default(),
        par,
        stack,
        Default::default(),
    ) {
        Ok(_) => {
            a.par_chunks_mut(n)
                .enumerate()
                .for_each(|(i, row)| row[i + 1..].fill(0.0));
            Ok(())
        }
        Err(faer::linalg::cholesky::llt::factor::LltError::NonPositivePivot { index }) => {
            Err(index)
        }
    }
}

/// Dead-column handling, damping, and the upper-lower Cholesky factor with damping escalation.
/// `Error::NotPositiveDefinite` names every fraction tried when all fail.
///
/// Memory: one `n x n` work buffer besides the input (each retry rebuilds it from `h`), which
/// matters at n = 11008 (485 MB per buffer).
pub fn factor_damped(h: &[f32], n: usize, policy: DampingPolicy) -> Result<Factorization> {
    check_square(h.len(), n, "factor_damped")?;
    policy.validate()?;
    check_finite(h, n)?;
    let diag: Vec<f32> = (0..n).map(|i| h[i * n + i]).collect();
    let is_dead = dead_flags(&diag)?;
    let dead: Vec<usize> = (0..n).filter(|&i| is_dead[i]).collect();
    let mean_diag = damped_mean_diag(&diag, &is_dead);
    let par = Par::rayon(0);

    let mut work = vec![0.0f32; n * n];
    let damping = escalate::<Error>(policy, n, mean_diag, |damp| {
        // work = J H J: row r is row n-1-r of H reversed (row-major reversal of the flat buffer).
        work.par_chunks_mut(n)
            .zip(h.par_chunks(n).rev())
            .for_each(|(w, src)| {
                w.iter_mut()
                    .zip(src.iter().rev())
                    .for_each(|(a, &b)| *a = b);
            });
        for &d in &dead {
            isolate(&mut work, n, n - 1 - d, 1.0);
        }
        for r in 0..n {
            work[r * n + r] += damp;
        }
        Ok(cholesky_lower_in_place(&mut work, n, par)
            .err()
            .map(|pivot| n - 1 - pivot))
    })?;
    // J L J in row-major is the reversed buffer: upper triangular U'.
    reverse_in_place(&mut work, n);
    Ok(Factorization {
        n,
        factor: work,
        damp_frac: damping.frac,
        damp_value: damping.value,
        attempts: damping.attempts,
        dead,
    })
}

/// Reverses the flat row-major `n x n` buffer (A -> J A J), in parallel: row i swaps with row
/// n-1-i, both reversed.
fn reverse_in_place(a: &mut [f32], n: usize) {
    let half = n / 2;
    let (top, rest) = a.split_at_mut(half * n);
    let (mid, bottom) = rest.split_at_mut((n - 2 * half) * n);
    top.par_chunks_mut(n)
        .zip(bottom.par_chunks_mut(n).rev())
        .for_each(|(x, y)| {
            x.swap_with_slice(y);
            x.reverse();
            y.reverse();
        });
    mid.reverse();
}

/// The upper Cholesky factor `U` of `H_damped⁻¹` (`H⁻¹ = Uᵀ U`), as the reference computes it;
/// returned with the factorisation details. Used by callers and tests that want the inverse.
pub fn damped_inverse_upper(
    h: &[f32],
    n: usize,
    policy: DampingPolicy,
) -> Result<(Vec<f32>, Factorization)> {
    let f = factor_damped(h, n, policy)?;
    let u = upper_triangular_inverse(&f.factor, n)?;
    Ok((u, f))
}

/// Inverse of a row-major upper-triangular `n x n` matrix (strictly lower part of the input is
/// ignored; that of the output is zero). ~n³/3 flops, multi-threaded.
pub fn upper_triangular_inverse(u: &[f32], n: usize) -> Result<Vec<f32>> {
    check_square(u.len(), n, "upper_triangular_inverse")?;
    let mut out = vec![0.0f32; n * n];
    invert_upper_triangular(
        MatMut::from_row_major_slice_mut(&mut out, n, n),
        MatRef::from_row_major_slice(u, n, n),
        Par::rayon(0),
    );
    Ok(out)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    /// Standard normal samples via Box-Muller (rand 0.9 without rand_distr).
    pub(crate) fn normals(rng: &mut StdRng, len: usize) -> Vec<f64> {
        (0..len)
            .map(|_| {
                let u1: f64 = rng.random_range(f64::EPSILON..1.0);
                let u2: f64 = rng.random::<f64>();
                (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
            })
            .collect()
    }

    /// Correlated activations `X = Z A + mu` (`[rows, n]`, row-major): `A` is `k x n` random with
    /// column scales decaying over the features, so features are correlated and H is not
    /// well conditioned; `k < n` gives a rank-deficient X.
    pub(crate) fn correlated(seed: u64, rows: usize, n: usize, k: usize) -> Vec<f64> {
        let mut rng = StdRng::seed_from_u64(seed);
        let z = normals(&mut rng, rows * k);
        let mut a = normals(&mut rng, k * n);
        for r in 0..k {
            for c in 0..n {
                a[r * n + c] *= (-(c as f64) / (n as f64 / 3.0)).exp() + 0.05;
            }
        }
        let mu = normals(&mut rng, n);
        let mut x = vec![0.0; rows * n];
        for t in 0..rows {
            for r in 0..k {
                let zr = z[t * k + r];
                for c in 0..n {
                    x[t * n + c] += zr * a[r * n + c];
                }
            }
            for c in 0..n {
                x[t * n + c] += 0.3 * mu[c];
            }
        }
        x
    }

    /// Naive f64 `H = (2/rows) XᵀX`.
    pub(crate) fn hessian_f64(x: &[f64], rows: usize, n: usize) -> Vec<f64> {
        let mut h = vec![0.0; n * n];
        for t in 0..rows {
            let row = &x[t * n..(t + 1) * n];
            for i in 0..n {
                let xi = row[i];
                for j in 0..n {
                    h[i * n + j] += xi * row[j];
                }
            }
        }
        h.iter_mut().for_each(|v| *v *= 2.0 / rows as f64);
        h
    }

    pub(crate) fn matmul_f64(a: &[f64], b: &[f64], m: usize, k: usize, n: usize) -> Vec<f64> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for p in 0..k {
                let aip = a[i * k + p];
                for j in 0..n {
                    c[i * n + j] += aip * b[p * n + j];
                }
            }
        }
        c
    }

    pub(crate) fn transpose_f64(a: &[f64], n: usize) -> Vec<f64> {
        (0..n * n).map(|k| a[(k % n) * n + k / n]).collect()
    }

    pub(crate) fn rel_fro(a: &[f64], b: &[f64]) -> f64 {
        let num: f64 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
        let den: f64 = b.iter().map(|y| y * y).sum();
        (num / den).sqrt()
    }

    /// Naive f64 lower Cholesky; None if not positive definite.
    pub(crate) fn chol_lower_f64(a: &[f64], n: usize) -> Option<Vec<f64>> {
        let mut l = vec![0.0; n * n];
        for j in 0..n {
            let mut d = a[j * n + j];
            for p in 0..j {
                d -= l[j * n + p] * l[j * n + p];
            }
            if d <= 0.0 {
                return None;
            }
            let d = d.sqrt();
            l[j * n + j] = d;
            for i in j + 1..n {
                let mut s = a[i * n + j];
                for p in 0..j {
                    s -= l[i * n + p] * l[j * n + p];
                }
                l[i * n + j] = s / d;
            }
        }
        Some(l)
    }

    /// Inverse of a lower-triangular matrix by forward substitution.
    fn inv_lower_f64(l: &[f64], n: usize) -> Vec<f64> {
        let mut inv = vec![0.0; n * n];
        for c in 0..n {
            for i in c..n {
                let mut s = if i == c { 1.0 } else { 0.0 };
                for p in c..i {
                    s -= l[i * n + p] * inv[p * n + c];
                }
                inv[i * n + c] = s / l[i * n + i];
            }
        }
        inv
    }

    /// The reference pipeline in f64: dead columns -> 1, damp, `Hinv = chol(inv(H), upper)`.
    /// Returns (H_damped, H_damped⁻¹, Hinv upper factor).
    fn reference_f64(h: &[f32], n: usize, frac: f64) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let mut h: Vec<f64> = h.iter().map(|&v| v as f64).collect();
        for d in 0..n {
            if h[d * n + d] == 0.0 {
                for i in 0..n {
                    h[d * n + i] = 0.0;
                    h[i * n + d] = 0.0;
                }
                h[d * n + d] = 1.0;
            }
        }
        let mean = (0..n).map(|i| h[i * n + i]).sum::<f64>() / n as f64;
        for i in 0..n {
            h[i * n + i] += frac * mean;
        }
        let l = chol_lower_f64(&h, n).expect("f64 reference not positive definite");
        let li = inv_lower_f64(&l, n);
        let hinv = matmul_f64(&transpose_f64(&li, n), &li, n, n, n);
        let upper = transpose_f64(&chol_lower_f64(&hinv, n).expect("inverse not SPD"), n);
        (h, hinv, upper)
    }

    fn to_f64(v: &[f32]) -> Vec<f64> {
        v.iter().map(|&x| x as f64).collect()
    }

    fn test_hessian(seed: u64, n: usize, rows: usize, k: usize) -> Vec<f32> {
        hessian_f64(&correlated(seed, rows, n, k), rows, n)
            .iter()
            .map(|&v| v as f32)
            .collect()
    }

    fn assert_upper(m: &[f32], n: usize) {
        for i in 0..n {
            for j in 0..i {
                assert_eq!(
                    m[i * n + j],
                    0.0,
                    "entry ({i},{j}) below the diagonal is nonzero"
                );
            }
        }
    }

    #[test]
    fn factor_reconstructs_and_inverts_like_reference() {
        for (seed, n) in [(1u64, 7usize), (2, 64), (3, 172), (4, 576), (5, 173)] {
            let h = test_hessian(seed, n, 2 * n + 16, n);
            let (u, f) = damped_inverse_upper(&h, n, DampingPolicy::default()).unwrap();
            assert_eq!(f.attempts, vec![0.01]);
            assert_eq!(f.damp_frac, 0.01);
            assert!(f.dead.is_empty());
            assert_upper(&f.factor, n);
            assert_upper(&u, n);
            let (hd, hinv, ref_upper) = reference_f64(&h, n, 0.01);
            let mean = (0..n).map(|i| h[i * n + i] as f64).sum::<f64>() / n as f64;
            assert!(((f.damp_value as f64) - 0.01 * mean).abs() <= 1e-6 * mean);

            // U' U'ᵀ = H_damped: backward error of an f32 Cholesky.
            let up = to_f64(&f.factor);
            let rec = matmul_f64(&up, &transpose_f64(&up, n), n, n, n);
            let e_rec = rel_fro(&rec, &hd);
            assert!(e_rec < 1e-6, "n={n}: |U'U'ᵀ - H|/|H| = {e_rec}");

            // (U'⁻¹)ᵀ U'⁻¹ = H_damped⁻¹ and U'⁻¹ equals the reference's Hinv factor.
            let ui = to_f64(&u);
            let inv = matmul_f64(&transpose_f64(&ui, n), &ui, n, n, n);
            let e_inv = rel_fro(&inv, &hinv);
            let e_up = rel_fro(&ui, &ref_upper);
            assert!(e_inv < 2e-5, "n={n}: inverse rel err {e_inv}");
            assert!(e_up < 2e-5, "n={n}: Hinv factor rel err {e_up}");
            // U'⁻¹ U' = I to working precision (the inverse really is the inverse of the factor).
            let id = matmul_f64(&ui, &up, n, n, n);
            let eye: Vec<f64> = (0..n * n)
                .map(|k| if k % (n + 1) == 0 { 1.0 } else { 0.0 })
                .collect();
            let e_id = rel_fro(&id, &eye);
            assert!(e_id < 5e-6, "n={n}: |U'⁻¹U' - I|/|I| = {e_id}");
            eprintln!("n={n}: rec {e_rec:.2e} inv {e_inv:.2e} Hinv {e_up:.2e} id {e_id:.2e}");
        }
    }

    #[test]
    fn dead_columns_are_decoupled() {
        let n = 64;
        let mut h = test_hessian(11, n, 200, n);
        for &d in &[0usize, 10, 63] {
            for i in 0..n {
                h[d * n + i] = 0.0;
                h[i * n + d] = 0.0;
            }
        }
        let mut marked = h.clone();
        assert_eq!(mark_dead_columns(&mut marked, n).unwrap(), vec![0, 10, 63]);
        assert_eq!(marked[10 * n + 10], 1.0);
        let f = factor_damped(&h, n, DampingPolicy::default()).unwrap();
        assert_eq!(f.dead, vec![0, 10, 63]);
        let mean = (0..n).map(|i| marked[i * n + i] as f64).sum::<f64>() / n as f64;
        assert!(((f.damp_value as f64) - 0.01 * mean).abs() <= 1e-6 * mean);
        for &d in &[0usize, 10, 63] {
            assert!((f.factor[d * n + d] - (1.0 + f.damp_value).sqrt()).abs() < 1e-6);
            for j in 0..n {
                if j != d {
                    assert_eq!(f.factor[d * n + j], 0.0);
                    assert_eq!(f.factor[j * n + d], 0.0);
                }
            }
        }
        let (hd, _, _) = reference_f64(&h, n, 0.01);
        let up = to_f64(&f.factor);
        let rec = matmul_f64(&up, &transpose_f64(&up, n), n, n, n);
        assert!(rel_fro(&rec, &hd) < 1e-5);
    }

    #[test]
    fn all_dead_is_an_error() {
        let n = 9;
        let h = vec![0.0f32; n * n];
        let e = factor_damped(&h, n, DampingPolicy::default()).unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)));
        assert!(e.to_string().contains("no calibration signal"), "{e}");
        let mut h2 = h.clone();
        assert!(matches!(
            mark_dead_columns(&mut h2, n),
            Err(Error::InvalidArgument(_))
        ));
    }

    #[test]
    fn escalates_damping_on_slightly_indefinite() {
        // Rank-deficient PSD minus 0.05*mean(diag): needs a fraction > 0.05, so 0.01, 0.02 and 0.04
        // fail and 0.08 succeeds.
        for n in [64usize, 172] {
            let mut h = test_hessian(21, n, 3 * n, n / 4);
            let mean = (0..n).map(|i| h[i * n + i]).sum::<f32>() / n as f32;
            for i in 0..n {
                h[i * n + i] -= 0.05 * mean;
            }
            let f = factor_damped(&h, n, DampingPolicy::default()).unwrap();
            assert_eq!(f.attempts, vec![0.01, 0.02, 0.04, 0.08], "n={n}");
            assert_eq!(f.damp_frac, 0.08);
            let (hd, _, _) = reference_f64(&h, n, 0.08);
            let up = to_f64(&f.factor);
            let rec = matmul_f64(&up, &transpose_f64(&up, n), n, n, n);
            assert!(rel_fro(&rec, &hd) < 1e-4);
        }
    }

    #[test]
    fn indefinite_fails_at_max_with_clear_message() {
        // Unit diagonal, off-diagonal 3: eigenvalue 1 - 3 = -2 survives every damping up to 1.0.
        let n = 7;
        let h: Vec<f32> = (0..n * n)
            .map(|k| if k % (n + 1) == 0 { 1.0 } else { 3.0 })
            .collect();
        let e = factor_damped(&h, n, DampingPolicy::default()).unwrap_err();
        assert!(matches!(e, Error::NotPositiveDefinite(_)));
        let msg = e.to_string();
        assert!(
            msg.contains("[0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1]"),
            "{msg}"
        );
        assert!(
            msg.contains("dampening_frac") && msg.contains("more calibration data"),
            "{msg}"
        );
        // A custom policy: the last attempt is exactly max.
        let p = DampingPolicy {
            initial: 0.1,
            growth: 3.0,
            max: 0.5,
        };
        assert_eq!(p.schedule(), vec![0.1, 0.3, 0.5]);
        let msg = factor_damped(&h, n, p).unwrap_err().to_string();
        assert!(msg.contains("[0.1, 0.3, 0.5]"), "{msg}");
    }

    #[test]
    fn rejects_non_finite_bad_shapes_and_policies() {
        let n = 7;
        let mut h = test_hessian(31, n, 30, n);
        h[2 * n + 5] = f32::NAN;
        let e = factor_damped(&h, n, DampingPolicy::default()).unwrap_err();
        assert!(matches!(e, Error::NonFinite(_)));
        assert!(e.to_string().contains("row 2, column 5"), "{e}");
        h[2 * n + 5] = f32::INFINITY;
        assert!(matches!(
            mark_dead_columns(&mut h, n),
            Err(Error::NonFinite(_))
        ));
        h[2 * n + 5] = 0.0;
        assert!(matches!(
            factor_damped(&h[1..], n, DampingPolicy::default()),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            factor_damped(&[], 0, DampingPolicy::default()),
            Err(Error::InvalidArgument(_))
        ));
        for p in [
            DampingPolicy {
                initial: 0.0,
                growth: 2.0,
                max: 1.0,
            },
            DampingPolicy {
                initial: 0.01,
                growth: 1.0,
                max: 1.0,
            },
            DampingPolicy {
                initial: 0.5,
                growth: 2.0,
                max: 0.1,
            },
            DampingPolicy {
                initial: f32::NAN,
                growth: 2.0,
                max: 1.0,
            },
        ] {
            assert!(
                matches!(factor_damped(&h, n, p), Err(Error::InvalidArgument(_))),
                "{p:?}"
            );
        }
    }
}
