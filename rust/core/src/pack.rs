//! Bit packing of integer codes into int32 words for the GPTQ and compressed-tensors layouts.
//!
//! OWNER: pack/io helper. CONTRACT (do not change signatures without telling the lead).
//! All code inputs are `[rows, cols]` row-major u8 in [0, 2^bits - 1]; bits in {2,3,4,8}.

use crate::error::Result;

/// GPTQ `qweight`: codes `[out, inp]` (a torch weight's orientation) -> int32 `[ceil(inp*bits/32), out]`,
/// packed along the input dimension, lowest input index in the lowest bits; 3-bit packs 32 values
/// in 3 words (10 | straddle | 10 | straddle | 10). `inp` not a multiple of the word group is
/// zero-padded.
pub fn pack_gptq_qweight(codes: &[u8], out: usize, inp: usize, bits: u8) -> Result<Vec<i32>> {
    let _ = (codes, out, inp, bits);
    todo!()
}
/// Inverse of [`pack_gptq_qweight`]: returns codes `[out, inp]`.
pub fn unpack_gptq_qweight(packed: &[i32], out: usize, inp: usize, bits: u8) -> Result<Vec<u8>> {
    let _ = (packed, out, inp, bits);
    todo!()
}
/// GPTQ `qzeros`: zeros `[n_groups, out]` -> int32 `[n_groups, ceil(out*bits/32)]`, packed along
/// the output dimension. `v1 = true` stores `zero - 1` (a zero of 0 is an error: it would wrap);
/// v2 stores the raw zero.
pub fn pack_gptq_qzeros(zeros: &[i32], n_groups: usize, out: usize, bits: u8, v1: bool) -> Result<Vec<i32>> {
    let _ = (zeros, n_groups, out, bits, v1);
    todo!()
}
/// Inverse of [`pack_gptq_qzeros`] (adds the 1 back for v1).
pub fn unpack_gptq_qzeros(packed: &[i32], n_groups: usize, out: usize, bits: u8, v1: bool) -> Result<Vec<i32>> {
    let _ = (packed, n_groups, out, bits, v1);
    todo!()
}
/// compressed-tensors `weight_packed`: codes `[out, inp]` (unsigned, i.e. the signed value
/// shifted by 2^(bits-1)) -> int32 `[out, ceil(inp*bits/32)]` packed along the input within
/// each row; dense (bit-stream) packing for 3 bits, as compressed-tensors does.
pub fn pack_ct_weight(codes: &[u8], out: usize, inp: usize, bits: u8) -> Result<Vec<i32>> {
    let _ = (codes, out, inp, bits);
    todo!()
}
pub fn unpack_ct_weight(packed: &[i32], out: usize, inp: usize, bits: u8) -> Result<Vec<u8>> {
    let _ = (packed, out, inp, bits);
    todo!()
}
/// compressed-tensors `weight_zero_point`: zeros `[out, n_groups]` (unsigned, shifted) packed
/// along dim 0 -> int32 `[ceil(out*bits/32), n_groups]`.
pub fn pack_ct_zero_point(zeros: &[u8], out: usize, n_groups: usize, bits: u8) -> Result<Vec<i32>> {
    let _ = (zeros, out, n_groups, bits);
    todo!()
}
pub fn unpack_ct_zero_point(packed: &[i32], out: usize, n_groups: usize, bits: u8) -> Result<Vec<u8>> {
    let _ = (packed, out, n_groups, bits);
    todo!()
}
