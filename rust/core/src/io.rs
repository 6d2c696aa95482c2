//! Atomic, sharded safetensors writing from Rust buffers.
//!
//! Every file is serialized by the `safetensors` crate under a hidden temporary name in the
//! target directory (`.{file}.tmp-{pid}`), fsync'd, and only renamed into place once *all*
//! files of the call (every shard and the index) were written, so a failure midway leaves
//! no partial checkpoint and no temporaries behind. The directory is fsync'd after the renames.

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
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::I8 | DType::U8 => 1,
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
        }
    }
}

/// One tensor: little-endian raw bytes with its dtype and shape.
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
}

/// Borrowed view handed to the safetensors serializer (no copy of the data).
struct BufView<'a> {
    dtype: Dtype,
    shape: &'a [usize],
    data: &'a [u8],
}

impl View for BufView<'_> {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

fn invalid(msg: String) -> Error {
    Error::InvalidArgument(msg)
}

fn io_err(what: &str, path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Io(format!("{what} {}: {e}", path.display()))
}

/// Checks names, shapes and byte lengths before anything touches the disk.
fn validate(stem: &str, tensors: &[TensorBuf], max_shard_bytes: Option<u64>) -> Result<()> {
    if stem.is_empty() || stem.contains(['/', '\\']) || stem.starts_with('.') {
        return Err(invalid(format!(
            "safetensors stem {stem:?} must be a plain, non-hidden file name without a directory"
        )));
    }
    if max_shard_bytes == Some(0) {
        return Err(invalid(
            "max_shard_bytes must be positive (or None for a single file)".into(),
        ));
    }
    let mut seen = HashSet::with_capacity(tensors.len());
    for t in tensors {
        if t.name.is_empty() || t.name == "__metadata__" {
            return Err(invalid(format!(
                "tensor name {:?} is not allowed in a safetensors file",
                t.name
            )));
        }
        if !seen.insert(t.name.as_str()) {
            return Err(invalid(format!(
                "tensor {:?} appears twice in the tensors to write",
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
    }
    Ok(())
}

/// Greedy sharding in the given order: a shard is closed when the next tensor would push it
/// past `max`; a tensor larger than `max` gets a shard of its own. Returns index ranges.
fn plan_shards(tensors: &[TensorBuf], max: Option<u64>) -> Vec<std::ops::Range<usize>> {
    let total: u64 = tensors.iter().map(|t| t.data.len() as u64).sum();
    let max = match max {
        Some(m) if total > m => m,
        _ => return std::iter::once(0..tensors.len()).collect(),
    };
    let mut shards = Vec::new();
    let (mut start, mut size) = (0usize, 0u64);
    for (i, t) in tensors.iter().enumerate() {
        let n = t.data.len() as u64;
        if i > start && size + n > max {
            shards.push(start..i);
            start = i;
            size = 0;
        }
        size += n;
    }
    shards.push(start..tensors.len());
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

fn sync_file(path: &Path) -> Result<()> {
    fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| io_err("cannot fsync", path, e))
}

/// Temporaries written so far; removed on drop unless committed (renamed into place).
struct Staged {
    files: Vec<(PathBuf, PathBuf)>,
}

impl Staged {
    fn commit(mut self, dir: &Path) -> Result<Vec<PathBuf>> {
        let files = std::mem::take(&mut self.files);
        let mut done = Vec::with_capacity(files.len());
        for (i, (tmp, dst)) in files.iter().enumerate() {
            if let Err(e) = fs::rename(tmp, dst) {
                // Leave no temporaries behind; files already renamed are complete.
                for (t, _) in &files[i..] {
                    let _ = fs::remove_file(t);
                }
                return Err(io_err("cannot rename into place", dst, e));
            }
            done.push(dst.clone());
        }
        // Make the renames durable. Directory fsync is not supported everywhere: best effort.
        if let Ok(d) = fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(done)
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        for (tmp, _) in &self.files {
            let _ = fs::remove_file(tmp);
        }
    }
}

/// Write `tensors` into `dir` as `{stem}.safetensors`, or, when their total exceeds
/// `max_shard_bytes`, as `{stem}-00001-of-0000N.safetensors` plus `{stem}.safetensors.index.json`
/// (`{"metadata": {"total_size": ...}, "weight_map": {...}}`). Each file is written under a
/// temporary name in `dir` and renamed into place. Returns the written paths.
/// Errors: duplicate names, data length != shape x dtype size, I/O failures (message names the file).
///
/// Details: `dir` is created if missing. Sharding is greedy in the given order by tensor bytes
/// (a tensor larger than the limit gets a shard of its own). `metadata` goes into every file's
/// `__metadata__`; `"format": "pt"` is added when absent (transformers expects it). Within a
/// file the safetensors crate orders tensors by dtype alignment, then name. The returned paths
/// are the shards in order, then the index. Existing files of the same names are replaced;
/// other files in `dir` are left alone.
pub fn write_safetensors(
    dir: &Path,
    stem: &str,
    tensors: Vec<TensorBuf>,
    max_shard_bytes: Option<u64>,
    metadata: Option<BTreeMap<String, String>>,
) -> Result<Vec<PathBuf>> {
    validate(stem, &tensors, max_shard_bytes)?;
    fs::create_dir_all(dir).map_err(|e| io_err("cannot create directory", dir, e))?;

    let mut meta: HashMap<String, String> = metadata.unwrap_or_default().into_iter().collect();
    meta.entry("format".into()).or_insert_with(|| "pt".into());

    let shards = plan_shards(&tensors, max_shard_bytes);
    let n = shards.len();
    let names: Vec<String> = if n == 1 {
        vec![format!("{stem}.safetensors")]
    } else {
        (1..=n)
            .map(|i| format!("{stem}-{i:05}-of-{n:05}.safetensors"))
            .collect()
    };

    let mut staged = Staged {
        files: Vec::with_capacity(n + 1),
    };
    for (range, file) in shards.iter().zip(&names) {
        let dst = dir.join(file);
        let tmp = temp_path(dir, file);
        // Register first so a partially written temporary is removed on error.
        staged.files.push((tmp.clone(), dst.clone()));
        let views = tensors[range.clone()].iter().map(|t| {
            (
                t.name.as_str(),
                BufView {
                    dtype: t.dtype.to_safetensors(),
                    shape: &t.shape,
                    data: &t.data,
                },
            )
        });
        safetensors::serialize_to_file(views, Some(meta.clone()), &tmp)
            .map_err(|e| io_err("cannot write safetensors file", &dst, e))?;
        sync_file(&tmp)?;
    }

    if n > 1 {
        let total: u64 = tensors.iter().map(|t| t.data.len() as u64).sum();
        let mut weight_map = BTreeMap::new();
        for (range, file) in shards.iter().zip(&names) {
            for t in &tensors[range.clone()] {
                weight_map.insert(t.name.as_str(), file.as_str());
            }
        }
        let file = format!("{stem}.safetensors.index.json");
        let dst = dir.join(&file);
        let tmp = temp_path(dir, &file);
        staged.files.push((tmp.clone(), dst.clone()));
        fs::File::create(&tmp)
            .and_then(|mut f| {
                f.write_all(index_json(total, &weight_map).as_bytes())?;
                f.sync_all()
            })
            .map_err(|e| io_err("cannot write index", &dst, e))?;
    }

    staged.commit(dir)
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::SafeTensors;

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
        let paths = write_safetensors(&d.0, "model", tensors.clone(), None, Some(meta)).unwrap();
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
        let paths = write_safetensors(&d.0, "model", tensors, Some(1 << 20), None).unwrap();
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
        let paths = write_safetensors(&d.0, "model", tensors.clone(), Some(600), None).unwrap();
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
        let paths = write_safetensors(&d.0, "m", tensors, Some(8), None).unwrap();
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
        for exe in ["/root/.cache/ferroquant/venv/bin/python", "python3"] {
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
        let paths = write_safetensors(&d.0, "model", vec![], Some(10), None).unwrap();
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
        let e = write_safetensors(&d.0, "model", dup, Some(4), None).unwrap_err();
        assert!(
            matches!(&e, Error::InvalidArgument(m) if m.contains("\"x\" appears twice")),
            "{e}"
        );
        let mut bad = raw("layer.scales", DType::F16, &[3, 4], 1);
        bad.data.pop();
        let e = write_safetensors(
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
            assert!(write_safetensors(&d.0, stem, vec![], None, None).is_err());
        }
        assert!(write_safetensors(
            &d.0,
            "m",
            vec![raw("__metadata__", DType::U8, &[1], 0)],
            None,
            None
        )
        .is_err());
        assert!(write_safetensors(&d.0, "m", vec![], Some(0), None).is_err());
        let huge = TensorBuf {
            name: "h".into(),
            dtype: DType::I64,
            shape: vec![usize::MAX, 2],
            data: vec![],
        };
        assert!(write_safetensors(&d.0, "m", vec![huge], None, None).is_err());
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
        let e = write_safetensors(&d.0, "model", tensors, Some(8), None).unwrap_err();
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
        let e = write_safetensors(&file, "model", vec![], None, None).unwrap_err();
        assert!(matches!(&e, Error::Io(m) if m.contains("not-a-dir")), "{e}");
    }

    #[test]
    fn serialization_failure_on_a_later_shard_leaves_no_file() {
        // Squat on the second shard's *temporary* name with a directory: shard 1 is fully
        // written to its temporary, shard 2 fails, and neither any final file nor shard 1's
        // temporary may remain.
        let d = TempDir::new("midway");
        let squat = temp_path(&d.0, "model-00002-of-00002.safetensors");
        fs::create_dir(&squat).unwrap();
        fs::write(squat.join("keep"), b"x").unwrap();
        let tensors = vec![raw("a", DType::U8, &[8], 1), raw("b", DType::U8, &[8], 2)];
        let e = write_safetensors(&d.0, "model", tensors, Some(8), None).unwrap_err();
        assert!(
            matches!(&e, Error::Io(m) if m.contains("model-00002-of-00002.safetensors")),
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
        let r = write_safetensors(
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
        let t = |n: usize| raw("t", DType::U8, &[n], 0);
        let ts = vec![t(5), t(5), t(5)];
        assert_eq!(plan_shards(&ts, Some(10)), vec![0..2, 2..3]);
        assert_eq!(plan_shards(&ts, Some(15)), vec![0..3]);
        assert_eq!(plan_shards(&ts, Some(4)), vec![0..1, 1..2, 2..3]);
        assert_eq!(plan_shards(&ts, None), vec![0..3]);
        assert_eq!(plan_shards(&[], Some(4)), vec![0..0]);
    }
}
