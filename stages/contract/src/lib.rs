//! The one small contract between the engine (`qpipe`, in `src/`) and the domain (this crate).
//!
//! The engine knows nothing about quantization: it composes configurations, asks the
//! [`Domain`] to [`plan`](Domain::plan) them into [`Instance`]s (what runs, with which
//! parameters, reading which files and writing which files), derives the DAG from the file
//! paths, hashes, schedules, and calls [`Stage::run`] for the instances that are stale.
//!
//! The domain knows nothing about the DAG, the lock or the CLI: a stage reads the files it
//! declared, writes the files it declared (to the temporary paths it is given) and returns.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// One input of an instance: a file or directory, under the name the stage reads it by.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DepSpec {
    /// What the stage calls it (`calib`, `checkpoint`, `manifest`); several deps may share
    /// a name when the stage reads a list ([`Job::deps_named`]). Not part of the key.
    pub name: String,
    /// Workspace-relative path (or absolute, for runs the user pointed outside the workspace).
    pub path: PathBuf,
}

impl DepSpec {
    pub fn new(name: impl Into<String>, path: impl Into<PathBuf>) -> Self {
        Self { name: name.into(), path: path.into() }
    }
}

/// One output file of an instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutSpec {
    /// What the stage calls it (`state_json`, `manifest`); unique within the instance.
    pub name: String,
    /// Workspace-relative path (or absolute, for runs the user pointed outside the workspace).
    pub path: PathBuf,
    /// A declared intermediate (a git-ignored `.pt`, a cache file under `tmp/`): it is not
    /// required for the instance, nor anything after it, to be up to date. `qpipe clean`
    /// may delete it; it is re-made only when a stage that reads it has to run.
    pub intermediate: bool,
}

impl OutSpec {
    /// An output committed to git.
    pub fn tracked(name: impl Into<String>, path: impl Into<PathBuf>) -> Self {
        Self { name: name.into(), path: path.into(), intermediate: false }
    }
    /// A declared intermediate (see [`OutSpec::intermediate`]).
    pub fn intermediate(name: impl Into<String>, path: impl Into<PathBuf>) -> Self {
        Self { name: name.into(), path: path.into(), intermediate: true }
    }
}

/// One stage instance: a node of the DAG.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Instance {
    /// Unique and stable across invocations, e.g. `score@tiny_qwen3_vl/wint8_aint8/default/small`.
    pub id: String,
    /// The [`Stage::kind`] that runs it.
    pub kind: String,
    /// Resolved parameters. Part of the instance key (hashed as canonical JSON).
    pub params: Value,
    /// What is *not* part of the key: where to find things whose content is already keyed
    /// through a dependency (a checkpoint's local directory, a hub cache location —
    /// moving a checkpoint must not make a run stale), and run settings that change no
    /// output (a memory limit).
    pub locators: Value,
    /// Files or directories read. Their content hashes are part of the key. An edge of the
    /// DAG runs from the instance that declares a path in its `outs` to every instance
    /// that lists it here. Their order is part of the key; their names are not.
    pub deps: Vec<DepSpec>,
    /// Files written, in a stable order.
    pub outs: Vec<OutSpec>,
    /// One line for people: `score wint8_aint8 (small) on tiny_qwen3_vl`.
    pub description: String,
}

/// One composed configuration (Hydra's "job"): the selected option of each config group
/// with overrides applied, as one JSON object.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Run {
    pub config: Value,
    /// The overrides that produced it, in `key=value` form, for documentation.
    pub overrides: Vec<String>,
    /// Part of the pipeline's `publish` matrix (as opposed to an ad-hoc command-line run).
    pub published: bool,
}

/// What planning produced.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    pub instances: Vec<Instance>,
    /// Lines for the user (printed as `warning: …` before any work): runs of a sweep that
    /// were skipped and why, formats that are experimental.
    pub warnings: Vec<String>,
}

/// A run's configuration has a bad value at `key` (dotted, as `autoquant.batch_size`).
/// The planner returns it (inside any context) for the run at index `run` of the runs it
/// was given; the engine fills in `location` — `pipeline.yaml:LINE:COL` where that value is
/// set, or the command-line override that set it — before the error is shown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyError {
    pub run: usize,
    pub key: String,
    pub message: String,
    pub location: Option<String>,
}

impl KeyError {
    /// An error at `key` of the run being checked (its index is set by the planner).
    pub fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        KeyError { run: 0, key: key.into(), message: message.into(), location: None }
    }
}

impl std::fmt::Display for KeyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(at) = &self.location {
            write!(f, "{at}: ")?;
        }
        write!(f, "key `{}`: {}", self.key, self.message)
    }
}

impl std::error::Error for KeyError {}

/// What the planner gets besides the runs.
#[derive(Debug, Clone)]
pub struct PlanContext {
    /// The workspace root: the directory holding `pipeline.yaml`.
    pub root: PathBuf,
    /// The pipeline file, as given (for messages and generated docs).
    pub pipeline_file: PathBuf,
}

/// Progress reporting for long stages. The engine draws bars; stages only report.
pub trait Progress: Sync {
    /// Start a phase of work. `total = Some(n)` draws a bar with ETA, `None` a spinner.
    fn phase(&self, name: &str, total: Option<u64>);
    /// `n` more units of the current phase are done.
    fn advance(&self, n: u64);
    /// What the current phase is doing now (`score: batch 2/4: layers.17.mlp.up_proj`),
    /// shown beside the bar in place of the phase's name.
    fn detail(&self, _msg: &str) {}
    /// A line for the user (printed above any bar). Warnings start with `warning: `.
    fn note(&self, msg: &str);
}

/// A [`Progress`] that reports nothing (tests, library use).
pub struct Silent;

impl Progress for Silent {
    fn phase(&self, _name: &str, _total: Option<u64>) {}
    fn advance(&self, _n: u64) {}
    fn note(&self, _msg: &str) {}
}

/// One resolved file of a [`Job`]: its declared name and where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobFile {
    pub name: String,
    pub path: PathBuf,
}

impl JobFile {
    pub fn new(name: impl Into<String>, path: impl Into<PathBuf>) -> Self {
        Self { name: name.into(), path: path.into() }
    }
}

/// Everything a stage gets to run one instance. Files are found by the names the instance
/// declared them under ([`Job::dep`], [`Job::out`]), never by position.
pub struct Job<'a> {
    pub id: &'a str,
    /// The workspace root.
    pub root: &'a Path,
    pub params: &'a Value,
    pub locators: &'a Value,
    /// Absolute paths of the declared `deps`.
    pub deps: &'a [JobFile],
    /// Absolute *temporary* paths for the declared `outs`, in the same directories as the
    /// final paths. The engine renames them into place after `run` returns `Ok`, and
    /// deletes them otherwise. A stage writes every one of them.
    pub outs: &'a [JobFile],
    /// The final (workspace-relative or absolute) paths of the outputs, for content that
    /// names them (a Markdown link to a figure, a README).
    pub final_outs: &'a [JobFile],
    pub progress: &'a dyn Progress,
}

impl Job<'_> {
    /// The dep declared as `name` (an error names the instance and the names it has).
    pub fn dep(&self, name: &str) -> anyhow::Result<&Path> {
        find(self.id, "dep", self.deps, name)
    }

    /// The dep declared as `name`, if the instance has one (optional inputs).
    pub fn dep_opt(&self, name: &str) -> Option<&Path> {
        self.deps.iter().find(|f| f.name == name).map(|f| f.path.as_path())
    }

    /// Every dep declared as `name`, in declaration order (inputs that come as a list).
    pub fn deps_named(&self, name: &str) -> Vec<&Path> {
        self.deps.iter().filter(|f| f.name == name).map(|f| f.path.as_path()).collect()
    }

    /// The temporary path to write the output declared as `name` to.
    pub fn out(&self, name: &str) -> anyhow::Result<&Path> {
        find(self.id, "output", self.outs, name)
    }

    /// The final path of the output declared as `name`.
    pub fn final_out(&self, name: &str) -> anyhow::Result<&Path> {
        find(self.id, "output", self.final_outs, name)
    }
}

fn find<'f>(id: &str, what: &str, files: &'f [JobFile], name: &str) -> anyhow::Result<&'f Path> {
    match files.iter().find(|f| f.name == name) {
        Some(f) => Ok(&f.path),
        None => {
            let names: Vec<&str> = files.iter().map(|f| f.name.as_str()).collect();
            anyhow::bail!("stage `{id}` declares no {what} named `{name}` (it has: {})", names.join(", "))
        }
    }
}

/// A kind of stage: fetch-model, build-calib, score, aggregate, render, docs.
pub trait Stage: Send + Sync {
    /// The kind name used in instance ids and the lock, e.g. `score`.
    fn kind(&self) -> &'static str;
    /// A version of the code that produces this kind's outputs. When it changes, every
    /// instance of the kind is stale. Derived from the source files (see `build.rs`).
    fn code_version(&self) -> &'static str;
    /// True for stages that use every core themselves (scoring): the scheduler runs
    /// them one at a time, and other work beside them only when `-j` allows.
    fn exclusive(&self) -> bool {
        false
    }
    /// Run one instance.
    fn run(&self, job: &Job<'_>) -> anyhow::Result<()>;
    /// Instances of this kind that are due to run at the same time and have the same fusion
    /// key run as one execution ([`Stage::run_fused`]), so that the work they share is done
    /// once (one model load and forward/backward for several quantization formats). Each
    /// still has its own key, outputs and lock entry, and is committed on its own. `None`
    /// (the default): each instance runs alone.
    fn fusion_key(&self, _inst: &Instance) -> Option<String> {
        None
    }
    /// Runs several instances with one fusion key at once: one result per job, in order.
    /// The outputs of each job must be the bytes that job would get run alone. The default
    /// runs them one after another.
    fn run_fused(&self, jobs: &[Job<'_>]) -> Vec<anyhow::Result<()>> {
        jobs.iter().map(|j| self.run(j)).collect()
    }
}

/// Tolerances for `qpipe verify --parity`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Tolerance {
    /// Largest allowed relative difference of a per-layer number.
    pub rel: f64,
    /// Smallest allowed Spearman rank correlation of the per-layer sensitivities.
    pub min_spearman: f64,
}

impl Default for Tolerance {
    fn default() -> Self {
        Self { rel: 1e-3, min_spearman: 0.999 }
    }
}

/// The outcome of comparing one rebuilt (or baseline) run folder with a committed one.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ParityReport {
    /// The committed run folder.
    pub run_dir: PathBuf,
    /// Problems that make the run differ (exit 1).
    pub drift: Vec<String>,
    /// Differences that are expected and explained (scope differences), not failures.
    pub notes: Vec<String>,
    /// Problems that stopped the comparison (exit 2): unreadable files, say.
    pub errors: Vec<String>,
    /// Figures: worst relative difference, its layer, the Spearman correlation, …
    pub figures: serde_json::Map<String, Value>,
}

/// The domain as the engine sees it.
pub trait Domain: Sync {
    /// Every stage kind, for scheduling and code versions.
    fn stages(&self) -> Vec<&dyn Stage>;
    /// Check and expand composed configurations into stage instances. Errors name the
    /// config key and say what is valid. Instances shared between runs (one calibration
    /// set feeding many pairs) are returned once.
    fn plan(&self, ctx: &PlanContext, runs: &[Run]) -> anyhow::Result<Plan>;
    /// Compare the artifacts of a run folder with a reference folder.
    fn compare(&self, committed: &Path, candidate: &Path, tol: &Tolerance) -> ParityReport;
}
