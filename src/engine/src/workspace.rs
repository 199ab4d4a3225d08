//! A workspace: the pipeline file, its root, the domain, and planning runs into a DAG.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use qpipe_contract::{Domain, Instance, Job, JobFile, PlanContext, Progress, Run, Stage};

use crate::config::Pipeline;
use crate::dag::Dag;
use crate::suggest::list;

pub const PIPELINE_FILE: &str = "pipeline.yaml";
pub const STATE_DIR: &str = "tmp/qpipe";
pub const STAT_CACHE: &str = "tmp/qpipe/stat-cache.json";
pub const BUILD_LOCK: &str = "tmp/qpipe/build.lock";

/// The pipeline, its root and the domain that plans and runs it.
pub struct Workspace<'d> {
    pub domain: &'d dyn Domain,
    pub pipeline: Pipeline,
    /// Absolute root (the directory holding the pipeline file).
    pub root: PathBuf,
    /// Let ad-hoc runs replace published artifacts (`--overwrite-published`); otherwise an
    /// ad-hoc run that would write a published run's files differently is refused.
    pub overwrite_published: bool,
    /// Read-only commands (`status`, `dag`): an ad-hoc run that a build would refuse to let
    /// replace a published one is planned anyway, with a warning saying so.
    pub published_guard_warns: bool,
    stages: HashMap<&'static str, &'d dyn Stage>,
}

/// A planned set of runs.
pub struct Planned {
    pub dag: Dag,
    /// Per instance: does it feed published artifacts (its lock entry goes to `qpipe.lock`)?
    pub published: Vec<bool>,
    /// The domain's warnings about the plan (skipped runs of a sweep, experimental formats).
    pub warnings: Vec<String>,
}

/// Find the pipeline file: `explicit` (relative to `cwd`), else `pipeline.yaml` in `cwd` or
/// the nearest ancestor that has one.
pub fn find_pipeline(cwd: &Path, explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = explicit {
        let p = cwd.join(p);
        if p.is_dir() {
            let inside = p.join(PIPELINE_FILE);
            bail!(
                "`{}` is a directory, not a pipeline file{}",
                p.display(),
                if inside.is_file() {
                    format!(" (did you mean `--pipeline {}`?)", inside.display())
                } else {
                    String::new()
                }
            );
        }
        if !p.is_file() {
            bail!("pipeline file `{}` does not exist", p.display());
        }
        return Ok(p);
    }
    for dir in cwd.ancestors() {
        let p = dir.join(PIPELINE_FILE);
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!("could not find `{PIPELINE_FILE}` in `{}` or any parent directory (or pass --pipeline FILE)", cwd.display())
}

impl<'d> Workspace<'d> {
    pub fn open(domain: &'d dyn Domain, pipeline_file: &Path) -> Result<Self> {
        let pipeline = Pipeline::load(pipeline_file)?;
        let root = std::fs::canonicalize(&pipeline.root)
            .with_context(|| format!("cannot resolve the workspace root `{}`", pipeline.root.display()))?;
        let mut stages = HashMap::new();
        for s in domain.stages() {
            stages.insert(s.kind(), s);
        }
        let mut kinds: Vec<&str> = stages.keys().copied().collect();
        kinds.sort();
        pipeline.executor.validate(&kinds).with_context(|| format!("{}", pipeline.file.display()))?;
        Ok(Workspace { domain, pipeline, root, overwrite_published: false, published_guard_warns: false, stages })
    }

    /// The shared output cache, when `QPIPE_CACHE_DIR` or `cache.dir` names one.
    pub fn store(&self) -> Option<crate::store::Store> {
        crate::store::Store::locate(&self.root, self.pipeline.cache_dir.as_deref())
    }

    pub fn stage(&self, kind: &str) -> Result<&'d dyn Stage> {
        self.stages.get(kind).copied().ok_or_else(|| {
            let kinds: Vec<&str> = self.stages.keys().copied().collect();
            anyhow!("the domain planned a stage of unknown kind `{kind}` (kinds: {})", list(&kinds, 20))
        })
    }

    fn ctx(&self) -> PlanContext {
        PlanContext { root: self.root.clone(), pipeline_file: self.pipeline.file.clone() }
    }

    /// Split command-line words into overrides (`KEY=VALUE`) and targets.
    pub fn split_args(args: &[String]) -> (Vec<String>, Vec<String>) {
        args.iter().cloned().partition(|a| a.contains('='))
    }

    /// Plan the publish matrix (no overrides) or the ad-hoc runs the overrides describe.
    pub fn plan(&self, overrides: &[String]) -> Result<Planned> {
        if overrides.is_empty() {
            let runs = self.pipeline.publish_runs()?;
            self.plan_runs(&runs, None)
        } else {
            let runs = self.pipeline.override_runs(overrides)?;
            self.plan_runs(&runs, None)
        }
    }

    /// Plan runs. An instance is published when it is also an instance of the publish
    /// matrix (`published_ids`, computed when not given).
    pub fn plan_runs(&self, runs: &[Run], published_ids: Option<HashSet<String>>) -> Result<Planned> {
        let plan = self
            .domain
            .plan(&self.ctx(), runs)
            .map_err(|mut e| {
                if let Some(k) = e.downcast_mut::<qpipe_contract::KeyError>() {
                    if let Some(run) = runs.get(k.run) {
                        k.location = self.pipeline.locate(run, &k.key);
                    }
                }
                e
            })
            .context("cannot plan the pipeline's runs")?;
        let (instances, mut warnings) = (plan.instances, plan.warnings);
        let ids = match published_ids {
            Some(ids) => ids,
            None if runs.iter().all(|r| r.published) => instances.iter().map(|i| i.id.clone()).collect(),
            None => {
                let matrix = self.publish_instances().unwrap_or_default();
                if !self.overwrite_published {
                    match refuse_overwriting_published(&instances, &matrix, runs) {
                        Err(e) if self.published_guard_warns => {
                            warnings.push(format!("`qpipe build` would refuse these overrides: {e:#}"))
                        }
                        r => r?,
                    }
                }
                matrix.into_iter().map(|i| i.id).collect()
            }
        };
        for inst in &instances {
            self.stage(&inst.kind)?;
        }
        let published = instances.iter().map(|i| ids.contains(&i.id)).collect();
        let dag = Dag::new(&self.root, instances)?;
        Ok(Planned { dag, published, warnings })
    }

    /// Ids of the publish matrix's instances.
    pub fn published_ids(&self) -> Result<HashSet<String>> {
        Ok(self.publish_instances()?.into_iter().map(|i| i.id).collect())
    }

    /// The publish matrix's instances.
    pub fn publish_instances(&self) -> Result<Vec<Instance>> {
        let runs = self.pipeline.publish_runs()?;
        Ok(self.domain.plan(&self.ctx(), &runs)?.instances)
    }

    /// Absolute path of a normalized path.
    pub fn abs(&self, norm: &str) -> PathBuf {
        self.root.join(norm)
    }
}

/// Errors when an ad-hoc instance would write a file that a publish-matrix instance writes
/// (a tracked artifact) while differing from it (other parameters or inputs): the ad-hoc
/// run would silently replace the published analysis and re-key `qpipe.lock`. An ad-hoc
/// run that composes exactly a published run is that run, and passes.
fn refuse_overwriting_published(instances: &[Instance], matrix: &[Instance], runs: &[Run]) -> Result<()> {
    let by_id: HashMap<&str, &Instance> = matrix.iter().map(|i| (i.id.as_str(), i)).collect();
    let mut by_out: HashMap<&Path, &Instance> = HashMap::new();
    for i in matrix {
        for o in i.outs.iter().filter(|o| !o.intermediate) {
            by_out.insert(o.path.as_path(), i);
        }
    }
    for inst in instances {
        let same_id = by_id.get(inst.id.as_str()).copied();
        let clash = inst.outs.iter().filter(|o| !o.intermediate).find_map(|o| by_out.get(o.path.as_path()).copied());
        let Some(published) = same_id.or(clash) else { continue };
        if published == inst {
            continue;
        }
        let what = if published.params != inst.params {
            "other parameters"
        } else if published.deps != inst.deps {
            "other inputs"
        } else {
            "a different declaration"
        };
        let file = published.outs.iter().find(|o| !o.intermediate).map(|o| o.path.display().to_string());
        let overrides: Vec<String> = runs.iter().filter(|r| !r.published).flat_map(|r| r.overrides.clone()).collect();
        bail!(
            "this run would overwrite the published `{}` (`{}`) with {what}; the published analysis there \
             comes from the pipeline's publish matrix\n  overrides: {}\nwrite it elsewhere (`runner.output_dir=DIR` \
             or `output_layout=tmp`), or pass `--overwrite-published` to replace the published files",
            published.id,
            file.unwrap_or_default(),
            overrides.join(" ")
        );
    }
    Ok(())
}

/// Holds `tmp/qpipe/build.lock` while a build runs; a second qpipe building the same tree
/// gets a clear error instead of racing.
pub struct BuildLock {
    _file: File,
}

impl BuildLock {
    pub fn acquire(root: &Path) -> Result<BuildLock> {
        let path = root.join(BUILD_LOCK);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("cannot create `{}`", dir.display()))?;
        }
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("cannot open `{}`", path.display()))?;
        // A brief grace period: a lock can outlive its holder by the instant a forked child
        // (a stage's subprocess, a test's `git`) takes to exec and drop inherited files.
        let deadline = std::time::Instant::now() + std::time::Duration::from_millis(300);
        loop {
            match file.try_lock() {
                Ok(()) => return Ok(BuildLock { _file: file }),
                Err(std::fs::TryLockError::WouldBlock) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(std::fs::TryLockError::WouldBlock) => bail!(
                    "another qpipe process is building `{}` (it holds `{BUILD_LOCK}`); wait for it to finish",
                    root.display()
                ),
                Err(std::fs::TryLockError::Error(e)) => {
                    return Err(e).with_context(|| format!("cannot lock `{}`", path.display()))
                }
            }
        }
    }
}

/// The input files and the final output files of instance `i`, as its [`Job`] names them.
pub(crate) fn job_files(ws: &Workspace<'_>, dag: &Dag, i: usize) -> (Vec<JobFile>, Vec<JobFile>) {
    let inst = &dag.instances[i];
    let deps = dag.dep_paths[i]
        .iter()
        .zip(&inst.deps)
        .map(|(p, d)| JobFile { name: d.name.clone(), path: ws.abs(p) })
        .collect();
    let finals = inst.outs.iter().map(|o| JobFile { name: o.name.clone(), path: o.path.clone() }).collect();
    (deps, finals)
}

/// The [`Job`] of `inst`: its inputs, the paths to write and its final outputs.
pub(crate) fn job<'a>(
    inst: &'a Instance,
    root: &'a Path,
    (deps, outs, finals): (&'a [JobFile], &'a [JobFile], &'a [JobFile]),
    progress: &'a dyn Progress,
) -> Job<'a> {
    Job { id: &inst.id, root, params: &inst.params, locators: &inst.locators, deps, outs, final_outs: finals, progress }
}
