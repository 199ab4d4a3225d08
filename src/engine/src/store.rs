//! The shared output cache: every instance's outputs stored by its key, so that a build
//! anywhere (another clone, another machine on a shared filesystem) that needs an instance
//! whose key is there restores the outputs instead of running the stage.
//!
//! Where: `QPIPE_CACHE_DIR`, else `cache.dir` in `pipeline.yaml` (relative to the
//! workspace); off when neither is set. Layout: `<dir>/v1/<key[..2]>/<key>/`, holding the
//! outputs as `0`, `1`, … and `entry.json` (`{"id", "kind", "outs": [{"name", "hash"}]}`).
//! An entry is made in a temporary folder beside it (`<dir>/v1/tmp/`) and renamed into
//! place whole, so readers see a complete entry or none, and of two machines storing the
//! same key one wins and the other drops its copy (the bytes are the same: the key says
//! so). Restoring checks every file's blake3 against the entry; a damaged entry is
//! reported and the stage runs instead. `qpipe clean` never touches the cache;
//! `qpipe cache gc` does.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::hashing::hash_file_bytes;

/// The environment variable that names the cache folder.
pub const ENV: &str = "QPIPE_CACHE_DIR";

/// A cache folder.
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
}

/// One output as an entry records it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StoredOut {
    pub name: String,
    pub hash: String,
}

/// What `entry.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Entry {
    pub id: String,
    pub kind: String,
    pub outs: Vec<StoredOut>,
}

impl Store {
    /// The cache of a workspace: `QPIPE_CACHE_DIR`, else `configured` (the pipeline's
    /// `cache.dir`, relative to `root`); `None` when neither is set.
    pub fn locate(root: &Path, configured: Option<&str>) -> Option<Store> {
        let dir = match std::env::var_os(ENV).filter(|v| !v.is_empty()) {
            Some(v) => PathBuf::from(v),
            None => root.join(configured.filter(|d| !d.is_empty())?),
        };
        Some(Store { dir })
    }

    /// The cache folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn entry_dir(&self, key: &str) -> PathBuf {
        self.dir.join("v1").join(key.get(..2).unwrap_or("__")).join(key)
    }

    /// The entry of `key`, if the cache has a complete one.
    pub fn lookup(&self, key: &str) -> Option<Entry> {
        let text = fs::read(self.entry_dir(key).join("entry.json")).ok()?;
        serde_json::from_slice(&text).ok()
    }

    /// Copies the outputs of `key`'s entry to `dests` (one per output, in order), checking
    /// each file's hash. Errors name the entry and what is wrong with it.
    pub fn restore(&self, key: &str, entry: &Entry, dests: &[PathBuf]) -> Result<()> {
        let dir = self.entry_dir(key);
        if entry.outs.len() != dests.len() {
            bail!("cache entry `{}` has {} outputs, the instance {}", dir.display(), entry.outs.len(), dests.len());
        }
        for (i, (out, dest)) in entry.outs.iter().zip(dests).enumerate() {
            let src = dir.join(i.to_string());
            fs::copy(&src, dest).with_context(|| format!("cannot copy `{}` from the cache", src.display()))?;
            let got = hash_file_bytes(dest)?;
            if got != out.hash {
                bail!(
                    "cache entry `{}`: output `{}` has hash {got}, the entry records {} (a damaged cache; \
                     `qpipe cache gc --older-than 0` empties it)",
                    dir.display(),
                    out.name,
                    out.hash
                );
            }
        }
        Ok(())
    }

    /// Stores the outputs `files` (name, path, hash) of instance `id` under `key`; does
    /// nothing when the key is there already.
    pub fn store(&self, key: &str, id: &str, kind: &str, files: &[(String, PathBuf, String)]) -> Result<()> {
        let fin = self.entry_dir(key);
        if fin.join("entry.json").exists() {
            return Ok(());
        }
        let tmp_root = self.dir.join("v1").join("tmp");
        fs::create_dir_all(&tmp_root).with_context(|| format!("cannot create `{}`", tmp_root.display()))?;
        let tmp = tempfile::Builder::new()
            .prefix(&format!("{key}."))
            .tempdir_in(&tmp_root)
            .with_context(|| format!("cannot create a folder in `{}`", tmp_root.display()))?;
        let mut outs = Vec::new();
        for (i, (name, path, hash)) in files.iter().enumerate() {
            fs::copy(path, tmp.path().join(i.to_string()))
                .with_context(|| format!("cannot copy `{}` into the cache", path.display()))?;
            outs.push(StoredOut { name: name.clone(), hash: hash.clone() });
        }
        let entry = Entry { id: id.to_string(), kind: kind.to_string(), outs };
        fs::write(tmp.path().join("entry.json"), serde_json::to_vec_pretty(&entry)?)?;
        if let Some(parent) = fin.parent() {
            fs::create_dir_all(parent).with_context(|| format!("cannot create `{}`", parent.display()))?;
        }
        let tmp = tmp.keep();
        if fs::rename(&tmp, &fin).is_err() {
            // Another writer stored the key first (same key, same bytes): keep theirs.
            fs::remove_dir_all(&tmp).ok();
            if !fin.join("entry.json").exists() {
                bail!("cannot move the cache entry into `{}`", fin.display());
            }
        }
        Ok(())
    }

    /// Removes the entries stored more than `older_than` ago (and unfinished temporary
    /// entries older than that); returns how many entries and how many bytes went.
    pub fn gc(&self, older_than: Duration) -> Result<(usize, u64)> {
        let now = SystemTime::now();
        let old = |p: &Path| {
            fs::metadata(p)
                .and_then(|m| m.modified())
                .map(|t| now.duration_since(t).unwrap_or_default() >= older_than)
                .unwrap_or(true)
        };
        let (mut entries, mut bytes) = (0, 0);
        let v1 = self.dir.join("v1");
        let Ok(shards) = fs::read_dir(&v1) else { return Ok((0, 0)) };
        for shard in shards.flatten() {
            let Ok(items) = fs::read_dir(shard.path()) else { continue };
            for item in items.flatten() {
                let p = item.path();
                let stamp = if shard.file_name() == "tmp" { p.clone() } else { p.join("entry.json") };
                if !old(&stamp) {
                    continue;
                }
                let size: u64 = walkdir::WalkDir::new(&p)
                    .into_iter()
                    .flatten()
                    .filter_map(|e| e.metadata().ok())
                    .filter(|m| m.is_file())
                    .map(|m| m.len())
                    .sum();
                fs::remove_dir_all(&p).with_context(|| format!("cannot remove `{}`", p.display()))?;
                entries += usize::from(shard.file_name() != "tmp");
                bytes += size;
            }
        }
        Ok((entries, bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_outputs_restore_byte_for_byte_and_damage_is_caught() {
        let d = tempfile::tempdir().unwrap();
        let store = Store { dir: d.path().join("cache") };
        let a = d.path().join("a.txt");
        fs::write(&a, "alpha").unwrap();
        let h = hash_file_bytes(&a).unwrap();
        let key = "ab12cd";
        assert!(store.lookup(key).is_none());
        store.store(key, "x@1", "x", &[("out".into(), a.clone(), h.clone())]).unwrap();
        // a second store of the same key keeps the first
        store.store(key, "x@1", "x", &[("out".into(), a.clone(), h.clone())]).unwrap();
        let entry = store.lookup(key).unwrap();
        assert_eq!(entry.outs, [StoredOut { name: "out".into(), hash: h }]);
        let dest = d.path().join("restored.txt");
        store.restore(key, &entry, std::slice::from_ref(&dest)).unwrap();
        assert_eq!(fs::read(&dest).unwrap(), b"alpha");
        fs::write(store.entry_dir(key).join("0"), "alphx").unwrap();
        let e = store.restore(key, &entry, &[dest]).unwrap_err().to_string();
        assert!(e.contains("a damaged cache"), "{e}");
        assert_eq!(store.gc(Duration::from_secs(3600)).unwrap().0, 0);
        assert_eq!(store.gc(Duration::ZERO).unwrap().0, 1);
        assert!(store.lookup(key).is_none());
    }
}
