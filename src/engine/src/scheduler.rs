//! `qpipe build`: run the stale instances of a selection in dependency order.
//!
//! The main thread checks instances as their producers finish, launches stale ones on
//! worker threads (up to `-j`, at most one `exclusive` stage at a time), and on each
//! success renames the temporary outputs into place, hashes them and writes the lock
//! entry last. A failed stage leaves its old outputs and lock entry untouched. With
//! `--executor slurm` a worker thread submits the instance as a Slurm job and follows it
//! instead of running it ([`crate::slurm`]); everything else is the same.

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

#[derive(Debug, Clone, Default)]
pub struct BuildOptions {
    pub dry_run: bool,
    pub force: bool,
    pub jobs: usize,
    /// After a failure, go on with everything that does not depend on it (`make -k`);
    /// otherwise start nothing new.
    pub keep_going: bool,
    /// Run stages as Slurm jobs (`--executor slurm`); `None`: in this process.
    pub executor: Option<std::sync::Arc<crate::slurm::Executor>>,
}

/// What a build did.
#[derive(Debug, Default)]
pub struct BuildReport {
    /// Ids of the instances that ran (or would run, with `--dry-run`), in completion order.
    pub ran: Vec<String>,
    /// Ids of the instances whose outputs came from the shared cache instead.
    pub restored: Vec<String>,
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
    /// The outputs came from the shared cache.
    restored: bool,
    /// The last message of its execution (a fused execution sends one per instance): the
    /// worker slot (and the exclusive one) is free again.
    slot_free: bool,
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
    let store = if opts.dry_run { None } else { ws.store() };
    // Launch new work: while nothing failed, or with `keep_going`.
    let launch = |failure: &Option<anyhow::Error>| failure.is_none() || opts.keep_going;
    let remote = |kind: &str| opts.executor.as_ref().filter(|e| e.remote(kind)).cloned();

    let result = std::thread::scope(|s| -> Result<()> {
        let (tx, rx) = mpsc::channel::<Finished>();
        let mut queue: VecDeque<usize> = VecDeque::new();
        let mut running = 0usize;
        let mut exclusive_running = false;
        let mut last_lock_write = Instant::now();
        loop {
            // 1. Check every waiting instance whose producers are done.
            let mut progressed = true;
            while progressed && launch(&failure) {
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
                            // (Several missing outputs of one producer — or another
                            // consumer's — ask for one re-run and wait for it.)
                            Some(p) if !ran[p] => {
                                if !rerun[p] {
                                    rerun[p] = true;
                                    force[p] = true;
                                    state[p] = State::Waiting;
                                    report.fresh = report.fresh.saturating_sub(1);
                                }
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
            while k < queue.len() && running < jobs && launch(&failure) {
                let i = queue[k];
                let inst = &dag.instances[i];
                let stage = ws.stage(&inst.kind)?;
                // In the shared cache (and not forced to run): restore instead of running.
                let hit = match (&store, &evals[i]) {
                    (Some(st), Some(Eval { key: Some(key), .. })) if !force[i] => {
                        st.lookup(key).map(|e| (st, key.clone(), e))
                    }
                    _ => None,
                };
                if let Some((st, key, entry)) = hit {
                    queue.remove(k);
                    let temps = match temp_outputs(ws, dag, i) {
                        Ok(t) => t,
                        Err(e) => {
                            let e = e.context(format!("cannot prepare the outputs of `{}`", inst.id));
                            match failure {
                                None => failure = Some(e),
                                Some(_) => ui.error(&e),
                            }
                            state[i] = State::Failed;
                            break;
                        }
                    };
                    let t0 = Instant::now();
                    let dests: Vec<PathBuf> = temps.iter().map(|t| t.to_path_buf()).collect();
                    match st.restore(&key, &entry, &dests) {
                        Ok(()) => {
                            ui.status("Restoring", &inst.id);
                            running += 1;
                            state[i] = State::Running;
                            let _ = tx.send(Finished {
                                node: i,
                                result: Ok(()),
                                temps,
                                elapsed: t0.elapsed(),
                                restored: true,
                                slot_free: true,
                            });
                        }
                        Err(e) => {
                            // Run it instead; the run stores a good entry (the damaged one stays
                            // until `qpipe cache gc`).
                            ui.warn(&format!("{e:#}; running `{}` instead", inst.id));
                            drop(temps);
                            force[i] = true;
                            queue.insert(k, i);
                        }
                    }
                    continue;
                }
                // On the cluster each job has its own resources: nothing to keep exclusive here.
                let executor = remote(&inst.kind);
                let exclusive = stage.exclusive() && executor.is_none();
                if exclusive && exclusive_running {
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
                // Queued instances of the same kind and fusion key run with this one, as one
                // execution (those the cache has are left to be restored).
                let mut group = vec![i];
                if let Some(fk) = stage.fusion_key(inst).filter(|_| fusion_enabled()) {
                    let mut j = k;
                    while j < queue.len() {
                        let o = queue[j];
                        let other = &dag.instances[o];
                        let cached = match (&store, &evals[o]) {
                            (Some(st), Some(Eval { key: Some(key), .. })) if !force[o] => st.lookup(key).is_some(),
                            _ => false,
                        };
                        if other.kind == inst.kind && !cached && stage.fusion_key(other).as_deref() == Some(fk.as_str())
                        {
                            group.push(queue.remove(j).expect("index in range"));
                        } else {
                            j += 1;
                        }
                    }
                }
                let mut group_temps = Vec::new();
                let mut prepared = true;
                for &g in &group {
                    let ev = evals[g].as_ref().expect("queued instances are evaluated");
                    let why = ev.reasons.iter().map(Reason::describe).collect::<Vec<_>>().join("; ");
                    if executor.is_none() {
                        // (The Slurm executor says `Submitted` and `Running … on NODE`.)
                        ui.status("Running", &dag.instances[g].id);
                    }
                    if ui.verbose {
                        ui.note(&format!("             because {why}"));
                    }
                    match temp_outputs(ws, dag, g) {
                        Ok(t) => group_temps.push(t),
                        Err(e) => {
                            let e = e.context(format!("cannot prepare the outputs of `{}`", dag.instances[g].id));
                            match failure {
                                None => failure = Some(e),
                                Some(_) => ui.error(&e),
                            }
                            prepared = false;
                            break;
                        }
                    }
                }
                if !prepared {
                    for &g in &group {
                        state[g] = State::Failed;
                    }
                    break;
                }
                if group.len() > 1 && ui.verbose {
                    ui.note(&format!("             {} `{}` instances run as one execution", group.len(), inst.kind));
                }
                let tx = tx.clone();
                exclusive_running |= exclusive;
                let specs: Vec<crate::slurm::SpecInstance> = match &executor {
                    Some(_) => group
                        .iter()
                        .zip(&group_temps)
                        .map(|(&g, temps)| crate::slurm::SpecInstance {
                            id: dag.instances[g].id.clone(),
                            key: evals[g].as_ref().and_then(|e| e.key.clone()).unwrap_or_default(),
                            outs: dag.instances[g]
                                .outs
                                .iter()
                                .zip(temps)
                                .map(|(o, t)| (o.name.clone(), t.to_path_buf()))
                                .collect(),
                        })
                        .collect(),
                    None => Vec::new(),
                };
                running += 1;
                for &g in &group {
                    state[g] = State::Running;
                }
                let root = ws.root.clone();
                let files: Vec<(Vec<JobFile>, Vec<JobFile>)> =
                    group.iter().map(|&g| crate::workspace::job_files(ws, dag, g)).collect();
                s.spawn(move || {
                    let t0 = Instant::now();
                    let outs: Vec<Vec<JobFile>> = group
                        .iter()
                        .zip(&group_temps)
                        .map(|(&g, temps)| {
                            temps
                                .iter()
                                .zip(&dag.instances[g].outs)
                                .map(|(t, o)| JobFile { name: o.name.clone(), path: t.to_path_buf() })
                                .collect()
                        })
                        .collect();
                    let progress = ui.stage_progress(&inst.id);
                    let jobs: Vec<Job> = group
                        .iter()
                        .zip(&files)
                        .zip(&outs)
                        .map(|((&g, (deps, finals)), outs)| {
                            crate::workspace::job(&dag.instances[g], &root, (deps, outs, finals), &progress)
                        })
                        .collect();
                    let run = || match &executor {
                        Some(ex) => ex.run(ui, &inst.kind, &specs),
                        None if jobs.len() == 1 => vec![stage.run(&jobs[0])],
                        None => stage.run_fused(&jobs),
                    };
                    let results = match catch_unwind(AssertUnwindSafe(run)) {
                        Ok(r) if r.len() == jobs.len() => r,
                        Ok(r) => {
                            let msg = format!("the stage returned {} results for {} instances", r.len(), jobs.len());
                            jobs.iter().map(|_| Err(anyhow!("{msg}"))).collect()
                        }
                        Err(panic) => {
                            let msg = panic
                                .downcast_ref::<String>()
                                .cloned()
                                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                                .unwrap_or_else(|| "unknown panic".into());
                            jobs.iter().map(|_| Err(anyhow!("the stage panicked: {msg}"))).collect()
                        }
                    };
                    drop(jobs);
                    drop(progress);
                    let n = group.len();
                    for (m, ((g, result), temps)) in group.into_iter().zip(results).zip(group_temps).enumerate() {
                        let _ = tx.send(Finished {
                            node: g,
                            result,
                            temps,
                            elapsed: t0.elapsed(),
                            restored: false,
                            slot_free: m + 1 == n,
                        });
                    }
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
            let inst = &dag.instances[f.node];
            if f.slot_free {
                running -= 1;
                if ws.stage(&inst.kind)?.exclusive() && !f.restored && remote(&inst.kind).is_none() {
                    exclusive_running = false;
                }
            }
            let ev = evals[f.node].take().expect("running instances are evaluated");
            let outcome = f.result.and_then(|()| commit(ws, planned, f.node, &ev, f.temps, &mut locks, &mut cache, ui));
            if let (Ok(()), Some(st), Some(key), false) = (&outcome, &store, &ev.key, f.restored) {
                // Share what ran. A cache that cannot be written is worth a warning, not a
                // failed build.
                let files: Vec<(String, PathBuf, String)> = locks
                    .get(&inst.id)
                    .map(|e| {
                        inst.outs
                            .iter()
                            .zip(&dag.out_paths[f.node])
                            .filter_map(|(o, p)| Some((o.name.clone(), ws.abs(p), e.out(p)?.hash.clone())))
                            .collect()
                    })
                    .unwrap_or_default();
                if files.len() == inst.outs.len() {
                    if let Err(e) = st.store(key, &inst.id, &inst.kind, &files) {
                        ui.warn(&format!("cannot store `{}` in the cache `{}`: {e:#}", inst.id, st.dir().display()));
                    }
                }
            }
            // The entry of a stage that took a while is written at once.
            if outcome.is_ok() && (f.elapsed >= LOCK_BATCH || last_lock_write.elapsed() >= LOCK_BATCH) {
                locks.save()?;
                last_lock_write = Instant::now();
            }
            match outcome {
                Ok(()) if f.restored => {
                    state[f.node] = State::Done;
                    ran[f.node] = true;
                    report.restored.push(inst.id.clone());
                }
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

/// `QPIPE_FUSE=0` runs every instance alone, even where its stage could share work
/// between instances (to compare, or to bound memory: a fused execution holds each
/// instance's working set at once).
fn fusion_enabled() -> bool {
    std::env::var("QPIPE_FUSE").map_or(true, |v| v != "0")
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
