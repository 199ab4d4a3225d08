//! `qpipe verify --parity`: compare a run folder's artifacts with a reference folder.

use std::path::{Path, PathBuf};

use crate::contract::{ParityReport, Tolerance};

/// Compare the artifacts of `candidate` with those of `committed`.
pub fn compare(committed: &Path, candidate: &Path, tol: &Tolerance) -> ParityReport {
    let _ = (candidate, tol);
    ParityReport {
        run_dir: committed.to_path_buf(),
        errors: vec!["parity comparison is not implemented yet".into()],
        ..Default::default()
    }
}

/// Files under `dir` (recursively) whose names end with `suffix`, sorted.
pub fn files_named(dir: &Path, suffix: &str) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = walkdir::WalkDir::new(dir)
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_file() && e.file_name().to_string_lossy().ends_with(suffix))
        .map(|e| e.into_path())
        .collect();
    out.sort();
    out
}

/// The legacy artifacts (`<repo>/../shared/reference/legacy-layer-analysis`, or
/// `/work/shared/...`) for tests; `None`, after a loud `SKIP:` line, when absent.
#[cfg(test)]
pub(crate) fn legacy_dir() -> Option<PathBuf> {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let rel = "reference/legacy-layer-analysis";
    let found = [repo.join("../shared").join(rel), PathBuf::from("/work/shared").join(rel)].into_iter().find(|p| p.is_dir());
    if found.is_none() {
        eprintln!("SKIP: legacy artifacts not found at <repo>/../shared/{rel} or /work/shared/{rel}");
    }
    found
}
