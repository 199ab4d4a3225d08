//! The command line (clap derive) and its exit codes.
//!
//! Exit codes: 0 success; `status` 1 = something is stale; `verify` 1 = drift,
//! 2 = could not check; errors exit 1 (`build`, `dag`, `clean`) or 2 (`status`, `verify`,
//! where 1 already means something); usage errors exit 2.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use qpipe_contract::{Domain, Tolerance};

use crate::clean::{execute, human_bytes, plan_clean};
use crate::scheduler::{build, BuildOptions};
use crate::status::{render_json, render_text, status};
use crate::ui::Ui;
use crate::verify::{verify, VerifyOptions};
use crate::workspace::{find_pipeline, BuildLock, Workspace};

/// qpipe builds per-layer quantization-sensitivity analyses as a content-hashed,
/// make-like DAG declared in one pipeline.yaml.
#[derive(Parser, Debug)]
#[command(
    name = "qpipe",
    version,
    about,
    long_about = None,
    propagate_version = true,
    after_help = "Environment:\n  QPIPE_CACHE_DIR  a shared output cache folder (see `qpipe cache --help`)\n  \
                  QPIPE_FUSE=0     run every instance alone, even where a stage could share work between them\n  \
                  NO_COLOR         plain output\nThe stages' own settings (vector level, memory) are in the README."
)]
pub struct Cli {
    /// The pipeline file (default: pipeline.yaml in this directory or the nearest parent).
    #[arg(long, global = true, value_name = "FILE")]
    pub pipeline: Option<PathBuf>,
    /// Say more: fresh instances, why each stage runs, timings.
    #[arg(short, long, global = true)]
    pub verbose: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Build what is stale: the publish matrix, or the runs that overrides describe.
    ///
    /// Words with `=` are overrides (Hydra style): `GROUP=OPTION` selects a group option,
    /// `a.b=VALUE` sets a key, `+a.b=VALUE` adds one, and `a=x,y,z` sweeps (several
    /// sweeps make a cartesian product). Other words are targets: a path (every stage
    /// writing under it), a stage id, or a stage kind — plus what they need.
    Build(BuildArgs),
    /// Show each stale or missing instance and why (exit 1 when anything is stale).
    Status(StatusArgs),
    /// Print the DAG.
    Dag(DagArgs),
    /// Rebuild published runs into tmp/qpipe/verify/ and compare them with the committed
    /// ones (exit 0 parity, 1 drift, 2 could not check).
    Verify(VerifyArgs),
    /// Delete git-ignored intermediates (*.pt, …) the pipeline declares; never a tracked file.
    Clean(CleanArgs),
    /// The shared output cache (`QPIPE_CACHE_DIR` or `cache.dir` in pipeline.yaml): builds
    /// restore an instance's outputs from it instead of running the stage when its key is there.
    #[command(subcommand)]
    Cache(CacheCommand),
    /// (Internal) What a Slurm job of `qpipe build --executor slurm` runs: the instances a
    /// job spec names, after checking their keys.
    #[command(hide = true)]
    RunInstance {
        /// The job spec the submitting `qpipe build` wrote.
        #[arg(long, value_name = "FILE")]
        spec: PathBuf,
    },
}

/// Where `qpipe build` runs stages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ExecutorKind {
    /// In this process, on worker threads.
    Local,
    /// Each stale instance as a Slurm job (`sbatch`), followed until it ends.
    Slurm,
}

#[derive(Subcommand, Debug)]
pub enum CacheCommand {
    /// Remove cache entries stored more than DAYS days ago (and leftovers of interrupted stores).
    Gc {
        /// Age in days (0: everything).
        #[arg(long, value_name = "DAYS", default_value_t = 30.0)]
        older_than: f64,
    },
}

/// `-j N`: a whole number of at least 1 (`-j 0` would run nothing).
fn parse_jobs(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1 (the number of stages to run at once)".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("`{s}` is not a whole number")),
    }
}

#[derive(Args, Debug)]
pub struct BuildArgs {
    /// Targets (paths, stage ids, stage kinds) and overrides (KEY=VALUE).
    #[arg(value_name = "TARGET|KEY=VALUE")]
    pub args: Vec<String>,
    /// Show what would run, run nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Re-run the selected instances even when they are up to date.
    #[arg(long)]
    pub force: bool,
    /// Let an ad-hoc run (overrides) replace the files of a published run that it differs
    /// from; without it such a run is refused.
    #[arg(long)]
    pub overwrite_published: bool,
    /// Stages to run at once, at least 1 (default: the number of CPUs; with `--executor
    /// slurm`, 256 jobs in flight); exclusive stages, such as scoring, still run one at a
    /// time here (on Slurm each job has its own resources).
    #[arg(short, long, value_name = "N", value_parser = parse_jobs)]
    pub jobs: Option<usize>,
    /// Where stages run (default: `executor.default` in pipeline.yaml, else local). With
    /// `slurm` every stale instance is an `sbatch` job running this qpipe on a worker;
    /// resources per stage kind come from `executor.slurm` in pipeline.yaml.
    #[arg(long, value_enum, value_name = "EXECUTOR")]
    pub executor: Option<ExecutorKind>,
    /// With `--executor slurm`: resubmit a failed job up to N times.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub retries: usize,
    /// After a failure, go on with everything that does not depend on it (the default with
    /// `--executor slurm`).
    #[arg(short = 'k', long)]
    pub keep_going: bool,
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// Targets (paths, stage ids, stage kinds) and overrides (KEY=VALUE).
    #[arg(value_name = "TARGET|KEY=VALUE")]
    pub args: Vec<String>,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum DagFormat {
    Text,
    Dot,
    Mermaid,
    Json,
}

#[derive(Args, Debug)]
pub struct DagArgs {
    /// Targets (paths, stage ids, stage kinds) and overrides (KEY=VALUE).
    #[arg(value_name = "TARGET|KEY=VALUE")]
    pub args: Vec<String>,
    #[arg(long, value_enum, default_value = "text")]
    pub format: DagFormat,
}

#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// A pair folder, a run folder, or a folder name such as weight-int8-act-int8.
    #[arg(long, value_name = "PAIR|RUN|NAME")]
    pub parity: String,
    /// Compare the committed runs with this folder's run folders of the same name
    /// instead of rebuilding.
    #[arg(long, value_name = "DIR")]
    pub baseline: Option<PathBuf>,
    /// Largest allowed relative difference of a per-layer number.
    #[arg(long, value_name = "TOL")]
    pub rel: Option<f64>,
    /// Smallest allowed Spearman rank correlation of the sensitivities.
    #[arg(long, value_name = "R")]
    pub min_spearman: Option<f64>,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
    /// Stages to run at once during the rebuild, at least 1.
    #[arg(short, long, value_name = "N", value_parser = parse_jobs)]
    pub jobs: Option<usize>,
}

#[derive(Args, Debug)]
pub struct CleanArgs {
    /// List what would be deleted and the total size; delete nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Also empty qpipe's caches (tmp/qpipe/stat-cache.json, tmp/qpipe/verify/).
    #[arg(long)]
    pub cache: bool,
}

fn default_jobs() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// Run the process: parse `std::env::args`, print to stdout/stderr, return the exit code.
pub fn main(domain: &dyn Domain) -> i32 {
    let ui = Ui::stdio();
    let cwd = match std::env::current_dir() {
        Ok(d) => d,
        Err(e) => {
            ui.error(&anyhow::Error::new(e).context("cannot read the current directory"));
            return 1;
        }
    };
    run(std::env::args_os(), domain, &cwd, ui)
}

/// Run one command line against a domain, from `cwd`, printing through `ui`.
pub fn run<I, T>(args: I, domain: &dyn Domain, cwd: &Path, mut ui: Ui) -> i32
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let cli = match Cli::try_parse_from(args) {
        Ok(c) => c,
        Err(e) => {
            let code = e.exit_code();
            let text = e.render().to_string();
            if code == 0 {
                ui.out(&text);
            } else {
                ui.note(text.trim_end());
            }
            return code;
        }
    };
    ui.verbose = cli.verbose;
    let error_code = match cli.command {
        Command::Status(_) | Command::Verify(_) => 2,
        _ => 1,
    };
    match dispatch(cli, domain, cwd, &ui) {
        Ok(code) => code,
        Err(e) => {
            ui.error(&e);
            error_code
        }
    }
}

fn open<'d>(domain: &'d dyn Domain, cwd: &Path, pipeline: Option<&Path>) -> Result<Workspace<'d>> {
    let file = find_pipeline(cwd, pipeline)?;
    Workspace::open(domain, &file)
}

/// Plans the runs the overrides describe and prints the domain's warnings about them.
fn plan(ws: &Workspace<'_>, overrides: &[String], ui: &Ui) -> Result<crate::workspace::Planned> {
    let planned = ws.plan(overrides)?;
    for w in &planned.warnings {
        ui.warn(w);
    }
    Ok(planned)
}

fn dispatch(cli: Cli, domain: &dyn Domain, cwd: &Path, ui: &Ui) -> Result<i32> {
    let mut ws = open(domain, cwd, cli.pipeline.as_deref())?;
    match &cli.command {
        Command::Build(a) => ws.overwrite_published = a.overwrite_published,
        // They write nothing: show what such a run would mean, and warn that a build would
        // refuse it.
        Command::Status(_) | Command::Dag(_) => ws.published_guard_warns = true,
        Command::RunInstance { spec } => return crate::slurm::run_spec(&mut ws, spec, ui),
        _ => {}
    }
    match cli.command {
        Command::Build(a) => {
            let _lock = if a.dry_run { None } else { Some(BuildLock::acquire(&ws.root)?) };
            let (overrides, targets) = Workspace::split_args(&a.args);
            let planned = plan(&ws, &overrides, ui)?;
            let sel = planned.dag.select(&targets, cwd)?;
            let kind = match (a.executor, ws.pipeline.executor.default.as_deref()) {
                (Some(k), _) => k,
                (None, Some("slurm")) => ExecutorKind::Slurm,
                _ => ExecutorKind::Local,
            };
            let executor = match kind {
                ExecutorKind::Slurm if !a.dry_run => Some(std::sync::Arc::new(crate::slurm::Executor::new(
                    &ws,
                    &ws.pipeline.executor.slurm,
                    &overrides,
                    a.retries,
                )?)),
                _ => None,
            };
            if a.retries > 0 && kind != ExecutorKind::Slurm {
                bail!("--retries resubmits failed Slurm jobs: use it with `--executor slurm`");
            }
            let opts = BuildOptions {
                dry_run: a.dry_run,
                force: a.force,
                // Slurm queues the jobs: many may be in flight (each a polling thread here).
                jobs: a.jobs.unwrap_or_else(|| if executor.is_some() { 256 } else { default_jobs() }),
                keep_going: a.keep_going || kind == ExecutorKind::Slurm,
                executor,
            };
            let report = build(&ws, &planned, &sel, &opts, ui)?;
            if overrides.is_empty() && targets.is_empty() && !a.dry_run {
                // The whole publish matrix is built: forget what it no longer publishes.
                let keep = planned.dag.instances.iter().map(|i| i.id.as_str()).collect();
                let pruned = crate::lock::Locks::load(&ws.root)?.prune_committed(&keep)?;
                if pruned > 0 {
                    ui.status(
                        "Pruned",
                        &format!(
                            "{pruned} entries of {} the pipeline no longer publishes",
                            crate::lock::COMMITTED_LOCK
                        ),
                    );
                }
            }
            let selected = sel.iter().filter(|s| **s).count();
            let verb = if a.dry_run { "would run" } else { "ran" };
            ui.status(
                "Finished",
                &format!(
                    "{selected} instances ({} {verb}, {}{} fresh) in {:.2}s",
                    report.ran.len(),
                    if report.restored.is_empty() {
                        String::new()
                    } else {
                        format!("{} restored from the cache, ", report.restored.len())
                    },
                    report.fresh,
                    report.elapsed.as_secs_f64()
                ),
            );
            Ok(0)
        }
        Command::Status(a) => {
            let (overrides, targets) = Workspace::split_args(&a.args);
            let planned = plan(&ws, &overrides, ui)?;
            let sel = planned.dag.select(&targets, cwd)?;
            let st = status(&ws, &planned, &sel)?;
            let remote = crate::slurm::in_flight(&ws.root);
            if a.json {
                ui.out(&serde_json::to_string_pretty(&render_json(&planned, &st, &remote))?);
            } else {
                ui.out(&render_text(&planned, &st, &remote));
            }
            Ok(i32::from(st.iter().any(|x| x.stale())))
        }
        Command::Dag(a) => {
            let (overrides, targets) = Workspace::split_args(&a.args);
            let planned = plan(&ws, &overrides, ui)?;
            let sel = planned.dag.select(&targets, cwd)?;
            let d = &planned.dag;
            let text = match a.format {
                DagFormat::Text => d.to_text(&sel),
                DagFormat::Dot => d.to_dot(&sel),
                DagFormat::Mermaid => d.to_mermaid(&sel),
                DagFormat::Json => serde_json::to_string_pretty(&d.to_json(&sel))?,
            };
            ui.out(&text);
            Ok(0)
        }
        Command::Verify(a) => {
            let _lock = BuildLock::acquire(&ws.root)?;
            let mut tol = Tolerance::default();
            if let Some(r) = a.rel {
                tol.rel = r;
            }
            if let Some(r) = a.min_spearman {
                tol.min_spearman = r;
            }
            let opts = VerifyOptions {
                selector: a.parity,
                baseline: a.baseline,
                tol,
                jobs: a.jobs.unwrap_or_else(default_jobs),
            };
            let outcome = verify(&ws, &opts, cwd, ui)?;
            if a.json {
                ui.out(&serde_json::to_string_pretty(&outcome.to_json())?);
            } else {
                ui.out(&outcome.to_text());
            }
            Ok(outcome.exit_code())
        }
        Command::RunInstance { .. } => unreachable!("dispatched above"),
        Command::Cache(CacheCommand::Gc { older_than }) => {
            let Some(store) = ws.store() else {
                bail!("no cache is configured: set `cache.dir` in the pipeline file or {}", crate::store::ENV);
            };
            if !(older_than >= 0.0 && older_than.is_finite()) {
                bail!("--older-than {older_than}: give a number of days, 0 or more");
            }
            let (entries, bytes) = store.gc(std::time::Duration::from_secs_f64(older_than * 86400.0))?;
            ui.status(
                "Removed",
                &format!("{entries} cache entries, {} total, from `{}`", human_bytes(bytes), store.dir().display()),
            );
            Ok(0)
        }
        Command::Clean(a) => {
            let _lock = if a.dry_run { None } else { Some(BuildLock::acquire(&ws.root)?) };
            let plan = plan_clean(&ws, a.cache)?;
            let mut listing = String::new();
            for (f, b) in &plan.files {
                listing.push_str(&format!("{f}  ({})\n", human_bytes(*b)));
            }
            for c in &plan.caches {
                listing.push_str(&format!("{c}  (cache)\n"));
            }
            if a.dry_run {
                if !listing.is_empty() {
                    ui.out(&listing);
                }
                ui.status(
                    "Would remove",
                    &format!("{} files, {} total", plan.files.len() + plan.caches.len(), human_bytes(plan.bytes())),
                );
            } else {
                let removed = execute(&ws.root, &plan).context("clean stopped")?;
                if ui.verbose && !listing.is_empty() {
                    ui.out(&listing);
                }
                ui.status("Removed", &format!("{} files, {} total", removed.len(), human_bytes(plan.bytes())));
            }
            Ok(0)
        }
    }
}
