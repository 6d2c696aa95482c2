//! Atomic, sharded safetensors writing from borrowed buffers.
//!
//! [`ShardWriter`] writes one shard at a time from borrowed byte slices (no copy of the tensor
//! data is made: the safetensors crate streams each slice to the file), so a caller can produce
//! tensors shard by shard and drop them once written. Every shard is serialized under a hidden
//! temporary name in the target directory (`.{stem}-{i:05}.safetensors.tmp-{pid}`), fsync'd,
//! and only renamed to its final name (`{stem}.safetensors`, or
//! `{stem}-{i:05}-of-{n:05}.safetensors` plus the index once the shard count `n` is known) when
//! *all* files were written, so a failure midway leaves no partial checkpoint and no temporaries
//! behind. The directory is fsync'd after the renames.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use safetensors::{Dtype, View};

use crate::error::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    I32,
    I64,
    I8,
    U8,
    F16,
    BF16,
    F32,
    /// FP8 E4M3 (``float8_e4m3fn``): compressed-tensors' FP8 weights.
    F8E4M3,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::I8 | DType::U8 | DType::F8E4M3 => 1,
            DType::F16 | DType::BF16 => 2,
            DType::I32 | DType::F32 => 4,
            DType::I64 => 8,
        }
    }

    fn to_safetensors(self) -> Dtype {
        match self {
            DType::I32 => Dtype::I32,
            DType::I64 => Dtype::I64,
            DType::I8 => Dtype::I8,
            DType::U8 => Dtype::U8,
            DType::F16 => Dtype::F16,
            DType::BF16 => Dtype::BF16,
            DType::F32 => Dtype::F32,
            DType::F8E4M3 => Dtype::F8_E4M3,
        }
    }
}

/// One owned tensor: little-endian raw bytes with its dtype and shape.
#[derive(Clone, Debug)]
pub struct TensorBuf {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

impl TensorBuf {
    /// An int32 tensor from native values (stored little-endian).
    pub fn from_i32(name: impl Into<String>, shape: Vec<usize>, values: &[i32]) -> Self {
        let data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        TensorBuf {
            name: name.into(),
            dtype: DType::I32,
            shape,
            data,
        }
    }

    /// A float32 tensor from native values (stored little-endian).
    pub fn from_f32(name: impl Into<String>, shape: Vec<usize>, values: &[f32]) -> Self {
        let data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        TensorBuf {
            name: name.into(),
            dtype: DType::F32,
            shape,
            data,
        }
    }

    pub fn view(&self) -> TensorView<'_> {
        TensorView {
            name: &self.name,
            dtype: self.dtype,
            shape: &self.shape,
            data: &self.data,
        }
    }
}

/// One borrowed tensor: little-endian raw bytes with its dtype and shape.
#[derive(Clone, Copy, Debug)]
pub struct TensorView<'a> {
    pub name: &'a str,
    pub dtype: DType,
    pub shape: &'a [usize],
    pub data: &'a [u8],
}

/// Adapter to the safetensors serializer's trait (the data stays borrowed).
struct StView<'a>(TensorView<'a>);

impl View for StView<'_> {
    fn dtype(&self) -> Dtype {
        self.0.dtype.to_safetensors()
    }
    fn shape(&self) -> &[usize] {
        self.0.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(self.0.data)
    }
    fn data_len(&self) -> usize {
        self.0.data.len()
    }
}

fn invalid(msg: String) -> Error {
    Error::InvalidArgument(msg)
}

fn io_err(what: &str, path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Io(format!("{what} {}: {e}", path.display()))
}

fn check_stem(stem: &str) -> Result<()> {
    if stem.is_empty() || stem.contains(['/', '\\']) || stem.starts_with('.') {
        return Err(invalid(format!(
            "safetensors stem {stem:?} must be a plain, non-hidden file name without a directory"
        )));
    }
    Ok(())
}

/// Checks a tensor's name and that its byte length is shape x dtype size.
fn check_tensor(t: &TensorView<'_>) -> Result<()> {
    if t.name.is_empty() || t.name == "__metadata__" {
        return Err(invalid(format!(
            "tensor name {:?} is not allowed in a safetensors file",
            t.name
        )));
    }
    let expected = t
        .shape
        .iter()
        .try_fold(t.dtype.size(), |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| {
            invalid(format!(
                "tensor {:?}: shape {:?} overflows",
                t.name, t.shape
            ))
        })?;
    if t.data.len() != expected {
        return Err(invalid(format!(
            "tensor {:?}: shape {:?} of {:?} needs {expected} bytes, got {}",
            t.name,
            t.shape,
            t.dtype,
            t.data.len()
        )));
    }
    Ok(())
}

/// The greedy sharding rule: a shard holding `shard_len` tensors of `shard_bytes` is closed
/// before a tensor of `next` bytes that would push it past `max`; a tensor larger than `max`
/// gets a shard of its own. (When everything fits, nothing is ever closed: one file.)
pub fn closes_shard(shard_len: usize, shard_bytes: u64, next: u64, max: Option<u64>) -> bool {
    matches!(max, Some(m) if shard_len > 0 && shard_bytes.saturating_add(next) > m)
}

/// Shards of `sizes` (bytes, in order) under [`closes_shard`], as index ranges.
fn plan_shards(sizes: &[u64], max: Option<u64>) -> Vec<std::ops::Range<usize>> {
    let mut shards = Vec::new();
    let (mut start, mut bytes) = (0usize, 0u64);
    for (i, &n) in sizes.iter().enumerate() {
        if closes_shard(i - start, bytes, n, max) {
            shards.push(start..i);
            start = i;
            bytes = 0;
        }
        bytes += n;
    }
    shards.push(start..sizes.len());
    shards
}

/// Minimal JSON string literal (the index file is the only JSON written here).
fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The `{stem}.safetensors.index.json` text, weight_map sorted by tensor name.
fn index_json(total_size: u64, weight_map: &BTreeMap<&str, &str>) -> String {
    let mut s = format!(
        "{{\n  \"metadata\": {{\n    \"total_size\": {total_size}\n  }},\n  \"weight_map\": {{"
    );
    for (i, (name, file)) in weight_map.iter().enumerate() {
        s.push_str(if i == 0 { "\n" } else { ",\n" });
        s.push_str(&format!("    {}: {}", json_string(name), json_string(file)));
    }
    s.push_str(if weight_map.is_empty() {
        "}\n}\n"
    } else {
        "\n  }\n}\n"
    });
    s
}

fn temp_path(dir: &Path, file: &str) -> PathBuf {
    dir.join(format!(".{file}.tmp-{}", std::process::id()))
}

/// Temporary name of shard `i` (1-based), before the shard count is known.
fn shard_temp_path(dir: &Path, stem: &str, i: usize) -> PathBuf {
    temp_path(dir, &format!("{stem}-{i:05}.safetensors"))
}

fn sync_file(path: &Path) -> Result<()> {
    fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| io_err("cannot fsync", path, e))
}

/// Temporaries written so far; removed on drop unless committed (renamed into place).
#[derive(Default)]
struct Staged {
    temps: Vec<PathBuf>,
}

impl Staged {
    /// Renames temporary `i` to `dsts[i]`.
    fn commit(mut self, dsts: Vec<PathBuf>, dir: &Path) -> Result<Vec<PathBuf>> {
        let temps = std::mem::take(&mut self.temps);
        for (i, (tmp, dst)) in temps.iter().zip(&dsts).enumerate() {
            if let Err(e) = fs::rename(tmp, dst) {
                // Leave no temporaries behind; files already renamed are complete.
                for t in &temps[i..] {
                    let _ = fs::remove_file(t);
                }
                return Err(io_err("cannot rename into place", dst, e));
            }
        }
        // Make the renames durable. Directory fsync is not supported everywhere: best effort.
        if let Ok(d) = fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(dsts)
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        for tmp in &self.temps {
            let _ = fs::remove_file(tmp);
        }
    }
}

/// Writes a (possibly sharded) safetensors checkpoint one shard at a time.
///
/// Call [`write_shard`](Self::write_shard) with the tensors of each shard in order (use
/// [`closes_shard`] to decide where a shard ends), then [`finish`](Self::finish). Dropping the
/// writer without finishing removes every temporary: nothing of the call remains.
pub struct ShardWriter {
    dir: PathBuf,
    stem: String,
    max_shard_bytes: Option<u64>,
    meta: HashMap<String, String>,
    staged: Staged,
    /// Tensor names of each written shard.
    shards: Vec<Vec<String>>,
    seen: HashSet<String>,
    total: u64,
}

impl ShardWriter {
    /// Checks the stem and limit and creates `dir` if missing. `metadata` goes into every
    /// file's `__metadata__`; `"format": "pt"` is added when absent (transformers expects it).
    pub fn new(
        dir: &Path,
        stem: &str,
        max_shard_bytes: Option<u64>,
        metadata: Option<BTreeMap<String, String>>,
    ) -> Result<Self> {
        check_stem(stem)?;
        if max_shard_bytes == Some(0) {
            return Err(invalid(
                "max_shard_bytes must be positive (or None for a single file)".into(),
            ));
        }
        fs::create_dir_all(dir).map_err(|e| io_err("cannot create directory", dir, e))?;
        let mut meta: HashMap<String, String> = metadata.unwrap_or_default().into_iter().collect();
        meta.entry("format".into()).or_insert_with(|| "pt".into());
        Ok(ShardWriter {
            dir: dir.to_path_buf(),
            stem: stem.to_string(),
            max_shard_bytes,
            meta,
            staged: Staged::default(),
            shards: Vec::new(),
            seen: HashSet::new(),
            total: 0,
        })
    }

    pub fn max_shard_bytes(&self) -> Option<u64> {
        self.max_shard_bytes
    }

    /// Validates `tensors` (names new and allowed, byte lengths) and writes them as the next
    /// shard's temporary file. Within a file the safetensors crate orders tensors by dtype
    /// alignment, then name.
    pub fn write_shard(&mut self, tensors: &[TensorView<'_>]) -> Result<()> {
        let mut names = Vec::with_capacity(tensors.len());
        for t in tensors {
            check_tensor(t)?;
            if self.seen.contains(t.name) || names.contains(&t.name) {
                return Err(invalid(format!(
                    "tensor {:?} appears twice in the tensors to write",
                    t.name
                )));
            }
            names.push(t.name);
        }
        let i = self.shards.len() + 1;
        let tmp = shard_temp_path(&self.dir, &self.stem, i);
        // Register first so a partially written temporary is removed on error.
        self.staged.temps.push(tmp.clone());
        let views = tensors.iter().map(|t| (t.name, StView(*t)));
        safetensors::serialize_to_file(views, Some(self.meta.clone()), &tmp).map_err(|e| {
            io_err(
                &format!("cannot write shard {i} of {}.safetensors to", self.stem),
                &tmp,
                e,
            )
        })?;
        sync_file(&tmp)?;
        self.total += tensors.iter().map(|t| t.data.len() as u64).sum::<u64>();
        self.seen.extend(names.iter().map(|n| n.to_string()));
        self.shards
            .push(names.into_iter().map(str::to_string).collect());
        Ok(())
    }

    /// Writes the index (when there is more than one shard) and renames every file into
    /// place. Returns the shards in order, then the index. With no shard written, one empty
    /// file is written. Existing files of the same names are replaced; other files in the
    /// directory are left alone.
    pub fn finish(mut self) -> Result<Vec<PathBuf>> {
        if self.shards.is_empty() {
            self.write_shard(&[])?;
        }
        let n = self.shards.len();
        let names: Vec<String> = if n == 1 {
            vec![format!("{}.safetensors", self.stem)]
        } else {
            (1..=n)
                .map(|i| format!("{}-{i:05}-of-{n:05}.safetensors", self.stem))
                .collect()
        };
        let mut dsts: Vec<PathBuf> = names.iter().map(|f| self.dir.join(f)).collect();
        if n > 1 {
            let mut weight_map = BTreeMap::new();
            for (tensors, file) in self.shards.iter().zip(&names) {
                for t in tensors {
                    weight_map.insert(t.as_str(), file.as_str());
                }
            }
            let file = format!("{}.safetensors.index.json", self.stem);
            let dst = self.dir.join(&file);
            let tmp = temp_path(&self.dir, &file);
            self.staged.temps.push(tmp.clone());
            fs::File::create(&tmp)
                .and_then(|mut f| {
                    f.write_all(index_json(self.total, &weight_map).as_bytes())?;
                    f.sync_all()
                })
                .map_err(|e| io_err("cannot write index", &dst, e))?;
            dsts.push(dst);
        }
        let staged = std::mem::take(&mut self.staged);
        staged.commit(dsts, &self.dir)
    }
}

/// Write `tensors` into `dir` as `{stem}.safetensors`, or, when their total exceeds
/// `max_shard_bytes`, as `{stem}-00001-of-0000N.safetensors` plus `{stem}.safetensors.index.json`
/// (`{"metadata": {"total_size": ...}, "weight_map": {...}}`), through [`ShardWriter`]: the
/// data is borrowed, never copied. Returns the written paths.
/// Errors: duplicate names, data length != shape x dtype size, I/O failures (message names the file).
///
/// Details: `dir` is created if missing. Sharding is greedy in the given order by tensor bytes
/// ([`closes_shard`]). The returned paths are the shards in order, then the index.
pub fn write_safetensors(
    dir: &Path,
    stem: &str,
    tensors: &[TensorView<'_>],
    max_shard_bytes: Option<u64>,
    metadata: Option<BTreeMap<String, String>>,
) -> Result<Vec<PathBuf>> {
    // Everything checkable is checked before anything touches the disk.
    check_stem(stem)?;
    let mut seen = HashSet::with_capacity(tensors.len());
    for t in tensors {
        check_tensor(t)?;
        if !seen.insert(t.name) {
            return Err(invalid(format!(
                "tensor {:?} appears twice in the tensors to write",
                t.name
            )));
        }
    }
    let mut writer = ShardWriter::new(dir, stem, max_shard_bytes, metadata)?;
    let sizes: Vec<u64> = tensors.iter().map(|t| t.data.len() as u64).collect();
    for range in plan_shards(&sizes, max_shard_bytes) {
        writer.write_shard(&tensors[range])?;
    }
    writer.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::SafeTensors;

    fn write_owned(
        dir: &Path,
        stem: &str,
        tensors: Vec<TensorBuf>,
        max: Option<u64>,
        meta: Option<BTreeMap<String, String>>,
    ) -> Result<Vec<PathBuf>> {
        let views: Vec<TensorView<'_>> = tensors.iter().map(TensorBuf::view).collect();
        write_safetensors(dir, stem, &views, max, meta)
    }

    /// A fresh empty directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);
    impl TempDir {
        fn new(tag: &str) -> Self {
            use std::sync::atomic::{AtomicUsize, Ordering};
            static N: AtomicUsize = AtomicUsize::new(0);
            let p = std::env::temp_dir().join(format!(
                "ferroquant-io-{tag}-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = fs::remove_dir_all(&p);
            fs::create_dir_all(&p).unwrap();
            TempDir(p)
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn listing(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    fn raw(name: &str, dtype: DType, shape: &[usize], seed: u8) -> TensorBuf {
        let n: usize = shape.iter().product::<usize>() * dtype.size();
        let data = (0..n)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect();
        TensorBuf {
            name: name.into(),
            dtype,
            shape: shape.to_vec(),
            data,
        }
    }

    fn all_dtypes() -> Vec<TensorBuf> {
        vec![
            TensorBuf::from_i32(
                "layer.qweight",
                vec![2, 3],
                &[1, -2, 3, i32::MIN, i32::MAX, 0],
            ),
            raw("layer.g_idx64", DType::I64, &[5], 1),
            raw("layer.i8", DType::I8, &[3, 3], 2),
            raw("layer.u8", DType::U8, &[7], 3),
            raw("layer.scales", DType::F16, &[4, 2], 4),
            raw("layer.bf16", DType::BF16, &[3], 5),
            TensorBuf::from_f32("layer.f32", vec![2, 2], &[1.5, -0.25, f32::MAX, 0.0]),
            raw("scalar", DType::F32, &[], 6),
            raw("empty", DType::F16, &[0, 4], 7),
        ]
    }

    fn check_file_holds(path: &Path, expected: &[&TensorBuf]) {
        let bytes = fs::read(path).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.len(), expected.len(), "{}", path.display());
        for t in expected {
            let v = st.tensor(&t.name).unwrap();
            assert_eq!(v.dtype(), t.dtype.to_safetensors(), "{}", t.name);
            assert_eq!(v.shape(), &t.shape[..], "{}", t.name);
            assert_eq!(v.data(), &t.data[..], "{}", t.name);
        }
        let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
        assert_eq!(
            meta.metadata()
                .as_ref()
                .unwrap()
                .get("format")
                .map(String::as_str),
            Some("pt")
        );
    }

    #[test]
    fn single_file_round_trip_all_dtypes() {
        let d = TempDir::new("single");
        let tensors = all_dtypes();
        let mut meta = BTreeMap::new();
        meta.insert("quantizer".to_string(), "ferroquant".to_string());
        let paths = write_owned(&d.0, "model", tensors.clone(), None, Some(meta)).unwrap();
        assert_eq!(paths, vec![d.0.join("model.safetensors")]);
        assert_eq!(listing(&d.0), vec!["model.safetensors"]);
        check_file_holds(&paths[0], &tensors.iter().collect::<Vec<_>>());
        // User metadata kept alongside the default format.
        let bytes = fs::read(&paths[0]).unwrap();
        let (_, m) = SafeTensors::read_metadata(&bytes).unwrap();
        assert_eq!(m.metadata().as_ref().unwrap()["quantizer"], "ferroquant");
        // int32 bytes are little-endian values.
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let q = st.tensor("layer.qweight").unwrap();
        let vals: Vec<i32> = q
            .data()
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(vals, vec![1, -2, 3, i32::MIN, i32::MAX, 0]);
        // A limit above the total still writes one unsharded file (and replaces the old one).
        let paths = write_owned(&d.0, "model", tensors, Some(1 << 20), None).unwrap();
        assert_eq!(paths, vec![d.0.join("model.safetensors")]);
        assert_eq!(listing(&d.0), vec!["model.safetensors"]);
    }

    #[test]
    fn sharding_is_greedy_and_index_is_consistent() {
        let d = TempDir::new("shard");
        // 400, 400, 100, 1000 (oversized), 300, 50 bytes (2250) with a 600-byte limit:
        // [a] [b c] [big] [d e]  -> greedy in order, the big one alone.
        let tensors = vec![
            raw("a", DType::F32, &[100], 1),
            raw("b", DType::F32, &[10, 10], 2),
            raw("c", DType::U8, &[100], 3),
            raw("big", DType::I32, &[250], 4),
            raw("d", DType::F16, &[150], 5),
            raw("e", DType::U8, &[50], 6),
        ];
        let paths = write_owned(&d.0, "model", tensors.clone(), Some(600), None).unwrap();
        let shard_names: Vec<String> = (1..=4)
            .map(|i| format!("model-{i:05}-of-00004.safetensors"))
            .collect();
        let mut expected_paths: Vec<PathBuf> = shard_names.iter().map(|n| d.0.join(n)).collect();
        expected_paths.push(d.0.join("model.safetensors.index.json"));
        assert_eq!(paths, expected_paths);
        let mut files = shard_names.clone();
        files.push("model.safetensors.index.json".into());
        files.sort();
        assert_eq!(listing(&d.0), files);

        let groups: [&[usize]; 4] = [&[0], &[1, 2], &[3], &[4, 5]];
        for (g, path) in groups.iter().zip(&paths) {
            let exp: Vec<&TensorBuf> = g.iter().map(|&i| &tensors[i]).collect();
            check_file_holds(path, &exp);
        }
        // Index: total_size = tensor bytes; every tensor mapped to the shard that holds it.
        let index = fs::read_to_string(&paths[4]).unwrap();
        assert!(index.contains("\"total_size\": 2250"), "{index}");
        for (g, file) in groups.iter().zip(&shard_names) {
            for &i in g.iter() {
                let entry = format!("{}: {}", json_string(&tensors[i].name), json_string(file));
                assert!(index.contains(&entry), "{entry} missing from {index}");
            }
        }
        assert_eq!(index.matches(".safetensors\"").count(), tensors.len());
    }

    #[test]
    fn index_is_valid_json_for_python() {
        // Names with characters that need escaping; the file is parsed by Python's json when
        // available (skipped otherwise), and by a structural check here.
        let d = TempDir::new("json");
        let tensors = vec![
            raw("we\"ird\\name", DType::U8, &[8], 1),
            raw("tab\tname", DType::U8, &[8], 2),
        ];
        let paths = write_owned(&d.0, "m", tensors, Some(8), None).unwrap();
        let index = fs::read_to_string(&paths[2]).unwrap();
        assert!(
            index.contains(r#""we\"ird\\name": "m-00001-of-00002.safetensors""#),
            "{index}"
        );
        assert!(
            index.contains(r#""tab\tname": "m-00002-of-00002.safetensors""#),
            "{index}"
        );
        let py = "import json,sys; d=json.load(open(sys.argv[1])); \
                  assert d['metadata']['total_size']==16, d; \
                  assert d['weight_map']=={'we\"ird\\\\name':'m-00001-of-00002.safetensors','tab\\tname':'m-00002-of-00002.safetensors'}, d";
        // any Python reads JSON: the one running the tests, else the system's
        let exes = [
            std::env::var("PYTHON").unwrap_or_else(|_| "python3".into()),
            "python".into(),
        ];
        for exe in &exes {
            if let Ok(o) = std::process::Command::new(exe)
                .arg("-c")
                .arg(py)
                .arg(&paths[2])
                .output()
            {
                assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
                break;
            }
        }
    }

    #[test]
    fn empty_tensor_list_writes_a_valid_empty_file() {
        let d = TempDir::new("empty");
        let paths = write_owned(&d.0, "model", vec![], Some(10), None).unwrap();
        check_file_holds(&paths[0], &[]);
    }

    #[test]
    fn bad_input_writes_nothing() {
        let d = TempDir::new("bad");
        let dup = vec![
            raw("x", DType::U8, &[4], 1),
            raw("y", DType::U8, &[4], 1),
            raw("x", DType::U8, &[2], 1),
        ];
        let e = write_owned(&d.0, "model", dup, Some(4), None).unwrap_err();
        assert!(
            matches!(&e, Error::InvalidArgument(m) if m.contains("\"x\" appears twice")),
            "{e}"
        );
        let mut bad = raw("layer.scales", DType::F16, &[3, 4], 1);
        bad.data.pop();
        let e = write_owned(
            &d.0,
            "model",
            vec![raw("ok", DType::U8, &[4], 1), bad],
            None,
            None,
        )
        .unwrap_err();
        assert!(
            matches!(&e, Error::InvalidArgument(m) if m.contains("layer.scales") && m.contains("needs 24 bytes, got 23")),
            "{e}"
        );
        for stem in ["", "a/b", ".hidden"] {
            assert!(write_owned(&d.0, stem, vec![], None, None).is_err());
        }
        assert!(write_owned(
            &d.0,
            "m",
            vec![raw("__metadata__", DType::U8, &[1], 0)],
            None,
            None
        )
        .is_err());
        assert!(write_owned(&d.0, "m", vec![], Some(0), None).is_err());
        let huge = TensorBuf {
            name: "h".into(),
            dtype: DType::I64,
            shape: vec![usize::MAX, 2],
            data: vec![],
        };
        assert!(write_owned(&d.0, "m", vec![huge], None, None).is_err());
        assert_eq!(listing(&d.0), Vec::<String>::new());
    }

    #[test]
    fn io_failure_names_the_file_and_leaves_no_temporaries() {
        let d = TempDir::new("iofail");
        // A directory squatting on the second shard's final name: the writes succeed, the
        // rename onto it fails, and nothing of the call remains but what was committed first.
        let blocker = d.0.join("model-00002-of-00002.safetensors");
        fs::create_dir(&blocker).unwrap();
        fs::write(blocker.join("keep"), b"x").unwrap();
        let tensors = vec![raw("a", DType::U8, &[8], 1), raw("b", DType::U8, &[8], 2)];
        let e = write_owned(&d.0, "model", tensors, Some(8), None).unwrap_err();
        assert!(
            matches!(&e, Error::Io(m) if m.contains("model-00002-of-00002.safetensors")),
            "{e}"
        );
        let left = listing(&d.0);
        assert!(
            left.iter().all(|f| !f.contains(".tmp")),
            "temporaries left: {left:?}"
        );
        assert!(
            !left.contains(&"model.safetensors.index.json".to_string()),
            "{left:?}"
        );

        // An output "directory" that is a file: the error names it and nothing is created.
        let file = d.0.join("not-a-dir");
        fs::write(&file, b"x").unwrap();
        let e = write_owned(&file, "model", vec![], None, None).unwrap_err();
        assert!(matches!(&e, Error::Io(m) if m.contains("not-a-dir")), "{e}");
    }

    #[test]
    fn serialization_failure_on_a_later_shard_leaves_no_file() {
        // Squat on the second shard's *temporary* name with a directory: shard 1 is fully
        // written to its temporary, shard 2 fails, and neither any final file nor shard 1's
        // temporary may remain.
        let d = TempDir::new("midway");
        let squat = shard_temp_path(&d.0, "model", 2);
        fs::create_dir(&squat).unwrap();
        fs::write(squat.join("keep"), b"x").unwrap();
        let tensors = vec![raw("a", DType::U8, &[8], 1), raw("b", DType::U8, &[8], 2)];
        let e = write_owned(&d.0, "model", tensors, Some(8), None).unwrap_err();
        assert!(
            matches!(&e, Error::Io(m) if m.contains("shard 2 of model.safetensors") && m.contains(".model-00002.safetensors.tmp-")),
            "{e}"
        );
        fs::remove_dir_all(&squat).unwrap();
        assert_eq!(listing(&d.0), Vec::<String>::new());
    }

    #[test]
    fn write_failure_midway_removes_temporaries() {
        // A read-only directory makes the very first temporary fail (unless running as root,
        // where permissions do not apply: then the write succeeds and we only check cleanliness).
        use std::os::unix::fs::PermissionsExt;
        let d = TempDir::new("ro");
        fs::set_permissions(&d.0, fs::Permissions::from_mode(0o555)).unwrap();
        let r = write_owned(
            &d.0,
            "model",
            vec![raw("a", DType::U8, &[8], 1)],
            None,
            None,
        );
        fs::set_permissions(&d.0, fs::Permissions::from_mode(0o755)).unwrap();
        let left = listing(&d.0);
        match r {
            Err(Error::Io(m)) => {
                assert!(m.contains("model.safetensors"), "{m}");
                assert!(left.is_empty(), "{left:?}");
            }
            Ok(_) => assert_eq!(left, vec!["model.safetensors"]),
            Err(e) => panic!("unexpected error {e}"),
        }
    }

    #[test]
    fn plan_shards_edge_cases() {
        let ts = [5, 5, 5];
        assert_eq!(plan_shards(&ts, Some(10)), vec![0..2, 2..3]);
        assert_eq!(plan_shards(&ts, Some(15)), vec![0..3]);
        assert_eq!(plan_shards(&ts, Some(4)), vec![0..1, 1..2, 2..3]);
        assert_eq!(plan_shards(&ts, None), vec![0..3]);
        assert_eq!(plan_shards(&[], Some(4)), vec![0..0]);
        // A tensor past the limit is alone; the rule never closes an empty shard.
        assert_eq!(plan_shards(&[2, 9, 2], Some(4)), vec![0..1, 1..2, 2..3]);
        assert!(!closes_shard(0, 0, u64::MAX, Some(1)));
        assert!(!closes_shard(3, u64::MAX, 1, None));
    }

    #[test]
    fn shard_writer_streams_and_names_shards_at_the_end() {
        // Shards are written one call at a time from borrowed data; their final names (and
        // the index) appear only at finish, when the count is known.
        let d = TempDir::new("stream");
        let a = raw("a", DType::F32, &[4], 1);
        let b = raw("b", DType::I32, &[2, 2], 2);
        let c = raw("c", DType::BF16, &[3], 3);
        let mut w = ShardWriter::new(&d.0, "model", Some(16), None).unwrap();
        w.write_shard(&[a.view()]).unwrap();
        w.write_shard(&[b.view(), c.view()]).unwrap();
        let left = listing(&d.0);
        assert_eq!(left.len(), 2, "{left:?}");
        assert!(
            left.iter()
                .all(|f| f.starts_with(".model-0000") && f.contains(".tmp-")),
            "{left:?}"
        );
        // A name already written in an earlier shard is refused.
        let e = w
            .write_shard(&[raw("a", DType::U8, &[1], 0).view()])
            .unwrap_err();
        assert!(
            matches!(&e, Error::InvalidArgument(m) if m.contains("\"a\" appears twice")),
            "{e}"
        );
        let paths = w.finish().unwrap();
        assert_eq!(
            paths,
            vec![
                d.0.join("model-00001-of-00002.safetensors"),
                d.0.join("model-00002-of-00002.safetensors"),
                d.0.join("model.safetensors.index.json"),
            ]
        );
        check_file_holds(&paths[0], &[&a]);
        check_file_holds(&paths[1], &[&b, &c]);
        let index = fs::read_to_string(&paths[2]).unwrap();
        assert!(index.contains("\"total_size\": 38"), "{index}");

        // Dropped before finish: every temporary goes, nothing is renamed.
        let d2 = TempDir::new("stream-drop");
        let mut w = ShardWriter::new(&d2.0, "model", None, None).unwrap();
        w.write_shard(&[a.view()]).unwrap();
        drop(w);
        assert_eq!(listing(&d2.0), Vec::<String>::new());
    }
}
