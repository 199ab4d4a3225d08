//! `fetch-model`: checks a local checkpoint folder, or fetches a pinned hub revision into
//! the Hugging Face cache, and writes the checkpoint's identity as JSON.
//!
//! Params: `{"source":"local"}` or `{"source":"hub","repo":R,"revision":SHA}`.
//! Locators: `checkpoint` (see [`checkpoint::resolve_dir`]). Out: one JSON file:
//!
//! ```json
//! {
//!   "format": "qpipe.checkpoint/1",
//!   "source": {"source": "hub", "repo": "Qwen/Qwen3-VL-4B-Instruct", "revision": "ebb2…"},
//!   "files": [{"name": "config.json", "size": 1521, "blake3": "…", "etag": "…"}, …],
//!   "weights": {"layout": "single", "files": ["model.safetensors"], "num_tensors": 53},
//!   "summary": {"model_type": "qwen3_vl", "num_hidden_layers": 4, "hidden_size": 128, …}
//! }
//! ```
//!
//! Everything in it derives from the checkpoint's content (and, for the hub, the pinned
//! revision): no absolute paths, no times, so moving a checkpoint folder changes nothing
//! downstream. `etag` (the hub's id of the file's content) appears for hub files only.

use std::io::Read;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::io::checkpoint::{self, hub, CheckpointInfo, HubEnv};
use qpipe_contract::{DepSpec, Instance, Job, OutSpec, Progress, Stage};
use serde::{Deserialize, Serialize};

/// The `fetch-model` stage.
pub struct FetchModel;

impl Stage for FetchModel {
    fn kind(&self) -> &'static str {
        "fetch-model"
    }
    fn code_version(&self) -> &'static str {
        env!("QPIPE_CODE_FETCH_MODEL")
    }
    fn run(&self, job: &Job<'_>) -> anyhow::Result<()> {
        run_with(job, &HubEnv::from_env())
    }
}

/// Where a checkpoint comes from: `model.path` (a local folder) or `model.hub_id` at a
/// pinned `model.revision`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "source", rename_all = "lowercase")]
pub enum CheckpointSource {
    Local { path: String },
    Hub { repo: String, revision: String },
}

impl CheckpointSource {
    /// A short, stable, filesystem-safe name for instance ids and cache paths.
    pub fn slug(&self) -> String {
        match self {
            Self::Local { path } => path.trim_end_matches('/').to_string(),
            Self::Hub { repo, revision } => format!("{repo}@{}", &revision[..revision.len().min(7)]),
        }
    }
}

/// The `fetch-model` instance for `src`: dep `checkpoint` (a local folder, keyed by
/// content), out `identity` (the checkpoint identity JSON at `identity`).
pub fn instance(root: &Path, src: &CheckpointSource, identity: &Path) -> Result<Instance> {
    let (params, deps) = match src {
        CheckpointSource::Local { path } => {
            if !root.join(path).is_dir() {
                bail!(
                    "key `model.path`: checkpoint folder `{path}` does not exist{}",
                    if Path::new(path).is_absolute() { String::new() } else { format!(" (under {})", root.display()) }
                );
            }
            (json!({"source": "local"}), vec![DepSpec::new("checkpoint", path)])
        }
        CheckpointSource::Hub { repo, revision } => {
            (json!({"source": "hub", "repo": repo, "revision": revision}), vec![])
        }
    };
    Ok(Instance {
        id: format!("fetch-model@{}", src.slug()),
        kind: "fetch-model".into(),
        params,
        locators: json!({"checkpoint": serde_json::to_value(src)?}),
        deps,
        outs: vec![OutSpec::intermediate("identity", identity)],
        description: format!("check checkpoint {}", src.slug()),
    })
}

/// [`FetchModel::run`] with explicit hub settings (tests pass a private cache/endpoint).
pub fn run_with(job: &Job<'_>, hub_env: &HubEnv) -> Result<()> {
    let out = job.out("identity")?;
    let str_param = |k: &str| {
        job.params
            .get(k)
            .and_then(Value::as_str)
            .with_context(|| format!("stage `{}`: parameter `{k}` is missing or not a string", job.id))
    };
    let (dir, info, source) = match str_param("source")? {
        "local" => {
            let locator = job
                .locators
                .get("checkpoint")
                .with_context(|| format!("stage `{}`: no `checkpoint` locator", job.id))?;
            let dir = checkpoint::resolve_dir(job.root, locator)?;
            job.progress.phase("checking checkpoint", None);
            let info = checkpoint::check_dir(&dir)?;
            (dir, info, json!({"source": "local"}))
        }
        "hub" => {
            let (repo, revision) = (str_param("repo")?, str_param("revision")?);
            job.progress.phase("fetching checkpoint", None);
            let (dir, info) = hub::fetch(hub_env, repo, revision, job.progress)?;
            (dir, info, json!({"source": "hub", "repo": repo, "revision": revision}))
        }
        other => bail!("stage `{}`: unknown checkpoint source `{other}` (valid: local, hub)", job.id),
    };
    let identity = identity(&dir, &info, source, job.progress)?;
    let mut text = serde_json::to_string_pretty(&identity)?;
    text.push('\n');
    std::fs::write(out, text).with_context(|| format!("cannot write {}", out.display()))?;
    Ok(())
}

/// The identity JSON of a checked checkpoint folder (see the module docs).
pub fn identity(dir: &Path, info: &CheckpointInfo, source: Value, progress: &dyn Progress) -> Result<Value> {
    let total: u64 = info.files.iter().map(|f| f.size).sum();
    progress.phase("hashing checkpoint", Some(total));
    let mut files = Vec::new();
    for f in &info.files {
        let path = dir.join(&f.name);
        let mut entry = json!({"name": f.name, "size": f.size, "blake3": hash_file(&path, progress)?});
        if let Some(etag) = hub::etag(&path) {
            entry["etag"] = json!(etag);
        }
        files.push(entry);
    }
    Ok(json!({
        "format": "qpipe.checkpoint/1",
        "source": source,
        "files": files,
        "weights": {
            "layout": if info.sharded { "sharded" } else { "single" },
            "files": info.weights,
            "num_tensors": info.num_tensors,
        },
        "summary": info.summary,
    }))
}

fn hash_file(path: &Path, progress: &dyn Progress) -> Result<String> {
    let mut f = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).with_context(|| format!("cannot read {}", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        progress.advance(n as u64);
    }
    Ok(h.finalize().to_hex().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use qpipe_contract::JobFile;
    use qpipe_contract::Silent;
    use std::path::PathBuf;

    fn run_local(root: &Path, path: &str) -> Result<Value> {
        let out = tempfile::NamedTempFile::new().unwrap();
        let outs = [JobFile::new("identity", out.path())];
        let job = Job {
            id: "fetch-model@t",
            root,
            params: &json!({"source": "local"}),
            locators: &json!({"checkpoint": {"source": "local", "path": path}}),
            deps: &[JobFile::new("checkpoint", root.join(path))],
            outs: &outs,
            final_outs: &[JobFile::new("identity", "tmp/qpipe/fetch/t.json")],
            progress: &Silent,
        };
        FetchModel.run(&job)?;
        Ok(serde_json::from_slice(&std::fs::read(out.path()).unwrap()).unwrap())
    }

    fn tiny_root() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
    }

    #[test]
    fn local_identity_is_content_derived() {
        let id = run_local(&tiny_root(), "models/tiny_qwen3_vl/checkpoint").unwrap();
        assert_eq!(id["format"], "qpipe.checkpoint/1");
        assert_eq!(id["source"], json!({"source": "local"}));
        assert_eq!(id["summary"]["num_hidden_layers"], 4);
        assert_eq!(id["summary"]["vocab_size"], 516);
        assert_eq!(id["summary"]["dtype"], "bfloat16");
        assert_eq!(id["weights"]["layout"], "single");
        let files = id["files"].as_array().unwrap();
        let w = files.iter().find(|f| f["name"] == "model.safetensors").unwrap();
        let bytes = std::fs::read(tiny_root().join("models/tiny_qwen3_vl/checkpoint/model.safetensors")).unwrap();
        assert_eq!(w["size"], bytes.len());
        assert_eq!(w["blake3"], blake3::hash(&bytes).to_hex().as_str());
        assert!(!id.to_string().contains(tiny_root().to_string_lossy().as_ref()), "no absolute paths");

        // The same checkpoint elsewhere (absolute path, other root): the same identity.
        let copy = tempfile::tempdir().unwrap();
        for f in files {
            let name = f["name"].as_str().unwrap();
            std::fs::copy(tiny_root().join("models/tiny_qwen3_vl/checkpoint").join(name), copy.path().join(name))
                .unwrap();
        }
        let moved = run_local(Path::new("/"), copy.path().to_str().unwrap()).unwrap();
        assert_eq!(moved, id);

        // One changed byte in the weights changes it.
        let mut b = bytes.clone();
        let last = b.len() - 1;
        b[last] ^= 1;
        std::fs::write(copy.path().join("model.safetensors"), b).unwrap();
        assert_ne!(run_local(Path::new("/"), copy.path().to_str().unwrap()).unwrap(), id);
    }

    #[test]
    fn local_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        crate::io::checkpoint::tests::sharded(dir.path());
        let p = dir.path().to_str().unwrap();
        let id = run_local(Path::new("/"), p).unwrap();
        assert_eq!(id["weights"]["layout"], "sharded");
        assert_eq!(id["files"].as_array().unwrap().len(), 5);

        let shard = dir.path().join("model-00001-of-00002.safetensors");
        let bytes = std::fs::read(&shard).unwrap();
        std::fs::write(&shard, &bytes[..bytes.len() - 4]).unwrap();
        let e = format!("{:#}", run_local(Path::new("/"), p).unwrap_err());
        assert!(e.contains("model-00001-of-00002.safetensors is truncated"), "{e}");
        std::fs::remove_file(&shard).unwrap();
        let e = format!("{:#}", run_local(Path::new("/"), p).unwrap_err());
        assert!(e.contains("model-00001-of-00002.safetensors is missing"), "{e}");
        let e = format!("{:#}", run_local(Path::new("/"), "/no/such/ckpt").unwrap_err());
        assert!(e.contains("/no/such/ckpt does not exist"), "{e}");
    }

    #[test]
    fn hub_identity_records_revision_and_etags() {
        use crate::io::checkpoint::hub::tests::{make_cache, tiny_files, REPO, REV};
        let cache = tempfile::tempdir().unwrap();
        make_cache(cache.path(), &tiny_files());
        let hub = HubEnv {
            cache_dir: cache.path().to_path_buf(),
            endpoint: "http://127.0.0.1:9".into(),
            offline: true,
            token: None,
        };
        let out = tempfile::NamedTempFile::new().unwrap();
        let outs = [JobFile::new("identity", out.path())];
        let params = json!({"source": "hub", "repo": REPO, "revision": REV});
        let locators = json!({"checkpoint": params.clone()});
        let job = Job {
            id: "fetch-model@hub",
            root: Path::new("/"),
            params: &params,
            locators: &locators,
            deps: &[],
            outs: &outs,
            final_outs: &[JobFile::new("identity", "x.json")],
            progress: &Silent,
        };
        run_with(&job, &hub).unwrap();
        let id: Value = serde_json::from_slice(&std::fs::read(out.path()).unwrap()).unwrap();
        assert_eq!(id["source"], params);
        let local = run_local(&tiny_root(), "models/tiny_qwen3_vl/checkpoint").unwrap();
        assert_eq!(id["summary"], local["summary"]);
        for (h, l) in id["files"].as_array().unwrap().iter().zip(local["files"].as_array().unwrap()) {
            assert_eq!(h["blake3"], l["blake3"]);
            assert!(h["etag"].is_string(), "{h}");
        }
        assert!(!id.to_string().contains(cache.path().to_string_lossy().as_ref()));

        let empty = tempfile::tempdir().unwrap();
        let hub = HubEnv { cache_dir: empty.path().to_path_buf(), ..hub };
        let e = format!("{:#}", run_with(&job, &hub).unwrap_err());
        assert!(e.contains("Org/Tiny-VL@") && e.contains("not in the Hugging Face cache"), "{e}");
    }
}
