//! `fetch-model`: Checks a local checkpoint folder or fetches a pinned hub revision; writes the checkpoint identity JSON.

use crate::contract::{Job, Stage};

/// The `fetch-model` stage.
pub struct FetchModel;

impl Stage for FetchModel {
    fn kind(&self) -> &'static str {
        "fetch-model"
    }
    fn code_version(&self) -> &'static str {
        env!("QPIPE_CODE_FETCH_MODEL")
    }
    fn run(&self, job: &Job<'_>) -> anyhow::Result<()> {
        anyhow::bail!("stage `fetch-model` ({}) is not implemented yet", job.id)
    }
}
