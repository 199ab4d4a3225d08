//! Running the real `qpipe` binary in a copy of the repository's workspace.

#![allow(dead_code)] // each test crate uses its own subset

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn qpipe(cwd: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qpipe")).current_dir(cwd).args(args).env("NO_COLOR", "1").output().unwrap()
}

pub fn text(o: &Output) -> (String, String) {
    (String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned())
}

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Copies the files below `subs` (repository-relative files or folders) into `dir`.
pub fn copy_into(dir: &Path, subs: &[&str]) {
    for sub in subs {
        for e in walkdir::WalkDir::new(repo().join(sub)).into_iter().flatten().filter(|e| e.file_type().is_file()) {
            let rel = e.path().strip_prefix(repo()).unwrap();
            fs::create_dir_all(dir.join(rel).parent().unwrap()).unwrap();
            fs::copy(e.path(), dir.join(rel)).unwrap();
        }
    }
}

/// A copy of the repository's pipeline, embedded checkpoint and captions.
pub fn workspace_copy() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    copy_into(dir.path(), &["pipeline.yaml", "models/tiny_qwen3_vl/checkpoint", "data/calibration", "data/coco"]);
    dir
}
