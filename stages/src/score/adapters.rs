//! Glue between the scorer and the modules other parts of qpipe own: the checkpoint
//! locator, the calibration `.pt` reader, the language model, the fake-quant formats and
//! the torch `.pt` writer. Kept here so the scorer itself depends only on [`super::backend`].

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use super::backend::{Batch, ScoreFormat, ScoreModel};
use super::FormatParams;
use crate::contract::Job;

/// The checkpoint folder of a job, from its `checkpoint` locator.
pub fn checkpoint_dir(job: &Job<'_>) -> Result<PathBuf> {
    let loc = job.locators.get("checkpoint").context("`score` job has no `checkpoint` locator")?;
    match loc.get("source").and_then(Value::as_str) {
        Some("local") => {
            let p = loc.get("path").and_then(Value::as_str).context("checkpoint locator has no `path`")?;
            let p = Path::new(p);
            Ok(if p.is_absolute() { p.to_path_buf() } else { job.root.join(p) })
        }
        other => bail!("checkpoint locator source {other:?}: only local checkpoints are wired into `score` yet"),
    }
}

/// The language model behind the scorer.
pub fn load_model(dir: &Path) -> Result<Box<dyn ScoreModel>> {
    bail!("loading {}: the candle Qwen3-VL language model is not merged into `score` yet", dir.display())
}

/// The fake-quant format of a run.
pub fn load_format(p: &FormatParams) -> Result<Box<dyn ScoreFormat>> {
    bail!("format `{}`: the fake-quant formats are not merged into `score` yet", p.name)
}

/// Calibration batches from the build-calib `.pt`.
pub fn load_batches(path: &Path, batch_size: usize) -> Result<Vec<Batch>> {
    let _ = batch_size;
    bail!("reading {}: the calibration reader is not merged into `score` yet", path.display())
}

/// The state tree as a torch-loadable `.pt`.
pub fn write_state_pt(path: &Path, state: &Value) -> Result<()> {
    let _ = state;
    bail!("writing {}: the torch `.pt` writer is not merged into `score` yet", path.display())
}
