//! Bit packing of integer codes into int32 words for the GPTQ and compressed-tensors layouts.
//!
//! All code inputs are `[rows, cols]` row-major u8 in [0, 2^bits - 1]; bits in {2,3,4,8}.
//!
//! # The one bit layout behind every format
//!
//! Every layout here is a little-endian *bit stream* along the packed dimension: value `i`
//! occupies bits `i*bits .. i*bits + bits` of the stream, and stream bit `p` is bit `p % 32`
//! of word `p / 32`. For 2, 4 and 8 bits no value crosses a word; for 3 bits, 32 values fill
//! 3 words and two values straddle: value 10 has its low 2 bits in bits 30..31 of word 0 and
//! its top bit in bit 0 of word 1; value 21 has its low bit in bit 31 of word 1 and its top
//! 2 bits in bits 0..1 of word 2 (the "10 | straddle | 10 | straddle | 10" scheme of
//! AutoGPTQ/GPTQModel, which is also what compressed-tensors' dense `pack_to_int32` produces).
//! The number of words for `n` values is `ceil(n * bits / 32)`; missing values are zero.
//!
//! What differs between formats is only which dimension is packed and the orientation:
//!
//! | tensor                       | input            | output                          | packed along |
//! |------------------------------|------------------|---------------------------------|--------------|
//! | GPTQ `qweight`               | `[out, inp]`     | `[ceil(inp*b/32), out]`         | input        |
//! | GPTQ `qzeros`                | `[groups, out]`  | `[groups, ceil(out*b/32)]`      | output       |
//! | compressed-tensors `weight_packed` | `[out, inp]` | `[out, ceil(inp*b/32)]`      | input        |
//! | compressed-tensors `weight_zero_point` | `[out, groups]` | `[ceil(out*b/32), groups]` | dim 0 (out) |
//!
//! GPTQ v1 `qzeros` stores `zero - 1` (v2 the raw zero). compressed-tensors stores signed
//! values `s` in `[-2^(b-1), 2^(b-1) - 1]` as `s + 2^(b-1)`; the functions here take that
//! already-shifted unsigned code. For ferroquant's unsigned codes `q = round(w/scale) + z`
//! this shifted value is `q` itself (and the shifted zero point is `z`), so one solve feeds
//! both writers unchanged.
//!
//! Unpacking ignores the padding bits past the last value.

use rayon::prelude::*;

use crate::error::{Error, Result};

fn invalid(msg: String) -> Error {
    Error::InvalidArgument(msg)
}

fn check_bits(bits: u8, what: &str) -> Result<()> {
    match bits {
        2 | 3 | 4 | 8 => Ok(()),
        _ => Err(invalid(format!(
            "{what}: bits must be 2, 3, 4 or 8, got {bits}"
        ))),
    }
}

/// Largest code representable with `bits` bits.
fn max_code(bits: u8) -> u32 {
    (1u32 << bits) - 1
}

fn mul(a: usize, b: usize, what: &str) -> Result<usize> {
    a.checked_mul(b)
        .ok_or_else(|| invalid(format!("{what}: size {a} x {b} overflows")))
}

/// Number of int32 words that hold `n` values of `bits` bits: `ceil(n * bits / 32)`.
pub fn packed_len(n: usize, bits: u8) -> usize {
    // n * bits / 32 rewritten to avoid overflowing n * bits.
    let b = bits as usize;
    (n / 32) * b + ((n % 32) * b).div_ceil(32)
}

fn check_len(len: usize, rows: usize, cols: usize, what: &str) -> Result<()> {
    let expected = mul(rows, cols, what)?;
    if len != expected {
        return Err(invalid(format!(
            "{what}: expected {rows} x {cols} = {expected} elements, got {len}"
        )));
    }
    Ok(())
}

/// Checks that every code fits in `bits` bits, naming the first one that does not.
fn check_codes(codes: &[u8], cols: usize, bits: u8, what: &str) -> Result<()> {
    const CHUNK: usize = 1 << 16;
    let maxq = max_code(bits) as u8;
    // A max-reduction per chunk vectorises; only a failing chunk is searched element-wise.
    let bad_chunk = codes
        .par_chunks(CHUNK)
        .position_first(|ch| ch.iter().fold(0u8, |m, &c| m.max(c)) > maxq);
    if let Some(ci) = bad_chunk {
        let i = ci * CHUNK
            + codes[ci * CHUNK..]
                .iter()
                .position(|&c| c > maxq)
                .unwrap_or(0);
        let (r, c) = i.checked_div(cols).map_or((0, i), |r| (r, i % cols));
        return Err(invalid(format!(
            "{what}: code {} at [{r}, {c}] (flat index {i}) exceeds {maxq}, the largest {bits}-bit code",
            codes[i]
        )));
    }
    Ok(())
}

/// Squeezes 8 byte lanes holding `B`-bit values (B in 2..=4) into the low `8*B` bits,
/// lane `j` landing at bit `B*j` (SWAR: three shift-or-mask steps instead of 8 shifts).
#[inline(always)]
fn compact8<const B: usize>(x: u64) -> u64 {
    let m1 = (1u64 << (2 * B)) - 1;
    let m2 = (1u64 << (4 * B)) - 1;
    let x = (x | (x >> (8 - B))) & (m1 * 0x0001_0001_0001_0001);
    let x = (x | (x >> (16 - 2 * B))) & (m2 * 0x0000_0001_0000_0001);
    (x | (x >> (32 - 4 * B))) & ((1u64 << (8 * B)) - 1)
}

/// Inverse of [`compact8`]: spreads `8*B` bits into 8 byte lanes of `B` bits each.
#[inline(always)]
fn expand8<const B: usize>(x: u64) -> u64 {
    let m1 = (1u64 << (2 * B)) - 1;
    let m2 = (1u64 << (4 * B)) - 1;
    let x = (x | (x << (32 - 4 * B))) & (m2 * 0x0000_0001_0000_0001);
    let x = (x | (x << (16 - 2 * B))) & (m1 * 0x0001_0001_0001_0001);
    (x | (x << (8 - B))) & (((1u64 << B) - 1) * 0x0101_0101_0101_0101)
}

/// Packs one group of 32 values into the first `B` words (the bit stream of the module docs;
/// for 3 bits the 96-bit stream yields the straddles at values 10 and 21 by itself).
#[inline(always)]
fn pack_group<const B: usize>(vals: &[u8; 32]) -> [u32; 8] {
    let mut w = [0u32; 8];
    if B == 8 {
        for (d, b) in w.iter_mut().zip(vals.chunks_exact(4)) {
            *d = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        }
        return w;
    }
    let mut acc: u128 = 0;
    for (c, b) in vals.chunks_exact(8).enumerate() {
        let x = u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
        acc |= u128::from(compact8::<B>(x)) << (8 * B * c);
    }
    for (k, d) in w.iter_mut().take(B).enumerate() {
        *d = (acc >> (32 * k)) as u32;
    }
    w
}

/// Inverse of [`pack_group`]; bits above each value are masked off.
#[inline(always)]
fn unpack_group<const B: usize>(w: &[u32; 8], out: &mut [u8; 32]) {
    if B == 8 {
        for (o, &x) in out.chunks_exact_mut(4).zip(w) {
            o.copy_from_slice(&x.to_le_bytes());
        }
        return;
    }
    let mut acc: u128 = 0;
    for (k, &x) in w.iter().take(B).enumerate() {
        acc |= u128::from(x) << (32 * k);
    }
    let chunk_mask = (1u64 << (8 * B)) - 1;
    for (c, o) in out.chunks_exact_mut(8).enumerate() {
        let x = (acc >> (8 * B * c)) as u64 & chunk_mask;
        o.copy_from_slice(&expand8::<B>(x).to_le_bytes());
    }
}

fn pack_line_b<const B: usize>(vals: &[u8], out: &mut [i32]) {
    let full = vals.len() / 32;
    for (ws, g) in out
        .chunks_exact_mut(B)
        .zip(vals.chunks_exact(32))
        .take(full)
    {
        let g: &[u8; 32] = g.try_into().expect("chunks_exact(32)");
        let w = pack_group::<B>(g);
        for (d, &x) in ws.iter_mut().zip(&w) {
            *d = x as i32;
        }
    }
    let rest = &vals[full * 32..];
    if !rest.is_empty() {
        let mut g = [0u8; 32];
        g[..rest.len()].copy_from_slice(rest);
        let w = pack_group::<B>(&g);
        for (d, &x) in out[full * B..].iter_mut().zip(&w) {
            *d = x as i32;
        }
    }
}

fn unpack_line_b<const B: usize>(words: &[i32], out: &mut [u8]) {
    let full = out.len() / 32;
    let mut w = [0u32; 8];
    for (g, ws) in out.chunks_exact_mut(32).zip(words.chunks_exact(B)) {
        for (d, &x) in w.iter_mut().zip(ws) {
            *d = x as u32;
        }
        let g: &mut [u8; 32] = g.try_into().expect("chunks_exact_mut(32)");
        unpack_group::<B>(&w, g);
    }
    let rest = &mut out[full * 32..];
    if !rest.is_empty() {
        let mut w = [0u32; 8];
        for (d, &x) in w.iter_mut().zip(&words[full * B..]) {
            *d = x as u32;
        }
        let mut g = [0u8; 32];
        unpack_group::<B>(&w, &mut g);
        let n = rest.len();
        rest.copy_from_slice(&g[..n]);
    }
}

/// Packs `vals` as a bit stream into `out` (`out.len() == packed_len(vals.len(), bits)`);
/// every word of `out` is overwritten. `bits` has been validated.
#[inline]
fn pack_line(vals: &[u8], bits: u8, out: &mut [i32]) {
    debug_assert_eq!(out.len(), packed_len(vals.len(), bits));
    match bits {
        2 => pack_line_b::<2>(vals, out),
        3 => pack_line_b::<3>(vals, out),
        4 => pack_line_b::<4>(vals, out),
        _ => pack_line_b::<8>(vals, out),
    }
}

/// Inverse of [`pack_line`]: fills all of `out` from the bit stream in `words`.
#[inline]
fn unpack_line(words: &[i32], bits: u8, out: &mut [u8]) {
    debug_assert_eq!(words.len(), packed_len(out.len(), bits));
    match bits {
        2 => unpack_line_b::<2>(words, out),
        3 => unpack_line_b::<3>(words, out),
        4 => unpack_line_b::<4>(words, out),
        _ => unpack_line_b::<8>(words, out),
    }
}

/// `src [rows, cols]` packed along cols -> `[rows, ceil(cols*b/32)]`, row by row.
fn pack_along_cols(src: &[u8], rows: usize, cols: usize, bits: u8) -> Vec<i32> {
    let wc = packed_len(cols, bits);
    let mut out = vec![0i32; rows * wc];
    if wc > 0 {
        out.par_chunks_mut(wc)
            .zip(src.par_chunks(cols))
            .with_min_len(64)
            .for_each(|(dst, row)| pack_line(row, bits, dst));
    }
    out
}

fn unpack_along_cols(packed: &[i32], rows: usize, cols: usize, bits: u8) -> Vec<u8> {
    let wc = packed_len(cols, bits);
    let mut out = vec![0u8; rows * cols];
    if cols > 0 {
        out.par_chunks_mut(cols)
            .zip(packed.par_chunks(wc))
            .with_min_len(64)
            .for_each(|(dst, words)| unpack_line(words, bits, dst));
    }
    out
}

/// `src [rows, cols]` packed along rows (dim 0) -> `[ceil(rows*b/32), cols]`. Each group of 32
/// rows fills `bits` word rows; inner loops run along contiguous columns.
fn pack_along_rows(src: &[u8], rows: usize, cols: usize, bits: u8) -> Vec<i32> {
    let b = bits as usize;
    let mut out = vec![0u32; packed_len(rows, bits) * cols];
    if cols > 0 && rows > 0 {
        out.par_chunks_mut(b * cols)
            .enumerate()
            .for_each(|(g, dst)| {
                let k0 = g * 32;
                for j in 0..(rows - k0).min(32) {
                    let pos = j * b;
                    let (w, off) = (pos / 32, pos % 32);
                    let row = &src[(k0 + j) * cols..][..cols];
                    for (d, &v) in dst[w * cols..][..cols].iter_mut().zip(row) {
                        *d |= u32::from(v) << off;
                    }
                    if off + b > 32 {
                        // Straddling value: its high bits start the next word.
                        for (d, &v) in dst[(w + 1) * cols..][..cols].iter_mut().zip(row) {
                            *d |= u32::from(v) >> (32 - off);
                        }
                    }
                }
            });
    }
    // Same size and alignment: the in-place collect reuses the allocation.
    out.into_iter().map(|w| w as i32).collect()
}

fn unpack_along_rows(packed: &[i32], rows: usize, cols: usize, bits: u8) -> Vec<u8> {
    let b = bits as usize;
    let mask = max_code(bits);
    let mut out = vec![0u8; rows * cols];
    if cols > 0 && rows > 0 {
        out.par_chunks_mut(32 * cols)
            .zip(packed.par_chunks(b * cols))
            .for_each(|(dst, words)| {
                for (j, drow) in dst.chunks_mut(cols).enumerate() {
                    let pos = j * b;
                    let (w, off) = (pos / 32, pos % 32);
                    let lo = &words[w * cols..][..cols];
                    if off + b > 32 {
                        let hi = &words[(w + 1) * cols..][..cols];
                        for ((d, &l), &h) in drow.iter_mut().zip(lo).zip(hi) {
                            let v = ((l as u32) >> off) | ((h as u32) << (32 - off));
                            *d = (v & mask) as u8;
                        }
                    } else {
                        for (d, &l) in drow.iter_mut().zip(lo) {
                            *d = (((l as u32) >> off) & mask) as u8;
                        }
                    }
                }
            });
    }
    out
}

/// Rows of codes handled together by the transposing GPTQ kernels: the transposed side is
/// then read/written in runs of 32 words (two cache lines) per `qweight` row. (Measured on
/// 4096 x 11008 on a loaded 2-core box: 16..128 within noise; one row at a time, or tiles
/// over the input dimension, were about 2x slower.)
const QW_ROWS: usize = 32;

/// Raw output pointer shared by the row-block tasks of [`pack_qweight_into`], which write
/// disjoint elements.
struct SharedOut(*mut i32);
// SAFETY: only used to write disjoint elements from different threads (see pack_qweight_into).
unsafe impl Sync for SharedOut {}
impl SharedOut {
    // A method (not field access) so closures capture the Sync wrapper, not the raw pointer.
    fn ptr(&self) -> *mut i32 {
        self.0
    }
}

/// The transposing kernel behind [`pack_gptq_qweight`]. Each task packs `ob_max` whole code
/// rows along the input (contiguous reads), then writes them transposed: `qweight[w, o0..o0+ob]`
/// for every word row `w`, i.e. runs of `ob` consecutive words. Every element of `packed`
/// (`[ceil(inp*bits/32), out]`) is written.
fn pack_qweight_into(
    codes: &[u8],
    out: usize,
    inp: usize,
    bits: u8,
    ob_max: usize,
    packed: &mut [i32],
) {
    let w_rows = packed_len(inp, bits);
    assert_eq!(packed.len(), w_rows * out, "pack_qweight_into: output size");
    assert_eq!(codes.len(), out * inp, "pack_qweight_into: input size");
    let dst = SharedOut(packed.as_mut_ptr());
    (0..out.div_ceil(ob_max)).into_par_iter().for_each_init(
        || vec![0i32; ob_max * w_rows],
        |local, blk| {
            let o0 = blk * ob_max;
            let ob = (out - o0).min(ob_max);
            for (r, words) in local.chunks_exact_mut(w_rows).take(ob).enumerate() {
                pack_line(&codes[(o0 + r) * inp..][..inp], bits, words);
            }
            for w in 0..w_rows {
                let base = w * out + o0;
                for r in 0..ob {
                    // SAFETY: base + r = w*out + o with o = o0 + r < out, so the index is below
                    // w_rows*out = packed.len() (asserted above); blocks own disjoint o ranges,
                    // so no element is written by two tasks, and `packed` is exclusively
                    // borrowed for the duration of this call.
                    unsafe { *dst.ptr().add(base + r) = local[r * w_rows + w] };
                }
            }
        },
    );
}

/// GPTQ `qweight`: codes `[out, inp]` (a torch weight's orientation) -> int32 `[ceil(inp*bits/32), out]`,
/// packed along the input dimension, lowest input index in the lowest bits; 3-bit packs 32 values
/// in 3 words (10 | straddle | 10 | straddle | 10). `inp` not a multiple of the word group is
/// zero-padded.
pub fn pack_gptq_qweight(codes: &[u8], out: usize, inp: usize, bits: u8) -> Result<Vec<i32>> {
    const WHAT: &str = "GPTQ qweight pack";
    check_bits(bits, WHAT)?;
    check_len(codes.len(), out, inp, WHAT)?;
    check_codes(codes, inp, bits, WHAT)?;
    let w_rows = packed_len(inp, bits);
    let mut packed = vec![0i32; mul(w_rows, out, WHAT)?];
    if packed.is_empty() {
        return Ok(Vec::new());
    }
    pack_qweight_into(codes, out, inp, bits, QW_ROWS, &mut packed);
    Ok(packed)
}

/// Inverse of [`pack_gptq_qweight`]: returns codes `[out, inp]`.
pub fn unpack_gptq_qweight(packed: &[i32], out: usize, inp: usize, bits: u8) -> Result<Vec<u8>> {
    const WHAT: &str = "GPTQ qweight unpack";
    check_bits(bits, WHAT)?;
    let w_rows = packed_len(inp, bits);
    check_len(packed.len(), w_rows, out, WHAT)?;
    let mut codes = vec![0u8; mul(out, inp, WHAT)?];
    if codes.is_empty() {
        return Ok(codes);
    }
    codes
        .par_chunks_mut(QW_ROWS * inp)
        .enumerate()
        .for_each_init(
            || vec![0i32; QW_ROWS * w_rows],
            |local, (blk, rows)| {
                // Gather QW_ROWS columns of qweight (a run of QW_ROWS words per qweight row),
                // then unpack each along the input.
                let o0 = blk * QW_ROWS;
                let ob = rows.len() / inp;
                for w in 0..w_rows {
                    for (r, &x) in packed[w * out + o0..][..ob].iter().enumerate() {
                        local[r * w_rows + w] = x;
                    }
                }
                for (r, row) in rows.chunks_exact_mut(inp).enumerate() {
                    unpack_line(&local[r * w_rows..][..w_rows], bits, row);
                }
            },
        );
    Ok(codes)
}

/// Converts zero points to the unsigned values GPTQ stores, validating their range.
fn gptq_zero_codes(zeros: &[i32], out: usize, bits: u8, v1: bool) -> Result<Vec<u8>> {
    let maxq = max_code(bits) as i32;
    let (lo, hi) = if v1 { (1, maxq + 1) } else { (0, maxq) };
    if let Some(i) = zeros.par_iter().position_first(|&z| z < lo || z > hi) {
        let (g, c) = i.checked_div(out).map_or((0, i), |g| (g, i % out));
        let z = zeros[i];
        if v1 && z == 0 {
            return Err(invalid(format!(
                "GPTQ qzeros pack: asymmetric zero point 0 at [group {g}, column {c}] can't be \
                 stored in GPTQ v1 (v1 stores zero - 1, which would wrap); use checkpoint_format \
                 gptq_v2 or compressed-tensors"
            )));
        }
        return Err(invalid(format!(
            "GPTQ qzeros pack: zero point {z} at [group {g}, column {c}] is outside [{lo}, {hi}], \
             the range GPTQ {} can store at {bits} bits",
            if v1 { "v1" } else { "v2" }
        )));
    }
    let shift = i32::from(v1);
    Ok(zeros.par_iter().map(|&z| (z - shift) as u8).collect())
}

/// GPTQ `qzeros`: zeros `[n_groups, out]` -> int32 `[n_groups, ceil(out*bits/32)]`, packed along
/// the output dimension. `v1 = true` stores `zero - 1` (a zero of 0 is an error: it would wrap);
/// v2 stores the raw zero.
pub fn pack_gptq_qzeros(
    zeros: &[i32],
    n_groups: usize,
    out: usize,
    bits: u8,
    v1: bool,
) -> Result<Vec<i32>> {
    const WHAT: &str = "GPTQ qzeros pack";
    check_bits(bits, WHAT)?;
    check_len(zeros.len(), n_groups, out, WHAT)?;
    let stored = gptq_zero_codes(zeros, out, bits, v1)?;
    Ok(pack_along_cols(&stored, n_groups, out, bits))
}

/// Inverse of [`pack_gptq_qzeros`] (adds the 1 back for v1).
pub fn unpack_gptq_qzeros(
    packed: &[i32],
    n_groups: usize,
    out: usize,
    bits: u8,
    v1: bool,
) -> Result<Vec<i32>> {
    const WHAT: &str = "GPTQ qzeros unpack";
    check_bits(bits, WHAT)?;
    check_len(packed.len(), n_groups, packed_len(out, bits), WHAT)?;
    mul(n_groups, out, WHAT)?;
    let shift = i32::from(v1);
    Ok(unpack_along_cols(packed, n_groups, out, bits)
        .into_iter()
        .map(|z| i32::from(z) + shift)
        .collect())
}

/// compressed-tensors `weight_packed`: codes `[out, inp]` (unsigned, i.e. the signed value
/// shifted by 2^(bits-1)) -> int32 `[out, ceil(inp*bits/32)]` packed along the input within
/// each row; dense (bit-stream) packing for 3 bits, as compressed-tensors does.
pub fn pack_ct_weight(codes: &[u8], out: usize, inp: usize, bits: u8) -> Result<Vec<i32>> {
    const WHAT: &str = "compressed-tensors weight_packed pack";
    check_bits(bits, WHAT)?;
    check_len(codes.len(), out, inp, WHAT)?;
    check_codes(codes, inp, bits, WHAT)?;
    Ok(pack_along_cols(codes, out, inp, bits))
}

/// Inverse of [`pack_ct_weight`]: returns unsigned (shifted) codes `[out, inp]`.
pub fn unpack_ct_weight(packed: &[i32], out: usize, inp: usize, bits: u8) -> Result<Vec<u8>> {
    const WHAT: &str = "compressed-tensors weight_packed unpack";
    check_bits(bits, WHAT)?;
    check_len(packed.len(), out, packed_len(inp, bits), WHAT)?;
    mul(out, inp, WHAT)?;
    Ok(unpack_along_cols(packed, out, inp, bits))
}

/// compressed-tensors `weight_zero_point`: zeros `[out, n_groups]` (unsigned, shifted) packed
/// along dim 0 -> int32 `[ceil(out*bits/32), n_groups]`.
pub fn pack_ct_zero_point(zeros: &[u8], out: usize, n_groups: usize, bits: u8) -> Result<Vec<i32>> {
    const WHAT: &str = "compressed-tensors weight_zero_point pack";
    check_bits(bits, WHAT)?;
    check_len(zeros.len(), out, n_groups, WHAT)?;
    check_codes(zeros, n_groups, bits, WHAT)?;
    Ok(pack_along_rows(zeros, out, n_groups, bits))
}

/// Inverse of [`pack_ct_zero_point`]: returns unsigned (shifted) zeros `[out, n_groups]`.
pub fn unpack_ct_zero_point(
    packed: &[i32],
    out: usize,
    n_groups: usize,
    bits: u8,
) -> Result<Vec<u8>> {
    const WHAT: &str = "compressed-tensors weight_zero_point unpack";
    check_bits(bits, WHAT)?;
    check_len(packed.len(), packed_len(out, bits), n_groups, WHAT)?;
    mul(out, n_groups, WHAT)?;
    Ok(unpack_along_rows(packed, out, n_groups, bits))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    const BITS: [u8; 4] = [2, 3, 4, 8];

    fn random_codes(n: usize, bits: u8, seed: u64) -> Vec<u8> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..n)
            .map(|_| rng.random_range(0..=max_code(bits)) as u8)
            .collect()
    }

    /// Independent reference: bit `p` of the little-endian stream held in `words`, read with
    /// plain bit arithmetic (no word-group logic at all).
    fn stream_bit(words: &[i32], p: usize) -> u32 {
        ((words[p / 32] as u32) >> (p % 32)) & 1
    }
    fn stream_value(words: &[i32], i: usize, bits: u8) -> u8 {
        let b = bits as usize;
        (0..b)
            .map(|t| stream_bit(words, i * b + t) << t)
            .sum::<u32>() as u8
    }

    fn transpose<T: Copy>(m: &[T], rows: usize, cols: usize) -> Vec<T> {
        let mut t = Vec::with_capacity(m.len());
        for c in 0..cols {
            for r in 0..rows {
                t.push(m[r * cols + c]);
            }
        }
        t
    }

    fn err_msg<T: std::fmt::Debug>(r: Result<T>) -> String {
        match r {
            Err(Error::InvalidArgument(m)) => m,
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
    }

    // ---------- hand-worked bit positions ----------

    #[test]
    fn gptq_int4_hand_example() {
        // Two output rows of 8 inputs: one word each, column o of qweight is row o's codes.
        let codes: Vec<u8> = (0..16).collect();
        let q = pack_gptq_qweight(&codes, 2, 8, 4).unwrap();
        assert_eq!(q, vec![0x7654_3210, 0xFEDC_BA98u32 as i32]);
        // 16 inputs, 2 outputs: qweight is [2 word rows, 2 outputs]; word row 1 holds inputs 8..15.
        let codes: Vec<u8> = (0..32).map(|i| (i % 16) as u8).collect(); // row0 = 0..15, row1 = 0..15
        let q = pack_gptq_qweight(&codes, 2, 16, 4).unwrap();
        let lo = 0x7654_3210;
        let hi = 0xFEDC_BA98u32 as i32;
        assert_eq!(q, vec![lo, lo, hi, hi]);
    }

    #[test]
    fn gptq_int3_hand_example_straddles() {
        // 32 inputs, one output. Nonzero codes, chosen to light up every boundary:
        // v0=7 (w0 bits 0..2), v9=1 (w0 bit 27), v10=5=0b101 (low 2 bits 0b01 -> w0 bits 30..31,
        // top bit 1 -> w1 bit 0), v11=7 (w1 bits 1..3), v20=1 (w1 bit 28),
        // v21=3=0b011 (low bit 1 -> w1 bit 31, top 2 bits 0b01 -> w2 bits 0..1),
        // v22=7 (w2 bits 2..4), v31=4=0b100 (w2 bits 29..31 -> bit 31).
        let mut codes = vec![0u8; 32];
        for (i, v) in [
            (0, 7),
            (9, 1),
            (10, 5),
            (11, 7),
            (20, 1),
            (21, 3),
            (22, 7),
            (31, 4),
        ] {
            codes[i] = v;
        }
        let q = pack_gptq_qweight(&codes, 1, 32, 3).unwrap();
        let w0: u32 = 7 | (1 << 27) | (1 << 30); // 0x4800_0007
        let w1: u32 = 1 | (7 << 1) | (1 << 28) | (1 << 31); // 0x9000_000F
        let w2: u32 = 1 | (7 << 2) | (1 << 31); // 0x8000_001D
        assert_eq!(w0, 0x4800_0007);
        assert_eq!(w1, 0x9000_000F);
        assert_eq!(w2, 0x8000_001D);
        assert_eq!(q, vec![w0 as i32, w1 as i32, w2 as i32]);
        assert_eq!(unpack_gptq_qweight(&q, 1, 32, 3).unwrap(), codes);

        // Value 10 = 0b110: low bits 0b10 -> w0 bit 31 only, top bit -> w1 bit 0.
        // Value 21 = 0b110: low bit 0 -> w1 bit 31 clear, top 2 bits 0b11 -> w2 bits 0..1.
        let mut codes = vec![0u8; 32];
        codes[10] = 6;
        codes[21] = 6;
        let q = pack_gptq_qweight(&codes, 1, 32, 3).unwrap();
        assert_eq!(q, vec![(1u32 << 31) as i32, 1, 3]);
    }

    #[test]
    fn gptq_int2_and_int8_hand_examples() {
        // 2-bit: 16 values per word; v0=3 (bits 0..1), v2=1 (bit 4), v3=2 (bit 7), v15=3 (bits 30..31).
        let mut codes = vec![0u8; 16];
        codes[0] = 3;
        codes[2] = 1;
        codes[3] = 2;
        codes[15] = 3;
        let q = pack_gptq_qweight(&codes, 1, 16, 2).unwrap();
        assert_eq!(q, vec![0xC000_0093u32 as i32]);
        // 8-bit: 4 bytes per word, little-endian byte order.
        let q = pack_gptq_qweight(&[0x01, 0x23, 0x45, 0xFE], 1, 4, 8).unwrap();
        assert_eq!(q, vec![0xFE45_2301u32 as i32]);
    }

    #[test]
    fn gptq_padding_when_inp_not_a_multiple() {
        // 4-bit, inp 9: two word rows, the second holds input 8 in its low nibble, rest zero.
        let codes: Vec<u8> = (1..=9).collect();
        let q = pack_gptq_qweight(&codes, 1, 9, 4).unwrap();
        assert_eq!(q, vec![0x8765_4321u32 as i32, 0x9]);
        // 3-bit, inp 33: ceil(99/32) = 4 word rows; input 32 sits in bits 0..2 of word 3.
        let mut codes = vec![0u8; 33];
        codes[32] = 5;
        let q = pack_gptq_qweight(&codes, 1, 33, 3).unwrap();
        assert_eq!(q, vec![0, 0, 0, 5]);
    }

    #[test]
    fn gptq_qzeros_hand_examples() {
        // Symmetric int4: zero 8 everywhere -> v1 stores 7 in every nibble, v2 stores 8.
        let z = vec![8i32; 2 * 8];
        assert_eq!(
            pack_gptq_qzeros(&z, 2, 8, 4, true).unwrap(),
            vec![0x7777_7777; 2]
        );
        assert_eq!(
            pack_gptq_qzeros(&z, 2, 8, 4, false).unwrap(),
            vec![0x8888_8888u32 as i32; 2]
        );
        // v1 minus one: zeros 1..=8 along the output dim -> stored 0..=7.
        let z: Vec<i32> = (1..=8).collect();
        assert_eq!(
            pack_gptq_qzeros(&z, 1, 8, 4, true).unwrap(),
            vec![0x7654_3210]
        );
        assert_eq!(
            pack_gptq_qzeros(&z, 1, 8, 4, false).unwrap(),
            vec![0x8765_4321u32 as i32]
        );
        // v1 can store a zero of 2^bits (stored maxq) and unpack gives it back.
        let z = vec![16i32; 8];
        let p = pack_gptq_qzeros(&z, 1, 8, 4, true).unwrap();
        assert_eq!(p, vec![-1]);
        assert_eq!(unpack_gptq_qzeros(&p, 1, 8, 4, true).unwrap(), z);
        // 3-bit qzeros use the same 32-in-3 scheme along the output dim: out 11, zero 4
        // everywhere, v1 stores 3 = 0b011; column 10 straddles (bits 30..31 of word 0 = 0b11,
        // bit 0 of word 1 = 0).
        let z = vec![4i32; 11];
        let p = pack_gptq_qzeros(&z, 1, 11, 3, true).unwrap();
        let w0: u32 = (0..11).fold(0u32, |acc, j| acc | 3u32.wrapping_shl(3 * j));
        assert_eq!(w0, 0xDB6D_B6DB);
        assert_eq!(p, vec![w0 as i32, 0]);
    }

    #[test]
    fn ct_weight_hand_examples_and_orientation() {
        // compressed-tensors stores signed s as s + 2^(b-1): at 4 bits, s = -8..=7 -> 0..=15.
        let signed: Vec<i8> = (-8..8).collect();
        let shifted: Vec<u8> = signed.iter().map(|&s| (i16::from(s) + 8) as u8).collect();
        assert_eq!(shifted, (0..16).collect::<Vec<u8>>());
        // Row-major [out, words]: one row of 16 inputs -> two words, along the row.
        let p = pack_ct_weight(&shifted, 1, 16, 4).unwrap();
        assert_eq!(p, vec![0x7654_3210, 0xFEDC_BA98u32 as i32]);
        // Two rows of 16: CT is [2 rows, 2 words], GPTQ is its transpose [2 words, 2 outputs].
        let codes: Vec<u8> = (0..32).map(|i| ((i % 16) ^ (i / 16)) as u8).collect();
        let ct = pack_ct_weight(&codes, 2, 16, 4).unwrap();
        let r0 = [0x7654_3210u32 as i32, 0xFEDC_BA98u32 as i32];
        let r1 = [0x6745_2301u32 as i32, 0xEFCD_AB89u32 as i32];
        assert_eq!(ct, vec![r0[0], r0[1], r1[0], r1[1]]);
        let gq = pack_gptq_qweight(&codes, 2, 16, 4).unwrap();
        assert_eq!(gq, vec![r0[0], r1[0], r0[1], r1[1]]);
        // Dense 3-bit: 11 values need 33 bits -> 2 words (no padding to 3 words);
        // value 10 = 0b111 straddles: bits 30..31 of word 0 and bit 0 of word 1.
        let mut codes = vec![0u8; 11];
        codes[10] = 7;
        assert_eq!(
            pack_ct_weight(&codes, 1, 11, 3).unwrap(),
            vec![(3u32 << 30) as i32, 1]
        );
        // 8-bit signed: -128 -> 0, -1 -> 127, 0 -> 128, 127 -> 255.
        let codes = [0u8, 127, 128, 255];
        assert_eq!(
            pack_ct_weight(&codes, 1, 4, 8).unwrap(),
            vec![0xFF80_7F00u32 as i32]
        );
        // 2-bit: 17 values -> 2 words (34 bits), value 16 alone in word 1.
        let mut codes = vec![0u8; 17];
        codes[16] = 2;
        codes[1] = 1;
        assert_eq!(pack_ct_weight(&codes, 1, 17, 2).unwrap(), vec![0x4, 2]);
    }

    #[test]
    fn ct_zero_point_packs_along_dim0() {
        // zeros [out 9, groups 2] at 4 bits -> [ceil(9*4/32)=2, 2]: word row 0 holds outputs
        // 0..7 of each group column, word row 1 holds output 8.
        let mut z = vec![0u8; 18];
        for o in 0..9 {
            z[o * 2] = o as u8; // group 0: 0..8
            z[o * 2 + 1] = 15 - o as u8; // group 1: 15..7
        }
        let p = pack_ct_zero_point(&z, 9, 2, 4).unwrap();
        assert_eq!(p, vec![0x7654_3210, 0x89AB_CDEFu32 as i32, 8, 7]);
        assert_eq!(unpack_ct_zero_point(&p, 9, 2, 4).unwrap(), z);
        // 3-bit along dim 0: outputs 10 and 21 straddle exactly as along any other dim.
        let mut z = vec![0u8; 22];
        z[10] = 5;
        z[21] = 3;
        let p = pack_ct_zero_point(&z, 22, 1, 3).unwrap();
        assert_eq!(p, vec![1 << 30, 1 | (1u32 << 31) as i32, 1]);
    }

    // ---------- exact round trips and agreement with the bit-level reference ----------

    const SHAPES: [(usize, usize); 6] = [(7, 172), (3, 576), (5, 64), (9, 33), (1, 1), (33, 95)];

    #[test]
    fn gptq_qweight_round_trip_and_reference() {
        for bits in BITS {
            for (s, &(out, inp)) in SHAPES.iter().enumerate() {
                let codes = random_codes(out * inp, bits, 100 + s as u64 * 7 + bits as u64);
                let q = pack_gptq_qweight(&codes, out, inp, bits).unwrap();
                let wr = packed_len(inp, bits);
                assert_eq!(q.len(), wr * out);
                assert_eq!(wr, (inp * bits as usize).div_ceil(32));
                for o in 0..out {
                    let col: Vec<i32> = (0..wr).map(|w| q[w * out + o]).collect();
                    for k in 0..inp {
                        assert_eq!(
                            stream_value(&col, k, bits),
                            codes[o * inp + k],
                            "bits {bits} [{o},{k}]"
                        );
                    }
                    // Padding bits are zero.
                    for p in inp * bits as usize..wr * 32 {
                        assert_eq!(stream_bit(&col, p), 0);
                    }
                }
                assert_eq!(
                    unpack_gptq_qweight(&q, out, inp, bits).unwrap(),
                    codes,
                    "bits {bits} {out}x{inp}"
                );
                // Same bit stream as compressed-tensors, transposed.
                let ct = pack_ct_weight(&codes, out, inp, bits).unwrap();
                assert_eq!(transpose(&ct, out, wr), q);
            }
        }
    }

    #[test]
    fn ct_weight_round_trip_and_reference() {
        for bits in BITS {
            for (s, &(out, inp)) in SHAPES.iter().enumerate() {
                let codes = random_codes(out * inp, bits, 200 + s as u64 * 7 + bits as u64);
                let p = pack_ct_weight(&codes, out, inp, bits).unwrap();
                let wc = packed_len(inp, bits);
                assert_eq!(p.len(), out * wc);
                for o in 0..out {
                    let row = &p[o * wc..][..wc];
                    for k in 0..inp {
                        assert_eq!(stream_value(row, k, bits), codes[o * inp + k]);
                    }
                }
                assert_eq!(unpack_ct_weight(&p, out, inp, bits).unwrap(), codes);
            }
        }
    }

    #[test]
    fn qzeros_and_ct_zero_point_round_trips() {
        for bits in BITS {
            for (s, &(groups, out)) in SHAPES.iter().enumerate() {
                let seed = 300 + s as u64 * 7 + bits as u64;
                let raw = random_codes(groups * out, bits, seed);
                // v2: raw zeros 0..=maxq.
                let z2: Vec<i32> = raw.iter().map(|&v| i32::from(v)).collect();
                let p2 = pack_gptq_qzeros(&z2, groups, out, bits, false).unwrap();
                let wc = packed_len(out, bits);
                assert_eq!(p2.len(), groups * wc);
                for g in 0..groups {
                    for c in 0..out {
                        assert_eq!(stream_value(&p2[g * wc..][..wc], c, bits), raw[g * out + c]);
                    }
                }
                assert_eq!(
                    unpack_gptq_qzeros(&p2, groups, out, bits, false).unwrap(),
                    z2
                );
                // v1: zeros 1..=2^bits, stored minus one -> the same words as v2 of raw.
                let z1: Vec<i32> = z2.iter().map(|&z| z + 1).collect();
                let p1 = pack_gptq_qzeros(&z1, groups, out, bits, true).unwrap();
                assert_eq!(p1, p2);
                assert_eq!(
                    unpack_gptq_qzeros(&p1, groups, out, bits, true).unwrap(),
                    z1
                );
                // compressed-tensors zero point [out=groups here, n_groups=out here], dim 0.
                let (zr, zc) = (groups, out);
                let pz = pack_ct_zero_point(&raw, zr, zc, bits).unwrap();
                let wr = packed_len(zr, bits);
                assert_eq!(pz.len(), wr * zc);
                for c in 0..zc {
                    let col: Vec<i32> = (0..wr).map(|w| pz[w * zc + c]).collect();
                    for r in 0..zr {
                        assert_eq!(stream_value(&col, r, bits), raw[r * zc + c]);
                    }
                }
                assert_eq!(unpack_ct_zero_point(&pz, zr, zc, bits).unwrap(), raw);
            }
        }
    }

    #[test]
    fn empty_shapes_are_fine() {
        for bits in BITS {
            assert!(pack_gptq_qweight(&[], 0, 64, bits).unwrap().is_empty());
            assert!(pack_gptq_qweight(&[], 4, 0, bits).unwrap().is_empty());
            assert_eq!(
                unpack_gptq_qweight(&[], 4, 0, bits).unwrap(),
                Vec::<u8>::new()
            );
            assert!(pack_ct_weight(&[], 4, 0, bits).unwrap().is_empty());
            assert!(pack_ct_zero_point(&[], 0, 3, bits).unwrap().is_empty());
            assert!(pack_gptq_qzeros(&[], 0, 3, bits, true).unwrap().is_empty());
        }
    }

    // ---------- errors ----------

    #[test]
    fn rejects_bad_bits() {
        for bits in [0u8, 1, 5, 6, 7, 16] {
            let m = err_msg(pack_gptq_qweight(&[0; 8], 1, 8, bits));
            assert!(
                m.contains("bits must be 2, 3, 4 or 8") && m.contains(&bits.to_string()),
                "{m}"
            );
            assert!(pack_ct_weight(&[0; 8], 1, 8, bits).is_err());
            assert!(unpack_gptq_qweight(&[0; 8], 1, 8, bits).is_err());
            assert!(unpack_ct_weight(&[0; 8], 1, 8, bits).is_err());
            assert!(pack_gptq_qzeros(&[1; 8], 1, 8, bits, true).is_err());
            assert!(unpack_gptq_qzeros(&[0; 8], 1, 8, bits, true).is_err());
            assert!(pack_ct_zero_point(&[0; 8], 8, 1, bits).is_err());
            assert!(unpack_ct_zero_point(&[0; 8], 8, 1, bits).is_err());
        }
    }

    #[test]
    fn rejects_wrong_lengths() {
        let m = err_msg(pack_gptq_qweight(&[0; 10], 2, 6, 4));
        assert!(m.contains("2 x 6 = 12") && m.contains("got 10"), "{m}");
        assert!(pack_ct_weight(&[0; 13], 2, 6, 4).is_err());
        // qweight for out 3, inp 16 at 4 bits is 2 x 3 words.
        let m = err_msg(unpack_gptq_qweight(&[0; 5], 3, 16, 4));
        assert!(m.contains("2 x 3 = 6") && m.contains("got 5"), "{m}");
        assert!(unpack_ct_weight(&[0; 5], 3, 16, 4).is_err());
        assert!(unpack_gptq_qzeros(&[0; 3], 2, 16, 4, false).is_err());
        assert!(pack_gptq_qzeros(&[1; 3], 2, 16, 4, false).is_err());
        assert!(pack_ct_zero_point(&[0; 3], 2, 2, 4).is_err());
        assert!(unpack_ct_zero_point(&[0; 3], 9, 1, 4).is_err());
        // Overflowing shapes are an error, not a panic.
        assert!(pack_gptq_qweight(&[], usize::MAX, 3, 4).is_err());
        assert!(unpack_ct_weight(&[], usize::MAX, usize::MAX, 4).is_err());
    }

    #[test]
    fn rejects_codes_above_maxq_naming_the_first() {
        let mut codes = vec![0u8; 3 * 40];
        codes[2 * 40 + 7] = 8; // first offender at [2, 7]
        codes[2 * 40 + 9] = 200;
        let m = err_msg(pack_gptq_qweight(&codes, 3, 40, 3));
        assert!(
            m.contains("code 8 at [2, 7]") && m.contains("flat index 87") && m.contains("7"),
            "{m}"
        );
        let m = err_msg(pack_ct_weight(&codes, 3, 40, 3));
        assert!(m.contains("code 8 at [2, 7]"), "{m}");
        // 8 fits in 4 bits; 200 fits in 8 bits; 16 does not fit in 4.
        assert!(pack_gptq_qweight(&codes, 3, 40, 8).is_ok());
        codes[2 * 40 + 9] = 16;
        let m = err_msg(pack_ct_weight(&codes, 3, 40, 4));
        assert!(m.contains("code 16 at [2, 9]") && m.contains("15"), "{m}");
        let m = err_msg(pack_ct_zero_point(&[0, 4, 1, 0], 2, 2, 2));
        assert!(m.contains("code 4 at [0, 1]"), "{m}");
    }

    #[test]
    fn rejects_unstorable_zero_points() {
        let mut z = vec![5i32; 2 * 16];
        z[16 + 3] = 0;
        let m = err_msg(pack_gptq_qzeros(&z, 2, 16, 4, true));
        assert!(
            m.contains("asymmetric zero point 0") && m.contains("[group 1, column 3]"),
            "{m}"
        );
        assert!(
            m.contains("gptq_v2") && m.contains("compressed-tensors"),
            "{m}"
        );
        // v2 stores the 0 fine.
        let p = pack_gptq_qzeros(&z, 2, 16, 4, false).unwrap();
        assert_eq!(unpack_gptq_qzeros(&p, 2, 16, 4, false).unwrap(), z);
        // Out-of-range zeros for either version.
        z[16 + 3] = 16;
        let m = err_msg(pack_gptq_qzeros(&z, 2, 16, 4, false));
        assert!(m.contains("zero point 16") && m.contains("[0, 15]"), "{m}");
        z[16 + 3] = 17;
        let m = err_msg(pack_gptq_qzeros(&z, 2, 16, 4, true));
        assert!(m.contains("zero point 17") && m.contains("[1, 16]"), "{m}");
        z[16 + 3] = -1;
        assert!(pack_gptq_qzeros(&z, 2, 16, 4, false).is_err());
    }

    /// Manual timing (best of 5):
    /// `cargo test -p ferroquant-core --release pack::tests::timing -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn timing_4096x11008() {
        fn best<T>(mut f: impl FnMut() -> T) -> (std::time::Duration, T) {
            let mut r = None;
            let mut best = std::time::Duration::MAX;
            for _ in 0..5 {
                let t = std::time::Instant::now();
                let v = f();
                best = best.min(t.elapsed());
                r = Some(v);
            }
            (best, r.expect("ran at least once"))
        }
        println!("rayon threads: {}", rayon::current_num_threads());
        for (out, inp) in [(11008usize, 4096usize), (4096, 11008)] {
            let codes = random_codes(out * inp, 8, 1);
            for bits in [2u8, 3, 4, 8] {
                let codes: Vec<u8> = codes.iter().map(|&c| c & max_code(bits) as u8).collect();
                let (t_chk, _) = best(|| check_codes(&codes, inp, bits, "t").is_ok());
                let (t_pack, q) = best(|| pack_gptq_qweight(&codes, out, inp, bits).unwrap());
                let (t_unpack, back) = best(|| unpack_gptq_qweight(&q, out, inp, bits).unwrap());
                assert_eq!(back, codes);
                let (t_ct, p) = best(|| pack_ct_weight(&codes, out, inp, bits).unwrap());
                let (t_ctu, back) = best(|| unpack_ct_weight(&p, out, inp, bits).unwrap());
                assert_eq!(back, codes);
                println!(
                    "out {out} inp {inp} int{bits}: check {t_chk:?}; gptq pack {t_pack:?} unpack {t_unpack:?}; ct pack {t_ct:?} unpack {t_ctu:?}"
                );
            }
        }
    }
}
