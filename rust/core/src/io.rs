//! Atomic, sharded safetensors writing from Rust buffers.
//!
//! OWNER: pack/io helper. CONTRACT (do not change signatures without telling the lead).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::error::Result;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    I32,
    I64,
    I8,
    U8,
    F16,
    BF16,
    F32,
}

/// One tensor: little-endian raw bytes with its dtype and shape.
#[derive(Clone, Debug)]
pub struct TensorBuf {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

/// Write `tensors` into `dir` as `{stem}.safetensors`, or, when their total exceeds
/// `max_shard_bytes`, as `{stem}-00001-of-0000N.safetensors` plus `{stem}.safetensors.index.json`
/// (`{"metadata": {"total_size": ...}, "weight_map": {...}}`). Each file is written under a
/// temporary name in `dir` and renamed into place. Returns the written paths.
/// Errors: duplicate names, data length != shape x dtype size, I/O failures (message names the file).
pub fn write_safetensors(
    dir: &Path,
    stem: &str,
    tensors: Vec<TensorBuf>,
    max_shard_bytes: Option<u64>,
    metadata: Option<BTreeMap<String, String>>,
) -> Result<Vec<PathBuf>> {
    let _ = (dir, stem, tensors, max_shard_bytes, metadata);
    todo!()
}
