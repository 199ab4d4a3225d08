//! `build-calib`: Tokenizes captions with the checkpoint's tokenizer into a torch-loadable `.pt`.

use crate::contract::{Job, Stage};

/// The `build-calib` stage.
pub struct BuildCalib;

impl Stage for BuildCalib {
    fn kind(&self) -> &'static str {
        "build-calib"
    }
    fn code_version(&self) -> &'static str {
        env!("QPIPE_CODE_BUILD_CALIB")
    }
    fn run(&self, job: &Job<'_>) -> anyhow::Result<()> {
        anyhow::bail!("stage `build-calib` ({}) is not implemented yet", job.id)
    }
}
