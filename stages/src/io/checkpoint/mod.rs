//! Finding and checking checkpoints.
//!
//! A checkpoint folder holds `config.json` (a Qwen3-VL config with a `text_config`, or a
//! plain text-model config), `tokenizer.json` (and usually `tokenizer_config.json`), and
//! weights: either one `model.safetensors`, or `model.safetensors.index.json` plus every
//! shard its `weight_map` names. [`check_dir`] checks all of that cheaply (headers only).
//! [`resolve_dir`] turns a stage's `checkpoint` locator into the folder; [`hub`] finds
//! and fetches hub checkpoints in the Hugging Face cache.

pub mod hub;
pub mod safetensors;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::Value;

pub use hub::HubEnv;

pub use qpipe_model::weights::{index_shards, INDEX_FILE, SINGLE_FILE};

/// The checkpoint folder a `checkpoint` locator names:
/// `{"source":"local","path":P}` → `P` (relative to `root` unless absolute), which must be
/// a folder; `{"source":"hub","repo":R,"revision":REV}` → the snapshot folder of `R@REV`
/// in the Hugging Face cache ([`HubEnv::from_env`]), which must be there (the
/// `fetch-model` stage puts it there); this never uses the network.
pub fn resolve_dir(root: &Path, locator: &Value) -> Result<PathBuf> {
    resolve_dir_in(root, locator, &HubEnv::from_env())
}

/// [`resolve_dir`] with explicit hub settings instead of the environment's.
pub fn resolve_dir_in(root: &Path, locator: &Value, hub: &HubEnv) -> Result<PathBuf> {
    let field = |k: &str| {
        locator
            .get(k)
            .and_then(Value::as_str)
            .with_context(|| format!("checkpoint locator {locator} has no string `{k}`"))
    };
    match field("source")? {
        "local" => {
            let path = field("path")?;
            let dir = root.join(path);
            if !dir.is_dir() {
                bail!(
                    "checkpoint folder {} does not exist (model.path = `{path}`); point `model.path` at a folder \
                     holding config.json, tokenizer.json and the safetensors weights",
                    dir.display()
                );
            }
            Ok(dir)
        }
        "hub" => {
            let (repo, revision) = (field("repo")?, field("revision")?);
            let dir = hub.snapshot_dir(repo, revision);
            if !dir.is_dir() {
                bail!(
                    "checkpoint {repo}@{revision} is not in the Hugging Face cache ({}); run its `fetch-model` stage \
                     (`qpipe build` with network access) or point `model.path=DIR` at a local copy",
                    dir.display()
                );
            }
            Ok(dir)
        }
        other => bail!("checkpoint locator {locator}: unknown source `{other}` (valid: local, hub)"),
    }
}

/// One checked file of a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileEntry {
    /// The name inside the checkpoint folder (`model-00001-of-00002.safetensors`).
    pub name: String,
    pub size: u64,
}

/// What [`check_dir`] found.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckpointInfo {
    /// Every file the pipeline reads, in a stable order: config.json, tokenizer.json,
    /// tokenizer_config.json and preprocessor_config.json (when present), the index (when
    /// sharded), the weights.
    pub files: Vec<FileEntry>,
    /// The weights files (one, or the index's shards in name order).
    pub weights: Vec<String>,
    pub sharded: bool,
    pub num_tensors: usize,
    pub summary: ModelSummary,
}

/// The language model's shape, from `config.json` (`text_config` when present).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ModelSummary {
    pub model_type: Option<String>,
    pub architectures: Vec<String>,
    pub num_hidden_layers: u64,
    pub hidden_size: u64,
    pub intermediate_size: Option<u64>,
    pub num_attention_heads: Option<u64>,
    pub num_key_value_heads: Option<u64>,
    pub vocab_size: u64,
    /// `dtype` (or the older `torch_dtype`) the checkpoint declares.
    pub dtype: Option<String>,
    pub tie_word_embeddings: Option<bool>,
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_slice(&text).with_context(|| format!("{} is not valid JSON", path.display()))
}

/// Parses `config.json` into the language model's summary.
pub fn read_summary(config_path: &Path) -> Result<ModelSummary> {
    let config = read_json(config_path)?;
    let (text, prefix) =
        qpipe_model::config::text_section(&config).with_context(|| format!("in {}", config_path.display()))?;
    let u = |k: &str| text.get(k).and_then(Value::as_u64);
    let need = |k: &str| {
        u(k).with_context(|| format!("{}: `{prefix}{k}` is missing or not a positive integer", config_path.display()))
    };
    let s = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).map(String::from);
    let text_str = |k: &str| text.get(k).and_then(Value::as_str).map(String::from);
    Ok(ModelSummary {
        model_type: s(&config, "model_type"),
        architectures: config
            .get("architectures")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(|x| x.as_str().map(String::from)).collect())
            .unwrap_or_default(),
        num_hidden_layers: need("num_hidden_layers")?,
        hidden_size: need("hidden_size")?,
        intermediate_size: u("intermediate_size"),
        num_attention_heads: u("num_attention_heads"),
        num_key_value_heads: u("num_key_value_heads"),
        vocab_size: need("vocab_size")?,
        dtype: ["dtype", "torch_dtype"].iter().find_map(|k| s(&config, k).or_else(|| text_str(k))),
        tie_word_embeddings: config
            .get("tie_word_embeddings")
            .or_else(|| text.get("tie_word_embeddings"))
            .and_then(Value::as_bool),
    })
}

fn require(dir: &Path, name: &str, what: &str) -> Result<FileEntry> {
    let path = dir.join(name);
    let meta = std::fs::metadata(&path).with_context(|| {
        format!("checkpoint file {} is missing ({what}); the checkpoint folder is incomplete", path.display())
    })?;
    if !meta.is_file() {
        bail!("checkpoint file {} is not a file", path.display());
    }
    Ok(FileEntry { name: name.to_string(), size: meta.len() })
}

/// Checks a checkpoint folder: config.json parses and names the model's shape,
/// tokenizer.json is there, and the weights (single or sharded) are complete — every
/// safetensors header is read and every tensor's bytes must lie inside its file; an
/// index's tensors must be in the shards it names. Errors name the file and what to do.
pub fn check_dir(dir: &Path) -> Result<CheckpointInfo> {
    if !dir.is_dir() {
        bail!("checkpoint folder {} does not exist", dir.display());
    }
    let mut files = vec![require(dir, "config.json", "the model's configuration")?];
    let summary = read_summary(&dir.join("config.json"))?;
    files.push(require(dir, "tokenizer.json", "the tokenizer")?);
    if dir.join("tokenizer_config.json").is_file() {
        files.push(require(dir, "tokenizer_config.json", "the tokenizer's settings")?);
    }
    if dir.join("preprocessor_config.json").is_file() {
        files.push(require(dir, "preprocessor_config.json", "the image preprocessing")?);
    }
    let index_path = dir.join(INDEX_FILE);
    let (weights, sharded) = if index_path.is_file() {
        files.push(require(dir, INDEX_FILE, "the weights index")?);
        (index_shards(&index_path)?, true)
    } else if dir.join(SINGLE_FILE).exists() {
        (vec![SINGLE_FILE.to_string()], false)
    } else {
        bail!("checkpoint folder {} has no weights: neither {SINGLE_FILE} nor {INDEX_FILE} is there", dir.display());
    };
    let mut num_tensors = 0;
    let mut found = BTreeSet::new();
    for w in &weights {
        files.push(require(
            dir,
            w,
            if sharded { "a weights shard named by model.safetensors.index.json" } else { "the weights" },
        )?);
        let header = safetensors::check(&dir.join(w))?;
        num_tensors += header.tensors.len();
        if sharded {
            found.extend(header.tensors.into_keys().map(|t| (t, w.clone())));
        }
    }
    if sharded {
        let index = read_json(&index_path)?;
        for (tensor, file) in index["weight_map"].as_object().into_iter().flatten() {
            let file = file.as_str().unwrap_or_default();
            if !found.contains(&(tensor.clone(), file.to_string())) {
                bail!(
                    "{} names tensor `{tensor}` in {file}, but {file} does not hold it; the shards do not match the \
                     index — fetch the checkpoint again",
                    index_path.display()
                );
            }
        }
    }
    Ok(CheckpointInfo { files, weights, sharded, num_tensors, summary })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde_json::json;

    pub(crate) fn tiny() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/tiny_qwen3_vl/checkpoint")
    }

    #[test]
    fn the_tiny_checkpoint_checks() {
        let info = check_dir(&tiny()).unwrap();
        let names: Vec<_> = info.files.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(
            names,
            ["config.json", "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "model.safetensors"]
        );
        assert!(!info.sharded);
        assert!(info.num_tensors > 10);
        let s = &info.summary;
        assert_eq!((s.num_hidden_layers, s.hidden_size, s.vocab_size), (4, 128, 516));
        assert_eq!(s.dtype.as_deref(), Some("bfloat16"));
        assert_eq!(s.model_type.as_deref(), Some("qwen3_vl"));
    }

    /// A sharded copy of a small fake checkpoint.
    pub(crate) fn sharded(dir: &Path) {
        std::fs::copy(tiny().join("config.json"), dir.join("config.json")).unwrap();
        std::fs::copy(tiny().join("tokenizer.json"), dir.join("tokenizer.json")).unwrap();
        let a = safetensors::tests::make(&[("w.a", &[2, 2])]);
        let b = safetensors::tests::make(&[("w.b", &[3]), ("w.c", &[1])]);
        std::fs::write(dir.join("model-00001-of-00002.safetensors"), a).unwrap();
        std::fs::write(dir.join("model-00002-of-00002.safetensors"), b).unwrap();
        let index = json!({"metadata": {"total_size": 40}, "weight_map": {
            "w.a": "model-00001-of-00002.safetensors",
            "w.b": "model-00002-of-00002.safetensors",
            "w.c": "model-00002-of-00002.safetensors"}});
        std::fs::write(dir.join(INDEX_FILE), index.to_string()).unwrap();
    }

    #[test]
    fn sharded_layouts_check_every_shard() {
        let dir = tempfile::tempdir().unwrap();
        sharded(dir.path());
        let info = check_dir(dir.path()).unwrap();
        assert!(info.sharded);
        assert_eq!(info.weights, ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]);
        assert_eq!(info.num_tensors, 3);
        assert_eq!(info.files.len(), 5);

        // A shard the index names is missing.
        std::fs::remove_file(dir.path().join("model-00002-of-00002.safetensors")).unwrap();
        let e = format!("{:#}", check_dir(dir.path()).unwrap_err());
        assert!(e.contains("model-00002-of-00002.safetensors is missing") && e.contains("named by"), "{e}");

        // A shard that lacks a tensor the index places in it.
        sharded(dir.path());
        std::fs::write(dir.path().join("model-00002-of-00002.safetensors"), safetensors::tests::make(&[("w.b", &[3])]))
            .unwrap();
        let e = format!("{:#}", check_dir(dir.path()).unwrap_err());
        assert!(e.contains("tensor `w.c`") && e.contains("does not hold it"), "{e}");
    }

    #[test]
    fn missing_and_truncated_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        for f in ["config.json", "tokenizer.json", "model.safetensors"] {
            std::fs::copy(tiny().join(f), dir.path().join(f)).unwrap();
        }
        check_dir(dir.path()).unwrap();
        let weights = std::fs::read(dir.path().join("model.safetensors")).unwrap();
        std::fs::write(dir.path().join("model.safetensors"), &weights[..weights.len() - 100]).unwrap();
        let e = format!("{:#}", check_dir(dir.path()).unwrap_err());
        assert!(e.contains("model.safetensors is truncated") && e.contains("fetch the checkpoint again"), "{e}");

        std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
        let e = format!("{:#}", check_dir(dir.path()).unwrap_err());
        assert!(e.contains("has no weights"), "{e}");

        std::fs::remove_file(dir.path().join("tokenizer.json")).unwrap();
        let e = format!("{:#}", check_dir(dir.path()).unwrap_err());
        assert!(e.contains("tokenizer.json is missing"), "{e}");

        std::fs::write(dir.path().join("config.json"), r#"{"text_config": {"hidden_size": 8}}"#).unwrap();
        let e = format!("{:#}", check_dir(dir.path()).unwrap_err());
        assert!(e.contains("`text_config.num_hidden_layers` is missing"), "{e}");
    }

    #[test]
    fn resolve_dir_reads_local_and_hub_locators() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let d = resolve_dir(&root, &json!({"source": "local", "path": "models/tiny_qwen3_vl/checkpoint"})).unwrap();
        assert!(d.join("config.json").is_file());
        let abs = tiny();
        assert_eq!(resolve_dir(Path::new("/nowhere"), &json!({"source": "local", "path": abs})).unwrap(), abs);
        let e = format!("{:#}", resolve_dir(&root, &json!({"source": "local", "path": "no/such"})).unwrap_err());
        assert!(e.contains("no/such") && e.contains("does not exist"), "{e}");
        let e = format!("{:#}", resolve_dir(&root, &json!({"source": "ftp"})).unwrap_err());
        assert!(e.contains("unknown source `ftp`"), "{e}");
        let e = format!("{:#}", resolve_dir(&root, &json!({"source": "hub", "repo": "x/y"})).unwrap_err());
        assert!(e.contains("no string `revision`"), "{e}");
    }
}
