//! Composed pipeline configurations → stage instances.
//!
//! The engine composes each run from `pipeline.yaml` (groups, defaults, overrides,
//! interpolation) into one JSON object; this module checks it against the domain's
//! schema ([`RunConfig`]) and expands it into the instances of one analysis:
//!
//! ```text
//! fetch-model@<checkpoint> ─► build-calib@<checkpoint>:<captions>:<N>x<T> ─► score@<run dir>
//!                                              ─► aggregate@<run dir> ─► render@<run dir>
//! ```
//!
//! plus, for the published runs, one `docs` instance per pair folder and one per model's
//! `layer-analysis/` folder. Instances shared by several runs (one calibration set feeds
//! every pair) come out once.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Component, Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::fetch_model::{self, CheckpointSource};
use crate::score::{self, Method};
use crate::{aggregate, build_calib, docs, recipe, render, search};
use qpipe_contract::{Instance, KeyError, Plan, PlanContext, Run};

/// The domain's view of one composed run. Unknown keys are errors.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    pub model: ModelCfg,
    pub dataset: DatasetCfg,
    pub quant_pair: QuantPairCfg,
    pub quant_granularity: GranularityCfg,
    pub autoquant: AutoquantCfg,
    pub output_layout: LayoutCfg,
    pub runner: RunnerCfg,
    #[serde(default)]
    pub experiment: Option<String>,
    #[serde(default)]
    pub recipe: RecipeCfg,
}

/// `recipe:` — the mixed-precision recipe across the pairs of one model × size × method ×
/// granularity ([`crate::recipe`]).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RecipeCfg {
    /// Effective-bits budgets, one recipe each.
    #[serde(default = "default_budgets")]
    pub budgets: Vec<f64>,
    /// The pairs to combine (default: every pair planned for that model and size).
    #[serde(default)]
    pub pairs: Option<Vec<String>>,
    /// Captions held out for validation: the last N of the captions file.
    #[serde(default = "default_holdout")]
    pub holdout_samples: usize,
    /// Pareto points validated beside the budgets.
    #[serde(default = "default_validate_points")]
    pub validate_points: usize,
}

fn default_budgets() -> Vec<f64> {
    vec![4.5, 5.0, 6.0, 7.0, 8.0]
}
fn default_holdout() -> usize {
    64
}
fn default_validate_points() -> usize {
    8
}

impl Default for RecipeCfg {
    fn default() -> Self {
        Self {
            budgets: default_budgets(),
            pairs: None,
            holdout_samples: default_holdout(),
            validate_points: default_validate_points(),
        }
    }
}

/// `model`: a local checkpoint folder (`path`) or a hub model (`repo` + pinned `revision`).
/// `model.path` wins when both are set, so `model.path=/ckpt` points a hub model at a
/// local copy.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ModelCfg {
    pub name: String,
    #[serde(default)]
    pub path: Option<String>,
    #[serde(default)]
    pub repo: Option<String>,
    #[serde(default)]
    pub revision: Option<String>,
    /// Prefix of run folder names (`<run_prefix>_autoquant_<pair>_lm_<size>`).
    #[serde(default)]
    pub run_prefix: Option<String>,
    /// Prefix used by legacy folder names (referenced from pipeline.yaml interpolations).
    #[serde(default)]
    pub legacy_prefix: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetCfg {
    pub name: String,
    /// A text file of captions, one per line (text-only calibration).
    #[serde(default)]
    pub captions_path: Option<String>,
    /// A COCO captions file (`images[]`, `annotations[]`): image-text calibration, one
    /// sample per annotation in file order.
    #[serde(default)]
    pub coco_captions: Option<String>,
    /// Where the COCO file's `file_name`s are (default: the file's folder).
    #[serde(default)]
    pub image_dir: Option<String>,
    pub size: String,
    pub size_to_max_samples: BTreeMap<String, usize>,
    #[serde(default)]
    pub max_calib_samples: Option<usize>,
    pub calib_seq_len: usize,
    #[serde(default)]
    pub root: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct QuantPairCfg {
    pub name: String,
    pub weight: WeightKind,
    pub activation: ActKind,
    pub format_name: String,
    #[serde(default)]
    pub experimental: bool,
    #[serde(default)]
    pub scheme_name: Option<String>,
    #[serde(default)]
    pub coverage_mode: Option<String>,
    #[serde(default)]
    pub coverage_fraction: Option<f64>,
    #[serde(default)]
    pub publish_pair_dir: Option<String>,
    #[serde(default)]
    pub publish_run_dir: Option<String>,
    /// The scheme and run-folder names of this pair's whole-model runs
    /// (`autoquant.coverage=full`), when they are not `<pair>_autoquant_all_layers` and
    /// `<run_prefix>_autoquant_<pair>_all_layers_<size>` (the legacy INT8 names).
    #[serde(default)]
    pub full_scheme_name: Option<String>,
    #[serde(default)]
    pub full_publish_run_dir: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WeightKind {
    Int4,
    Int8,
    Fp4,
    Fp8,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ActKind {
    Int4,
    Int8,
    Fp8,
    Fp16,
}

impl WeightKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Int4 => "int4",
            Self::Int8 => "int8",
            Self::Fp4 => "fp4",
            Self::Fp8 => "fp8",
        }
    }
}

impl ActKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Int4 => "int4",
            Self::Int8 => "int8",
            Self::Fp8 => "fp8",
            Self::Fp16 => "fp16",
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GranularityCfg {
    pub name: String,
    #[serde(default)]
    pub quant_cfg_overrides: serde_json::Map<String, Value>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AutoquantCfg {
    pub method: Method,
    pub batch_size: usize,
    pub score_size: usize,
    pub effective_bits: f64,
    pub device: String,
    /// `auto | f32 | bf16 | f16` (auto: bf16 on a GPU, f32 on the CPU).
    #[serde(default = "auto")]
    pub dtype: String,
    #[serde(default)]
    pub verbose: Option<bool>,
    /// The memory scoring may use (`12GiB`, `512MiB`, bytes); default: what is free where
    /// the model computes, less a margin. Changes no score, so it is not in any key.
    #[serde(default)]
    pub memory_limit: Option<MemorySize>,
    /// Which Linears are scored: the language model's (`lm_only`) or every Linear of the
    /// whole model (`full`: the vision tower, its mergers, the language model, `lm_head`;
    /// needs image-text calibration).
    #[serde(default)]
    pub coverage: score::Coverage,
}

/// A memory size as written in the pipeline or on the command line: `12GiB` or bytes.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(untagged)]
pub enum MemorySize {
    Bytes(u64),
    Text(String),
}

impl MemorySize {
    pub fn bytes(&self) -> Result<u64> {
        match self {
            MemorySize::Bytes(b) => Ok(*b),
            MemorySize::Text(t) => score::memory::parse_size(t),
        }
    }
}

fn auto() -> String {
    "auto".into()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LayoutMode {
    Publish,
    Tmp,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LayoutCfg {
    pub name: String,
    pub mode: LayoutMode,
    pub root_dir: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RunnerCfg {
    #[serde(default)]
    pub output_dir: Option<String>,
}

impl RunConfig {
    /// Parse and check one composed run. Errors name the key.
    pub fn from_value(value: &Value) -> Result<Self> {
        let cfg: RunConfig = serde_path_to_error::deserialize(value)
            .map_err(|e| anyhow::Error::new(KeyError::new(e.path().to_string(), e.inner().to_string())))?;
        cfg.check()?;
        Ok(cfg)
    }

    fn check(&self) -> Result<()> {
        let m = &self.model;
        if m.path.is_none() && m.repo.is_none() {
            bail!(KeyError::new(
                "model",
                format!("`{}` has neither `path` (a local checkpoint folder) nor `repo` (a hub model id)", m.name)
            ));
        }
        if m.path.is_none() {
            match &m.revision {
                Some(rev) if is_commit_sha(rev) => {}
                Some(rev) => bail!(KeyError::new("model.revision", format!("`{rev}` is not a commit sha; a branch or tag can move, so it cannot key a \
                     reproducible build — pin the 40-hex commit (see the model's page on the hub, \"Files and versions\")"))),
                None => bail!(KeyError::new("model.revision", format!("hub model `{}` needs a pinned revision (a 40-hex commit sha)", m.name))),
            }
        }
        let d = &self.dataset;
        match (&d.captions_path, &d.coco_captions) {
            (Some(_), None) | (None, Some(_)) => {}
            (None, None) => bail!(KeyError::new(
                "dataset",
                format!(
                    "`{}` has neither `captions_path` (a text file) nor `coco_captions` (a COCO captions file)",
                    d.name
                )
            )),
            (Some(_), Some(_)) => bail!(KeyError::new(
                "dataset.coco_captions",
                "set either `captions_path` (text) or `coco_captions` (images and captions), not both"
            )),
        }
        if d.image_dir.is_some() && d.coco_captions.is_none() {
            bail!(KeyError::new("dataset.image_dir", "only `coco_captions` datasets have images"));
        }
        if self.autoquant.coverage == score::Coverage::LmOnly && d.coco_captions.is_some() {
            bail!(KeyError::new(
                "autoquant.coverage",
                "image-text calibration (`dataset.coco_captions`) scores the whole model: set `autoquant.coverage=full` \
                 (the language model alone on images is not supported)"
            ));
        }
        if self.autoquant.coverage == score::Coverage::Full && d.coco_captions.is_none() {
            bail!(KeyError::new(
                "autoquant.coverage",
                "`full` scores the vision tower, which only runs on images: use an image-text dataset \
                 (`dataset.coco_captions`)"
            ));
        }
        if d.max_calib_samples.is_none() && !d.size_to_max_samples.contains_key(&d.size) {
            let valid: Vec<_> = d.size_to_max_samples.keys().cloned().collect();
            bail!(KeyError::new(
                "dataset.size",
                format!("unknown size `{}`; valid sizes: {}", d.size, valid.join(", "))
            ));
        }
        if self.num_samples() == 0 {
            bail!(KeyError::new("dataset.max_calib_samples", "must be at least 1"));
        }
        if d.calib_seq_len < 2 {
            bail!(KeyError::new(
                "dataset.calib_seq_len",
                "must be at least 2 (the loss predicts token t+1 from token t)"
            ));
        }
        let a = &self.autoquant;
        if a.batch_size == 0 {
            bail!(KeyError::new("autoquant.batch_size", "must be at least 1"));
        }
        if a.score_size == 0 {
            bail!(KeyError::new("autoquant.score_size", "must be at least 1"));
        }
        if !(a.effective_bits > 0.0 && a.effective_bits <= 16.0) {
            bail!(KeyError::new("autoquant.effective_bits", format!("{} is outside (0, 16]", a.effective_bits)));
        }
        parse_device(&a.device).map_err(|e| KeyError::new("autoquant.device", format!("{e:#}")))?;
        if let Some(m) = &a.memory_limit {
            m.bytes().map_err(|e| KeyError::new("autoquant.memory_limit", format!("{e:#}")))?;
        }
        if !matches!(a.dtype.as_str(), "auto" | "f32" | "bf16" | "f16" | "f64") {
            bail!(KeyError::new(
                "autoquant.dtype",
                format!("unknown dtype `{}`; valid: auto, f32, bf16, f16, f64 (CPU only)", a.dtype)
            ));
        }
        let r = &self.recipe;
        if r.budgets.is_empty() || r.budgets.iter().any(|b| !(*b > 0.0 && *b <= 16.0)) {
            bail!(KeyError::new(
                "recipe.budgets",
                format!("{:?}: give one or more effective bits in (0, 16]", r.budgets)
            ));
        }
        if r.holdout_samples == 0 {
            bail!(KeyError::new("recipe.holdout_samples", "must be at least 1"));
        }
        for (key, value) in [
            ("quant_pair.name", &self.quant_pair.name),
            ("quant_granularity.name", &self.quant_granularity.name),
            ("model.name", &self.model.name),
            ("dataset.size", &self.dataset.size),
        ] {
            check_path_component(key, value)?;
        }
        Ok(())
    }

    /// The captions file: `dataset.captions_path` or `dataset.coco_captions`.
    pub fn captions_file(&self) -> &str {
        let d = &self.dataset;
        d.coco_captions.as_deref().or(d.captions_path.as_deref()).unwrap_or_default()
    }

    /// Whether calibration samples are images with captions.
    pub fn image_text(&self) -> bool {
        self.dataset.coco_captions.is_some()
    }

    /// Number of calibration samples: `dataset.max_calib_samples`, else the size's.
    pub fn num_samples(&self) -> usize {
        let d = &self.dataset;
        d.max_calib_samples.unwrap_or_else(|| d.size_to_max_samples.get(&d.size).copied().unwrap_or(0))
    }

    /// The AutoQuant scheme name: `<pair>_autoquant_lm` unless the pair overrides it.
    pub fn scheme_name(&self) -> String {
        let q = &self.quant_pair;
        match self.autoquant.coverage {
            score::Coverage::Full => {
                q.full_scheme_name.clone().unwrap_or_else(|| format!("{}_autoquant_all_layers", q.name))
            }
            score::Coverage::LmOnly => q.scheme_name.clone().unwrap_or_else(|| format!("{}_autoquant_lm", q.name)),
        }
    }

    /// `scheme.coverage_mode`: `full` for whole-model runs, else the pair's (legacy
    /// `lm_default`) or `lm_only`.
    pub fn coverage_mode(&self) -> String {
        match self.autoquant.coverage {
            score::Coverage::Full => "full".into(),
            score::Coverage::LmOnly => self.quant_pair.coverage_mode.clone().unwrap_or_else(|| "lm_only".into()),
        }
    }

    /// `weight-<w>-act-<a>` unless the pair overrides it.
    pub fn pair_dir(&self) -> String {
        self.quant_pair.publish_pair_dir.clone().unwrap_or_else(|| {
            format!("weight-{}-act-{}", self.quant_pair.weight.as_str(), self.quant_pair.activation.as_str())
        })
    }

    /// `<run_prefix>_autoquant_<pair>_lm_<size>` (`…_all_layers_<size>` for whole-model
    /// runs) unless the pair overrides it.
    pub fn run_dir_name(&self) -> String {
        let full = self.autoquant.coverage == score::Coverage::Full;
        let named = if full { &self.quant_pair.full_publish_run_dir } else { &self.quant_pair.publish_run_dir };
        named.clone().unwrap_or_else(|| {
            let prefix = self.model.run_prefix.as_deref().unwrap_or(&self.model.name);
            let scope = if full { "all_layers" } else { "lm" };
            format!("{prefix}_autoquant_{}_{scope}_{}", self.quant_pair.name, self.dataset.size)
        })
    }

    /// The run folder, relative to the workspace root unless absolute:
    /// `runner.output_dir` if set, else `<layout root>/<pair dir>/[<granularity>/]<run dir>`.
    pub fn run_dir(&self) -> PathBuf {
        if let Some(dir) = &self.runner.output_dir {
            return PathBuf::from(dir);
        }
        let mut p = PathBuf::from(&self.output_layout.root_dir);
        p.push(self.pair_dir());
        if self.quant_granularity.name != "default" {
            p.push(&self.quant_granularity.name);
        }
        p.push(self.run_dir_name());
        p
    }

    /// The checkpoint's source, as the fetch-model stage and the locators see it.
    pub fn checkpoint(&self) -> CheckpointSource {
        match (&self.model.path, &self.model.repo) {
            (Some(path), _) => CheckpointSource::Local { path: path.clone() },
            (None, Some(repo)) => {
                CheckpointSource::Hub { repo: repo.clone(), revision: self.model.revision.clone().unwrap_or_default() }
            }
            (None, None) => unreachable!("checked in RunConfig::check"),
        }
    }

    /// What the manifest calls the model: the hub id or the checkpoint path.
    pub fn model_id(&self) -> String {
        match self.checkpoint() {
            CheckpointSource::Local { path } => path,
            CheckpointSource::Hub { repo, .. } => repo,
        }
    }
}

/// `auto`, `cpu`, `cuda` or `cuda:N`.
pub fn parse_device(s: &str) -> Result<()> {
    match s {
        "auto" | "cpu" | "cuda" => Ok(()),
        _ => match s.strip_prefix("cuda:") {
            Some(n) if n.parse::<usize>().is_ok() => Ok(()),
            _ => bail!("unknown device `{s}`; valid: auto, cpu, cuda, cuda:N"),
        },
    }
}

fn is_commit_sha(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

fn check_path_component(key: &str, value: &str) -> Result<()> {
    if value.is_empty() || value.contains(['/', '\\']) || value == "." || value == ".." {
        bail!("key `{key}`: `{value}` cannot name a folder (empty, `.`/`..`, or contains a path separator)");
    }
    Ok(())
}

/// A short content-free hash for cache file names (FNV-1a, 32 bits as 8 hex digits).
fn short_hash(s: &str) -> String {
    let mut h: u32 = 0x811c_9dc5;
    for b in s.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    format!("{h:08x}")
}

fn slug(s: &str) -> String {
    s.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '.' { c } else { '_' }).collect()
}

fn rel(p: &Path) -> String {
    let joined = p
        .components()
        .filter(|c| !matches!(c, Component::CurDir | Component::RootDir))
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join("/");
    // An absolute path keeps one leading slash (`/tmp/out`, not `//tmp/out`).
    if p.has_root() {
        format!("/{joined}")
    } else {
        joined
    }
}

/// The instances of one run, and what the docs need to know about it.
struct RunPlan {
    cfg: RunConfig,
    run: Run,
    run_dir: PathBuf,
    manifest: PathBuf,
    files: RunFiles,
}

/// Where a run's shared inputs and its scores are (what a recipe over runs reads).
#[derive(Clone)]
struct RunFiles {
    src_slug: String,
    src_tag: String,
    locator: Value,
    identity: PathBuf,
    checkpoint: Option<PathBuf>,
    calib: PathBuf,
    scores: PathBuf,
    score_params: score::ScoreParams,
}

/// Expand runs into instances. Runs are checked first; the first bad run stops planning
/// with an error naming the run (its overrides) and the key.
///
/// A pair × granularity that cannot be built (an overlay that makes no sense for the
/// format, a block size that does not divide a Linear's input dimension) is an error when
/// it is the only run. In a sweep of several runs it is skipped with a warning naming the
/// run and the reason, so that a whole-grid sweep builds every cell that exists; a sweep
/// whose runs are all skipped is an error. Experimental pairs get a warning.
pub fn plan(ctx: &PlanContext, runs: &[Run]) -> Result<Plan> {
    let mut out: Vec<Instance> = Vec::new();
    let mut index: BTreeMap<String, usize> = BTreeMap::new();
    let mut push = |inst: Instance, out: &mut Vec<Instance>| -> Result<()> {
        if let Some(&i) = index.get(&inst.id) {
            if out[i] != inst {
                bail!(
                    "two runs define stage `{}` differently; give them different output folders \
                     (output_layout=tmp or runner.output_dir=DIR)",
                    inst.id
                );
            }
            return Ok(());
        }
        index.insert(inst.id.clone(), out.len());
        out.push(inst);
        Ok(())
    };

    let mut planned: Vec<RunPlan> = Vec::new();
    let mut shapes = ShapeCache::default();
    let mut warnings = Vec::new();
    // Reasons a sweep's runs were skipped (one per pair × granularity), with their runs.
    let mut skipped: Vec<(String, Vec<String>)> = Vec::new();
    let mut experimental = BTreeSet::new();
    for (run_index, run) in runs.iter().enumerate() {
        let cfg = RunConfig::from_value(&run.config)
            .map_err(|e| match e.downcast::<KeyError>() {
                Ok(k) => anyhow::Error::new(KeyError { run: run_index, ..k }),
                Err(e) => e,
            })
            .with_context(|| format!("in run {}", describe_run(run)))?;
        if let Err(e) = check_format(ctx, &cfg, &mut shapes)? {
            if runs.len() == 1 {
                return Err(e.context(format!("in run {}", describe_run(run))));
            }
            let reason = format!("{e:#}");
            match skipped.iter_mut().find(|(r, _)| *r == reason) {
                Some((_, runs)) => runs.push(describe_run(run)),
                None => skipped.push((reason, vec![describe_run(run)])),
            }
            continue;
        }
        if cfg.quant_pair.experimental && experimental.insert(cfg.quant_pair.name.clone()) {
            warnings.push(format!(
                "quant pair `{}` ({}) is marked experimental in the pipeline",
                cfg.quant_pair.name, cfg.quant_pair.format_name
            ));
        }
        let (instances, run_dir, manifest, files) = run_instances(ctx, &cfg)?;
        for inst in instances {
            push(inst, &mut out)?;
        }
        planned.push(RunPlan { cfg, run: run.clone(), run_dir, manifest, files });
    }
    let n_skipped: usize = skipped.iter().map(|(_, r)| r.len()).sum();
    let lines: Vec<String> = skipped
        .iter()
        .map(|(reason, r)| match r.as_slice() {
            [one] => format!("run {one}: {reason}"),
            many => format!("{} runs: {reason}", many.len()),
        })
        .collect();
    if n_skipped > 0 && planned.is_empty() {
        bail!("none of the {} runs can be built:\n  {}", runs.len(), lines.join("\n  "));
    }
    warnings.extend(lines.iter().map(|l| format!("skipping {l}")));
    if n_skipped > 0 {
        warnings.push(format!(
            "{n_skipped} of {} runs skipped: their pair × granularity cannot be built (see above)",
            runs.len()
        ));
    }
    let recipes = recipe_instances(ctx, &planned)?;
    let docs = docs_instances(ctx, &planned, &recipes)?;
    for inst in recipes.into_iter().chain(docs) {
        push(inst, &mut out)?;
    }
    Ok(Plan { instances: out, warnings })
}

/// Linear shapes `(in_features, out_features)` of each local checkpoint, read once per plan.
#[derive(Default)]
struct ShapeCache(BTreeMap<PathBuf, Vec<(usize, usize)>>);

impl ShapeCache {
    /// The shapes of every distinct Linear of the checkpoint's language model, or `None` for a
    /// hub model not read yet (the score stage checks those shapes when it loads the weights).
    fn get(&mut self, ctx: &PlanContext, cfg: &RunConfig) -> Result<Option<&[(usize, usize)]>> {
        let CheckpointSource::Local { path } = cfg.checkpoint() else { return Ok(None) };
        let dir = ctx.root.join(&path);
        if !self.0.contains_key(&dir) {
            let c = qpipe_model::TextConfig::from_dir(&dir)
                .with_context(|| format!("key `model.path`: cannot read the model config in `{path}`"))?;
            let mut shapes: Vec<(usize, usize)> = Vec::new();
            for kind in qpipe_model::LinearKind::ALL {
                let (out_features, in_features) = kind.shape(&c);
                if !shapes.contains(&(in_features, out_features)) {
                    shapes.push((in_features, out_features));
                }
            }
            self.0.insert(dir.clone(), shapes);
        }
        Ok(self.0.get(&dir).map(Vec::as_slice))
    }
}

/// Whether a pair × granularity can be built, checked before any stage runs: the inner
/// error names an unknown format, an overlay that makes no sense for it, or a block size
/// that does not divide a Linear's input dimension. The outer error is a model config that
/// cannot be read.
fn check_format(ctx: &PlanContext, cfg: &RunConfig, shapes: &mut ShapeCache) -> Result<Result<()>> {
    let q = &cfg.quant_pair;
    let g = &cfg.quant_granularity;
    let shapes = shapes.get(ctx, cfg)?.unwrap_or(&[]);
    Ok(qpipe_quant::check_combination(&q.name, &g.name, &q.format_name, &g.quant_cfg_overrides, shapes).map(|_| ()))
}

fn describe_run(run: &Run) -> String {
    if run.overrides.is_empty() {
        "with the pipeline's defaults".to_string()
    } else {
        format!("`{}`", run.overrides.join(" "))
    }
}

fn run_instances(ctx: &PlanContext, cfg: &RunConfig) -> Result<(Vec<Instance>, PathBuf, PathBuf, RunFiles)> {
    let src = cfg.checkpoint();
    let src_slug = src.slug();
    let src_tag = format!("{}-{}", slug(&cfg.model.name), short_hash(&src_slug));
    let local = match &src {
        CheckpointSource::Local { path } => Some(PathBuf::from(path)),
        CheckpointSource::Hub { .. } => None,
    };
    let locator = serde_json::to_value(&src)?;

    // fetch-model: check a local folder, or fetch a pinned hub revision.
    let identity = PathBuf::from(format!("tmp/qpipe/fetch/{src_tag}.json"));
    let fetch = fetch_model::instance(&ctx.root, &src, &identity)?;

    // build-calib: captions → tokens.
    let n = cfg.num_samples();
    let t = cfg.dataset.calib_seq_len;
    let captions = PathBuf::from(cfg.captions_file());
    let captions_name = captions.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let calib_out = PathBuf::from(format!(
        "tmp/qpipe/calib/{src_tag}/{}-{}-{n}x{t}.pt",
        slug(captions.file_stem().map(|s| s.to_string_lossy()).unwrap_or_default().as_ref()),
        short_hash(&rel(&captions)),
    ));
    let local_file = |f: &str| local.as_ref().map(|d| d.join(f)).filter(|p| ctx.root.join(p).is_file());
    let files0 = (identity.clone(), calib_out.clone());
    let (tokenizer, tokenizer_config) = (local_file("tokenizer.json"), local_file("tokenizer_config.json"));
    // Image-text calibration: every image the samples use is an input of the key.
    let image_dir = cfg.dataset.image_dir.as_ref().map(PathBuf::from);
    let calib_images = cfg.image_text().then(|| calib_out.with_extension("images.json"));
    // (A captions file that cannot be read lists no images: build-calib then fails on it
    // with the file and the reason, and `status` still plans.)
    let image_files: Vec<PathBuf> = match &calib_images {
        Some(_) => build_calib::images::image_files(
            &ctx.root.join(&captions),
            image_dir.as_ref().map(|d| ctx.root.join(d)).as_deref(),
            n,
        )
        .map(|files| files.into_iter().map(|p| workspace_path(ctx, &p)).collect())
        .unwrap_or_default(),
        None => Vec::new(),
    };
    let preprocessor_config = local_file("preprocessor_config.json");
    let mut params = build_calib::Params::pipeline(n, t);
    params.image_text = cfg.image_text();
    let calib = build_calib::instance(
        format!("build-calib@{src_slug}:{}:{n}x{t}", rel(&captions)),
        &params,
        &build_calib::CalibFiles {
            captions: &captions,
            identity: &identity,
            tokenizer: tokenizer.as_deref(),
            tokenizer_config: tokenizer_config.as_deref(),
            out: &calib_out,
            images: calib_images.as_ref().map(|out| build_calib::ImageFiles {
                preprocessor_config: preprocessor_config.as_deref(),
                files: &image_files,
                out,
            }),
        },
        match &image_dir {
            Some(d) => json!({"checkpoint": locator, "captions_name": captions_name, "image_dir": rel(d)}),
            None => json!({"checkpoint": locator, "captions_name": captions_name}),
        },
    );

    // score → aggregate → render, in the run folder.
    let run_dir = cfg.run_dir();
    let scheme = cfg.scheme_name();
    let run_id = rel(&run_dir);
    let state_pt = run_dir.join(format!("{scheme}_autoquant_state.pt"));
    let state_json = run_dir.join(format!("{scheme}_autoquant_state.json"));
    let manifest = run_dir.join(format!("{scheme}_quant_manifest.json"));
    let a = &cfg.autoquant;
    // Resolved here so that the device and dtype scores are computed on go into the key.
    let compute = qpipe_compute::device::resolve(&a.device, &a.dtype)?;
    let score_params = score::ScoreParams {
        method: a.method,
        format: score::FormatParams {
            name: cfg.quant_pair.format_name.clone(),
            granularity: Some(cfg.quant_granularity.name.clone()),
            quant_cfg_overrides: Value::Object(cfg.quant_granularity.quant_cfg_overrides.clone()),
        },
        batch_size: a.batch_size,
        score_size: a.score_size,
        device: compute.device,
        dtype: compute.dtype,
        coverage: a.coverage,
    };
    // The scores are named by what they depend on — not by the run folder, nor by the bit
    // budget — so runs that differ only in those share one `score` instance (and one
    // scoring): `autoquant.effective_bits=6 output_layout=tmp` re-runs the search alone.
    let scores = PathBuf::from(format!(
        "tmp/qpipe/scores/{src_tag}/{}-{}-{n}x{t}-{}.json",
        slug(&cfg.quant_pair.name),
        slug(&cfg.quant_granularity.name),
        short_hash(&format!("{}\n{}", serde_json::to_string(&score_params)?, rel(&calib_out))),
    ));
    let score = score::instance(
        format!("score@{}", rel(&scores)),
        &score_params,
        &score::ScoreFiles {
            identity: &identity,
            calib: &calib_out,
            calib_images: calib_images.as_deref(),
            checkpoint: local.as_deref(),
            scores: &scores,
        },
        json!({
            "checkpoint": locator,
            "quant_pair": cfg.quant_pair.name,
            "experimental": cfg.quant_pair.experimental,
            "verbose": a.verbose.unwrap_or(false),
            "memory_limit": a.memory_limit.as_ref().map(MemorySize::bytes).transpose()?,
        }),
        format!("score {} ({}, {} samples) on {}", cfg.quant_pair.name, cfg.dataset.size, n, cfg.model.name),
    )?;
    let scheme_block = json!({
        "name": scheme,
        "auto_quantize_bits": a.effective_bits,
        "auto_quantize_method": a.method.as_str(),
        "auto_quantize_score_size": a.score_size,
        "coverage_mode": cfg.coverage_mode(),
        "coverage_fraction": cfg.quant_pair.coverage_fraction.unwrap_or(1.0),
        "quant_formats": [cfg.quant_pair.format_name],
    });
    let search_params = search::SearchParams { method: a.method, effective_bits: a.effective_bits };
    let search = search::instance(&run_id, &search_params, &scores, &state_pt, &state_json);
    let aggregate = aggregate::instance(&run_id, scheme_block, &cfg.model_id(), &state_json, &manifest);
    let render = render::instance(&run_id, &manifest, &run_dir);
    let files = RunFiles {
        src_slug,
        src_tag,
        locator,
        identity: files0.0,
        checkpoint: local.clone(),
        calib: files0.1,
        scores,
        score_params,
    };
    Ok((vec![fetch, calib, score, search, aggregate, render], run_dir, manifest, files))
}

/// One `recipe` instance per model × calibration set × method × granularity (and
/// compute) over the pairs planned for it — at least two, or `recipe.pairs` — with the
/// held-out captions it validates on. Runs with `runner.output_dir` get none.
fn recipe_instances(ctx: &PlanContext, planned: &[RunPlan]) -> Result<Vec<Instance>> {
    let mut groups: Vec<(String, Vec<&RunPlan>)> = Vec::new();
    // (Held-out validation is tokenized from caption lines: image-text runs get no recipe.)
    for p in planned.iter().filter(|p| p.cfg.runner.output_dir.is_none() && !p.cfg.image_text()) {
        let sp = &p.files.score_params;
        let key = format!(
            "{}|{}|{}|{}|{}|{}|{}|{}|{}",
            p.cfg.output_layout.root_dir,
            p.files.src_tag,
            rel(&p.files.calib),
            sp.method.as_str(),
            p.cfg.quant_granularity.name,
            sp.batch_size,
            sp.score_size,
            sp.device,
            sp.dtype
        );
        match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, v)) => v.push(p),
            None => groups.push((key, vec![p])),
        }
    }
    let mut out = Vec::new();
    for (_, runs) in groups {
        let first = &runs[0];
        let cfg = &first.cfg;
        let rc = &cfg.recipe;
        let mut pairs: Vec<&RunPlan> = Vec::new();
        for r in &runs {
            if !pairs.iter().any(|q| q.cfg.quant_pair.name == r.cfg.quant_pair.name) {
                pairs.push(r);
            }
        }
        if let Some(want) = &rc.pairs {
            for w in want {
                if !pairs.iter().any(|q| &q.cfg.quant_pair.name == w) {
                    bail!(KeyError::new(
                        "recipe.pairs",
                        format!(
                            "pair `{w}` is not built for {} at size `{}`; add it to the runs (quant_pair=…)",
                            cfg.model.name, cfg.dataset.size
                        )
                    ));
                }
            }
            pairs.retain(|q| want.contains(&q.cfg.quant_pair.name));
        } else if pairs.len() < 2 {
            continue;
        }
        let f = &first.files;
        let (n, t) = (cfg.num_samples(), cfg.dataset.calib_seq_len);
        let h = rc.holdout_samples;
        let captions = PathBuf::from(cfg.captions_file());
        let holdout = PathBuf::from(format!(
            "tmp/qpipe/calib/{}/{}-{}-holdout{h}-after{n}x{t}.pt",
            f.src_tag,
            slug(captions.file_stem().map(|s| s.to_string_lossy()).unwrap_or_default().as_ref()),
            short_hash(&rel(&captions)),
        ));
        let local_file =
            |name: &str| f.checkpoint.as_ref().map(|d| d.join(name)).filter(|p| ctx.root.join(p).is_file());
        let (tokenizer, tokenizer_config) = (local_file("tokenizer.json"), local_file("tokenizer_config.json"));
        let captions_name = captions.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        let held = build_calib::instance(
            format!("build-calib@{}:{}:holdout{h}-after{n}x{t}", f.src_slug, rel(&captions)),
            &build_calib::Params { held_out_after: Some(n), ..build_calib::Params::pipeline(h, t) },
            &build_calib::CalibFiles {
                captions: &captions,
                identity: &f.identity,
                tokenizer: tokenizer.as_deref(),
                tokenizer_config: tokenizer_config.as_deref(),
                out: &holdout,
                images: None,
            },
            json!({"checkpoint": f.locator, "captions_name": captions_name}),
        );
        let gran = &cfg.quant_granularity.name;
        let mut dir = PathBuf::from(&cfg.output_layout.root_dir).join("recipes").join(&cfg.dataset.size);
        if gran != "default" {
            dir = dir.join(gran);
        }
        let sp = &f.score_params;
        let params = recipe::RecipeParams {
            model_id: cfg.model_id(),
            size: cfg.dataset.size.clone(),
            granularity: gran.clone(),
            method: sp.method,
            pairs: pairs
                .iter()
                .map(|q| recipe::RecipePair {
                    name: q.cfg.quant_pair.name.clone(),
                    format: q.files.score_params.format.clone(),
                })
                .collect(),
            budgets: rc.budgets.clone(),
            batch_size: sp.batch_size,
            validate_points: rc.validate_points,
            device: sp.device.clone(),
            dtype: sp.dtype.clone(),
        };
        let inst = recipe::instance(
            format!("recipe@{}", rel(&dir)),
            &params,
            &recipe::RecipeFiles {
                identity: &f.identity,
                calib: &f.calib,
                holdout: &holdout,
                checkpoint: f.checkpoint.as_deref(),
                scores: pairs.iter().map(|q| q.files.scores.clone()).collect(),
                dir: &dir,
            },
            json!({"checkpoint": f.locator}),
        )?;
        out.push(held);
        out.push(inst);
    }
    Ok(out)
}

/// One README per published pair folder and one per model's `layer-analysis/` folder.
///
/// Only published runs placed by the output layout count (not `runner.output_dir` runs,
/// nor layouts outside the workspace). Parameters are built from the runs' configs and
/// hold workspace-relative paths only, so they key the same on every machine.
fn docs_instances(ctx: &PlanContext, planned: &[RunPlan], recipes: &[Instance]) -> Result<Vec<Instance>> {
    use docs::{ModelDoc, PairDoc, PairSummary, RunDoc};

    // (layout root, pair dir) → runs, and layout root → pair dirs, in first-seen order.
    let mut pairs: Vec<((String, String), Vec<&RunPlan>)> = Vec::new();
    for p in planned {
        let root = Path::new(&p.cfg.output_layout.root_dir);
        if !p.run.published || p.cfg.runner.output_dir.is_some() || root.is_absolute() {
            continue;
        }
        let key = (rel(root), p.cfg.pair_dir());
        match pairs.iter_mut().find(|(k, _)| *k == key) {
            Some((_, runs)) => runs.push(p),
            None => pairs.push((key, vec![p])),
        }
    }
    let mut out = Vec::new();
    let mut models: Vec<(String, Vec<PairSummary>, &RunPlan)> = Vec::new();
    for ((root, pair_dir), mut runs) in pairs {
        runs.sort_by(|a, b| {
            (&a.cfg.quant_granularity.name, a.cfg.num_samples(), &a.cfg.dataset.size).cmp(&(
                &b.cfg.quant_granularity.name,
                b.cfg.num_samples(),
                &b.cfg.dataset.size,
            ))
        });
        let first = &runs[0].cfg;
        let pair_path = format!("{root}/{pair_dir}");
        let run_docs: Vec<RunDoc> = runs
            .iter()
            .map(|p| {
                let path = rel(&p.run_dir);
                RunDoc {
                    size: p.cfg.dataset.size.clone(),
                    samples: p.cfg.num_samples(),
                    granularity: p.cfg.quant_granularity.name.clone(),
                    rel: path.strip_prefix(&format!("{pair_path}/")).unwrap_or(&path).to_string(),
                    path,
                }
            })
            .collect();
        let overrides = sweep_overrides(&runs);
        let pair = pair_info(first);
        let doc = PairDoc {
            path: pair_path.clone(),
            pipeline_file: workspace_rel(ctx, &ctx.pipeline_file),
            model: model_info(ctx, first),
            calib: calib_info(ctx, first),
            pair: pair.clone(),
            runs: run_docs,
            overrides: overrides.clone(),
        };
        let mut granularities: Vec<String> = runs.iter().map(|p| p.cfg.quant_granularity.name.clone()).collect();
        granularities.dedup();
        let mut sizes: Vec<String> = Vec::new();
        for p in &runs {
            if !sizes.contains(&p.cfg.dataset.size) {
                sizes.push(p.cfg.dataset.size.clone());
            }
        }
        let summary = PairSummary { pair: pair.clone(), granularities, sizes, overrides };
        match models.iter_mut().find(|(r, _, _)| *r == root) {
            Some((_, list, _)) => list.push(summary),
            None => models.push((root.clone(), vec![summary], runs[0])),
        }
        out.push(docs::pair_instance(doc, runs.iter().map(|p| p.manifest.clone()).collect())?);
    }
    for (root, summaries, first) in models {
        let recipes: Vec<docs::RecipeSummary> = recipes
            .iter()
            .filter(|i| i.kind == "recipe")
            .filter_map(|i| {
                let dir = i.id.strip_prefix("recipe@")?.strip_prefix(&format!("{root}/"))?.to_string();
                let p: recipe::RecipeParams = serde_json::from_value(i.params.clone()).ok()?;
                Some(docs::RecipeSummary {
                    dir,
                    size: p.size,
                    granularity: p.granularity,
                    pairs: p.pairs.into_iter().map(|x| x.name).collect(),
                    budgets: p.budgets,
                })
            })
            .collect();
        let doc = ModelDoc {
            path: root.clone(),
            pipeline_file: workspace_rel(ctx, &ctx.pipeline_file),
            model: model_info(ctx, &first.cfg),
            calib: calib_info(ctx, &first.cfg),
            pairs: summaries,
            recipes,
        };
        out.push(docs::model_instance(doc)?);
    }
    Ok(out)
}

/// A path for generated docs: workspace-relative when it is inside the workspace, else
/// `None` (an absolute path would make the docs depend on the machine).
fn workspace_rel_opt(ctx: &PlanContext, p: &Path) -> Option<String> {
    if !p.is_absolute() {
        return Some(rel(p));
    }
    let root = ctx.root.canonicalize().unwrap_or_else(|_| ctx.root.clone());
    p.strip_prefix(&ctx.root).or_else(|_| p.strip_prefix(&root)).ok().map(rel)
}

/// [`workspace_rel_opt`], falling back to the file name.
/// `p` relative to the workspace when inside it (as the other deps are written), else as is.
fn workspace_path(ctx: &PlanContext, p: &Path) -> PathBuf {
    p.strip_prefix(&ctx.root).map(Path::to_path_buf).unwrap_or_else(|_| p.to_path_buf())
}

fn workspace_rel(ctx: &PlanContext, p: &Path) -> String {
    workspace_rel_opt(ctx, p)
        .unwrap_or_else(|| p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default())
}

fn model_info(ctx: &PlanContext, cfg: &RunConfig) -> docs::ModelInfo {
    let m = &cfg.model;
    docs::ModelInfo {
        name: m.name.clone(),
        path: m.path.as_deref().and_then(|p| workspace_rel_opt(ctx, Path::new(p))),
        repo: if m.path.is_none() { m.repo.clone() } else { None },
        revision: if m.path.is_none() { m.revision.clone() } else { None },
    }
}

fn calib_info(ctx: &PlanContext, cfg: &RunConfig) -> docs::CalibInfo {
    let d = &cfg.dataset;
    let mut sizes: Vec<docs::SizeInfo> = d
        .size_to_max_samples
        .iter()
        .map(|(name, samples)| docs::SizeInfo { name: name.clone(), samples: *samples })
        .collect();
    sizes.sort_by(|a, b| (a.samples, &a.name).cmp(&(b.samples, &b.name)));
    let a = &cfg.autoquant;
    docs::CalibInfo {
        captions_path: workspace_rel(ctx, Path::new(cfg.captions_file())),
        seq_len: d.calib_seq_len,
        sizes,
        method: a.method.as_str().into(),
        batch_size: a.batch_size,
        score_size: a.score_size,
        effective_bits: a.effective_bits,
        device: a.device.clone(),
    }
}

fn pair_info(cfg: &RunConfig) -> docs::PairInfo {
    let q = &cfg.quant_pair;
    docs::PairInfo {
        name: q.name.clone(),
        dir: cfg.pair_dir(),
        weight: q.weight.as_str().into(),
        activation: q.activation.as_str().into(),
        format_name: q.format_name.clone(),
        experimental: q.experimental,
        scheme: cfg.scheme_name(),
    }
}

/// The runs' overrides merged into one sweep (`dataset.size=small,medium,large`). A run
/// without recorded overrides (built from the defaults) is described by its selections.
fn sweep_overrides(runs: &[&RunPlan]) -> Vec<String> {
    let mut keys: Vec<(String, Vec<String>)> = Vec::new();
    for p in runs {
        let own: Vec<String> = if p.run.overrides.is_empty() {
            let mut v = vec![format!("model={}", p.cfg.model.name), format!("quant_pair={}", p.cfg.quant_pair.name)];
            if p.cfg.quant_granularity.name != "default" {
                v.push(format!("quant_granularity={}", p.cfg.quant_granularity.name));
            }
            v.push(format!("dataset.size={}", p.cfg.dataset.size));
            v
        } else {
            p.run.overrides.clone()
        };
        for o in own {
            let (k, v) = o.split_once('=').unwrap_or((o.as_str(), ""));
            match keys.iter_mut().find(|(key, _)| key == k) {
                Some((_, vals)) if !vals.iter().any(|x| x == v) => vals.push(v.to_string()),
                Some(_) => {}
                None => keys.push((k.to_string(), vec![v.to_string()])),
            }
        }
    }
    keys.into_iter().map(|(k, v)| format!("{k}={}", v.join(","))).collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use qpipe_contract::OutSpec;

    fn base() -> Value {
        json!({
            "experiment": "x",
            "model": {"name": "tiny", "path": ".", "run_prefix": "tiny", "legacy_prefix": "tiny"},
            "dataset": {"name": "captions", "captions_path": "c.txt", "size": "small",
                        "size_to_max_samples": {"small": 16, "medium": 128, "large": 512},
                        "max_calib_samples": null, "calib_seq_len": 512},
            "quant_pair": {"name": "wfp8_afp16", "weight": "fp8", "activation": "fp16",
                           "format_name": "FP8_WEIGHT_ONLY_CFG", "experimental": false},
            "quant_granularity": {"name": "default", "quant_cfg_overrides": {}},
            "autoquant": {"method": "gradient", "batch_size": 8, "score_size": 128,
                          "effective_bits": 8.0, "device": "auto"},
            "output_layout": {"name": "publish", "mode": "publish", "root_dir": "models/tiny/layer-analysis"},
            "runner": {"output_dir": null}
        })
    }

    /// The embedded checkpoint's config.json in `dir`, which `"path": "."` then names.
    pub(crate) fn copy_tiny_config(dir: &Path) {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/tiny_qwen3_vl/checkpoint/config.json");
        std::fs::copy(src, dir.join("config.json")).unwrap();
    }

    fn ctx() -> PlanContext {
        PlanContext { root: PathBuf::from("."), pipeline_file: PathBuf::from("pipeline.yaml") }
    }

    #[test]
    fn naming_follows_the_legacy_layout() {
        let cfg = RunConfig::from_value(&base()).unwrap();
        assert_eq!(cfg.scheme_name(), "wfp8_afp16_autoquant_lm");
        assert_eq!(cfg.pair_dir(), "weight-fp8-act-fp16");
        assert_eq!(
            cfg.run_dir(),
            PathBuf::from("models/tiny/layer-analysis/weight-fp8-act-fp16/tiny_autoquant_wfp8_afp16_lm_small")
        );
        let mut v = base();
        v["quant_granularity"]["name"] = json!("w_group64");
        let cfg = RunConfig::from_value(&v).unwrap();
        assert!(cfg.run_dir().ends_with("weight-fp8-act-fp16/w_group64/tiny_autoquant_wfp8_afp16_lm_small"));
        v["runner"]["output_dir"] = json!("/tmp/out");
        assert_eq!(RunConfig::from_value(&v).unwrap().run_dir(), PathBuf::from("/tmp/out"));
    }

    #[test]
    fn bad_keys_are_named() {
        let mut v = base();
        v["autoquant"]["method"] = json!("grad");
        let e = format!("{:#}", RunConfig::from_value(&v).unwrap_err());
        assert!(e.contains("autoquant.method") && e.contains("kl_div"), "{e}");
        let mut v = base();
        v["quant_pair"]["weight"] = json!("int9");
        let e = format!("{:#}", RunConfig::from_value(&v).unwrap_err());
        assert!(e.contains("quant_pair.weight"), "{e}");
        let mut v = base();
        v["dataset"]["size"] = json!("huge");
        let e = format!("{:#}", RunConfig::from_value(&v).unwrap_err());
        assert!(e.contains("dataset.size") && e.contains("medium"), "{e}");
        let mut v = base();
        v["autoquant"]["extra"] = json!(1);
        let e = format!("{:#}", RunConfig::from_value(&v).unwrap_err());
        assert!(e.contains("unknown field `extra`"), "{e}");
    }

    #[test]
    fn instance_paths_are_slash_joined_with_one_leading_slash_when_absolute() {
        assert_eq!(rel(Path::new("./models/a/b")), "models/a/b");
        assert_eq!(rel(Path::new("/tmp/out")), "/tmp/out");
    }

    #[test]
    fn combinations_that_cannot_be_built_are_rejected_before_any_stage() {
        let dir = tempfile::tempdir().unwrap();
        copy_tiny_config(dir.path());
        std::fs::write(dir.path().join("c.txt"), "a\n").unwrap();
        let ctx = PlanContext { root: dir.path().to_path_buf(), ..ctx() };
        let run = |v: Value| Run { config: v, overrides: vec!["quant_pair=x".into()], published: false };
        // FP4 has no per-channel scale: the overlay is rejected, naming pair and overlay.
        let mut v = base();
        v["quant_pair"] = json!({"name": "wfp4_afp16", "weight": "fp4", "activation": "fp16",
                                  "format_name": "NVFP4_WEIGHT_ONLY_CFG"});
        v["quant_granularity"] = json!({"name": "w_per_out_channel",
                                         "quant_cfg_overrides": {"*weight_quantizer": {"axis": 0}}});
        let e = format!("{:#}", plan(&ctx, &[run(v.clone())]).unwrap_err());
        assert!(e.contains("wfp4_afp16") && e.contains("w_per_out_channel"), "{e}");
        // A group size that does not divide an input dimension (hidden 128 here).
        v["quant_pair"] = json!({"name": "wint4_afp16", "weight": "int4", "activation": "fp16",
                                  "format_name": "INT4_BLOCKWISE_WEIGHT_ONLY_CFG"});
        v["quant_granularity"] = json!({"name": "w_group96",
                                         "quant_cfg_overrides": {"*weight_quantizer": {"block_sizes": {"-1": 96}}}});
        let e = format!("{:#}", plan(&ctx, &[run(v.clone())]).unwrap_err());
        assert!(e.contains("w_group96") && e.contains("96"), "{e}");
        // The same overlay with a dividing size plans.
        let mut good = v.clone();
        good["quant_granularity"]["quant_cfg_overrides"]["*weight_quantizer"]["block_sizes"]["-1"] = json!(64);
        assert!(plan(&ctx, &[run(good.clone())]).is_ok());
        // In a sweep the bad run is skipped with a warning; the good one plans.
        let p = plan(&ctx, &[run(v.clone()), run(good)]).unwrap();
        assert!(
            p.warnings.iter().any(|w| w.starts_with("skipping run") && w.contains("w_group96")),
            "{:?}",
            p.warnings
        );
        assert!(p.warnings.iter().any(|w| w.contains("1 of 2 runs skipped")), "{:?}", p.warnings);
        assert_eq!(p.instances.iter().filter(|i| i.kind == "score").count(), 1);
        // A sweep of runs that all cannot be built is an error listing each reason once.
        let e = format!("{:#}", plan(&ctx, &[run(v.clone()), run(v.clone())]).unwrap_err());
        assert!(
            e.contains("none of the 2 runs can be built") && e.contains("2 runs: ") && e.contains("w_group96"),
            "{e}"
        );
        // Experimental pairs warn, once per pair.
        v["quant_granularity"] = json!({"name": "default", "quant_cfg_overrides": {}});
        v["quant_pair"]["experimental"] = json!(true);
        let p = plan(&ctx, &[run(v.clone()), run(v)]).unwrap();
        assert_eq!(
            p.warnings,
            ["quant pair `wint4_afp16` (INT4_BLOCKWISE_WEIGHT_ONLY_CFG) is marked experimental in the pipeline"]
        );
    }

    #[test]
    fn hub_models_need_a_pinned_revision() {
        let mut v = base();
        v["model"] = json!({"name": "m", "repo": "Qwen/Qwen3-VL-4B-Instruct", "revision": "main"});
        let e = format!("{:#}", RunConfig::from_value(&v).unwrap_err());
        assert!(e.contains("not a commit sha"), "{e}");
        v["model"]["revision"] = json!("ebb281ec70b05090aa6165b016eac8ec08e71b17");
        let cfg = RunConfig::from_value(&v).unwrap();
        assert_eq!(cfg.checkpoint().slug(), "Qwen/Qwen3-VL-4B-Instruct@ebb281e");
    }

    #[test]
    fn runs_share_fetch_and_calibration() {
        let a = base();
        let mut b = base();
        b["quant_pair"] = json!({"name": "wint8_aint8", "weight": "int8", "activation": "int8",
                                  "format_name": "INT8_DEFAULT_CFG"});
        let runs: Vec<Run> =
            [a, b].into_iter().map(|config| Run { config, overrides: vec![], published: false }).collect();
        let dir = tempfile::tempdir().unwrap();
        copy_tiny_config(dir.path());
        std::fs::write(dir.path().join("c.txt"), "a\n").unwrap();
        let ctx = PlanContext { root: dir.path().to_path_buf(), ..ctx() };
        let inst = plan(&ctx, &runs).unwrap().instances;
        let kinds: Vec<_> = inst.iter().map(|i| i.kind.as_str()).collect();
        assert_eq!(
            kinds,
            [
                "fetch-model",
                "build-calib",
                "score",
                "search",
                "aggregate",
                "render",
                "score",
                "search",
                "aggregate",
                "render",
                "build-calib",
                "recipe"
            ]
        );
        // Two pairs on one calibration set: a recipe over both, validated on held-out captions.
        let recipe = inst.iter().find(|i| i.kind == "recipe").unwrap();
        let deps: Vec<&str> = recipe.deps.iter().map(|d| d.name.as_str()).collect();
        assert!(deps.contains(&"holdout") && deps.iter().filter(|d| d.starts_with("scores_")).count() == 2, "{deps:?}");
        let held = inst.iter().filter(|i| i.kind == "build-calib").nth(1).unwrap();
        assert!(held.params["held_out_after"].as_u64().is_some(), "{}", held.params);
        let calib = &inst[1];
        assert_eq!(calib.params["max_samples"], json!(16));
        assert_eq!(inst[2].deps[1].name, "calib");
        assert_eq!(inst[2].deps[1].path, calib.outs[0].path);
        assert_eq!(inst[3].deps[0].path, inst[2].outs[0].path, "search reads the scores");
        assert!(inst[3].outs[1].path.ends_with("wfp8_afp16_autoquant_lm_autoquant_state.json"));
    }

    #[test]
    fn published_runs_get_pair_and_model_readmes() {
        let dir = tempfile::tempdir().unwrap();
        copy_tiny_config(dir.path());
        std::fs::write(dir.path().join("c.txt"), "a\n").unwrap();
        let ctx = PlanContext { root: dir.path().to_path_buf(), pipeline_file: dir.path().join("pipeline.yaml") };
        let mut runs = Vec::new();
        for size in ["large", "small", "medium"] {
            let mut config = base();
            config["dataset"]["size"] = json!(size);
            let overrides =
                vec!["model=tiny".to_string(), "quant_pair=wfp8_afp16".into(), format!("dataset.size={size}")];
            runs.push(Run { config, overrides, published: true });
        }
        let mut scratch = base();
        scratch["runner"]["output_dir"] = json!("tmp/x");
        runs.push(Run { config: scratch, overrides: vec![], published: true });
        runs.push(Run { config: base(), overrides: vec![], published: false });
        let inst = plan(&ctx, &runs).unwrap().instances;
        let docs: Vec<&Instance> = inst.iter().filter(|i| i.kind == "docs").collect();
        assert_eq!(docs.len(), 2, "{docs:#?}");
        let pair = docs[0];
        assert_eq!(pair.id, "docs@models/tiny/layer-analysis/weight-fp8-act-fp16");
        assert_eq!(pair.outs, [OutSpec::tracked("readme", "models/tiny/layer-analysis/weight-fp8-act-fp16/README.md")]);
        let sizes: Vec<_> =
            pair.params["runs"].as_array().unwrap().iter().map(|r| r["size"].as_str().unwrap()).collect();
        assert_eq!(sizes, ["small", "medium", "large"]);
        assert_eq!(pair.deps.len(), 3);
        assert!(pair.deps[0]
            .path
            .ends_with("tiny_autoquant_wfp8_afp16_lm_small/wfp8_afp16_autoquant_lm_quant_manifest.json"));
        assert_eq!(
            pair.params["overrides"],
            json!(["model=tiny", "quant_pair=wfp8_afp16", "dataset.size=small,medium,large"])
        );
        assert_eq!(pair.params["runs"][0]["rel"], json!("tiny_autoquant_wfp8_afp16_lm_small"));
        assert_eq!(pair.params["calib"]["sizes"][2], json!({"name": "large", "samples": 512}));
        let model = docs[1];
        assert_eq!(model.id, "docs@models/tiny/layer-analysis");
        assert!(model.deps.is_empty());
        assert_eq!(model.params["pairs"][0]["sizes"], json!(["small", "medium", "large"]));
        assert_eq!(model.params["pipeline_file"], json!("pipeline.yaml"));
        // Deterministic, and nothing machine-specific in the parameters.
        let again = plan(&ctx, &runs).unwrap().instances;
        assert_eq!(inst, again);
        for d in &docs {
            let text = d.params.to_string();
            assert!(!text.contains(&dir.path().display().to_string()), "{text}");
        }
        // The params are what the docs stage reads.
        for d in &docs {
            serde_json::from_value::<docs::DocsParams>(d.params.clone()).unwrap();
        }
    }
}
