//! Content hashes (blake3), the stat cache and instance keys.
//!
//! - file → blake3 of its bytes;
//! - directory → blake3 over its files' sorted (relative path, file hash) pairs;
//! - instance key → blake3 over kind, code version, canonical JSON of the parameters
//!   (sorted keys) and the content hash of every dependency, in declared order.
//!
//! The stat cache (`tmp/qpipe/stat-cache.json`) remembers (size, mtime, inode) → hash per
//! file, the way git's index does, so an unchanged 8 GB checkpoint is not re-read.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use crate::atomic::write_atomic;

/// Canonical JSON: object keys sorted, no whitespace, numbers as serde_json writes them.
pub fn canonical_json(v: &Value) -> String {
    let mut s = String::new();
    write_canonical(v, &mut s);
    s
}

fn write_canonical(v: &Value, out: &mut String) {
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                write_canonical(&m[k], out);
            }
            out.push('}');
        }
        Value::Array(a) => {
            out.push('[');
            for (i, c) in a.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(c, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// The key of a stage instance.
pub fn instance_key(kind: &str, code_version: &str, params: &Value, dep_hashes: &[String]) -> String {
    let mut h = blake3::Hasher::new();
    h.update(b"qpipe-key/1\0");
    for part in [kind, code_version, &canonical_json(params)] {
        h.update(part.as_bytes());
        h.update(b"\0");
    }
    for d in dep_hashes {
        h.update(d.as_bytes());
        h.update(b"\0");
    }
    h.finalize().to_hex().to_string()
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct StatEntry {
    size: u64,
    mtime_ns: u64,
    inode: u64,
    hash: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct StatFile {
    version: u32,
    files: HashMap<String, StatEntry>,
}

/// path → (size, mtime, inode, hash), persisted under `tmp/qpipe/`.
pub struct StatCache {
    path: PathBuf,
    files: HashMap<String, StatEntry>,
    dirty: bool,
    /// Hashes computed in this process (files and directories).
    memo: HashMap<PathBuf, Option<String>>,
}

fn stat_of(meta: &fs::Metadata) -> (u64, u64, u64) {
    let mtime = meta.modified().ok().and_then(|t| t.duration_since(UNIX_EPOCH).ok()).unwrap_or_default();
    #[cfg(unix)]
    let inode = std::os::unix::fs::MetadataExt::ino(meta);
    #[cfg(not(unix))]
    let inode = 0;
    (meta.len(), mtime.as_nanos() as u64, inode)
}

/// blake3 of a file's bytes, read in full.
pub fn hash_file_bytes(path: &Path) -> Result<String> {
    let mut h = blake3::Hasher::new();
    let f = fs::File::open(path).with_context(|| format!("cannot read `{}`", path.display()))?;
    h.update_reader(std::io::BufReader::with_capacity(1 << 20, f))
        .with_context(|| format!("cannot read `{}`", path.display()))?;
    Ok(h.finalize().to_hex().to_string())
}

impl StatCache {
    /// Load the cache (a missing or unreadable cache is empty).
    pub fn load(path: PathBuf) -> Self {
        let files = fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice::<StatFile>(&b).ok())
            .filter(|f| f.version == 1)
            .map(|f| f.files)
            .unwrap_or_default();
        StatCache { path, files, dirty: false, memo: HashMap::new() }
    }

    /// Write the cache back if it changed.
    pub fn save(&mut self) -> Result<()> {
        if !self.dirty {
            return Ok(());
        }
        let file = StatFile { version: 1, files: std::mem::take(&mut self.files) };
        let bytes = serde_json::to_vec(&file)?;
        self.files = file.files;
        write_atomic(&self.path, &bytes)?;
        self.dirty = false;
        Ok(())
    }

    /// Forget what this process computed about the file `path` (it was just rewritten)
    /// and about the directories holding it.
    pub fn invalidate(&mut self, path: &Path) {
        for p in path.ancestors() {
            self.memo.remove(p);
        }
    }

    /// Content hash of a file or directory, `None` when it does not exist.
    pub fn hash(&mut self, path: &Path) -> Result<Option<String>> {
        self.hash_skipping(path, &|_| false)
    }

    /// Like [`hash`](Self::hash), but a directory's hash leaves out the files `skip` names
    /// (declared intermediates, which `qpipe clean` may delete) and qpipe's own temporary
    /// files (a stage may be writing beside them).
    pub fn hash_skipping(&mut self, path: &Path, skip: &dyn Fn(&Path) -> bool) -> Result<Option<String>> {
        if let Some(h) = self.memo.get(path) {
            return Ok(h.clone());
        }
        let h = match fs::metadata(path) {
            Err(_) => None,
            Ok(m) if m.is_dir() => Some(self.dir_hash(path, skip)?),
            Ok(m) => Some(self.file_hash(path, &m)?),
        };
        self.memo.insert(path.to_path_buf(), h.clone());
        Ok(h)
    }

    fn file_hash(&mut self, path: &Path, meta: &fs::Metadata) -> Result<String> {
        let (size, mtime_ns, inode) = stat_of(meta);
        let key = path.to_string_lossy().into_owned();
        if let Some(e) = self.files.get(&key) {
            if e.size == size && e.mtime_ns == mtime_ns && e.inode == inode {
                return Ok(e.hash.clone());
            }
        }
        let hash = hash_file_bytes(path)?;
        // Like git's "racily clean" rule: a file modified within the last couple of seconds
        // could change again without its mtime moving, so it is not cached yet.
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        let recent = now.saturating_sub(Duration::from_nanos(mtime_ns)) < Duration::from_secs(2);
        if !recent {
            self.files.insert(key, StatEntry { size, mtime_ns, inode, hash: hash.clone() });
            self.dirty = true;
        } else if self.files.remove(&key).is_some() {
            self.dirty = true;
        }
        Ok(hash)
    }

    fn dir_hash(&mut self, dir: &Path, skip: &dyn Fn(&Path) -> bool) -> Result<String> {
        let mut h = blake3::Hasher::new();
        h.update(b"qpipe-dir/1\0");
        for entry in walkdir::WalkDir::new(dir).follow_links(true).sort_by_file_name() {
            let entry = entry.with_context(|| format!("cannot list `{}`", dir.display()))?;
            if !entry.file_type().is_file()
                || entry.file_name().to_string_lossy().contains(".qpipe-tmp")
                || skip(entry.path())
            {
                continue;
            }
            let rel = entry.path().strip_prefix(dir).unwrap_or(entry.path());
            let rel = rel.components().map(|c| c.as_os_str().to_string_lossy()).collect::<Vec<_>>().join("/");
            let meta = entry.metadata().with_context(|| format!("cannot stat `{}`", entry.path().display()))?;
            let fh = self.file_hash(entry.path(), &meta)?;
            h.update(rel.as_bytes());
            h.update(b"\0");
            h.update(fh.as_bytes());
            h.update(b"\0");
        }
        Ok(h.finalize().to_hex().to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn canonical_json_sorts_keys() {
        let a = json!({"b": 1, "a": {"d": [1, 2.5], "c": null}});
        assert_eq!(canonical_json(&a), r#"{"a":{"c":null,"d":[1,2.5]},"b":1}"#);
    }

    #[test]
    fn keys_change_with_every_input() {
        let base = instance_key("score", "v1", &json!({"a": 1}), &["h".into()]);
        assert_eq!(base, instance_key("score", "v1", &json!({"a": 1}), &["h".into()]));
        assert_ne!(base, instance_key("render", "v1", &json!({"a": 1}), &["h".into()]));
        assert_ne!(base, instance_key("score", "v2", &json!({"a": 1}), &["h".into()]));
        assert_ne!(base, instance_key("score", "v1", &json!({"a": 2}), &["h".into()]));
        assert_ne!(base, instance_key("score", "v1", &json!({"a": 1}), &["g".into()]));
    }

    #[test]
    fn directories_hash_names_and_contents() {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir(d.path().join("sub")).unwrap();
        fs::write(d.path().join("sub/a.txt"), "a").unwrap();
        fs::write(d.path().join("b.txt"), "b").unwrap();
        let mut c = StatCache::load(d.path().join("cache.json"));
        let sub = c.hash(&d.path().join("sub")).unwrap().unwrap();
        let mut c2 = StatCache::load(d.path().join("none.json"));
        fs::rename(d.path().join("sub/a.txt"), d.path().join("sub/z.txt")).unwrap();
        assert_ne!(sub, c2.hash(&d.path().join("sub")).unwrap().unwrap());
        assert_eq!(c2.hash(&d.path().join("missing")).unwrap(), None);
    }

    #[test]
    fn stat_cache_answers_without_reading() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("big.bin");
        fs::write(&f, "content").unwrap();
        let old = SystemTime::now() - Duration::from_secs(60);
        fs::File::options().write(true).open(&f).unwrap().set_modified(old).unwrap();
        let cache = d.path().join("cache.json");
        let mut c = StatCache::load(cache.clone());
        let h = c.hash(&f).unwrap().unwrap();
        c.save().unwrap();
        // Poison the cached hash: a cache hit returns it without reading the file.
        let text = fs::read_to_string(&cache).unwrap().replace(&h, "cached");
        fs::write(&cache, text).unwrap();
        assert_eq!(StatCache::load(cache.clone()).hash(&f).unwrap().unwrap(), "cached");
        // A changed size misses the cache.
        fs::write(&f, "content!").unwrap();
        fs::File::options().write(true).open(&f).unwrap().set_modified(old).unwrap();
        assert_ne!(StatCache::load(cache).hash(&f).unwrap().unwrap(), "cached");
    }
}
