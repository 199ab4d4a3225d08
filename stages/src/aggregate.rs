//! `aggregate`: AutoQuant state → `<scheme>_quant_manifest.json` (legacy schema).

use crate::contract::{Job, Stage};

/// The `aggregate` stage.
pub struct Aggregate;

impl Stage for Aggregate {
    fn kind(&self) -> &'static str {
        "aggregate"
    }
    fn code_version(&self) -> &'static str {
        env!("QPIPE_CODE_AGGREGATE")
    }
    fn run(&self, job: &Job<'_>) -> anyhow::Result<()> {
        anyhow::bail!("stage `aggregate` ({}) is not implemented yet", job.id)
    }
}
