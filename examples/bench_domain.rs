//! `qpipe` with the real planner but trivial stages, for `scripts/bench_engine.sh`.
//!
//! It plans exactly what the real binary plans (the Qwen3-VL domain's `plan`, the real
//! stage kinds and code versions) but each stage just writes a few bytes to its outputs,
//! so a whole grid can be "built" in seconds and the real `qpipe` then finds it up to
//! date. Not for producing artifacts.

use std::path::Path;

use qpipe_contract::{Domain, Job, ParityReport, Plan, PlanContext, Run, Stage, Tolerance};
use qpipe_stages::Qwen3Vl;

struct Trivial {
    kind: &'static str,
    version: &'static str,
}

impl Stage for Trivial {
    fn kind(&self) -> &'static str {
        self.kind
    }
    fn code_version(&self) -> &'static str {
        self.version
    }
    fn run(&self, job: &Job<'_>) -> anyhow::Result<()> {
        for out in job.outs {
            std::fs::write(&out.path, job.id)?;
        }
        Ok(())
    }
}

struct Bench {
    stages: Vec<Trivial>,
}

impl Domain for Bench {
    fn stages(&self) -> Vec<&dyn Stage> {
        self.stages.iter().map(|s| s as &dyn Stage).collect()
    }
    fn plan(&self, ctx: &PlanContext, runs: &[Run]) -> anyhow::Result<Plan> {
        Qwen3Vl.plan(ctx, runs)
    }
    fn compare(&self, committed: &Path, candidate: &Path, tol: &Tolerance) -> ParityReport {
        Qwen3Vl.compare(committed, candidate, tol)
    }
}

fn main() {
    let stages = Qwen3Vl.stages().iter().map(|s| Trivial { kind: s.kind(), version: s.code_version() }).collect();
    std::process::exit(qpipe_engine::cli::main(&Bench { stages }));
}
