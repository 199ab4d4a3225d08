//! `docs`: Folder READMEs generated from the published runs.

use crate::contract::{Job, Stage};

/// The `docs` stage.
pub struct Docs;

impl Stage for Docs {
    fn kind(&self) -> &'static str {
        "docs"
    }
    fn code_version(&self) -> &'static str {
        env!("QPIPE_CODE_DOCS")
    }
    fn run(&self, job: &Job<'_>) -> anyhow::Result<()> {
        anyhow::bail!("stage `docs` ({}) is not implemented yet", job.id)
    }
}
