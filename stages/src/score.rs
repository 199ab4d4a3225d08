//! `score`: per-layer quantize-and-score (ModelOpt `auto_quantize` semantics).
//!
//! Reads (deps, in plan order) the fetch-model identity JSON, the calibration `.pt` and,
//! for local checkpoints, the checkpoint folder; writes the AutoQuant state as a
//! git-ignored `.pt` and a tracked `.json` (same tree).
//!
//! Parts: [`recipes`] (grouping, names, costs), [`backend`] (what the scorer needs from a
//! model and a format), [`scorer`] (calibration, `gradient`, `kl_div`), [`search`] (the
//! effective-bits search filling `best`), [`state`] (the output tree), [`adapters`] (the
//! glue to the `model`, `quant`, `build_calib`, `checkpoint` and `torch_pt` modules).

pub mod adapters;
pub mod backend;
pub mod recipes;
pub mod scorer;
pub mod search;
pub mod state;

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use serde_json::Value;

use crate::contract::{Job, Progress, Stage};
use backend::{Batch, ScoreFormat, ScoreModel};

/// The `score` stage.
pub struct Score;

/// `score` parameters (see `plan.rs`).
#[derive(Debug, Clone, Deserialize)]
pub struct ScoreParams {
    pub method: String,
    pub format: FormatParams,
    pub batch_size: usize,
    pub score_size: usize,
    pub effective_bits: f64,
    /// Resolved at plan time: `cpu` or `cuda:N` ([`crate::device`]).
    pub device: String,
    /// Resolved at plan time: `f32`, `bf16` or `f16`.
    #[serde(default = "f32_name")]
    pub dtype: String,
}

fn f32_name() -> String {
    "f32".into()
}

/// The quantization format of a run: a ModelOpt config name plus granularity overrides.
#[derive(Debug, Clone, Deserialize)]
pub struct FormatParams {
    pub name: String,
    #[serde(default)]
    pub granularity: Option<String>,
    #[serde(default)]
    pub quant_cfg_overrides: Value,
}

/// Scoring method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Gradient,
    KlDiv,
}

impl Method {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "gradient" => Ok(Self::Gradient),
            "kl_div" => Ok(Self::KlDiv),
            other => bail!("key `autoquant.method`: unknown scoring method `{other}`; use `gradient` or `kl_div`"),
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Gradient => "gradient",
            Self::KlDiv => "kl_div",
        }
    }
}

/// Settings of one scoring run.
#[derive(Debug, Clone)]
pub struct Settings {
    pub method: Method,
    pub batch_size: usize,
    pub score_size: usize,
    pub effective_bits: f64,
    pub device: String,
}

/// `num_score_steps` = min(score_size / batch_size, batches), at least one batch.
pub fn num_score_steps(score_size: usize, batch_size: usize, batches: usize) -> usize {
    (score_size / batch_size.max(1)).clamp(1, batches.max(1)).min(batches)
}

/// Split tokens into batches of `batch_size` (the last may be smaller).
pub fn make_batches(input_ids: &[Vec<u32>], attention_mask: &[Vec<u32>], pad: u32, batch_size: usize) -> Vec<Batch> {
    input_ids
        .chunks(batch_size)
        .zip(attention_mask.chunks(batch_size))
        .map(|(ids, mask)| Batch { input_ids: ids.to_vec(), attention_mask: mask.to_vec(), pad_token_id: pad })
        .collect()
}

/// Calibrate, score, search: the whole state for one format.
pub fn run_scoring(
    model: &dyn ScoreModel,
    format: &dyn ScoreFormat,
    batches: &[Batch],
    settings: &Settings,
    progress: &dyn Progress,
) -> Result<Value> {
    if batches.is_empty() {
        bail!("the calibration set is empty: nothing to calibrate or score with");
    }
    crate::malloc::keep_freed_memory();
    let linears = model.linears();
    let recipes = recipes::group(&linears);
    let score_steps = num_score_steps(settings.score_size, settings.batch_size, batches.len());
    let scores = match settings.method {
        Method::Gradient => {
            let budget = scorer::keep_budget_bytes(model.available_memory());
            scorer::gradient_scores(model, format, &recipes, batches, score_steps, budget, progress)?
        }
        Method::KlDiv => {
            if format.input_needs_calibration() {
                scorer::calibrate_inputs(model, format, batches, progress)?;
            }
            scorer::kl_div_scores(model, format, &recipes, &batches[..score_steps], progress)?
        }
    };
    let stats = state::candidate_stats(&recipes, &format.display_name(), format.effective_bits(), &scores);
    let cands = state::to_candidates(&stats);
    let total: f64 = recipes.iter().map(|r| r.cost(16.0)).sum();
    let max_cost = total * settings.effective_bits / 16.0;
    let sel = match settings.method {
        Method::Gradient => search::knapsack(&cands, max_cost)?,
        Method::KlDiv => search::threshold(&cands, max_cost),
    };
    let info = state::RunInfo {
        method: settings.method.as_str().into(),
        batch_size: settings.batch_size,
        num_calib_steps: batches.len(),
        num_score_steps: score_steps,
        device: settings.device.clone(),
        dtype: model.dtype_name().into(),
        quantized_layers: linears.iter().map(|l| l.name.clone()).collect(),
    };
    Ok(state::to_json(&info, &stats, &sel, settings.effective_bits))
}

/// Keeps freed tensor buffers in the process instead of returning them to the kernel.
///
/// glibc serves allocations above its mmap threshold (128 KiB, adapting up to 32 MiB) with
/// fresh `mmap`s and trims the heap top on free, so every activation tensor of a forward
/// pass starts as page faults on zeroed pages: about 9 % of the scoring time on the
/// mid-size benchmark. Raising both thresholds makes the heap reuse those pages. Results do
/// not depend on it. A no-op on other C libraries; call it once at the start of scoring.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        const M_TRIM_THRESHOLD: std::ffi::c_int = -1;
        const M_MMAP_THRESHOLD: std::ffi::c_int = -3;
        extern "C" {
            fn mallopt(param: std::ffi::c_int, value: std::ffi::c_int) -> std::ffi::c_int;
        }
        static ONCE: std::sync::Once = std::sync::Once::new();
        // SAFETY: `mallopt` only changes allocator tunables; glibc serialises it against
        // concurrent allocations with the arena lock. 32 MiB is glibc's largest accepted
        // mmap threshold on 64-bit targets.
        ONCE.call_once(|| unsafe {
            mallopt(M_MMAP_THRESHOLD, 32 << 20);
            mallopt(M_TRIM_THRESHOLD, i32::MAX);
        });
    }
}

/// Errors, before loading anything, when the scorer's weights cannot fit on `device`: it
/// holds the language model twice in the compute dtype (as loaded, and fake-quantized).
pub fn check_weights_fit(
    ckpt: &std::path::Path,
    dtype: candle_core::DType,
    device: &str,
    available: Option<u64>,
) -> Result<()> {
    let cfg = crate::model::TextConfig::from_dir(ckpt)?;
    let need = 2 * dtype.size_in_bytes() as u64 * cfg.params();
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    match available {
        Some(avail) if need > avail => bail!(
            "scoring {} on {device} holds its {:.2} B language-model parameters in {dtype:?} twice (as loaded and \
             fake-quantized): {:.1} GiB, but only {:.1} GiB of memory is available there; use a device with more \
             memory{}",
            ckpt.display(),
            cfg.params() as f64 / 1e9,
            gib(need),
            gib(avail),
            if dtype == candle_core::DType::F32 { " or `autoquant.dtype=bf16`" } else { "" }
        ),
        _ => Ok(()),
    }
}

impl Stage for Score {
    fn kind(&self) -> &'static str {
        "score"
    }
    fn code_version(&self) -> &'static str {
        env!("QPIPE_CODE_SCORE")
    }
    fn exclusive(&self) -> bool {
        true
    }
    fn run(&self, job: &Job<'_>) -> Result<()> {
        let p: ScoreParams = serde_json::from_value(job.params.clone()).context("reading the `score` parameters")?;
        // Already resolved by the plan; resolving again checks the device is still there.
        let compute = crate::device::resolve(&p.device, &p.dtype)?;
        let settings = Settings {
            method: Method::parse(&p.method)?,
            batch_size: p.batch_size,
            score_size: p.score_size,
            effective_bits: p.effective_bits,
            device: compute.device.clone(),
        };
        let device = crate::device::candle_device(&compute.device)?;
        let dtype = crate::device::candle_dtype(&compute.dtype)?;
        if job.deps.len() < 2 || job.outs.len() != 2 {
            bail!(
                "`score` ({}) expects deps [identity, calibration, (checkpoint)] and outs [state.pt, state.json]",
                job.id
            );
        }
        let progress: &dyn Progress = job.progress;
        keep_freed_memory();
        let ckpt = adapters::checkpoint_dir(job)?;
        check_weights_fit(&ckpt, dtype, &compute.device, crate::device::available_bytes(&device))?;
        progress.note(&format!("score: loading {} ({} on {})", ckpt.display(), compute.dtype, compute.device));
        let model = adapters::load_model_on(&ckpt, dtype, &device)?;
        let format = adapters::load_format(&p.format)?;
        let batches = adapters::load_batches(&job.deps[1], settings.batch_size)?;
        let state = run_scoring(model.as_ref(), format.as_ref(), &batches, &settings, progress)
            .with_context(|| format!("scoring {} with {}", ckpt.display(), p.format.name))?;
        adapters::write_state_pt(&job.outs[0], &state)?;
        let text = serde_json::to_string_pretty(&state)? + "\n";
        std::fs::write(&job.outs[1], text).with_context(|| format!("writing {}", job.outs[1].display()))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn score_steps_like_the_seed() {
        assert_eq!(num_score_steps(128, 8, 2), 2);
        assert_eq!(num_score_steps(128, 8, 64), 16);
        assert_eq!(num_score_steps(16, 8, 64), 2);
        assert_eq!(num_score_steps(4, 8, 3), 1);
    }

    #[test]
    fn a_model_too_large_for_memory_is_refused_before_loading() {
        let tiny = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/tiny_qwen3_vl/checkpoint");
        let f32 = candle_core::DType::F32;
        assert!(check_weights_fit(&tiny, f32, "cpu", Some(1 << 30)).is_ok());
        let e = check_weights_fit(&tiny, f32, "cpu", Some(1 << 10)).unwrap_err().to_string();
        assert!(e.contains("in F32 twice") && e.contains("GiB of memory is available"), "{e}");
        // The 4B shape: 4.02 B parameters → 30 GiB.
        let dir = tempfile::tempdir().unwrap();
        let cfg = crate::synth::Shape::QWEN3_VL_4B.config(crate::synth::Dtype::Bf16);
        std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
        let e = check_weights_fit(dir.path(), f32, "cpu", Some(24 << 30)).unwrap_err().to_string();
        assert!(e.contains("4.02 B") && e.contains("30.0 GiB") && e.contains("dtype=bf16"), "{e}");
        // In bf16 on an 80 GB GPU it fits: 15 GiB.
        let bf16 = candle_core::DType::BF16;
        assert!(check_weights_fit(dir.path(), bf16, "cuda:0", Some(79 << 30)).is_ok());
        let e = check_weights_fit(dir.path(), bf16, "cuda:0", Some(8 << 30)).unwrap_err().to_string();
        assert!(e.contains("15.0 GiB") && e.contains("on cuda:0"), "{e}");
    }

    #[test]
    fn methods() {
        assert!(Method::parse("hessian").unwrap_err().to_string().contains("gradient"));
    }
}
