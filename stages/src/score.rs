//! `score`: Per-layer quantize-and-score (ModelOpt `auto_quantize` semantics).

use crate::contract::{Job, Stage};

/// The `score` stage.
pub struct Score;

impl Stage for Score {
    fn kind(&self) -> &'static str {
        "score"
    }
    fn code_version(&self) -> &'static str {
        env!("QPIPE_CODE_SCORE")
    }
    fn run(&self, job: &Job<'_>) -> anyhow::Result<()> {
        anyhow::bail!("stage `score` ({}) is not implemented yet", job.id)
    }
}
