//! `qpipe clean`: delete declared intermediates that git ignores (never a tracked file),
//! plus temporary files a killed build left behind; `--cache` also empties qpipe's caches.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::dag::norm_path;
use crate::lock::Locks;
use crate::workspace::{Workspace, STAT_CACHE};

/// What `clean` removes.
#[derive(Debug, Default)]
pub struct CleanPlan {
    /// Root-relative files with their sizes.
    pub files: Vec<(String, u64)>,
    /// Cache files and folders (`--cache`).
    pub caches: Vec<String>,
}

impl CleanPlan {
    pub fn bytes(&self) -> u64 {
        self.files.iter().map(|(_, b)| b).sum()
    }
}

/// Scratch area of `qpipe verify`.
pub const VERIFY_DIR: &str = "tmp/qpipe/verify";

fn git_list(root: &Path, args: &[&str]) -> Result<BTreeSet<String>> {
    let out = Command::new("git")
        .arg("-C")
        .arg(root)
        .args(["ls-files", "-z", "--others"])
        .args(args)
        .output()
        .context("qpipe clean asks git which files are ignored, and `git` could not be run")?;
    if !out.status.success() {
        bail!(
            "qpipe clean asks git which files are ignored, and `git ls-files` failed in `{}` (is it a git work tree?): {}",
            root.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out
        .stdout
        .split(|b| *b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect())
}

fn size(p: &Path) -> u64 {
    std::fs::symlink_metadata(p).map(|m| m.len()).unwrap_or(0)
}

/// Decide what to delete.
pub fn plan_clean(ws: &Workspace<'_>, cache: bool) -> Result<CleanPlan> {
    let ignored = git_list(&ws.root, &["--ignored", "--exclude-standard"])?;
    let untracked = git_list(&ws.root, &[])?;
    let mut declared: BTreeSet<String> = BTreeSet::new();
    let locks = Locks::load(&ws.root)?;
    for (_, e) in locks.all() {
        declared.extend(e.outs.iter().filter(|o| o.intermediate).map(|o| o.path.clone()));
    }
    // The current plan's intermediates too (built before a lock existed, say).
    if let Ok(planned) = ws.plan(&[]) {
        for (inst, paths) in planned.dag.instances.iter().zip(&planned.dag.out_paths) {
            declared.extend(inst.outs.iter().zip(paths).filter(|(o, _)| o.intermediate).map(|(_, p)| p.clone()));
        }
    }
    let mut plan = CleanPlan::default();
    for p in &declared {
        let Ok(rel) = norm_path(&ws.root, Path::new(p)) else { continue };
        if Path::new(&rel).is_absolute() || !ignored.contains(&rel) {
            continue;
        }
        let abs = ws.root.join(&rel);
        if abs.is_file() {
            plan.files.push((rel, size(&abs)));
        }
    }
    for rel in &untracked {
        let name = rel.rsplit('/').next().unwrap_or(rel);
        if (crate::atomic::is_temp_name(name) || crate::atomic::is_legacy_state_temp(name))
            && !crate::atomic::writer_alive(name)
        {
            plan.files.push((rel.clone(), size(&ws.root.join(rel))));
        }
    }
    plan.files.sort();
    plan.files.dedup();
    if cache {
        for c in [STAT_CACHE, VERIFY_DIR] {
            if ws.root.join(c).exists() {
                plan.caches.push(c.to_string());
            }
        }
    }
    Ok(plan)
}

/// Delete what the plan lists; returns the paths removed.
pub fn execute(root: &Path, plan: &CleanPlan) -> Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    for (rel, _) in &plan.files {
        let p = root.join(rel);
        std::fs::remove_file(&p).with_context(|| format!("cannot remove `{rel}`"))?;
        removed.push(p);
    }
    for c in &plan.caches {
        let p = root.join(c);
        if p.is_dir() {
            std::fs::remove_dir_all(&p).with_context(|| format!("cannot remove `{c}`"))?;
        } else {
            std::fs::remove_file(&p).with_context(|| format!("cannot remove `{c}`"))?;
        }
        removed.push(p);
    }
    Ok(removed)
}

/// `1.5 MiB`-style sizes.
pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}
