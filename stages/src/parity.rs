//! `qpipe verify --parity`: compare a run folder's artifacts with a reference folder.

use std::path::Path;

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
