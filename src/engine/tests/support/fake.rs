//! A fake domain for engine tests and benchmarks: three trivial stage kinds that copy and
//! annotate text files, shaped like the real pipeline (a shared `prep` per source feeding
//! a `score` and a `render` per run). Shared by `tests/` and `benches/`.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use anyhow::{bail, Context, Result};
use qpipe_contract::{DepSpec, Domain, Instance, Job, OutSpec, ParityReport, Plan, PlanContext, Run, Stage, Tolerance};
use serde_json::{json, Value};

/// The test pipeline the fake domain understands.
pub const PIPELINE: &str = r#"version: 1
defaults: {source: a}
config:
  size: small
  scale: 1
  fail: false
  panic: false
  sleep_ms: 0
  stall_ms: 0
  cycle: false
  escape: false
  summary: false
  out_dir: out/${source.name}/${size}
  runner: {output_dir: null}
groups:
  source:
    a: {path: data/a.txt}
    b: {path: data/b.txt}
publish:
  - source: [a, b]
    size: [small, large]
"#;

/// Shared record of what ran.
#[derive(Default)]
pub struct Log {
    pub ran: Mutex<Vec<String>>,
    pub running: AtomicUsize,
    pub max_running: AtomicUsize,
    pub exclusive_running: AtomicUsize,
    pub max_exclusive: AtomicUsize,
    /// The instance ids of each fused execution.
    pub fused: Mutex<Vec<Vec<String>>>,
}

impl Log {
    pub fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.ran.lock().unwrap())
    }
    fn enter(&self, exclusive: bool) {
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_running.fetch_max(now, Ordering::SeqCst);
        if exclusive {
            let now = self.exclusive_running.fetch_add(1, Ordering::SeqCst) + 1;
            self.max_exclusive.fetch_max(now, Ordering::SeqCst);
        }
    }
    fn leave(&self, id: &str, exclusive: bool) {
        self.running.fetch_sub(1, Ordering::SeqCst);
        if exclusive {
            self.exclusive_running.fetch_sub(1, Ordering::SeqCst);
        }
        self.ran.lock().unwrap().push(id.to_string());
    }
}

pub struct FakeStage {
    /// Append a run counter to the output (a non-deterministic stage).
    pub nondeterministic: std::sync::atomic::AtomicBool,
    kind: &'static str,
    version: Mutex<&'static str>,
    exclusive: bool,
    log: &'static Log,
}

impl FakeStage {
    pub fn set_version(&self, v: &'static str) {
        *self.version.lock().unwrap() = v;
    }
}

fn read(p: &Path) -> Result<String> {
    std::fs::read_to_string(p).with_context(|| format!("cannot read `{}`", p.display()))
}

fn write(p: &Path, s: &str) -> Result<()> {
    std::fs::write(p, s).with_context(|| format!("cannot write `{}`", p.display()))
}

impl Stage for FakeStage {
    fn kind(&self) -> &'static str {
        self.kind
    }
    fn code_version(&self) -> &'static str {
        *self.version.lock().unwrap()
    }
    fn exclusive(&self) -> bool {
        self.exclusive
    }
    fn run(&self, job: &Job<'_>) -> Result<()> {
        self.log.enter(self.exclusive);
        let r = self.work(job);
        self.log.leave(job.id, self.exclusive);
        r
    }
    /// `+fuse=true` (a locator, so not in the key): score instances of one `scale` fuse.
    fn fusion_key(&self, inst: &Instance) -> Option<String> {
        (self.kind == "score" && inst.locators["fuse"] == json!(true)).then(|| inst.params["scale"].to_string())
    }
    fn run_fused(&self, jobs: &[Job<'_>]) -> Vec<Result<()>> {
        self.log.fused.lock().unwrap().push(jobs.iter().map(|j| j.id.to_string()).collect());
        jobs.iter().map(|j| self.run(j)).collect()
    }
}

impl FakeStage {
    fn work(&self, job: &Job<'_>) -> Result<()> {
        let p = job.params;
        if let Some(ms) = p.get("sleep_ms").and_then(Value::as_u64) {
            std::thread::sleep(std::time::Duration::from_millis(ms));
        }
        match self.kind {
            "prep" => {
                let mut text = read(job.dep("source")?)?.to_uppercase();
                if self.nondeterministic.load(Ordering::SeqCst) {
                    text.push_str(&format!(" #{}", self.log.ran.lock().unwrap().len()));
                }
                write(job.out("prepared")?, &text)
            }
            "score" => {
                let input = read(job.dep("prepared")?)?;
                let result = format!("result of {} size={} scale={}\n", input.trim(), p["size"], p["scale"]);
                job.progress.phase("scoring", Some(2));
                job.progress.advance(2);
                if p["fail"] == json!(true) {
                    write(job.out("result")?, "half a resu")?;
                    bail!("scoring failed half-way (fail=true)");
                }
                if let Some(ms) = p.get("stall_ms").and_then(Value::as_u64).filter(|ms| *ms > 0) {
                    write(job.out("result")?, "half a resu")?;
                    std::thread::sleep(std::time::Duration::from_millis(ms));
                }
                if p["panic"] == json!(true) {
                    write(job.out("result")?, "half a resu")?;
                    panic!("scoring panicked half-way (panic=true)");
                }
                write(job.out("state")?, &format!("state {}", input.trim()))?;
                write(job.out("result")?, &result)
            }
            "render" => write(job.out("report")?, &format!("# report\n{}", read(job.dep("result")?)?)),
            "loop" => write(job.out("loop")?, "x"),
            "summary" => {
                let n = walkdir::WalkDir::new(job.dep("dir")?)
                    .into_iter()
                    .flatten()
                    .filter(|e| e.file_type().is_file())
                    .count();
                write(job.out("summary")?, &format!("{n} files"))
            }
            other => bail!("unknown fake kind {other}"),
        }
    }
}

/// The fake domain.
pub struct Fake {
    pub log: &'static Log,
    pub prep: FakeStage,
    pub score: FakeStage,
    pub render: FakeStage,
    pub looper: FakeStage,
    pub summary: FakeStage,
}

impl Fake {
    pub fn new(exclusive_score: bool) -> Fake {
        let log: &'static Log = Box::leak(Box::default());
        let st = |kind, exclusive| FakeStage {
            nondeterministic: Default::default(),
            kind,
            version: Mutex::new("v1"),
            exclusive,
            log,
        };
        Fake {
            log,
            prep: st("prep", false),
            score: st("score", exclusive_score),
            render: st("render", false),
            looper: st("loop", false),
            summary: st("summary", false),
        }
    }
}

fn s(v: &Value, key: &str) -> Result<String> {
    v.pointer(key).and_then(Value::as_str).map(str::to_string).with_context(|| format!("key `{key}` missing"))
}

impl Domain for Fake {
    fn stages(&self) -> Vec<&dyn Stage> {
        vec![&self.prep, &self.score, &self.render, &self.looper, &self.summary]
    }

    fn plan(&self, _ctx: &PlanContext, runs: &[Run]) -> Result<Plan> {
        let mut out: Vec<Instance> = Vec::new();
        let warnings = runs.iter().filter_map(|r| r.config["warn"].as_str().map(str::to_string)).collect();
        let mut push = |i: Instance| {
            if !out.iter().any(|o| o.id == i.id) {
                out.push(i);
            }
        };
        for run in runs {
            let c = &run.config;
            let name = s(c, "/source/name")?;
            // `runner.output_dir` redirects a run (what `qpipe verify` uses).
            let out_dir = match c.pointer("/runner/output_dir").and_then(Value::as_str) {
                Some(dir) => PathBuf::from(dir),
                None => PathBuf::from(s(c, "/out_dir")?),
            };
            let prep_out = PathBuf::from(format!("tmp/prep/{name}.txt"));
            push(Instance {
                id: format!("prep@{name}"),
                kind: "prep".into(),
                params: json!({}),
                locators: json!({}),
                deps: vec![DepSpec::new("source", s(c, "/source/path")?)],
                outs: vec![OutSpec::intermediate("prepared", &prep_out)],
                description: format!("prepare {name}"),
            });
            let mut score_outs = vec![
                OutSpec::intermediate("state", out_dir.join("state.pt")),
                OutSpec::tracked("result", out_dir.join("result.txt")),
            ];
            if c["escape"] == json!(true) {
                score_outs.push(OutSpec::tracked("escaped", "../escaped.txt"));
            }
            let run_id = out_dir.display().to_string();
            push(Instance {
                id: format!("score@{run_id}"),
                kind: "score".into(),
                params: json!({"size": c["size"], "scale": c["scale"], "fail": c["fail"], "panic": c["panic"],
                               "sleep_ms": c["sleep_ms"], "stall_ms": c["stall_ms"]}),
                locators: if c.get("fuse").is_some() { json!({"fuse": c["fuse"]}) } else { json!({}) },
                deps: vec![DepSpec::new("prepared", prep_out.clone())],
                outs: score_outs,
                description: format!("score {name} ({})", c["size"]),
            });
            push(Instance {
                id: format!("render@{run_id}"),
                kind: "render".into(),
                params: json!({}),
                locators: json!({}),
                deps: vec![DepSpec::new("result", out_dir.join("result.txt"))],
                outs: vec![OutSpec::tracked("report", out_dir.join("report.md"))],
                description: format!("report for {run_id}"),
            });
            if c["summary"] == json!(true) {
                push(Instance {
                    id: format!("summary@{name}"),
                    kind: "summary".into(),
                    params: json!({}),
                    locators: json!({}),
                    deps: vec![DepSpec::new("dir", format!("out/{name}"))],
                    outs: vec![OutSpec::tracked("summary", format!("summaries/{name}.md"))],
                    description: format!("summary of out/{name}"),
                });
            }
            if c["cycle"] == json!(true) {
                for (a, b) in [("a", "b"), ("b", "a")] {
                    push(Instance {
                        id: format!("loop@{a}"),
                        kind: "loop".into(),
                        params: json!({}),
                        locators: json!({}),
                        deps: vec![DepSpec::new("loop", format!("loop/{b}.txt"))],
                        outs: vec![OutSpec::tracked("loop", format!("loop/{a}.txt"))],
                        description: "a cycle".into(),
                    });
                }
            }
        }
        Ok(Plan { instances: out, warnings })
    }

    fn compare(&self, committed: &Path, candidate: &Path, _tol: &Tolerance) -> ParityReport {
        let mut r = ParityReport { run_dir: committed.to_path_buf(), ..Default::default() };
        match (read(&committed.join("result.txt")), read(&candidate.join("result.txt"))) {
            (Ok(a), Ok(b)) if a == b => {
                r.figures.insert("layers".into(), json!(1));
            }
            (Ok(_), Ok(_)) => r.drift.push("result.txt differs".into()),
            (Err(e), _) | (_, Err(e)) => r.errors.push(format!("{e:#}")),
        }
        r
    }
}
