//! A cheap integrity check of `.safetensors` files: the 8-byte header length, the JSON
//! header, and every tensor's `data_offsets` against the file's size. Reads the header
//! only, never the weights, so it catches truncated downloads and copies of any size in
//! milliseconds.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::Deserialize;

/// A header larger than this is not a safetensors header (the format caps it at 100 MB).
const MAX_HEADER: u64 = 100_000_000;

#[derive(Deserialize)]
struct Entry {
    dtype: String,
    shape: Vec<u64>,
    data_offsets: [u64; 2],
}

/// What the header of one checked file says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Tensor name → (dtype, shape), in name order.
    pub tensors: BTreeMap<String, (String, Vec<u64>)>,
    /// The raw JSON header bytes (identifies the layout of the file).
    pub raw: Vec<u8>,
}

fn dtype_size(dtype: &str) -> Option<u64> {
    Some(match dtype {
        "BOOL" | "U8" | "I8" | "F8_E5M2" | "F8_E4M3" | "F8_E8M0" => 1,
        "U16" | "I16" | "F16" | "BF16" => 2,
        "U32" | "I32" | "F32" => 4,
        "U64" | "I64" | "F64" => 8,
        _ => return None,
    })
}

/// Checks `path` and returns its header. Errors name the file, the tensor and what to do.
pub fn check(path: &Path) -> Result<Header> {
    let refetch = "the file is damaged or was cut short (an interrupted download or copy); fetch the checkpoint again";
    let mut f = std::fs::File::open(path).with_context(|| format!("cannot open checkpoint file {}", path.display()))?;
    let file_len = f.metadata().with_context(|| format!("cannot stat {}", path.display()))?.len();
    if file_len < 8 {
        bail!(
            "checkpoint file {} is truncated: {file_len} bytes, not even a safetensors header; {refetch}",
            path.display()
        );
    }
    let mut len = [0u8; 8];
    f.read_exact(&mut len).with_context(|| format!("cannot read {}", path.display()))?;
    let n = u64::from_le_bytes(len);
    if n > MAX_HEADER {
        bail!("checkpoint file {} is not a safetensors file (header length {n} bytes); {refetch}", path.display());
    }
    if 8 + n > file_len {
        bail!(
            "checkpoint file {} is truncated: its header needs {} bytes, the file has {file_len}; {refetch}",
            path.display(),
            8 + n
        );
    }
    let mut raw = vec![0u8; n as usize];
    f.read_exact(&mut raw).with_context(|| format!("cannot read {}", path.display()))?;
    let mut json: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&raw).with_context(|| {
        format!("checkpoint file {}: the safetensors header is not valid JSON; {refetch}", path.display())
    })?;
    json.remove("__metadata__");
    let data_len = file_len - 8 - n;
    let mut tensors = BTreeMap::new();
    for (name, v) in json {
        let e: Entry = serde_json::from_value(v).with_context(|| {
            format!("checkpoint file {}: tensor `{name}` has a malformed header entry", path.display())
        })?;
        let [begin, end] = e.data_offsets;
        if begin > end {
            bail!("checkpoint file {}: tensor `{name}` has data_offsets [{begin}, {end}]; {refetch}", path.display());
        }
        if end > data_len {
            bail!(
                "checkpoint file {} is truncated: tensor `{name}` ends at byte {end} of the data, the file holds {data_len} \
                 bytes of data; {refetch}",
                path.display()
            );
        }
        if let Some(size) = dtype_size(&e.dtype) {
            let want = e.shape.iter().product::<u64>() * size;
            if want != end - begin {
                bail!(
                    "checkpoint file {}: tensor `{name}` ({} {:?}) needs {want} bytes but its data_offsets span {}; {refetch}",
                    path.display(),
                    e.dtype,
                    e.shape,
                    end - begin
                );
            }
        }
        tensors.insert(name, (e.dtype, e.shape));
    }
    Ok(Header { tensors, raw })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A minimal safetensors file: f32 tensors of the given shapes, filled with 0.5.
    pub(crate) fn make(tensors: &[(&str, &[u64])]) -> Vec<u8> {
        let mut header = serde_json::Map::new();
        let mut data = Vec::new();
        for (name, shape) in tensors {
            let n: u64 = shape.iter().product();
            let begin = data.len() as u64;
            for _ in 0..n {
                data.extend_from_slice(&0.5f32.to_le_bytes());
            }
            header.insert(
                (*name).to_string(),
                serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [begin, data.len()]}),
            );
        }
        let h = serde_json::to_vec(&header).unwrap();
        let mut out = (h.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(&h);
        out.extend_from_slice(&data);
        out
    }

    #[test]
    fn good_file_passes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.safetensors");
        std::fs::write(&p, make(&[("a", &[2, 3]), ("b", &[4])])).unwrap();
        let h = check(&p).unwrap();
        assert_eq!(h.tensors.len(), 2);
        assert_eq!(h.tensors["a"], ("F32".to_string(), vec![2, 3]));
    }

    #[test]
    fn truncations_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.safetensors");
        let full = make(&[("a", &[2, 3]), ("b", &[4])]);
        for (cut, needle) in [(full.len() - 1, "tensor `b` ends at byte 40"), (20, "its header needs"), (3, "not even")]
        {
            std::fs::write(&p, &full[..cut]).unwrap();
            let e = format!("{:#}", check(&p).unwrap_err());
            assert!(
                e.contains("m.safetensors") && e.contains(needle) && e.contains("fetch the checkpoint again"),
                "{e}"
            );
        }
        std::fs::write(&p, b"\xff\xff\xff\xff\xff\xff\xff\xffgarbage").unwrap();
        assert!(format!("{:#}", check(&p).unwrap_err()).contains("not a safetensors file"));
        let e = format!("{:#}", check(&dir.path().join("nope.safetensors")).unwrap_err());
        assert!(e.contains("cannot open checkpoint file") && e.contains("nope.safetensors"), "{e}");
    }
}
