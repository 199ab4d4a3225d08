//! The Qwen3-VL sensitivity-analysis domain, as the engine sees it.

use std::path::Path;

use crate::{aggregate, build_calib, docs, fetch_model, parity, plan, recipe, render, score, search};
use qpipe_contract::{Domain, ParityReport, Plan, PlanContext, Run, Stage, Tolerance};

/// The domain: its stage kinds, its planner, its parity comparison.
pub struct Qwen3Vl;

impl Domain for Qwen3Vl {
    fn stages(&self) -> Vec<&dyn Stage> {
        vec![
            &fetch_model::FetchModel,
            &build_calib::BuildCalib,
            &score::Score,
            &search::Search,
            &aggregate::Aggregate,
            &render::Render,
            &recipe::RecipeStage,
            &docs::Docs,
        ]
    }

    fn plan(&self, ctx: &PlanContext, runs: &[Run]) -> anyhow::Result<Plan> {
        plan::plan(ctx, runs)
    }

    fn compare(&self, committed: &Path, candidate: &Path, tol: &Tolerance) -> ParityReport {
        parity::compare(committed, candidate, tol)
    }
}
