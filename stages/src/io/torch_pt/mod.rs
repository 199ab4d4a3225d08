//! Writes `torch.load`-able `.pt` files: torch's zip + pickle serialization format.
//!
//! A [`Value`] tree (dicts with string keys, in order; lists; strings; floats; ints; bools;
//! `None`; contiguous [`Tensor`]s of f32, bf16, f16 or i64) is written as `torch.save`
//! writes it, so `torch.load(path, weights_only=True)` opens it and candle's
//! `candle_core::pickle` reader reads its tensors:
//!
//! ```text
//! archive/data.pkl                  the tree, pickle protocol 2 (first entry: names the archive)
//! archive/.format_version           "1"
//! archive/.storage_alignment        "64"
//! archive/byteorder                 "little"
//! archive/data/<n>                  the bytes of the n-th tensor's storage, little-endian
//! archive/version                   "3\n"
//! archive/.data/serialization_id    40 digits, derived from the content
//! ```
//!
//! Every entry is stored (not compressed) with its data aligned to 64 bytes inside the
//! file, as torch writes them (torch's `mmap=True` loading relies on it). The output is
//! deterministic: the same tree gives the same bytes (fixed timestamps, a content-derived
//! serialization id), so content hashes of `.pt` intermediates are stable.

mod pickle;

use std::io::{Seek, Write};
use std::path::Path;

use anyhow::{bail, Context, Result};
use zip::write::SimpleFileOptions;
use zip::{CompressionMethod, DateTime, ZipWriter};

/// Element type of a [`Tensor`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    F32,
    BF16,
    F16,
    I64,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::BF16 | Self::F16 => 2,
            Self::I64 => 8,
        }
    }

    /// The legacy storage class torch's pickles name (`torch.FloatStorage`, …).
    fn storage_class(self) -> &'static str {
        match self {
            Self::F32 => "FloatStorage",
            Self::BF16 => "BFloat16Storage",
            Self::F16 => "HalfStorage",
            Self::I64 => "LongStorage",
        }
    }
}

/// A contiguous (row-major) CPU tensor: a shape and its elements' little-endian bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    dtype: DType,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl Tensor {
    /// A tensor from raw little-endian element bytes. Errors when the byte count does not
    /// match the shape.
    pub fn from_bytes(dtype: DType, shape: &[usize], data: Vec<u8>) -> Result<Self> {
        let numel: usize = shape.iter().product();
        if data.len() != numel * dtype.size() {
            bail!(
                "tensor of shape {shape:?} and dtype {dtype:?} needs {} bytes, got {}",
                numel * dtype.size(),
                data.len()
            );
        }
        Ok(Self { dtype, shape: shape.to_vec(), data })
    }

    pub fn from_f32(shape: &[usize], values: &[f32]) -> Result<Self> {
        Self::from_bytes(DType::F32, shape, values.iter().flat_map(|v| v.to_le_bytes()).collect())
    }

    pub fn from_i64(shape: &[usize], values: &[i64]) -> Result<Self> {
        Self::from_bytes(DType::I64, shape, values.iter().flat_map(|v| v.to_le_bytes()).collect())
    }

    pub fn from_bf16(shape: &[usize], values: &[half::bf16]) -> Result<Self> {
        Self::from_bytes(DType::BF16, shape, values.iter().flat_map(|v| v.to_le_bytes()).collect())
    }

    pub fn from_f16(shape: &[usize], values: &[half::f16]) -> Result<Self> {
        Self::from_bytes(DType::F16, shape, values.iter().flat_map(|v| v.to_le_bytes()).collect())
    }

    /// Copies a candle tensor (any layout, any device) of dtype f32, bf16, f16 or i64.
    pub fn from_candle(t: &candle_core::Tensor) -> Result<Self> {
        use candle_core::DType as C;
        let shape = t.dims().to_vec();
        let flat = t.flatten_all()?.to_device(&candle_core::Device::Cpu)?;
        match t.dtype() {
            C::F32 => Self::from_f32(&shape, &flat.to_vec1::<f32>()?),
            C::BF16 => Self::from_bf16(&shape, &flat.to_vec1::<half::bf16>()?),
            C::F16 => Self::from_f16(&shape, &flat.to_vec1::<half::f16>()?),
            C::I64 => Self::from_i64(&shape, &flat.to_vec1::<i64>()?),
            other => bail!("cannot write a {other:?} tensor to a .pt file (supported: f32, bf16, f16, i64)"),
        }
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The little-endian element bytes.
    pub fn data(&self) -> &[u8] {
        &self.data
    }

    fn contiguous_strides(&self) -> Vec<usize> {
        let mut strides = vec![1; self.shape.len()];
        for i in (0..self.shape.len().saturating_sub(1)).rev() {
            strides[i] = strides[i + 1] * self.shape[i + 1];
        }
        strides
    }
}

/// A value `torch.load(weights_only=True)` can return.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    List(Vec<Value>),
    /// A Python `dict`; keys keep this order.
    Dict(Vec<(String, Value)>),
    Tensor(Tensor),
}

impl Value {
    /// A dict from `(key, value)` pairs, in order.
    pub fn dict<K: Into<String>>(items: impl IntoIterator<Item = (K, Value)>) -> Self {
        Self::Dict(items.into_iter().map(|(k, v)| (k.into(), v)).collect())
    }
}

impl From<Tensor> for Value {
    fn from(t: Tensor) -> Self {
        Self::Tensor(t)
    }
}

impl From<&str> for Value {
    fn from(s: &str) -> Self {
        Self::Str(s.to_string())
    }
}

impl From<String> for Value {
    fn from(s: String) -> Self {
        Self::Str(s)
    }
}

impl From<f64> for Value {
    fn from(f: f64) -> Self {
        Self::Float(f)
    }
}

impl From<i64> for Value {
    fn from(i: i64) -> Self {
        Self::Int(i)
    }
}

impl From<bool> for Value {
    fn from(b: bool) -> Self {
        Self::Bool(b)
    }
}

/// JSON → the same Python objects `json.load` would give: `null` → None, integers that
/// fit an i64 → int, other numbers → float, arrays → list, objects → dict (in order).
impl From<&serde_json::Value> for Value {
    fn from(v: &serde_json::Value) -> Self {
        use serde_json::Value as J;
        match v {
            J::Null => Self::None,
            J::Bool(b) => Self::Bool(*b),
            J::Number(n) => match n.as_i64() {
                Some(i) => Self::Int(i),
                None => Self::Float(n.as_f64().unwrap_or(f64::NAN)),
            },
            J::String(s) => Self::Str(s.clone()),
            J::Array(items) => Self::List(items.iter().map(Self::from).collect()),
            J::Object(map) => Self::Dict(map.iter().map(|(k, v)| (k.clone(), Self::from(v))).collect()),
        }
    }
}

const ARCHIVE: &str = "archive";
const ALIGNMENT: u16 = 64;

/// The `.pt` bytes of `value`.
pub fn to_bytes(value: &Value) -> Result<Vec<u8>> {
    let mut buf = std::io::Cursor::new(Vec::new());
    write_to(&mut buf, value)?;
    Ok(buf.into_inner())
}

/// Writes `value` to `path` (created or truncated) as a `torch.save` file.
pub fn write(path: &Path, value: &Value) -> Result<()> {
    let file = std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut w = StopAfterError { inner: std::io::BufWriter::new(file), failed: false };
    let r = write_to(&mut w, value).and_then(|()| Ok(w.flush()?));
    if r.is_err() {
        // Drop the buffered rest without a second attempt to write it.
        w.failed = true;
        let (_, _) = w.inner.into_parts();
    }
    r.with_context(|| format!("cannot write {}", path.display()))
}

/// Writes `value` as a `torch.save` zip to any seekable writer. The first I/O error (a
/// full disk) is the one returned; the archive is abandoned quietly after it (the zip
/// writer would otherwise try to finish it again when dropped and print a second,
/// unrelated-looking error).
pub fn write_to<W: Write + Seek>(w: W, value: &Value) -> Result<()> {
    let mut w = StopAfterError { inner: w, failed: false };
    let r = write_zip(&mut w, value);
    if w.failed {
        // `r` holds the I/O error (possibly wrapped by zip); nothing else is written.
        return r.and(Err(anyhow::anyhow!("an earlier write failed")));
    }
    r
}

/// A writer that, after its first error, accepts and discards everything: what is left to
/// write belongs to an archive that is being abandoned.
struct StopAfterError<W> {
    inner: W,
    failed: bool,
}

impl<W: Write> Write for StopAfterError<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.failed {
            return Ok(buf.len());
        }
        self.inner.write(buf).inspect_err(|_| self.failed = true)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        if self.failed {
            return Ok(());
        }
        self.inner.flush().inspect_err(|_| self.failed = true)
    }
}

impl<W: Seek> Seek for StopAfterError<W> {
    fn seek(&mut self, pos: std::io::SeekFrom) -> std::io::Result<u64> {
        if self.failed {
            return Ok(0);
        }
        self.inner.seek(pos).inspect_err(|_| self.failed = true)
    }
}

fn write_zip<W: Write + Seek>(w: W, value: &Value) -> Result<()> {
    let enc = pickle::Encoder::encode(value);
    let options = SimpleFileOptions::default()
        .compression_method(CompressionMethod::Stored)
        .last_modified_time(DateTime::default())
        .with_alignment(ALIGNMENT)
        .large_file(enc.storages.iter().any(|t| t.data.len() >= u32::MAX as usize));
    let mut zip = ZipWriter::new(w);
    let entry = |zip: &mut ZipWriter<W>, name: &str, bytes: &[u8]| -> Result<()> {
        zip.start_file(format!("{ARCHIVE}/{name}"), options)?;
        zip.write_all(bytes)?;
        Ok(())
    };
    entry(&mut zip, "data.pkl", &enc.out)?;
    entry(&mut zip, ".format_version", b"1")?;
    entry(&mut zip, ".storage_alignment", ALIGNMENT.to_string().as_bytes())?;
    entry(&mut zip, "byteorder", b"little")?;
    let mut id = blake3::Hasher::new();
    id.update(&enc.out);
    for (key, t) in enc.storages.iter().enumerate() {
        entry(&mut zip, &format!("data/{key}"), &t.data)?;
        id.update(&t.data);
    }
    entry(&mut zip, "version", b"3\n")?;
    entry(&mut zip, ".data/serialization_id", serialization_id(id.finalize().as_bytes()).as_bytes())?;
    zip.finish()?;
    Ok(())
}

/// 40 decimal digits, as torch writes them, derived from a content hash.
fn serialization_id(hash: &[u8; 32]) -> String {
    let a = u64::from_le_bytes(hash[..8].try_into().unwrap()) % 10u64.pow(19);
    let b = u64::from_le_bytes(hash[8..16].try_into().unwrap()) % 10u64.pow(19);
    format!("{:02}{a:019}{b:019}", hash[16] % 100)
}

/// Runs `python3 -c <code> <args…>` when python3 with torch is available. Returns `None`
/// (after printing `SKIP: …` to stderr) when it is not, so tests can skip loudly.
#[cfg(test)]
pub(crate) fn python_torch(code: &str, args: &[&std::ffi::OsStr]) -> Option<std::process::Output> {
    let probe = std::process::Command::new("python3").args(["-c", "import torch"]).output();
    match probe {
        Ok(o) if o.status.success() => {}
        _ => {
            eprintln!("SKIP: python3 with torch is not available; torch.load check not run");
            return None;
        }
    }
    Some(std::process::Command::new("python3").arg("-c").arg(code).args(args).output().expect("python3 runs"))
}

#[cfg(test)]
mod tests {
    /// Run by [`a_full_disk_is_one_clean_error`] in a child process, to see its stderr.
    #[test]
    fn child_writes_to_a_full_disk() {
        if std::env::var_os("QPIPE_TEST_DEV_FULL").is_none() {
            return;
        }
        let t = super::Tensor::from_f32(&[1 << 20], &vec![1.0; 1 << 20]).unwrap();
        let value = super::Value::dict([("x", super::Value::Tensor(t))]);
        let e = super::write(std::path::Path::new("/dev/full"), &value).unwrap_err();
        println!("ERROR: {e:#}");
    }

    #[test]
    fn a_full_disk_is_one_clean_error() {
        if !std::path::Path::new("/dev/full").exists() {
            eprintln!("SKIP: no /dev/full here");
            return;
        }
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "io::torch_pt::tests::child_writes_to_a_full_disk", "--nocapture"])
            .env("QPIPE_TEST_DEV_FULL", "1")
            .output()
            .unwrap();
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(stdout.contains("ERROR: cannot write /dev/full") && stdout.contains("No space left"), "{stdout}");
        assert!(!stderr.contains("ZipWriter") && !stdout.contains("ZipWriter"), "{stderr}{stdout}");
    }

    use super::*;

    fn sample() -> Value {
        Value::dict([
            ("ids", Tensor::from_i64(&[2, 3], &[0, 1, 2, 3, 4, -(1 << 40)]).unwrap().into()),
            ("w", Tensor::from_f32(&[3], &[1.5, -2.25, f32::MIN_POSITIVE]).unwrap().into()),
            ("h", Tensor::from_bf16(&[1, 2], &[half::bf16::from_f32(0.5), half::bf16::from_f32(-3.0)]).unwrap().into()),
            (
                "f16",
                Tensor::from_f16(&[2, 1, 1, 1], &[half::f16::from_f32(1.0), half::f16::from_f32(2.0)]).unwrap().into(),
            ),
            ("scalar", Tensor::from_f32(&[], &[7.0]).unwrap().into()),
            ("empty", Tensor::from_i64(&[0, 4], &[]).unwrap().into()),
            (
                "meta",
                Value::dict([
                    ("name", "x\u{e9}".into()),
                    ("n", Value::Int(1 << 40)),
                    ("neg", Value::Int(-70000)),
                    ("pi", Value::Float(std::f64::consts::PI)),
                    ("flags", Value::List(vec![Value::Bool(true), Value::Bool(false), Value::None])),
                    ("empty_list", Value::List(vec![])),
                ]),
            ),
        ])
    }

    #[test]
    fn wrong_byte_counts_are_errors() {
        let e = Tensor::from_f32(&[2, 2], &[1.0]).unwrap_err().to_string();
        assert!(e.contains("needs 16 bytes, got 4"), "{e}");
    }

    #[test]
    fn zip_layout_is_torchs_and_deterministic() {
        let bytes = to_bytes(&sample()).unwrap();
        assert_eq!(bytes, to_bytes(&sample()).unwrap(), "same tree, same bytes");
        let mut zip = zip::ZipArchive::new(std::io::Cursor::new(&bytes)).unwrap();
        let names: Vec<String> = zip.file_names().map(|n| n.unwrap().into_owned()).collect();
        assert_eq!(names[0], "archive/data.pkl");
        for n in [
            "archive/byteorder",
            "archive/version",
            "archive/data/0",
            "archive/data/5",
            "archive/.data/serialization_id",
        ] {
            assert!(names.iter().any(|x| x == n), "{n} missing from {names:?}");
        }
        for i in 0..zip.len() {
            let f = zip.by_index(i).unwrap();
            assert_eq!(f.compression(), CompressionMethod::Stored);
            assert_eq!(f.data_start().unwrap() % 64, 0, "{:?} is not 64-byte aligned", f.name());
        }
        let id = std::io::read_to_string(zip.by_name("archive/.data/serialization_id").unwrap()).unwrap();
        assert_eq!(id.len(), 40);
        assert!(id.bytes().all(|b| b.is_ascii_digit()));
    }

    #[test]
    fn candle_reads_the_tensors_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.pt");
        write(&path, &sample()).unwrap();
        let pth = candle_core::pickle::PthTensors::new(&path, None).unwrap();
        let ids = pth.get("ids").unwrap().unwrap();
        assert_eq!(ids.dims(), [2, 3]);
        assert_eq!(ids.to_vec2::<i64>().unwrap(), [[0, 1, 2], [3, 4, -(1 << 40)]]);
        let w = pth.get("w").unwrap().unwrap();
        assert_eq!(w.to_vec1::<f32>().unwrap(), [1.5, -2.25, f32::MIN_POSITIVE]);
        let h = pth.get("h").unwrap().unwrap();
        assert_eq!(h.dtype(), candle_core::DType::BF16);
        assert_eq!(h.to_dtype(candle_core::DType::F32).unwrap().to_vec2::<f32>().unwrap(), [[0.5, -3.0]]);
        let f = pth.get("f16").unwrap().unwrap();
        assert_eq!(f.dims(), [2, 1, 1, 1]);
        assert_eq!(
            f.to_dtype(candle_core::DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            [1.0, 2.0]
        );
        assert_eq!(pth.get("scalar").unwrap().unwrap().to_scalar::<f32>().unwrap(), 7.0);
        assert_eq!(pth.get("empty").unwrap().unwrap().dims(), [0, 4]);
    }

    #[test]
    fn from_candle_keeps_shape_and_values() {
        let c = candle_core::Tensor::arange(0f32, 6.0, &candle_core::Device::Cpu).unwrap().reshape((2, 3)).unwrap();
        let t = Tensor::from_candle(&c.t().unwrap()).unwrap();
        assert_eq!(t.shape(), [3, 2]);
        assert_eq!(t, Tensor::from_f32(&[3, 2], &[0.0, 3.0, 1.0, 4.0, 2.0, 5.0]).unwrap());
        let u8s = candle_core::Tensor::new(&[1u8], &candle_core::Device::Cpu).unwrap();
        assert!(Tensor::from_candle(&u8s).unwrap_err().to_string().contains("U8"));
    }

    #[test]
    fn json_maps_to_python_values() {
        let j = serde_json::json!({"a": [1, 2.5, null, "s", true], "b": {"c": -3}});
        let v = Value::from(&j);
        let want = Value::dict([
            ("a", Value::List(vec![Value::Int(1), Value::Float(2.5), Value::None, "s".into(), Value::Bool(true)])),
            ("b", Value::dict([("c", Value::Int(-3))])),
        ]);
        assert_eq!(v, want);
    }

    #[test]
    fn torch_load_weights_only_opens_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.pt");
        write(&path, &sample()).unwrap();
        let code = r#"
import sys, torch
d = torch.load(sys.argv[1], weights_only=True)
assert list(d) == ["ids", "w", "h", "f16", "scalar", "empty", "meta"], list(d)
assert d["ids"].dtype == torch.int64 and d["ids"].tolist() == [[0, 1, 2], [3, 4, -(1 << 40)]]
assert d["w"].dtype == torch.float32 and d["w"].tolist() == [1.5, -2.25, torch.finfo(torch.float32).tiny]
assert d["h"].dtype == torch.bfloat16 and d["h"].float().tolist() == [[0.5, -3.0]]
assert d["f16"].dtype == torch.float16 and d["f16"].shape == (2, 1, 1, 1)
assert d["scalar"].shape == () and d["scalar"].item() == 7.0
assert d["empty"].shape == (0, 4)
import math
assert d["meta"] == {"name": "x\u00e9", "n": 1 << 40, "neg": -70000, "pi": math.pi,
                     "flags": [True, False, None], "empty_list": []}, d["meta"]
m = torch.load(sys.argv[1], weights_only=True, mmap=True)
assert m["ids"].tolist() == d["ids"].tolist()
print("OK")
"#;
        let Some(out) = python_torch(code, &[path.as_os_str()]) else { return };
        assert!(
            out.status.success() && String::from_utf8_lossy(&out.stdout).contains("OK"),
            "torch.load failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
