//! `qpipe build`: run the stale instances of a selection in dependency order.
//!
//! The main thread checks instances as their producers finish, launches stale ones on
//! worker threads (up to `-j`, at most one `exclusive` stage at a time), and on each
//! success renames the temporary outputs into place, hashes them and writes the lock
//! entry last. A failed stage leaves its old outputs and lock entry untouched.

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use qpipe_contract::{Job, JobFile};
use tempfile::TempPath;

use crate::check::{Checker, Eval, Reason};
use crate::hashing::StatCache;
use crate::lock::{LockEntry, LockedDep, LockedOut, Locks};
use crate::ui::Ui;
use crate::workspace::{Planned, Workspace, STAT_CACHE};

/// Lock entries of stages quicker than this are written in batches.
const LOCK_BATCH: Duration = Duration::from_millis(100);

#[derive(Debug, Clone)]
pub struct BuildOptions {
    pub dry_run: bool,
    pub force: bool,
    pub jobs: usize,
}

/// What a build did.
#[derive(Debug, Default)]
pub struct BuildReport {
    /// Ids of the instances that ran (or would run, with `--dry-run`), in completion order.
    pub ran: Vec<String>,
    pub fresh: usize,
    pub elapsed: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum State {
    Waiting,
    Queued,
    Running,
    Done,
    Failed,
}

struct Finished {
    node: usize,
    result: Result<()>,
    temps: Vec<TempPath>,
    elapsed: Duration,
}

/// Build the selected instances.
pub fn build(ws: &Workspace<'_>, planned: &Planned, sel: &[bool], opts: &BuildOptions, ui: &Ui) -> Result<BuildReport> {
    let start = Instant::now();
    let dag = &planned.dag;
    let n = dag.instances.len();
    sweep_state_temps(&ws.root);
    sweep_output_temps(ws, dag);
    let mut locks = Locks::load(&ws.root)?;
    let mut cache = StatCache::load(ws.root.join(STAT_CACHE));
    let mut state = vec![State::Waiting; n];
    let mut force = vec![opts.force; n];
    let mut rerun = vec![false; n];
    let mut ran = vec![false; n];
    let mut evals: Vec<Option<Eval>> = vec![None; n];
    let mut report = BuildReport::default();
    let mut failure: Option<anyhow::Error> = None;
    let jobs = opts.jobs.max(1);

    let result = std::thread::scope(|s| -> Result<()> {
        let (tx, rx) = mpsc::channel::<Finished>();
        let mut queue: VecDeque<usize> = VecDeque::new();
        let mut running = 0usize;
        let mut exclusive_running = false;
        let mut last_lock_write = Instant::now();
        loop {
            // 1. Check every waiting instance whose producers are done.
            let mut progressed = true;
            while progressed && failure.is_none() {
                progressed = false;
                for &i in &dag.order {
                    if !sel[i] || state[i] != State::Waiting || dag.producers(i).any(|p| state[p] != State::Done) {
                        continue;
                    }
                    let mut checker = Checker { ws, dag, cache: &mut cache };
                    let mut ev = checker.evaluate(&locks, i)?;
                    if opts.dry_run {
                        if let Some(p) = dag.producers(i).find(|&p| ran[p]) {
                            ev.reasons.push(Reason::Upstream(dag.instances[p].id.clone()));
                        }
                    }
                    if force[i] && ev.reasons.is_empty() {
                        ev.reasons.push(Reason::Forced);
                    }
                    if ev.fresh() {
                        state[i] = State::Done;
                        report.fresh += 1;
                        if ui.verbose {
                            ui.info("Fresh", &dag.instances[i].id);
                        }
                        progressed = true;
                        continue;
                    }
                    // A stale instance needs its inputs on disk: re-make missing intermediates.
                    let mut waits = false;
                    for path in &dag.dep_paths[i] {
                        if ws.abs(path).exists() {
                            continue;
                        }
                        let producer = dag.producer_of(path).map(|(p, _)| p).or_else(|| {
                            // A directory dependency holding produced files.
                            dag.producers(i).find(|&p| dag.out_paths[p].iter().any(|o| crate::dag::is_under(o, path)))
                        });
                        match producer {
                            Some(p) if opts.dry_run && ran[p] => {}
                            Some(p) if !rerun[p] && !ran[p] => {
                                rerun[p] = true;
                                force[p] = true;
                                state[p] = State::Waiting;
                                report.fresh = report.fresh.saturating_sub(1);
                                waits = true;
                            }
                            Some(p) => bail!(
                                "stage `{}` needs `{path}`, which `{}` did not produce",
                                dag.instances[i].id,
                                dag.instances[p].id
                            ),
                            None => bail!(
                                "input `{path}` of stage `{}` is missing, and no stage produces it",
                                dag.instances[i].id
                            ),
                        }
                    }
                    progressed = true;
                    if waits {
                        continue;
                    }
                    state[i] = State::Queued;
                    evals[i] = Some(ev);
                    queue.push_back(i);
                }
            }

            // 2. Launch what may run now.
            let mut k = 0;
            let mut dry_progress = false;
            while k < queue.len() && running < jobs && failure.is_none() {
                let i = queue[k];
                let inst = &dag.instances[i];
                let stage = ws.stage(&inst.kind)?;
                if stage.exclusive() && exclusive_running {
                    k += 1;
                    continue;
                }
                queue.remove(k);
                let ev = evals[i].as_ref().expect("queued instances are evaluated");
                let why = ev.reasons.iter().map(Reason::describe).collect::<Vec<_>>().join("; ");
                if opts.dry_run {
                    ui.info("Would run", &format!("{} ({why})", inst.id));
                    state[i] = State::Done;
                    ran[i] = true;
                    report.ran.push(inst.id.clone());
                    dry_progress = true;
                    continue;
                }
                ui.status("Running", &inst.id);
                if ui.verbose {
                    ui.note(&format!("             because {why}"));
                }
                let temps = match temp_outputs(ws, dag, i) {
                    Ok(t) => t,
                    Err(e) => {
                        failure = Some(e.context(format!("cannot prepare the outputs of `{}`", inst.id)));
                        state[i] = State::Failed;
                        break;
                    }
                };
                let tx = tx.clone();
                let exclusive = stage.exclusive();
                exclusive_running |= exclusive;
                running += 1;
                state[i] = State::Running;
                let root = ws.root.clone();
                let deps: Vec<JobFile> = dag.dep_paths[i]
                    .iter()
                    .zip(&inst.deps)
                    .map(|(p, d)| JobFile { name: d.name.clone(), path: ws.abs(p) })
                    .collect();
                let finals: Vec<JobFile> =
                    inst.outs.iter().map(|o| JobFile { name: o.name.clone(), path: o.path.clone() }).collect();
                s.spawn(move || {
                    let t0 = Instant::now();
                    let outs: Vec<JobFile> = temps
                        .iter()
                        .zip(&inst.outs)
                        .map(|(t, o)| JobFile { name: o.name.clone(), path: t.to_path_buf() })
                        .collect();
                    let progress = ui.stage_progress(&inst.id);
                    let job = Job {
                        id: &inst.id,
                        root: &root,
                        params: &inst.params,
                        locators: &inst.locators,
                        deps: &deps,
                        outs: &outs,
                        final_outs: &finals,
                        progress: &progress,
                    };
                    let result = match catch_unwind(AssertUnwindSafe(|| stage.run(&job))) {
                        Ok(r) => r,
                        Err(panic) => {
                            let msg = panic
                                .downcast_ref::<String>()
                                .cloned()
                                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                                .unwrap_or_else(|| "unknown panic".into());
                            Err(anyhow!("the stage panicked: {msg}"))
                        }
                    };
                    drop(progress);
                    let _ = tx.send(Finished { node: i, result, temps, elapsed: t0.elapsed() });
                });
            }

            if running == 0 {
                if dry_progress {
                    continue;
                }
                if failure.is_some() || queue.is_empty() {
                    break;
                }
                // Only possible if everything queued is blocked, which cannot happen with
                // one exclusive slot and nothing running.
                bail!("internal error: the scheduler is stuck with {} queued stages", queue.len());
            }

            // 3. Wait for one stage to finish.
            // Entries of quick stages are written in batches, but never later than
            // LOCK_BATCH after the stage finished.
            let f = loop {
                match rx.recv_timeout(LOCK_BATCH) {
                    Ok(f) => break f,
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        locks.save()?;
                        last_lock_write = Instant::now();
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => bail!("a worker thread vanished"),
                }
            };
            running -= 1;
            let inst = &dag.instances[f.node];
            if ws.stage(&inst.kind)?.exclusive() {
                exclusive_running = false;
            }
            let ev = evals[f.node].take().expect("running instances are evaluated");
            let outcome = f.result.and_then(|()| commit(ws, planned, f.node, &ev, f.temps, &mut locks, &mut cache, ui));
            // The entry of a stage that took a while is written at once.
            if outcome.is_ok() && (f.elapsed >= LOCK_BATCH || last_lock_write.elapsed() >= LOCK_BATCH) {
                locks.save()?;
                last_lock_write = Instant::now();
            }
            match outcome {
                Ok(()) => {
                    state[f.node] = State::Done;
                    ran[f.node] = true;
                    report.ran.push(inst.id.clone());
                    if ui.verbose {
                        ui.info("Finished", &format!("{} in {:.2}s", inst.id, f.elapsed.as_secs_f64()));
                    }
                }
                Err(e) => {
                    state[f.node] = State::Failed;
                    if failure.is_none() {
                        failure = Some(e.context(format!("stage `{}` failed ({})", inst.id, inst.description)));
                    } else {
                        ui.error(&e.context(format!("stage `{}` failed", inst.id)));
                    }
                }
            }
        }
        Ok(())
    });
    let saved = locks.save();
    cache.save().ok();
    result?;
    saved?;
    report.elapsed = start.elapsed();
    if let Some(e) = failure {
        let left = (0..n).filter(|&i| sel[i] && state[i] != State::Done).count();
        return Err(e.context(format!(
            "build failed after {:.2}s: {} ran, {left} not built",
            report.elapsed.as_secs_f64(),
            report.ran.len()
        )));
    }
    Ok(report)
}

/// Removes what killed builds left of the state files' atomic writes (`qpipe.lock`,
/// `scratch.lock`, `stat-cache.json`), whatever version of qpipe wrote them.
pub fn sweep_state_temps(root: &Path) {
    for file in [crate::lock::COMMITTED_LOCK, crate::lock::SCRATCH_LOCK, STAT_CACHE] {
        let path = root.join(file);
        let Some(dir) = path.parent() else { continue };
        crate::atomic::sweep_dead(dir, |n| {
            crate::atomic::is_temp_for(n, &path) || crate::atomic::is_legacy_state_temp(n)
        });
    }
}

/// Removes what killed builds left of the outputs of every planned instance — also those
/// that will not run because their previous output is still in place. Only files whose
/// writer is gone: another checkout may be writing into the same folder right now.
fn sweep_output_temps(ws: &Workspace<'_>, dag: &crate::dag::Dag) {
    let mut by_dir: std::collections::BTreeMap<PathBuf, Vec<PathBuf>> = Default::default();
    for o in dag.out_paths.iter().flatten() {
        let fin = ws.abs(o);
        if let Some(dir) = fin.parent() {
            by_dir.entry(dir.to_path_buf()).or_default().push(fin.clone());
        }
    }
    for (dir, outs) in by_dir {
        crate::atomic::sweep_dead(&dir, |n| outs.iter().any(|o| crate::atomic::is_temp_for(n, o)));
    }
}

/// Fresh temporary paths beside each output (the files themselves do not exist yet, so a
/// stage that forgets one is caught).
fn temp_outputs(ws: &Workspace<'_>, dag: &crate::dag::Dag, i: usize) -> Result<Vec<TempPath>> {
    let mut temps = Vec::new();
    for o in &dag.out_paths[i] {
        let fin = ws.abs(o);
        let dir = fin.parent().expect("outputs are files below the root");
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create directory `{}`", dir.display()))?;
        // What a killed build left for this output. Only files whose writer is gone: another
        // checkout may be writing into the same folder right now.
        crate::atomic::sweep_dead(dir, |n| crate::atomic::is_temp_for(n, &fin));
        let tmp = crate::atomic::temp_path(&fin);
        temps.push(TempPath::try_from_path(&tmp).with_context(|| format!("temporary path `{}`", tmp.display()))?);
    }
    Ok(temps)
}

/// Move a successful stage's outputs into place, then record its lock entry.
#[allow(clippy::too_many_arguments)]
fn commit(
    ws: &Workspace<'_>,
    planned: &Planned,
    i: usize,
    ev: &Eval,
    temps: Vec<TempPath>,
    locks: &mut Locks,
    cache: &mut StatCache,
    ui: &Ui,
) -> Result<()> {
    let dag = &planned.dag;
    let inst = &dag.instances[i];
    for (t, o) in temps.iter().zip(&dag.out_paths[i]) {
        if !t.exists() {
            bail!("the stage did not write its output `{o}`");
        }
    }
    for (t, o) in temps.into_iter().zip(&dag.out_paths[i]) {
        let fin = ws.abs(o);
        crate::atomic::keep_mode(&t, &fin)?;
        crate::atomic::fault_pause();
        t.persist(&fin).map_err(|e| e.error).with_context(|| format!("cannot move the output into `{o}`"))?;
        cache.invalidate(&fin);
    }
    let mut outs = Vec::new();
    for (o, spec) in dag.out_paths[i].iter().zip(&inst.outs) {
        let hash = cache.hash(&ws.abs(o))?.ok_or_else(|| anyhow!("output `{o}` vanished after the stage wrote it"))?;
        outs.push(LockedOut { path: o.clone(), hash, intermediate: spec.intermediate });
    }
    // Inputs the stage re-made (missing intermediates) are hashed now they exist again.
    let mut deps = Vec::new();
    for (d, (path, h)) in dag.dep_paths[i].iter().zip(&ev.deps).enumerate() {
        let hash = match h {
            Some(h) => h.clone(),
            None => {
                Checker { ws, dag, cache }.dep_hash(locks, i, d)?.ok_or_else(|| anyhow!("input `{path}` is missing"))?
            }
        };
        deps.push(LockedDep { path: path.clone(), hash });
    }
    let stage = ws.stage(&inst.kind)?;
    let hashes: Vec<String> = deps.iter().map(|d| d.hash.clone()).collect();
    let key = crate::hashing::instance_key(&inst.kind, stage.code_version(), &inst.params, &hashes);
    let entry = LockEntry {
        kind: inst.kind.clone(),
        key,
        code_version: stage.code_version().to_string(),
        params: inst.params.clone(),
        deps,
        outs,
    };
    // Same key, different bytes: the stage is not deterministic, so re-making a cleaned
    // intermediate (or `--force`) changes what its consumers are keyed on.
    if let Some(old) = locks.get(&inst.id).filter(|old| old.key == entry.key) {
        for o in &entry.outs {
            if old.out(&o.path).is_some_and(|r| r.hash != o.hash) {
                ui.warn(&format!(
                    "`{}` wrote different bytes to `{}` from the same inputs; stages should be deterministic, \
                     or what reads it re-runs",
                    inst.id, o.path
                ));
            }
        }
    }
    locks.put(&inst.id, entry, planned.published[i]);
    Ok(())
}
