//! `qpipe build --executor slurm`: each stale instance (a fused group: one job for the
//! group) becomes one `sbatch` job that runs this same `qpipe` binary on a worker, as
//! `qpipe run-instance --spec FILE`, on the shared filesystem.
//!
//! How the pieces fit:
//!
//! - **Dependencies are tracked by the submitter, not by `--dependency=afterok`.** An
//!   instance's key is made from its inputs' bytes, so it is only known once its producers
//!   have finished *and* the submitter has moved their outputs into place and hashed them.
//!   The scheduler submits an instance when that is done — the same point where it would
//!   start it locally — and polls `scontrol show job` until the job ends. So a job never
//!   starts before what it reads is committed, a failed producer's consumers are never
//!   submitted, and nothing is left pending in the queue after a failure.
//! - **The worker re-checks the key** (`run_spec`): it plans the same runs, computes the
//!   instance's key from the inputs it sees and refuses to run when it differs from the
//!   submitter's, so a job never runs stale or different work.
//! - **Outputs go to the temporary paths the submitter chose**, beside the final ones; the
//!   worker writes a small result file; the submitter renames the outputs into place, hashes
//!   them and writes the lock. Only the submitting process ever writes `qpipe.lock`.
//! - **Control**: a failed job's error names the job id and shows the tail of its stderr;
//!   `--retries N` resubmits a failed job; SIGINT/SIGTERM cancel every job in flight
//!   (`scancel`) before qpipe exits; `qpipe status` shows which instances are queued or
//!   running (the jobs file, [`JOBS_FILE`], checked against `squeue`).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use qpipe_contract::{Job, JobFile};
use serde::{Deserialize, Serialize};

use crate::check::Checker;
use crate::config::SlurmConfig;
use crate::hashing::StatCache;
use crate::lock::Locks;
use crate::ui::Ui;
use crate::workspace::{Workspace, STAT_CACHE};

/// Where job specs, results and logs go (below the workspace root).
pub const SLURM_DIR: &str = "tmp/qpipe/slurm";
/// The submitter's record of its jobs in flight, for `qpipe status`.
pub const JOBS_FILE: &str = "tmp/qpipe/slurm/jobs.json";

/// One instance of a job: what the worker runs and where it writes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SpecInstance {
    pub id: String,
    /// The key the submitter computed; the worker refuses to run under another.
    pub key: String,
    /// Output name → the temporary path to write.
    pub outs: BTreeMap<String, PathBuf>,
}

/// What `qpipe run-instance --spec FILE` reads.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Spec {
    /// The build's overrides: the worker plans the same runs.
    pub overrides: Vec<String>,
    /// `--overwrite-published` of the build (it changes what may be planned).
    pub overwrite_published: bool,
    pub instances: Vec<SpecInstance>,
    /// Where the worker writes each instance's outcome ([`Outcomes`]).
    pub result: PathBuf,
}

/// The worker's outcome per instance id: `null` for success, else the error.
type Outcomes = BTreeMap<String, Option<String>>;

/// A Slurm job's state, from `scontrol show job`.
#[derive(Debug, Clone, PartialEq)]
pub struct JobState {
    pub state: String,
    pub exit_code: String,
    pub node: String,
    pub reason: String,
}

impl JobState {
    /// `scontrol show job -o ID`'s one line, `Key=Value` pairs.
    pub fn parse(line: &str) -> Option<JobState> {
        let field = |k: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(k).and_then(|v| v.strip_prefix('=')))
                .map(str::to_string)
        };
        Some(JobState {
            state: field("JobState")?,
            exit_code: field("ExitCode").unwrap_or_default(),
            node: field("NodeList").filter(|n| n != "(null)").unwrap_or_default(),
            reason: field("Reason").filter(|r| r != "None").unwrap_or_default(),
        })
    }

    /// Whether the job has ended (any way).
    pub fn ended(&self) -> bool {
        !matches!(
            self.state.as_str(),
            "PENDING" | "RUNNING" | "CONFIGURING" | "COMPLETING" | "SUSPENDED" | "REQUEUED" | "RESIZING" | "STAGE_OUT"
        )
    }
}

/// Job ids in flight, for the signal handler.
fn live_jobs() -> &'static Mutex<BTreeMap<String, String>> {
    static LIVE: OnceLock<Mutex<BTreeMap<String, String>>> = OnceLock::new();
    LIVE.get_or_init(Default::default)
}

/// SIGINT/SIGTERM: cancel every job in flight, then exit 130. Installed once per process.
fn install_signal_handler() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let r = ctrlc::set_handler(|| {
            let jobs: Vec<(String, String)> =
                live_jobs().lock().map(|m| m.iter().map(|(j, i)| (j.clone(), i.clone())).collect()).unwrap_or_default();
            if !jobs.is_empty() {
                let ids: Vec<&str> = jobs.iter().map(|(j, _)| j.as_str()).collect();
                let ok = Command::new("scancel").args(&ids).status().is_ok_and(|s| s.success());
                eprintln!(
                    "qpipe: interrupted; {} {} Slurm job(s): {}",
                    if ok { "cancelled" } else { "could not cancel (scancel failed)" },
                    ids.len(),
                    jobs.iter().map(|(j, i)| format!("{j} ({i})")).collect::<Vec<_>>().join(", ")
                );
            }
            std::process::exit(130);
        });
        if let Err(e) = r {
            eprintln!("warning: cannot catch Ctrl-C ({e}); interrupting qpipe will leave its Slurm jobs running");
        }
    });
}

/// Submits and follows jobs for one build.
#[derive(Debug)]
pub struct Executor {
    cfg: SlurmConfig,
    root: PathBuf,
    pipeline_file: PathBuf,
    exe: PathBuf,
    overrides: Vec<String>,
    overwrite_published: bool,
    retries: usize,
    poll: Duration,
    /// id → job id and state, mirrored to [`JOBS_FILE`].
    jobs: Mutex<BTreeMap<String, (String, String)>>,
}

impl Executor {
    /// An executor for a build of `ws` with these overrides. Fails early when `sbatch` is
    /// not on the PATH.
    pub fn new(ws: &Workspace<'_>, cfg: &SlurmConfig, overrides: &[String], retries: usize) -> Result<Executor> {
        if !on_path("sbatch") {
            bail!(
                "`--executor slurm`: `sbatch` is not on the PATH; run qpipe on a Slurm login node (or use \
                 `--executor local`)"
            );
        }
        let exe = std::env::current_exe().context("cannot find the qpipe executable to run on the workers")?;
        std::fs::create_dir_all(ws.root.join(SLURM_DIR))
            .with_context(|| format!("cannot create `{}`", ws.root.join(SLURM_DIR).display()))?;
        install_signal_handler();
        Ok(Executor {
            cfg: cfg.clone(),
            root: ws.root.clone(),
            pipeline_file: std::fs::canonicalize(&ws.pipeline.file).unwrap_or_else(|_| ws.pipeline.file.clone()),
            exe,
            overrides: overrides.to_vec(),
            overwrite_published: ws.overwrite_published,
            retries,
            poll: Duration::from_secs_f64(cfg.poll_seconds.unwrap_or(2.0)),
            jobs: Mutex::new(BTreeMap::new()),
        })
    }

    /// Whether instances of `kind` run on the cluster (not `local: true`).
    pub fn remote(&self, kind: &str) -> bool {
        !self.cfg.stages.get(kind).is_some_and(|s| s.local)
    }

    /// The `sbatch` arguments of a job of `kind` (before `--wrap`).
    pub fn sbatch_args(&self, kind: &str, name: &str, log: &Path) -> Vec<String> {
        let mut a = vec![
            "--parsable".to_string(),
            format!("--job-name={name}"),
            format!("--chdir={}", self.root.display()),
            format!("--output={}.out", log.display()),
            format!("--error={}.err", log.display()),
        ];
        a.extend(self.cfg.partition.iter().map(|p| format!("--partition={p}")));
        a.extend(self.cfg.account.iter().map(|p| format!("--account={p}")));
        a.extend(self.cfg.time.iter().map(|p| format!("--time={p}")));
        a.extend(self.cfg.sbatch_args.iter().cloned());
        if let Some(s) = self.cfg.stages.get(kind) {
            a.extend(s.sbatch_args.iter().cloned());
        }
        a
    }

    /// Runs a group of instances of `kind` (one, or a fused group) as one Slurm job, and
    /// again up to `--retries` times while it fails; one result per instance.
    pub fn run(&self, ui: &Ui, kind: &str, group: &[SpecInstance]) -> Vec<Result<()>> {
        let mut attempt = 0;
        loop {
            let results = match self.run_once(ui, kind, group) {
                Ok(r) => r,
                Err(e) => {
                    let msg = format!("{e:#}");
                    group.iter().map(|_| Err(anyhow!("{msg}"))).collect()
                }
            };
            if attempt >= self.retries || results.iter().all(Result::is_ok) {
                return results;
            }
            attempt += 1;
            let e = results.iter().find_map(|r| r.as_ref().err()).map(|e| format!("{e:#}")).unwrap_or_default();
            let first = e.lines().next().unwrap_or_default();
            ui.warn(&format!("`{}`: {first}; retrying ({attempt} of {})", group[0].id, self.retries));
        }
    }

    fn run_once(&self, ui: &Ui, kind: &str, group: &[SpecInstance]) -> Result<Vec<Result<()>>> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let tag = format!("{}-{}-{n}", sanitize(&group[0].id), std::process::id());
        let dir = self.root.join(SLURM_DIR);
        let (spec_path, result, log) =
            (dir.join(format!("{tag}.spec.json")), dir.join(format!("{tag}.result.json")), dir.join(&tag));
        let _ = std::fs::remove_file(&result);
        let spec = Spec {
            overrides: self.overrides.clone(),
            overwrite_published: self.overwrite_published,
            instances: group.to_vec(),
            result: result.clone(),
        };
        crate::atomic::write_atomic(&spec_path, serde_json::to_string_pretty(&spec)?.as_bytes())?;
        let name = format!("qpipe:{}", group[0].id);
        let wrap = format!(
            "exec {} --pipeline {} run-instance --spec {}",
            shell_quote(&self.exe.to_string_lossy()),
            shell_quote(&self.pipeline_file.to_string_lossy()),
            shell_quote(&spec_path.to_string_lossy())
        );
        let mut args = self.sbatch_args(kind, &name, &log);
        args.push(format!("--wrap={wrap}"));
        let out = Command::new("sbatch").args(&args).output().context("cannot run `sbatch`")?;
        if !out.status.success() {
            bail!(
                "`sbatch` refused the job of `{}`: {}(arguments: {})",
                group[0].id,
                String::from_utf8_lossy(&out.stderr),
                args[..args.len() - 1].join(" ")
            );
        }
        let job = String::from_utf8_lossy(&out.stdout).trim().split(';').next().unwrap_or_default().to_string();
        if job.is_empty() {
            bail!("`sbatch` printed no job id for `{}`", group[0].id);
        }
        live_jobs().lock().expect("not poisoned").insert(job.clone(), group[0].id.clone());
        let ids: Vec<&str> = group.iter().map(|g| g.id.as_str()).collect();
        ui.status("Submitted", &format!("{} (Slurm job {job})", ids.join(", ")));
        self.record(&ids, Some((&job, "PENDING")));
        let end = self.follow(ui, &job, &ids);
        live_jobs().lock().expect("not poisoned").remove(&job);
        self.record(&ids, None);
        let end = end?;
        let outcomes: Option<Outcomes> = std::fs::read(&result).ok().and_then(|b| serde_json::from_slice(&b).ok());
        let _ = std::fs::remove_file(&result);
        let _ = std::fs::remove_file(&spec_path);
        let why = |what: &str| {
            let err = format!("{}.err", log.display());
            format!(
                "Slurm job {job} {what}{}; the last lines of its stderr (`{err}`):\n{}",
                if end.node.is_empty() { String::new() } else { format!(" on {}", end.node) },
                tail(Path::new(&err), 15)
            )
        };
        Ok(group
            .iter()
            .map(|g| match outcomes.as_ref().and_then(|o| o.get(&g.id)) {
                Some(None) if end.state == "COMPLETED" => Ok(()),
                Some(Some(e)) => Err(anyhow!("{e}\n{}", why(&format!("failed ({})", end.state)))),
                _ => Err(anyhow!(
                    "{}",
                    why(&format!(
                        "ended {} (exit code {}){}",
                        end.state,
                        end.exit_code,
                        if end.reason.is_empty() { String::new() } else { format!(", reason {}", end.reason) }
                    ))
                )),
            })
            .collect())
    }

    /// Polls the job until it ends; says when it starts running.
    fn follow(&self, ui: &Ui, job: &str, ids: &[&str]) -> Result<JobState> {
        let mut last = String::new();
        let mut misses = 0;
        loop {
            match scontrol(job) {
                Some(s) => {
                    misses = 0;
                    if s.state != last {
                        if s.state == "RUNNING" {
                            ui.status("Running", &format!("{} on {} (Slurm job {job})", ids.join(", "), s.node));
                        }
                        self.record(ids, Some((job, &s.state)));
                        last = s.state.clone();
                    }
                    if s.ended() {
                        return Ok(s);
                    }
                }
                // Purged already (a job that ended longer than MinJobAge ago), or the
                // controller did not answer: the result file says how it went.
                None => {
                    misses += 1;
                    if misses >= 3 {
                        return Ok(JobState {
                            state: "UNKNOWN".into(),
                            exit_code: "?".into(),
                            node: String::new(),
                            reason: "scontrol no longer knows the job".into(),
                        });
                    }
                }
            }
            std::thread::sleep(self.poll);
        }
    }

    /// Updates [`JOBS_FILE`] (`None`: the instances are no longer in flight).
    fn record(&self, ids: &[&str], job: Option<(&str, &str)>) {
        let mut jobs = self.jobs.lock().expect("not poisoned");
        for id in ids {
            match job {
                Some((j, s)) => jobs.insert(id.to_string(), (j.to_string(), s.to_string())),
                None => jobs.remove(*id),
            };
        }
        let doc: BTreeMap<&String, serde_json::Value> =
            jobs.iter().map(|(id, (j, s))| (id, serde_json::json!({"job": j, "state": s}))).collect();
        let text = serde_json::to_string_pretty(&serde_json::json!({ "jobs": doc })).unwrap_or_default();
        let _ = crate::atomic::write_atomic(&self.root.join(JOBS_FILE), text.as_bytes());
    }
}

/// An instance in flight on the cluster, as `qpipe status` shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct RemoteJob {
    pub job: String,
    /// Slurm's state now (`PENDING`, `RUNNING`, …).
    pub state: String,
    pub node: String,
}

impl RemoteJob {
    /// `queued` or `running`.
    pub fn word(&self) -> &'static str {
        if self.state == "PENDING" {
            "queued"
        } else {
            "running"
        }
    }
}

/// The instances a build has in flight on the cluster right now: the jobs file, each job
/// confirmed by `squeue` (a build that was killed leaves a file naming jobs that are gone).
pub fn in_flight(root: &Path) -> HashMap<String, RemoteJob> {
    let Ok(text) = std::fs::read_to_string(root.join(JOBS_FILE)) else { return HashMap::new() };
    let Ok(doc) = serde_json::from_str::<serde_json::Value>(&text) else { return HashMap::new() };
    let Some(jobs) = doc["jobs"].as_object().filter(|j| !j.is_empty()) else { return HashMap::new() };
    let ids: Vec<&str> = jobs.values().filter_map(|v| v["job"].as_str()).collect();
    let Ok(out) = Command::new("squeue").args(["-h", "-o", "%i|%T|%N", "-j", &ids.join(",")]).output() else {
        return HashMap::new();
    };
    let live: HashMap<String, (String, String)> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut p = l.split('|');
            Some((
                p.next()?.trim().to_string(),
                (p.next()?.trim().to_string(), p.next().unwrap_or("").trim().to_string()),
            ))
        })
        .collect();
    jobs.iter()
        .filter_map(|(id, v)| {
            let job = v["job"].as_str()?;
            let (state, node) = live.get(job)?;
            Some((id.clone(), RemoteJob { job: job.to_string(), state: state.clone(), node: node.clone() }))
        })
        .collect()
}

/// `qpipe run-instance --spec FILE`: what a Slurm job runs. Plans the build's runs, checks
/// each instance's key against the submitter's, runs them (fused when several) into the
/// given paths and writes the outcomes. Never writes the lock or the stat cache.
pub fn run_spec(ws: &mut Workspace<'_>, spec_file: &Path, ui: &Ui) -> Result<i32> {
    let spec: Spec = serde_json::from_slice(
        &std::fs::read(spec_file).with_context(|| format!("cannot read job spec `{}`", spec_file.display()))?,
    )
    .with_context(|| format!("job spec `{}` is not valid", spec_file.display()))?;
    ws.overwrite_published = spec.overwrite_published;
    let planned = ws.plan(&spec.overrides)?;
    let dag = &planned.dag;
    let locks = Locks::load(&ws.root)?;
    let mut cache = StatCache::load(ws.root.join(STAT_CACHE));
    let mut nodes = Vec::new();
    let mut outcomes: Outcomes = BTreeMap::new();
    for s in &spec.instances {
        let i = dag
            .instances
            .iter()
            .position(|x| x.id == s.id)
            .with_context(|| format!("instance `{}` is not in the plan of `{}`", s.id, spec.overrides.join(" ")))?;
        let ev = Checker { ws, dag, cache: &mut cache }.evaluate(&locks, i)?;
        match ev.key {
            Some(k) if k == s.key => nodes.push((i, s)),
            k => {
                outcomes.insert(
                    s.id.clone(),
                    Some(format!(
                        "`{}` is not the work that was submitted: its key here is {}, the submitter's {} (its inputs, \
                         parameters or qpipe itself differ on this node); not running it",
                        s.id,
                        k.as_deref().unwrap_or("unknown (an input is missing)"),
                        s.key
                    )),
                );
            }
        }
    }
    if let Some((i, _)) = nodes.first() {
        let kind = &dag.instances[*i].kind;
        let stage = ws.stage(kind)?;
        let files: Vec<(Vec<JobFile>, Vec<JobFile>, Vec<JobFile>)> = nodes
            .iter()
            .map(|(i, s)| {
                let (deps, finals) = crate::workspace::job_files(ws, dag, *i);
                let outs = dag.instances[*i]
                    .outs
                    .iter()
                    .map(|o| JobFile { name: o.name.clone(), path: s.outs.get(&o.name).cloned().unwrap_or_default() })
                    .collect();
                (deps, outs, finals)
            })
            .collect();
        let progress = ui.stage_progress(&dag.instances[*i].id);
        let jobs: Vec<Job> = nodes
            .iter()
            .zip(&files)
            .map(|((i, _), (deps, outs, finals))| {
                crate::workspace::job(&dag.instances[*i], &ws.root, (deps, outs, finals), &progress)
            })
            .collect();
        for ((_, s), o) in nodes.iter().zip(&files) {
            if o.1.iter().any(|f| f.path.as_os_str().is_empty()) {
                bail!("job spec `{}` gives no path for an output of `{}`", spec_file.display(), s.id);
            }
        }
        let results = if jobs.len() == 1 { vec![stage.run(&jobs[0])] } else { stage.run_fused(&jobs) };
        for ((_, s), r) in nodes.iter().zip(results) {
            if let Err(e) = &r {
                ui.error(&anyhow!("{e:#}").context(format!("stage `{}` failed", s.id)));
            }
            outcomes.insert(s.id.clone(), r.err().map(|e| format!("{e:#}")));
        }
    }
    for (id, o) in &outcomes {
        if let Some(e) = o.as_ref().filter(|_| !nodes.iter().any(|(_, s)| &s.id == id)) {
            ui.error(&anyhow!("{e}"));
        }
    }
    crate::atomic::write_atomic(&spec.result, serde_json::to_string_pretty(&outcomes)?.as_bytes())?;
    Ok(i32::from(outcomes.values().any(Option::is_some)))
}

/// `scontrol show job -o ID`, parsed; `None` when it fails (unknown job, no controller).
fn scontrol(job: &str) -> Option<JobState> {
    let out = Command::new("scontrol").args(["show", "job", "-o", job]).output().ok()?;
    if !out.status.success() {
        return None;
    }
    JobState::parse(String::from_utf8_lossy(&out.stdout).lines().next()?)
}

/// The last `n` lines of a file, indented (or a note that it cannot be read).
fn tail(path: &Path, n: usize) -> String {
    match std::fs::read_to_string(path) {
        Ok(t) => {
            let lines: Vec<&str> = t.lines().collect();
            let from = lines.len().saturating_sub(n);
            if lines.is_empty() {
                "  (empty)".into()
            } else {
                lines[from..].iter().map(|l| format!("  | {l}")).collect::<Vec<_>>().join("\n")
            }
        }
        Err(e) => format!("  (cannot read it: {e})"),
    }
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
}

/// An id as a file name part: `score@models/x/y` → `score-models-x-y`.
fn sanitize(id: &str) -> String {
    let s: String =
        id.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' || c == '.' { c } else { '-' }).collect();
    let s = s.trim_matches('-');
    // Keep names short: the tail of the id says the most (run folder, pair).
    let start = s.len().saturating_sub(80);
    s[start..].to_string()
}

/// `s` single-quoted for `sh`.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scontrol_lines_parse() {
        let l = "JobId=12 JobName=qpipe:score@x UserId=root(0) JobState=RUNNING Reason=None Dependency=(null) \
                 ExitCode=0:0 NodeList=vm BatchHost=vm";
        let s = JobState::parse(l).unwrap();
        assert_eq!(
            s,
            JobState { state: "RUNNING".into(), exit_code: "0:0".into(), node: "vm".into(), reason: "".into() }
        );
        assert!(!s.ended());
        let l = "JobId=13 JobState=CANCELLED Reason=None ExitCode=0:15 NodeList=(null)";
        let s = JobState::parse(l).unwrap();
        assert!(s.ended() && s.node.is_empty() && s.exit_code == "0:15");
        let s = JobState::parse("JobId=14 JobState=PENDING Reason=Resources ExitCode=0:0").unwrap();
        assert_eq!((s.reason.as_str(), s.ended()), ("Resources", false));
        assert!(JobState::parse("slurm_load_jobs error: Invalid job id specified").is_none());
    }

    #[test]
    fn names_and_quoting() {
        assert_eq!(sanitize("score@models/a b/c"), "score-models-a-b-c");
        assert!(sanitize(&"x".repeat(200)).len() <= 80);
        assert_eq!(shell_quote("/a/it's"), r"'/a/it'\''s'");
    }
}
