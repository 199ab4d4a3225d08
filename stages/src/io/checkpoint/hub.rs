//! Hugging Face hub checkpoints: the cache layout huggingface_hub and hf-hub share, and
//! fetching a pinned revision into it.
//!
//! ```text
//! <cache>/models--<Org>--<Name>/blobs/<etag>                 file contents
//! <cache>/models--<Org>--<Name>/snapshots/<commit>/<file>    symlinks to the blobs
//! <cache>/models--<Org>--<Name>/refs/<branch>                a commit sha
//! ```
//!
//! `<cache>` is `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`.
//! `HF_HUB_OFFLINE=1` forbids network access; `HF_ENDPOINT` replaces `https://huggingface.co`.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use hf_hub::api::sync::{ApiBuilder, ApiError};
use hf_hub::{Cache, Repo, RepoType};

use super::{check_dir, CheckpointInfo, INDEX_FILE, SINGLE_FILE};
use qpipe_contract::Progress;

/// Where the hub cache is and whether (and where) the network may be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubEnv {
    /// The hub cache folder (holding `models--…` folders).
    pub cache_dir: PathBuf,
    /// The hub's base URL.
    pub endpoint: String,
    /// No network access: only the cache is read.
    pub offline: bool,
    /// An access token for gated or private repositories.
    pub token: Option<String>,
}

fn env_flag(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "on" | "yes" | "true"))
}

impl HubEnv {
    /// The environment's settings: `HF_HUB_CACHE`, `HF_HOME`, `HF_HUB_OFFLINE`,
    /// `HF_ENDPOINT`, `HF_TOKEN` (or `$HF_HOME/token`).
    pub fn from_env() -> Self {
        let non_empty = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let home = non_empty("HF_HOME").map(PathBuf::from).unwrap_or_else(|| {
            let base = non_empty("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(non_empty("HOME").unwrap_or_else(|| ".".into())).join(".cache"));
            base.join("huggingface")
        });
        let cache_dir = non_empty("HF_HUB_CACHE").map(PathBuf::from).unwrap_or_else(|| home.join("hub"));
        let token = non_empty("HF_TOKEN")
            .or_else(|| std::fs::read_to_string(home.join("token")).ok().map(|t| t.trim().to_string()))
            .filter(|t| !t.is_empty());
        Self {
            cache_dir,
            endpoint: non_empty("HF_ENDPOINT").unwrap_or_else(|| "https://huggingface.co".into()),
            offline: env_flag("HF_HUB_OFFLINE"),
            token,
        }
    }

    /// `<cache>/models--Org--Name`.
    pub fn repo_dir(&self, repo: &str) -> PathBuf {
        self.cache_dir.join(format!("models--{}", repo.replace('/', "--")))
    }

    /// `<cache>/models--Org--Name/snapshots/<commit>` for a commit sha (never through
    /// `refs/`), or for the commit a cached ref (`refs/<branch>`) names. Does not check
    /// that it exists.
    pub fn snapshot_dir(&self, repo: &str, revision: &str) -> PathBuf {
        let dir = self.repo_dir(repo);
        if revision.len() == 40 && revision.bytes().all(|b| b.is_ascii_hexdigit()) {
            return dir.join("snapshots").join(revision);
        }
        let commit = std::fs::read_to_string(dir.join("refs").join(revision))
            .ok()
            .map(|c| c.trim().to_string())
            .filter(|c| !c.is_empty())
            .unwrap_or_else(|| revision.to_string());
        dir.join("snapshots").join(commit)
    }

    fn not_cached(&self, repo: &str, revision: &str) -> anyhow::Error {
        anyhow!(
            "checkpoint {repo}@{revision} is not in the Hugging Face cache ({}); get it with network access \
             (unset HF_HUB_OFFLINE and run `qpipe build` again, or `huggingface-cli download {repo} --revision {revision}`), \
             or point `model.path=DIR` at a local copy",
            self.snapshot_dir(repo, revision).display()
        )
    }
}

/// The cached snapshot folder of `repo@revision`, checked. Never uses the network.
pub fn cached(env: &HubEnv, repo: &str, revision: &str) -> Result<(PathBuf, CheckpointInfo)> {
    let dir = env.snapshot_dir(repo, revision);
    if !dir.is_dir() {
        return Err(env.not_cached(repo, revision));
    }
    let info = check_dir(&dir).map_err(|e| e.context(env.not_cached(repo, revision)))?;
    Ok((dir, info))
}

/// The snapshot folder of `repo@revision`, downloading what the cache lacks (config,
/// tokenizer files, the weights index and its shards, or the single weights file),
/// unless offline. Returns the folder and its check.
pub fn fetch(env: &HubEnv, repo: &str, revision: &str, progress: &dyn Progress) -> Result<(PathBuf, CheckpointInfo)> {
    if let Ok(found) = cached(env, repo, revision) {
        return Ok(found);
    }
    if env.offline {
        return cached(env, repo, revision).context("HF_HUB_OFFLINE is set, so nothing was downloaded");
    }
    let dir = env.snapshot_dir(repo, revision);
    let api = ApiBuilder::from_cache(Cache::new(env.cache_dir.clone()))
        .with_endpoint(env.endpoint.clone())
        .with_token(env.token.clone())
        .with_progress(false)
        .build()
        .context("cannot set up the hub client")?;
    let api = api.repo(Repo::with_revision(repo.to_string(), RepoType::Model, revision.to_string()));
    let get = |file: &str, required: bool| -> Result<Option<PathBuf>> {
        let local = dir.join(file);
        if local.exists() {
            return Ok(Some(local));
        }
        progress.note(&format!("downloading {repo}@{revision}: {file}"));
        match api.download(file) {
            Ok(path) => {
                if path != local {
                    bail!(
                        "the hub at {} served {} for {repo}@{revision}/{file}: a different commit than the pinned one",
                        env.endpoint,
                        path.display()
                    );
                }
                Ok(Some(path))
            }
            Err(ApiError::RequestError(e)) if !required && matches!(*e, ureq::Error::Status(404, _)) => Ok(None),
            Err(e) => Err(anyhow!(e).context(format!(
                "cannot download {file} of {repo}@{revision} from {} (into {})",
                env.endpoint,
                env.cache_dir.display()
            ))),
        }
    };
    get("config.json", true)?;
    get("tokenizer.json", true)?;
    get("tokenizer_config.json", false)?;
    // The image preprocessing of image-text calibration.
    get("preprocessor_config.json", false)?;
    match get(INDEX_FILE, false)? {
        Some(index) => {
            for shard in super::index_shards(&index)? {
                get(&shard, true)?;
            }
        }
        None => {
            get(SINGLE_FILE, true)?;
        }
    }
    let info =
        check_dir(&dir).with_context(|| format!("checkpoint {repo}@{revision} downloaded from {}", env.endpoint))?;
    Ok((dir, info))
}

/// The hub's etag of a cached file: the name of the blob its snapshot symlink points to
/// (a sha256 of the content for LFS files, a git blob id for small ones).
pub fn etag(snapshot_file: &Path) -> Option<String> {
    let target = std::fs::read_link(snapshot_file).ok()?;
    let name = target.file_name()?.to_string_lossy().into_owned();
    target.parent()?.file_name().is_some_and(|p| p == "blobs").then_some(name)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::io::{BufRead, BufReader, Write};
    use std::net::TcpListener;
    use std::sync::{Arc, Mutex};

    use qpipe_contract::Silent;

    pub(crate) const REV: &str = "0123456789abcdef0123456789abcdef01234567";
    pub(crate) const REPO: &str = "Org/Tiny-VL";

    fn tiny() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/tiny_qwen3_vl/checkpoint")
    }

    pub(crate) fn tiny_files() -> BTreeMap<String, Vec<u8>> {
        ["config.json", "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "model.safetensors"]
            .iter()
            .map(|f| (f.to_string(), std::fs::read(tiny().join(f)).unwrap()))
            .collect()
    }

    /// Lays out `files` in a hub cache as huggingface_hub does (blobs + snapshot symlinks),
    /// without a `refs/` entry (the commit is pinned).
    pub(crate) fn make_cache(cache: &Path, files: &BTreeMap<String, Vec<u8>>) {
        let repo = cache.join("models--Org--Tiny-VL");
        let snap = repo.join("snapshots").join(REV);
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::create_dir_all(repo.join("blobs")).unwrap();
        for (name, bytes) in files {
            let etag = blake3::hash(bytes).to_hex().to_string();
            std::fs::write(repo.join("blobs").join(&etag), bytes).unwrap();
            std::os::unix::fs::symlink(format!("../../blobs/{etag}"), snap.join(name)).unwrap();
        }
    }

    fn env(cache: &Path, endpoint: &str, offline: bool) -> HubEnv {
        HubEnv { cache_dir: cache.to_path_buf(), endpoint: endpoint.into(), offline, token: None }
    }

    #[test]
    fn environment_conventions() {
        let e = HubEnv::from_env();
        if std::env::var_os("HF_HUB_CACHE").is_none() {
            assert!(e.cache_dir.ends_with("hub"), "{e:?}");
        }
        let h = env(Path::new("/c"), "http://x", true);
        assert_eq!(h.repo_dir("Qwen/Qwen3-VL-4B-Instruct"), Path::new("/c/models--Qwen--Qwen3-VL-4B-Instruct"));
        assert_eq!(h.snapshot_dir(REPO, REV), Path::new("/c/models--Org--Tiny-VL/snapshots").join(REV));
    }

    #[test]
    fn offline_reads_a_cache_layout() {
        let cache = tempfile::tempdir().unwrap();
        let hub = env(cache.path(), "http://127.0.0.1:9", true);
        let e = format!("{:#}", fetch(&hub, REPO, REV, &Silent).unwrap_err());
        assert!(e.contains("is not in the Hugging Face cache") && e.contains("HF_HUB_OFFLINE"), "{e}");

        make_cache(cache.path(), &tiny_files());
        let (dir, info) = fetch(&hub, REPO, REV, &Silent).unwrap();
        assert_eq!(dir, hub.snapshot_dir(REPO, REV));
        assert_eq!(info.summary.num_hidden_layers, 4);
        let etag = etag(&dir.join("model.safetensors")).unwrap();
        assert_eq!(etag, blake3::hash(&tiny_files()["model.safetensors"]).to_hex().to_string());
        let loc = serde_json::json!({"source": "hub", "repo": REPO, "revision": REV});
        assert_eq!(super::super::resolve_dir_in(Path::new("/"), &loc, &hub).unwrap(), dir);

        // A branch name resolves through refs/.
        let refs = hub.repo_dir(REPO).join("refs");
        std::fs::create_dir_all(&refs).unwrap();
        std::fs::write(refs.join("main"), REV).unwrap();
        assert_eq!(hub.snapshot_dir(REPO, "main"), dir);

        // A truncated cached blob is reported, not used.
        let blob = std::fs::canonicalize(dir.join("model.safetensors")).unwrap();
        let bytes = std::fs::read(&blob).unwrap();
        std::fs::write(&blob, &bytes[..bytes.len() / 2]).unwrap();
        let e = format!("{:#}", fetch(&hub, REPO, REV, &Silent).unwrap_err());
        assert!(e.contains("not in the Hugging Face cache") && e.contains("is truncated"), "{e}");
        let other = serde_json::json!({"source": "hub", "repo": "Org/Other", "revision": REV});
        let e = format!("{:#}", super::super::resolve_dir_in(Path::new("/"), &other, &hub).unwrap_err());
        assert!(e.contains("Org/Other@") && e.contains("fetch-model"), "{e}");
    }

    /// A stand-in for the hub's `/{repo}/resolve/{revision}/{file}` endpoint, serving
    /// `files` of `REPO@REV` with the headers hf-hub reads (etag, x-repo-commit,
    /// Content-Range for `Range` requests). Returns its base URL and the request log.
    pub(crate) fn serve(files: BTreeMap<String, Vec<u8>>, commit: &str) -> (String, Arc<Mutex<Vec<String>>>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let log = Arc::new(Mutex::new(Vec::new()));
        let (log2, commit) = (log.clone(), commit.to_string());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut line = String::new();
                if reader.read_line(&mut line).is_err() {
                    continue;
                }
                let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
                let mut range = None;
                loop {
                    let mut h = String::new();
                    if reader.read_line(&mut h).unwrap_or(0) == 0 || h.trim().is_empty() {
                        break;
                    }
                    if let Some((k, v)) = h.split_once(':') {
                        if k.eq_ignore_ascii_case("range") {
                            range = v.trim().strip_prefix("bytes=").map(String::from);
                        }
                    }
                }
                log2.lock().unwrap().push(format!("{path} {}", range.clone().unwrap_or_default()));
                let prefix = format!("/{REPO}/resolve/{REV}/");
                let body = path.strip_prefix(&prefix).and_then(|f| files.get(f));
                let response = match body {
                    None => b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_vec(),
                    Some(bytes) => {
                        let (start, end) = match range.as_deref().and_then(|r| r.split_once('-')) {
                            Some((a, b)) => {
                                let a: usize = a.parse().unwrap_or(0);
                                let b = b.parse::<usize>().map(|b| b + 1).unwrap_or(bytes.len()).min(bytes.len());
                                (a, b)
                            }
                            None => (0, bytes.len()),
                        };
                        let etag = blake3::hash(bytes).to_hex();
                        let mut r = format!(
                            "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {start}-{}/{}\r\n\
                             ETag: \"{etag}\"\r\nX-Repo-Commit: {commit}\r\nConnection: close\r\n\r\n",
                            end - start,
                            end.saturating_sub(1),
                            bytes.len()
                        )
                        .into_bytes();
                        r.extend_from_slice(&bytes[start..end]);
                        r
                    }
                };
                let _ = stream.write_all(&response);
            }
        });
        (url, log)
    }

    fn proxy_set() -> bool {
        let set = ["ALL_PROXY", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "http_proxy", "https_proxy"]
            .iter()
            .any(|k| std::env::var(k).is_ok_and(|v| !v.is_empty()));
        if set {
            eprintln!("SKIP: an HTTP proxy is set in the environment; hf-hub would send 127.0.0.1 requests through it");
        }
        set
    }

    #[test]
    fn fetches_from_a_local_hub_into_the_cache() {
        if proxy_set() {
            return;
        }
        let cache = tempfile::tempdir().unwrap();
        let (url, log) = serve(tiny_files(), REV);
        let hub = env(cache.path(), &url, false);
        let (dir, info) = fetch(&hub, REPO, REV, &Silent).unwrap();
        assert_eq!(dir, hub.snapshot_dir(REPO, REV));
        assert_eq!(info.files.len(), 5, "config, tokenizer, tokenizer_config, preprocessor_config, weights");
        assert_eq!(std::fs::read(dir.join("model.safetensors")).unwrap(), tiny_files()["model.safetensors"]);
        assert!(etag(&dir.join("config.json")).is_some(), "snapshot files link to blobs");
        let requests = log.lock().unwrap().clone();
        assert!(requests.iter().any(|r| r.contains(INDEX_FILE)), "asked for the index first: {requests:?}");
        // Now cached: no further requests, and offline works.
        let n = requests.len();
        fetch(&hub, REPO, REV, &Silent).unwrap();
        assert_eq!(log.lock().unwrap().len(), n);
        fetch(&HubEnv { offline: true, ..hub }, REPO, REV, &Silent).unwrap();
    }

    #[test]
    fn fetches_sharded_weights_and_rejects_moved_commits() {
        if proxy_set() {
            return;
        }
        let src = tempfile::tempdir().unwrap();
        super::super::tests::sharded(src.path());
        let files: BTreeMap<String, Vec<u8>> = std::fs::read_dir(src.path())
            .unwrap()
            .map(|e| e.unwrap())
            .map(|e| (e.file_name().to_string_lossy().into_owned(), std::fs::read(e.path()).unwrap()))
            .collect();
        let cache = tempfile::tempdir().unwrap();
        let (url, _) = serve(files.clone(), REV);
        let (dir, info) = fetch(&env(cache.path(), &url, false), REPO, REV, &Silent).unwrap();
        assert!(info.sharded && dir.join("model-00002-of-00002.safetensors").is_file());

        let cache = tempfile::tempdir().unwrap();
        let (url, _) = serve(files, "fedcba9876543210fedcba9876543210fedcba98");
        let e = format!("{:#}", fetch(&env(cache.path(), &url, false), REPO, REV, &Silent).unwrap_err());
        assert!(e.contains("a different commit than the pinned one"), "{e}");

        let cache = tempfile::tempdir().unwrap();
        let (url, _) = serve(BTreeMap::new(), REV);
        let e = format!("{:#}", fetch(&env(cache.path(), &url, false), REPO, REV, &Silent).unwrap_err());
        assert!(e.contains("cannot download config.json") && e.contains("404"), "{e}");
    }
}
