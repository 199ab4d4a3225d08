//! `render`: Manifest → `per-layer-sensitivity.{json,md,svg}`.

use crate::contract::{Job, Stage};

/// The `render` stage.
pub struct Render;

impl Stage for Render {
    fn kind(&self) -> &'static str {
        "render"
    }
    fn code_version(&self) -> &'static str {
        env!("QPIPE_CODE_RENDER")
    }
    fn run(&self, job: &Job<'_>) -> anyhow::Result<()> {
        anyhow::bail!("stage `render` ({}) is not implemented yet", job.id)
    }
}
