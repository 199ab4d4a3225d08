//! `score`: per-layer quantize-and-score (ModelOpt `auto_quantize` semantics).
//!
//! Reads the fetch-model identity JSON (dep `identity`), the calibration `.pt` (`calib`)
//! and, for local checkpoints, the checkpoint folder (`checkpoint`); writes every recipe's
//! scores and costs per format (out `scores`, a git-ignored JSON). Its key holds only what
//! changes them — not the effective-bits budget, which the `search` stage applies.
//!
//! Parts: [`recipes`] (grouping, names, costs), [`backend`] (what the scorer needs from a
//! model and a format), [`scorer`] (calibration, `gradient`, `kl_div`), [`state`] (the
//! output tree), [`adapters`] (the glue to the `model`, `quant`, `build_calib`,
//! `checkpoint` and `torch_pt` modules).

pub mod adapters;
pub mod backend;
pub mod memory;
pub mod recipes;
pub mod scorer;
pub mod state;
pub mod whole_model;

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use backend::{Batch, ScoreFormat, ScoreModel};
use qpipe_contract::{DepSpec, Instance, Job, OutSpec, Progress, Stage};

/// The `score` stage.
pub struct Score;

/// `score` parameters: everything that changes the scores (the instance key).
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct ScoreParams {
    pub method: Method,
    pub format: FormatParams,
    pub batch_size: usize,
    pub score_size: usize,
    /// Resolved at plan time: `cpu` or `cuda:N` ([`qpipe_compute::device`]).
    pub device: String,
    /// Resolved at plan time: `f32`, `bf16` or `f16`.
    #[serde(default = "f32_name")]
    pub dtype: String,
    /// Which Linears are scored (absent from the key when `lm_only`, as before it existed).
    #[serde(default, skip_serializing_if = "Coverage::is_lm_only")]
    pub coverage: Coverage,
}

/// `autoquant.coverage`: the language model's Linears, or every Linear of the whole model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Coverage {
    #[default]
    LmOnly,
    Full,
}

impl Coverage {
    pub fn as_str(self) -> &'static str {
        match self {
            Coverage::LmOnly => "lm_only",
            Coverage::Full => "full",
        }
    }
    fn is_lm_only(&self) -> bool {
        *self == Coverage::LmOnly
    }
}

fn f32_name() -> String {
    "f32".into()
}

/// The quantization format of a run: a ModelOpt config name plus granularity overrides.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct FormatParams {
    pub name: String,
    #[serde(default)]
    pub granularity: Option<String>,
    #[serde(default)]
    pub quant_cfg_overrides: Value,
}

/// Scoring method: `autoquant.method` in the pipeline, `method` in the score params.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
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
    pub device: String,
    /// `autoquant.memory_limit` in bytes; `None`: what is free where the model computes,
    /// less a margin ([`memory::default_limit`]).
    pub memory_limit: Option<u64>,
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
        .map(|(ids, mask)| Batch::text(ids.to_vec(), mask.to_vec(), pad))
        .collect()
}

/// Calibrate and score: every recipe's scores for one format (and NONE), as the scores
/// file (`search::complete` adds what a budget selects).
pub fn run_scoring(
    model: &dyn ScoreModel,
    format: &dyn ScoreFormat,
    batches: &[Batch],
    settings: &Settings,
    progress: &dyn Progress,
) -> Result<Value> {
    Ok(run_scoring_fused(model, &[format], batches, settings, progress)?.remove(0))
}

/// [`run_scoring`] of several formats at once: one calibration forward per batch for all
/// formats with static input ranges; for `gradient` one forward and backward per batch
/// (formats of one [`scorer::pass_class`]), for `kl_div` one unquantized forward and its
/// log-probabilities per batch. Each format's scores file is the one [`run_scoring`] gives
/// it alone, byte for byte.
pub fn run_scoring_fused(
    model: &dyn ScoreModel,
    formats: &[&dyn ScoreFormat],
    batches: &[Batch],
    settings: &Settings,
    progress: &dyn Progress,
) -> Result<Vec<Value>> {
    if batches.is_empty() {
        bail!("the calibration set is empty: nothing to calibrate or score with");
    }
    qpipe_compute::malloc::keep_freed_memory();
    let linears = model.linears();
    let recipes = recipes::group(&linears);
    let score_steps = num_score_steps(settings.score_size, settings.batch_size, batches.len());
    let limit = settings.memory_limit.or_else(|| memory::default_limit(model.available_memory(), model.weight_bytes()));
    let scores: Vec<Vec<f64>> = match settings.method {
        Method::Gradient => scorer::gradient_scores(model, formats, &recipes, batches, score_steps, limit, progress)?,
        Method::KlDiv => {
            let calibrated: Vec<&dyn ScoreFormat> =
                formats.iter().copied().filter(|f| f.input_needs_calibration()).collect();
            if !calibrated.is_empty() {
                scorer::calibrate_inputs(model, &calibrated, batches, progress)?;
            }
            scorer::kl_div_scores(model, formats, &recipes, &batches[..score_steps], limit, progress)?
        }
    };
    if let Some(line) = model.report() {
        progress.note(&format!("score: {line}"));
    }
    let info = state::RunInfo {
        method: settings.method.as_str().into(),
        batch_size: settings.batch_size,
        num_calib_steps: batches.len(),
        num_score_steps: score_steps,
        device: settings.device.clone(),
        dtype: model.dtype_name().into(),
        // The manifest's `layers` lists ModelOpt's QuantLinear modules: not the tower's
        // Conv3d (`patch_embed.proj`), which is a scored recipe all the same.
        quantized_layers: linears
            .iter()
            .filter(|l| !l.name.ends_with("patch_embed.proj"))
            .map(|l| l.name.clone())
            .collect(),
    };
    Ok(formats
        .iter()
        .zip(&scores)
        .map(|(format, scores)| {
            let stats = state::candidate_stats(&recipes, &format.display_name(), format.effective_bits(), scores);
            state::to_json(&info, &stats)
        })
        .collect())
}

/// Errors, before loading anything, when the language model's weights alone cannot fit
/// in `limit` bytes on `device`: they are held once, the large matrices of a
/// half-precision checkpoint as stored ([`qpipe_model::weights`]). The rest is the memory
/// plan's, made once the model is loaded ([`memory::Plan`]).
pub fn check_weights_fit(
    ckpt: &std::path::Path,
    dtype: candle_core::DType,
    device: &str,
    limit: Option<u64>,
) -> Result<()> {
    let cfg = qpipe_model::TextConfig::from_dir(ckpt)?;
    let act = dtype.size_in_bytes();
    let stored = checkpoint_matrix_bytes(ckpt).unwrap_or(act);
    let matrix = if dtype == candle_core::DType::F32 { stored.min(act) } else { act };
    let need = qpipe_model::memory::weight_bytes(&cfg, matrix, act);
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    match limit {
        Some(limit) if need > limit => bail!(
            "scoring {} on {device} holds its {:.2} B language-model parameters: {:.1} GiB, but the memory limit is \
             {:.1} GiB there; raise `autoquant.memory_limit`, free memory or use a device with more memory{}",
            ckpt.display(),
            cfg.params() as f64 / 1e9,
            gib(need),
            gib(limit),
            if dtype == candle_core::DType::F32 && matrix == 4 { " or a bf16 checkpoint" } else { "" }
        ),
        _ => Ok(()),
    }
}

/// Bytes per value of the checkpoint's weights, from `config.json`'s `dtype` /
/// `torch_dtype` (top level or `text_config`).
fn checkpoint_matrix_bytes(ckpt: &std::path::Path) -> Option<usize> {
    let v: Value = serde_json::from_slice(&std::fs::read(ckpt.join("config.json")).ok()?).ok()?;
    let pick = |o: &Value| o.get("dtype").or_else(|| o.get("torch_dtype")).and_then(Value::as_str).map(str::to_string);
    let name = pick(&v).or_else(|| v.get("text_config").and_then(pick))?;
    match name.as_str() {
        "bfloat16" | "float16" => Some(2),
        "float32" => Some(4),
        _ => None,
    }
}

/// What a `score` instance reads and writes.
pub struct ScoreFiles<'a> {
    /// The checkpoint identity (dep `identity`).
    pub identity: &'a Path,
    /// The calibration tokens (dep `calib`).
    pub calib: &'a Path,
    /// Image-text calibration: each sample's image file and hash (dep `calib_images`).
    pub calib_images: Option<&'a Path>,
    /// A local checkpoint folder (dep `checkpoint`); a hub checkpoint is keyed through its
    /// identity and found through the `checkpoint` locator.
    pub checkpoint: Option<&'a Path>,
    /// The scores (out `scores`, intermediate).
    pub scores: &'a Path,
}

/// The `score` instance `id`.
pub fn instance(
    id: String,
    params: &ScoreParams,
    files: &ScoreFiles<'_>,
    locators: Value,
    description: String,
) -> Result<Instance> {
    let mut deps = vec![DepSpec::new("identity", files.identity), DepSpec::new("calib", files.calib)];
    deps.extend(files.calib_images.map(|p| DepSpec::new("calib_images", p)));
    deps.extend(files.checkpoint.map(|p| DepSpec::new("checkpoint", p)));
    Ok(Instance {
        id,
        kind: "score".into(),
        params: serde_json::to_value(params)?,
        locators,
        deps,
        outs: vec![OutSpec::intermediate("scores", files.scores)],
        description,
    })
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
        run_group(std::slice::from_ref(job))
    }
    /// Instances that share the method, checkpoint, calibration tokens, batch and score
    /// sizes, device and dtype (and for `gradient` the way inputs are quantized,
    /// [`scorer::pass_class`]) are scored in one pass.
    fn fusion_key(&self, inst: &Instance) -> Option<String> {
        let p: ScoreParams = serde_json::from_value(inst.params.clone()).ok()?;
        // `gradient` walks the batches by the format's pass class; `kl_div` the same for all.
        let class = match p.method {
            Method::Gradient => Some(scorer::pass_class(adapters::load_format(&p.format).ok()?.as_ref())),
            Method::KlDiv => None,
        };
        let deps: Vec<String> = inst.deps.iter().map(|d| format!("{}={}", d.name, d.path.display())).collect();
        Some(format!(
            "{}|{}|{}|{}|{}|{}|{class:?}|{}",
            p.method.as_str(),
            deps.join(","),
            p.batch_size,
            p.score_size,
            p.device,
            p.dtype,
            inst.locators["checkpoint"]
        ))
    }
    fn run_fused(&self, jobs: &[Job<'_>]) -> Vec<Result<()>> {
        match run_group(jobs) {
            Ok(()) => jobs.iter().map(|_| Ok(())).collect(),
            Err(e) => {
                let msg = format!("{e:#}");
                jobs.iter().map(|_| Err(anyhow::anyhow!("{msg}"))).collect()
            }
        }
    }
}

/// `autoquant.memory_limit` of a job, in bytes: a run setting that changes no score, so it
/// travels in the locators, not the key.
pub fn memory_limit(job: &Job<'_>) -> Result<Option<u64>> {
    match job.locators.get("memory_limit") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => Ok(n.as_u64()),
        Some(Value::String(s)) => memory::parse_size(s).map(Some).context("key `autoquant.memory_limit`"),
        Some(other) => bail!("key `autoquant.memory_limit`: expected a size such as `12GiB`, found {other}"),
    }
}

/// Runs `jobs` (one, or several of one fusion key) in one scoring pass.
fn run_group(jobs: &[Job<'_>]) -> Result<()> {
    let Some(job) = jobs.first() else { return Ok(()) };
    let params: Vec<ScoreParams> = jobs
        .iter()
        .map(|j| {
            serde_json::from_value(j.params.clone()).with_context(|| format!("reading the parameters of `{}`", j.id))
        })
        .collect::<Result<_>>()?;
    let p = &params[0];
    // Already resolved by the plan; resolving again checks the device is still there.
    let compute = qpipe_compute::device::resolve(&p.device, &p.dtype)?;
    let settings = Settings {
        method: p.method,
        batch_size: p.batch_size,
        score_size: p.score_size,
        device: compute.device.clone(),
        memory_limit: memory_limit(job)?,
    };
    let device = qpipe_compute::device::candle_device(&compute.device)?;
    let dtype = qpipe_compute::device::candle_dtype(&compute.dtype)?;
    let progress: &dyn Progress = job.progress;
    qpipe_compute::malloc::keep_freed_memory();
    let ckpt = adapters::checkpoint_dir(job)?;
    let free = qpipe_compute::device::available_bytes(&device);
    check_weights_fit(&ckpt, dtype, &compute.device, settings.memory_limit.or(free))?;
    progress.note(&format!("score: loading {} ({} on {})", ckpt.display(), compute.dtype, compute.device));
    let formats: Vec<Box<dyn ScoreFormat>> =
        params.iter().map(|p| adapters::load_format(&p.format)).collect::<Result<_>>()?;
    let model: Box<dyn ScoreModel> = match p.coverage {
        Coverage::LmOnly => adapters::load_model_on(&ckpt, dtype, &device)?,
        Coverage::Full => {
            let m = whole_model::load(&ckpt, dtype, &device)?;
            formats.iter().try_for_each(|f| m.check_format(f.as_ref()))?;
            Box::new(m)
        }
    };
    let names: Vec<&str> = params.iter().map(|p| p.format.name.as_str()).collect();
    if jobs.len() > 1 {
        progress.note(&format!("score: {} formats in one pass: {}", jobs.len(), names.join(", ")));
    }
    let batches = match job.dep_opt("calib_images") {
        None => adapters::load_batches(job.dep("calib")?, settings.batch_size)?,
        Some(images) => {
            adapters::load_image_batches(job.dep("calib")?, images, &ckpt, job.root, settings.batch_size, progress)?
        }
    };
    let refs: Vec<&dyn ScoreFormat> = formats.iter().map(|f| f.as_ref()).collect();
    let (flops0, t0) = (qpipe_model::gemm::flops_done(), std::time::Instant::now());
    let all = run_scoring_fused(model.as_ref(), &refs, &batches, &settings, progress)
        .with_context(|| format!("scoring {} with {}", ckpt.display(), names.join(", ")))?;
    let (flops, secs) = (qpipe_model::gemm::flops_done() - flops0, t0.elapsed().as_secs_f64());
    if secs >= 10.0 {
        progress.note(&format!(
            "score: {:.2} TFLOP of f32 products in {secs:.0} s: {:.1} GFLOP/s (integer products not counted)",
            flops as f64 / 1e12,
            flops as f64 / secs / 1e9
        ));
    }
    for (j, scores) in jobs.iter().zip(all) {
        let text = serde_json::to_string_pretty(&scores)? + "\n";
        let out = j.out("scores")?;
        std::fs::write(out, text).with_context(|| format!("writing {}", out.display()))?;
    }
    Ok(())
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
        assert!(e.contains("memory limit is"), "{e}");
        // The 4B shape in bf16: 4.02 B parameters held once as stored → 7.5 GiB, which
        // fits a 12 GiB limit on the CPU in f32 and an 8 GiB one does not.
        let dir = tempfile::tempdir().unwrap();
        let cfg = crate::synth::Shape::QWEN3_VL_4B.config(crate::synth::Dtype::Bf16);
        std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
        assert!(check_weights_fit(dir.path(), f32, "cpu", Some(12 << 30)).is_ok());
        let e = check_weights_fit(dir.path(), f32, "cpu", Some(7 << 30)).unwrap_err().to_string();
        assert!(e.contains("4.02 B") && e.contains("7.5 GiB"), "{e}");
        // An f32 checkpoint of that shape is 15 GiB.
        let f32_cfg = crate::synth::Shape::QWEN3_VL_4B.config(crate::synth::Dtype::F32);
        std::fs::write(dir.path().join("config.json"), f32_cfg.to_string()).unwrap();
        let e = check_weights_fit(dir.path(), f32, "cpu", Some(12 << 30)).unwrap_err().to_string();
        assert!(e.contains("15.0 GiB") && e.contains("bf16 checkpoint"), "{e}");
        let bf16 = candle_core::DType::BF16;
        assert!(check_weights_fit(dir.path(), bf16, "cuda:0", Some(24 << 30)).is_ok());
    }

    #[test]
    fn methods() {
        assert!(Method::parse("hessian").unwrap_err().to_string().contains("gradient"));
    }
}
