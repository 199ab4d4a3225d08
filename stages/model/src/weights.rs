//! Loading the language model's tensors out of a full Qwen3-VL checkpoint.
//!
//! Only `model.language_model.*` and `lm_head.weight` are read (the vision tower is never
//! touched; safetensors files are memory-mapped, so its bytes are not even paged in).
//! Single-file (`model.safetensors`) and sharded (`model.safetensors.index.json`)
//! checkpoints are supported. Norm weights are converted to the compute dtype; the large
//! matrices (Linear weights, embedding, `lm_head`) of a bf16/f16 checkpoint stay in its
//! dtype when the model computes in f32 — held once, as stored, and widened exactly where
//! a product reads them ([`crate::gemm`] packs them to f32 as it goes) — so a 4 B-parameter
//! bf16 checkpoint takes 7.5 GiB, not 15 in f32.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};

use crate::config::TextConfig;
use crate::names::{LinearKind, LINEARS_PER_LAYER};

/// Prefix of the language model inside a Qwen3-VL checkpoint.
pub const LM_PREFIX: &str = "model.language_model.";

/// Norm weights of one decoder layer.
#[derive(Debug, Clone)]
pub struct LayerNorms {
    pub input_layernorm: Tensor,
    pub post_attention_layernorm: Tensor,
    pub q_norm: Tensor,
    pub k_norm: Tensor,
}

/// Every tensor of the language model: norms in the compute dtype, matrices in the compute
/// dtype or, for an f32 model of a half-precision checkpoint, as stored.
#[derive(Debug, Clone)]
pub struct LmWeights {
    pub embed_tokens: Tensor,
    pub norms: Vec<LayerNorms>,
    /// `[out, in]` weights of every hookable Linear, in module order (see [`crate::names`]).
    pub linears: Vec<Tensor>,
    pub norm: Tensor,
    /// `None` when tied to `embed_tokens`.
    pub lm_head: Option<Tensor>,
}

/// The single-file weights name.
pub const SINGLE_FILE: &str = "model.safetensors";
/// The sharded-weights index name.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// The shard file names an index's `weight_map` names, sorted, deduplicated; each must be a
/// plain file name inside the checkpoint folder.
pub fn index_shards(index_path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read(index_path).with_context(|| format!("cannot read {}", index_path.display()))?;
    let index: serde_json::Value =
        serde_json::from_slice(&text).with_context(|| format!("{} is not valid JSON", index_path.display()))?;
    let map = index
        .get("weight_map")
        .and_then(serde_json::Value::as_object)
        .with_context(|| format!("{} has no `weight_map` object", index_path.display()))?;
    let mut shards = BTreeSet::new();
    for (tensor, file) in map {
        let file = file
            .as_str()
            .with_context(|| format!("{}: weight_map[`{tensor}`] is not a file name", index_path.display()))?;
        if file.contains(['/', '\\']) || file.starts_with('.') {
            bail!("{}: weight_map[`{tensor}`] = `{file}` is not a file in the checkpoint folder", index_path.display());
        }
        shards.insert(file.to_string());
    }
    if shards.is_empty() {
        bail!("{}: `weight_map` is empty", index_path.display());
    }
    Ok(shards.into_iter().collect())
}

/// The safetensors files of a checkpoint folder: the shards named by [`INDEX_FILE`], else
/// [`SINGLE_FILE`].
pub fn checkpoint_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join(INDEX_FILE);
    if index.is_file() {
        return index_shards(&index)?
            .into_iter()
            .map(|f| {
                let p = dir.join(&f);
                if p.is_file() {
                    Ok(p)
                } else {
                    bail!("{}: shard {f} listed in `weight_map` does not exist", index.display())
                }
            })
            .collect();
    }
    let single = dir.join(SINGLE_FILE);
    if single.is_file() {
        return Ok(vec![single]);
    }
    bail!(
        "{}: no {SINGLE_FILE} or {INDEX_FILE}; point the checkpoint locator at a Hugging Face checkpoint folder",
        dir.display()
    )
}

/// One tensor's place in a safetensors file, from its header.
struct Entry {
    file: usize,
    dtype: DType,
    shape: Vec<usize>,
    /// Absolute byte range in the file.
    start: u64,
    end: u64,
}

/// Reads tensors out of the checkpoint's safetensors files with positioned reads, not a
/// memory map: a mapped file's pages count in the process's resident memory until it is
/// unmapped, so mapping every shard while copying its tensors out would hold the model
/// twice at the end of loading. Read this way, only the tensors themselves are resident.
pub(crate) struct Reader {
    files: Vec<(PathBuf, std::fs::File)>,
    entries: std::collections::HashMap<String, Entry>,
    dtype: DType,
    device: Device,
    dir: PathBuf,
}

fn safetensors_dtype(s: &str) -> Option<DType> {
    Some(match s {
        "F32" => DType::F32,
        "BF16" => DType::BF16,
        "F16" => DType::F16,
        "F64" => DType::F64,
        "U8" => DType::U8,
        "U32" => DType::U32,
        "I64" => DType::I64,
        _ => return None,
    })
}

impl Reader {
    pub(crate) fn open(dir: &Path, paths: &[PathBuf], dtype: DType, device: &Device) -> Result<Self> {
        use std::io::Read;
        let mut files = Vec::new();
        let mut entries = std::collections::HashMap::new();
        for (fi, path) in paths.iter().enumerate() {
            let mut f = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
            let len = f.metadata().with_context(|| format!("cannot stat {}", path.display()))?.len();
            let cut = || format!("{} is not a complete safetensors file; fetch the checkpoint again", path.display());
            let mut n = [0u8; 8];
            f.read_exact(&mut n).with_context(cut)?;
            let n = u64::from_le_bytes(n);
            if n > 100_000_000 || 8 + n > len {
                bail!("{}", cut());
            }
            let mut header = vec![0u8; n as usize];
            f.read_exact(&mut header).with_context(cut)?;
            let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&header)
                .with_context(|| format!("{}: the header is not JSON", path.display()))?;
            for (name, e) in header {
                if name == "__metadata__" {
                    continue;
                }
                let bad = || format!("{}: tensor `{name}` has a malformed header entry", path.display());
                let dtype = e["dtype"].as_str().with_context(bad)?;
                let shape: Vec<usize> = e["shape"]
                    .as_array()
                    .with_context(bad)?
                    .iter()
                    .map(|d| d.as_u64().map(|d| d as usize))
                    .collect::<Option<_>>()
                    .with_context(bad)?;
                let offs = e["data_offsets"].as_array().with_context(bad)?;
                let (Some(a), Some(b)) = (offs.first().and_then(|v| v.as_u64()), offs.get(1).and_then(|v| v.as_u64()))
                else {
                    bail!("{}", bad());
                };
                let (start, end) = (8 + n + a, 8 + n + b);
                if end > len || start > end {
                    bail!("{}: tensor `{name}` ends past the end of the file; {}", path.display(), cut());
                }
                // An unknown dtype is an error only for a tensor that is read.
                let dtype = safetensors_dtype(dtype).unwrap_or(DType::U8);
                entries.insert(name, Entry { file: fi, dtype, shape, start, end });
            }
            files.push((path.clone(), f));
        }
        Ok(Reader { files, entries, dtype, device: device.clone(), dir: dir.to_path_buf() })
    }

    fn has(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// Loads `name`, checks its shape and finiteness, converts it to the compute dtype —
    /// or, with `keep_half`, keeps a bf16/f16 tensor as it is stored (f32 computations
    /// widen it exactly where they use it).
    fn load_as(&self, name: &str, shape: &[usize], keep_half: bool) -> Result<Tensor> {
        use std::os::unix::fs::FileExt;
        let e = self
            .entries
            .get(name)
            .with_context(|| format!("{}: tensor `{name}` is missing from the checkpoint", self.dir.display()))?;
        if e.shape != shape {
            bail!(
                "{}: tensor `{name}` has shape {:?} in the safetensors but config.json implies {:?}",
                self.dir.display(),
                e.shape,
                shape
            );
        }
        match e.dtype {
            DType::F32 | DType::BF16 | DType::F16 => {}
            _ => bail!("{}: tensor `{name}` is not f32, bf16 or f16", self.dir.display()),
        }
        let numel: usize = shape.iter().product();
        let (path, file) = &self.files[e.file];
        if e.end - e.start != (numel * e.dtype.size_in_bytes()) as u64 {
            bail!("{}: tensor `{name}`'s data size does not match its shape and dtype", path.display());
        }
        let mut bytes = vec![0u8; (e.end - e.start) as usize];
        file.read_exact_at(&mut bytes, e.start)
            .with_context(|| format!("{}: reading tensor `{name}`", path.display()))?;
        let t = Tensor::from_raw_buffer(&bytes, e.dtype, shape, &Device::Cpu)?;
        drop(bytes);
        let half = matches!(e.dtype, DType::BF16 | DType::F16);
        let target = if keep_half && half && self.dtype == DType::F32 { e.dtype } else { self.dtype };
        let t = t.to_dtype(target)?.to_device(&self.device)?.contiguous()?;
        check_finite(&t).with_context(|| format!("{}: tensor `{name}`", self.dir.display()))?;
        Ok(t)
    }

    pub(crate) fn load(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.load_as(name, shape, false)
    }

    /// A large matrix (Linear weight, embedding, head): kept in the checkpoint's half
    /// precision when the model computes in f32.
    pub(crate) fn load_matrix(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.load_as(name, shape, true)
    }
}

/// Errors when a tensor holds NaN or ±Inf (x − x is NaN exactly for those).
pub fn check_finite(t: &Tensor) -> Result<()> {
    let s = t.sub(t)?.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()?;
    if s.is_nan() {
        let v = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let (i, x) = v.iter().enumerate().find(|(_, x)| !x.is_finite()).map(|(i, x)| (i, *x)).unwrap_or((0, f32::NAN));
        bail!("holds a non-finite value ({x} at flat index {i}); the checkpoint is corrupt");
    }
    Ok(())
}

impl LmWeights {
    /// Loads the language model of the checkpoint in `dir` (config already parsed).
    pub fn load(dir: &Path, cfg: &TextConfig, dtype: DType, device: &Device) -> Result<Self> {
        let files = checkpoint_files(dir)?;
        let r = Reader::open(dir, &files, dtype, device)?;
        let (h, v, d) = (cfg.hidden_size, cfg.vocab_size, cfg.head_dim);
        let p = LM_PREFIX;
        let embed_tokens = r.load_matrix(&format!("{p}embed_tokens.weight"), &[v, h])?;
        let mut norms = Vec::with_capacity(cfg.num_hidden_layers);
        let mut linears = Vec::with_capacity(cfg.num_hidden_layers * LINEARS_PER_LAYER);
        for i in 0..cfg.num_hidden_layers {
            let lp = format!("{p}layers.{i}.");
            norms.push(LayerNorms {
                input_layernorm: r.load(&format!("{lp}input_layernorm.weight"), &[h])?,
                post_attention_layernorm: r.load(&format!("{lp}post_attention_layernorm.weight"), &[h])?,
                q_norm: r.load(&format!("{lp}self_attn.q_norm.weight"), &[d])?,
                k_norm: r.load(&format!("{lp}self_attn.k_norm.weight"), &[d])?,
            });
            for kind in LinearKind::ALL {
                let (out, inp) = kind.shape(cfg);
                linears.push(r.load_matrix(&format!("{lp}{}.weight", kind.suffix()), &[out, inp])?);
            }
        }
        let norm = r.load(&format!("{p}norm.weight"), &[h])?;
        let lm_head = if !cfg.tie_word_embeddings && r.has("lm_head.weight") {
            Some(r.load_matrix("lm_head.weight", &[v, h])?)
        } else {
            None
        };
        Ok(LmWeights { embed_tokens, norms, linears, norm, lm_head })
    }

    /// The output projection (`lm_head`, or `embed_tokens` when tied), `[vocab, hidden]`.
    pub fn output_weight(&self) -> &Tensor {
        self.lm_head.as_ref().unwrap_or(&self.embed_tokens)
    }

    /// Bytes the weights hold, as stored.
    pub fn bytes(&self) -> u64 {
        let size = |t: &Tensor| (t.elem_count() * t.dtype().size_in_bytes()) as u64;
        let norms: u64 = self
            .norms
            .iter()
            .map(|n| size(&n.input_layernorm) + size(&n.post_attention_layernorm) + size(&n.q_norm) + size(&n.k_norm))
            .sum();
        size(&self.embed_tokens)
            + norms
            + self.linears.iter().map(size).sum::<u64>()
            + size(&self.norm)
            + self.lm_head.as_ref().map_or(0, size)
    }
}

impl LmWeights {
    /// Deterministic pseudo-random weights for `cfg` (benchmarks and tests without a
    /// checkpoint): Linear and embedding entries uniform with standard deviation 0.02
    /// (as transformers' `initializer_range`), norm weights `1 ± 0.1`. Untied `lm_head`
    /// when `cfg.tie_word_embeddings` is false.
    pub fn synthetic(cfg: &TextConfig, seed: u64, dtype: DType, device: &Device) -> Result<Self> {
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut uniform = |shape: &[usize], center: f32, std: f32| -> Result<Tensor> {
            let n: usize = shape.iter().product();
            let half_width = std * 3f32.sqrt();
            let v: Vec<f32> = (0..n)
                .map(|_| {
                    // xorshift64*
                    state ^= state >> 12;
                    state ^= state << 25;
                    state ^= state >> 27;
                    let u = (state.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40) as f32 / (1u64 << 24) as f32;
                    center + (2.0 * u - 1.0) * half_width
                })
                .collect();
            Ok(Tensor::from_vec(v, shape, device)?.to_dtype(dtype)?)
        };
        let (h, v, d) = (cfg.hidden_size, cfg.vocab_size, cfg.head_dim);
        let embed_tokens = uniform(&[v, h], 0.0, 0.02)?;
        let mut norms = Vec::new();
        let mut linears = Vec::new();
        for _ in 0..cfg.num_hidden_layers {
            norms.push(LayerNorms {
                input_layernorm: uniform(&[h], 1.0, 0.06)?,
                post_attention_layernorm: uniform(&[h], 1.0, 0.06)?,
                q_norm: uniform(&[d], 1.0, 0.06)?,
                k_norm: uniform(&[d], 1.0, 0.06)?,
            });
            for kind in LinearKind::ALL {
                let (o, i) = kind.shape(cfg);
                linears.push(uniform(&[o, i], 0.0, 0.02)?);
            }
        }
        let norm = uniform(&[h], 1.0, 0.06)?;
        let lm_head = if cfg.tie_word_embeddings { None } else { Some(uniform(&[v, h], 0.0, 0.02)?) };
        Ok(LmWeights { embed_tokens, norms, linears, norm, lm_head })
    }
}
