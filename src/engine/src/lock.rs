//! The lock files: what was built, from what, into what.
//!
//! `qpipe.lock` (committed, at the root) holds the entries of instances that feed
//! published artifacts; `tmp/qpipe/scratch.lock` the rest. Both are JSON with entries
//! sorted by instance id, written atomically.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::hashing::write_atomic;

pub const COMMITTED_LOCK: &str = "qpipe.lock";
pub const SCRATCH_LOCK: &str = "tmp/qpipe/scratch.lock";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LockedDep {
    pub path: String,
    pub hash: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LockedOut {
    pub path: String,
    pub hash: String,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub intermediate: bool,
}

/// One built instance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LockEntry {
    pub kind: String,
    pub key: String,
    pub code_version: String,
    pub params: Value,
    pub deps: Vec<LockedDep>,
    pub outs: Vec<LockedOut>,
}

impl LockEntry {
    pub fn out(&self, path: &str) -> Option<&LockedOut> {
        self.outs.iter().find(|o| o.path == path)
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct LockFileData {
    version: u32,
    instances: BTreeMap<String, LockEntry>,
}

/// One lock file.
#[derive(Debug)]
pub struct LockFile {
    pub path: PathBuf,
    pub entries: BTreeMap<String, LockEntry>,
    dirty: bool,
}

impl LockFile {
    pub fn load(path: PathBuf) -> Result<Self> {
        let entries = match fs::read(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(e).with_context(|| format!("cannot read lock file `{}`", path.display())),
            Ok(bytes) => {
                let data: LockFileData = serde_json::from_slice(&bytes).with_context(|| {
                    format!(
                        "lock file `{}` is corrupt (resolve merge conflicts, or delete it to rebuild everything)",
                        path.display()
                    )
                })?;
                if data.version != 1 {
                    bail!("lock file `{}` has version {}; this qpipe reads version 1", path.display(), data.version);
                }
                data.instances
            }
        };
        Ok(LockFile { path, entries, dirty: false })
    }

    pub fn save(&mut self) -> Result<()> {
        if !self.dirty {
            return Ok(());
        }
        let data = LockFileData { version: 1, instances: std::mem::take(&mut self.entries) };
        let mut text = serde_json::to_string_pretty(&data)?;
        self.entries = data.instances;
        text.push('\n');
        write_atomic(&self.path, text.as_bytes())
            .with_context(|| format!("cannot write lock file `{}`", self.path.display()))?;
        self.dirty = false;
        Ok(())
    }
}

/// Both lock files of a workspace.
#[derive(Debug)]
pub struct Locks {
    pub committed: LockFile,
    pub scratch: LockFile,
}

impl Locks {
    pub fn load(root: &Path) -> Result<Self> {
        Ok(Locks {
            committed: LockFile::load(root.join(COMMITTED_LOCK))?,
            scratch: LockFile::load(root.join(SCRATCH_LOCK))?,
        })
    }

    pub fn get(&self, id: &str) -> Option<&LockEntry> {
        self.committed.entries.get(id).or_else(|| self.scratch.entries.get(id))
    }

    /// Record an entry in the committed lock (`published`) or the scratch lock (in memory;
    /// [`save`](Self::save) writes the changed files).
    pub fn put(&mut self, id: &str, entry: LockEntry, published: bool) {
        let (into, other) =
            if published { (&mut self.committed, &mut self.scratch) } else { (&mut self.scratch, &mut self.committed) };
        if other.entries.remove(id).is_some() {
            other.dirty = true;
        }
        into.entries.insert(id.to_string(), entry);
        into.dirty = true;
    }

    /// Write the lock files that changed.
    pub fn save(&mut self) -> Result<()> {
        self.scratch.save()?;
        self.committed.save()
    }

    /// Drop committed entries whose ids are not in `keep` (instances the pipeline no longer
    /// publishes); returns how many went.
    pub fn prune_committed(&mut self, keep: &std::collections::HashSet<&str>) -> Result<usize> {
        let before = self.committed.entries.len();
        self.committed.entries.retain(|id, _| keep.contains(id.as_str()));
        let n = before - self.committed.entries.len();
        if n > 0 {
            self.committed.dirty = true;
            self.committed.save()?;
        }
        Ok(n)
    }

    /// Every recorded entry, committed first.
    pub fn all(&self) -> impl Iterator<Item = (&String, &LockEntry)> {
        self.committed.entries.iter().chain(self.scratch.entries.iter())
    }
}
