//! `qpipe verify --parity`: rebuild published runs into a scratch area through the same
//! DAG (committed files untouched) and let the domain compare them with the committed
//! run folders — or compare the committed folders with a `--baseline` folder.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use qpipe_contract::{ParityReport, Run, Tolerance};
use serde_json::{json, Value};

use crate::clean::VERIFY_DIR;
use crate::dag::{is_under, norm_path};
use crate::scheduler::{build, BuildOptions};
use crate::suggest::{did_you_mean, list};
use crate::ui::Ui;
use crate::workspace::Workspace;

pub struct VerifyOptions {
    /// A pair folder, a run folder, or a folder name such as `weight-int8-act-int8`.
    pub selector: String,
    pub baseline: Option<PathBuf>,
    pub tol: Tolerance,
    pub jobs: usize,
}

/// A published run and the folder its artifacts live in.
pub struct PublishedRun {
    pub run: Run,
    /// Root-relative run folder.
    pub dir: String,
}

/// The published runs and their folders: the deepest folder holding all the tracked
/// outputs the run alone produces.
pub fn published_runs(ws: &Workspace<'_>) -> Result<Vec<PublishedRun>> {
    let mut out = Vec::new();
    for run in ws.pipeline.publish_runs()? {
        let mut single = run.clone();
        single.published = false;
        let planned = ws.plan_runs(std::slice::from_ref(&single), Some(Default::default()))?;
        let dag = &planned.dag;
        let tracked: Vec<&String> = dag
            .instances
            .iter()
            .zip(&dag.out_paths)
            .flat_map(|(i, ps)| i.outs.iter().zip(ps).filter(|(o, _)| !o.intermediate).map(|(_, p)| p))
            .collect();
        let Some(first) = tracked.first() else { continue };
        let mut dir: Vec<&str> = first.split('/').collect();
        dir.pop();
        for p in &tracked[1..] {
            let parts: Vec<&str> = p.split('/').collect();
            let common = dir.iter().zip(&parts).take_while(|(a, b)| a == b).count();
            dir.truncate(common);
        }
        out.push(PublishedRun { run, dir: dir.join("/") });
    }
    Ok(out)
}

/// Which published runs a selector names.
pub fn select<'a>(
    ws: &Workspace<'_>,
    runs: &'a [PublishedRun],
    selector: &str,
    cwd: &Path,
) -> Result<Vec<&'a PublishedRun>> {
    let as_path = norm_path(&ws.root, &cwd.join(selector)).ok().filter(|p| !p.is_empty());
    let hits: Vec<&PublishedRun> = runs
        .iter()
        .filter(|r| as_path.as_deref().is_some_and(|p| is_under(&r.dir, p)) || r.dir.split('/').any(|c| c == selector))
        .collect();
    if hits.is_empty() {
        let mut names: Vec<String> = Vec::new();
        for r in runs {
            let parts: Vec<&str> = r.dir.rsplitn(3, '/').collect();
            names.extend(parts.iter().take(2).map(|s| s.to_string()));
        }
        names.sort();
        names.dedup();
        bail!(
            "no published run matches `{selector}`; published pair and run folders: {}{}",
            list(&names, 30),
            did_you_mean(selector, &names)
        );
    }
    Ok(hits)
}

/// Find the baseline's folder for a run: a folder of the same name anywhere under the
/// baseline; else, inside a folder named like the run's parent (the pair folder), the
/// one whose name ends like the run's (`…_autoquant_int8_lm_small` matches
/// `qwen3_vl_4b_autoquant_int8_lm_small`), when exactly one is best; else the baseline
/// itself when it is a run folder and one run is checked.
fn baseline_dir(baseline: &Path, run_dir: &str, single: bool) -> Option<PathBuf> {
    let mut parts = run_dir.rsplit('/');
    let name = parts.next().unwrap_or(run_dir);
    let parent = parts.next();
    let dirs: Vec<walkdir::DirEntry> =
        walkdir::WalkDir::new(baseline).max_depth(4).into_iter().flatten().filter(|e| e.file_type().is_dir()).collect();
    if let Some(e) = dirs.iter().find(|e| e.depth() > 0 && e.file_name().to_string_lossy() == name) {
        return Some(e.path().to_path_buf());
    }
    if let Some(parent) = parent {
        let mut best: Vec<(usize, PathBuf)> = Vec::new();
        for e in dirs.iter().filter(|e| {
            e.depth() > 0 && e.path().parent().and_then(Path::file_name).is_some_and(|p| p.to_string_lossy() == parent)
        }) {
            let n = common_suffix_tokens(&e.file_name().to_string_lossy(), name);
            if n > 0 {
                best.push((n, e.path().to_path_buf()));
            }
        }
        best.sort_by_key(|b| std::cmp::Reverse(b.0));
        match best.as_slice() {
            [(n, p), (m, _), ..] if n > m => return Some(p.clone()),
            [(_, p)] => return Some(p.clone()),
            _ => {}
        }
    }
    let has_files = std::fs::read_dir(baseline)
        .map(|d| d.flatten().any(|e| e.path().extension().is_some_and(|x| x == "json" || x == "md")))
        .unwrap_or(false);
    (single && has_files).then(|| baseline.to_path_buf())
}

/// How many trailing `_`-separated tokens two names share.
fn common_suffix_tokens(a: &str, b: &str) -> usize {
    a.rsplit('_').zip(b.rsplit('_')).take_while(|(x, y)| x == y).count()
}

/// Outcome of a whole verification.
pub struct VerifyOutcome {
    pub reports: Vec<ParityReport>,
}

impl VerifyOutcome {
    /// 0 parity, 1 drift, 2 could not check.
    pub fn exit_code(&self) -> i32 {
        if self.reports.iter().any(|r| !r.errors.is_empty()) {
            2
        } else if self.reports.iter().any(|r| !r.drift.is_empty()) {
            1
        } else {
            0
        }
    }

    pub fn to_json(&self) -> Value {
        let result = match self.exit_code() {
            0 => "parity",
            1 => "drift",
            _ => "error",
        };
        json!({"result": result, "runs": self.reports})
    }

    pub fn to_text(&self) -> String {
        let mut s = String::new();
        for r in &self.reports {
            let verdict = if !r.errors.is_empty() {
                "could not check"
            } else if !r.drift.is_empty() {
                "DRIFT"
            } else {
                "parity"
            };
            s.push_str(&format!("{}: {verdict}\n", r.run_dir.display()));
            for e in &r.errors {
                s.push_str(&format!("  error: {e}\n"));
            }
            for d in &r.drift {
                s.push_str(&format!("  drift: {d}\n"));
            }
            for n in &r.notes {
                s.push_str(&format!("  note:  {n}\n"));
            }
            for (k, v) in &r.figures {
                s.push_str(&format!("  {k}: {v}\n"));
            }
        }
        let count = |f: &dyn Fn(&ParityReport) -> bool| self.reports.iter().filter(|r| f(r)).count();
        s.push_str(&format!(
            "{} run(s): {} at parity, {} drifted, {} could not be checked\n",
            self.reports.len(),
            count(&|r| r.errors.is_empty() && r.drift.is_empty()),
            count(&|r| r.errors.is_empty() && !r.drift.is_empty()),
            count(&|r| !r.errors.is_empty()),
        ));
        s
    }
}

fn error_report(dir: &Path, msg: String) -> ParityReport {
    ParityReport { run_dir: dir.to_path_buf(), errors: vec![msg], ..Default::default() }
}

pub fn verify(ws: &Workspace<'_>, opts: &VerifyOptions, cwd: &Path, ui: &Ui) -> Result<VerifyOutcome> {
    let runs = published_runs(ws)?;
    let chosen = select(ws, &runs, &opts.selector, cwd)?;
    let mut reports = Vec::new();

    if let Some(baseline) = &opts.baseline {
        let baseline = cwd.join(baseline);
        if !baseline.is_dir() {
            bail!("baseline folder `{}` does not exist", baseline.display());
        }
        for r in &chosen {
            let committed = ws.abs(&r.dir);
            ui.status("Comparing", &format!("{} with {}", r.dir, baseline.display()));
            let report = match baseline_dir(&baseline, &r.dir, chosen.len() == 1) {
                None => error_report(
                    &committed,
                    format!("the baseline `{}` has no folder named like `{}`", baseline.display(), r.dir),
                ),
                Some(_) if !committed.is_dir() => {
                    error_report(&committed, format!("committed run folder `{}` does not exist", r.dir))
                }
                Some(b) => {
                    let mut report = ws.domain.compare(&committed, &b, &opts.tol);
                    report.notes.insert(0, format!("baseline folder: {}", b.display()));
                    report
                }
            };
            reports.push(report);
        }
        for r in &mut reports {
            if let Ok(rel) = r.run_dir.strip_prefix(&ws.root) {
                r.run_dir = rel.to_path_buf();
            }
        }
        return Ok(VerifyOutcome { reports });
    }

    // Rebuild into tmp/qpipe/verify/<run dir>, same DAG and keys, scratch lock.
    let mut scratch_runs = Vec::new();
    let mut pairs = Vec::new();
    for r in &chosen {
        let committed = ws.abs(&r.dir);
        if !committed.is_dir() {
            reports.push(error_report(
                &committed,
                format!(
                    "committed run folder `{}` does not exist; build and commit it first (`qpipe build {}`)",
                    r.dir, r.dir
                ),
            ));
            continue;
        }
        let scratch = format!("{VERIFY_DIR}/{}", r.dir.trim_start_matches('/'));
        let mut run = r.run.clone();
        run.published = false;
        run.overrides.push(format!("runner.output_dir={scratch}"));
        match run.config.pointer_mut("/runner") {
            Some(Value::Object(m)) => {
                m.insert("output_dir".into(), Value::String(scratch.clone()));
            }
            _ => {
                bail!("the pipeline's runs have no `runner` mapping, so `runner.output_dir` cannot redirect a rebuild")
            }
        }
        scratch_runs.push(run);
        pairs.push((committed, ws.abs(&scratch)));
    }
    if !scratch_runs.is_empty() {
        let published = ws.published_ids().unwrap_or_default();
        let built = ws.plan_runs(&scratch_runs, Some(published)).and_then(|planned| {
            let sel = vec![true; planned.dag.instances.len()];
            ui.status("Rebuilding", &format!("{} run(s) into {VERIFY_DIR}/", scratch_runs.len()));
            build(ws, &planned, &sel, &BuildOptions { jobs: opts.jobs, ..Default::default() }, ui)
        });
        match built {
            Err(e) => {
                for (committed, _) in &pairs {
                    reports.push(error_report(committed, format!("the rebuild failed: {e:#}")));
                }
            }
            Ok(_) => {
                for (committed, scratch) in &pairs {
                    ui.status(
                        "Comparing",
                        &format!("{}", committed.strip_prefix(&ws.root).unwrap_or(committed).display()),
                    );
                    reports.push(ws.domain.compare(committed, scratch, &opts.tol));
                }
            }
        }
    }
    // Name run folders relative to the root in what people read.
    for r in &mut reports {
        if let Ok(rel) = r.run_dir.strip_prefix(&ws.root) {
            r.run_dir = rel.to_path_buf();
        }
    }
    Ok(VerifyOutcome { reports })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn baseline_folders_match_by_name_or_by_suffix_within_the_pair() {
        let d = tempfile::tempdir().unwrap();
        for sub in [
            "weight-int8-act-int8/qwen3_vl_4b_autoquant_int8_lm_small",
            "weight-int8-act-int8/qwen3_vl_4b_autoquant_int8_lm_large",
            "weight-int8-act-int8/qwen3_vl_4b_autoquant_all_layers_int8_small",
            "weight-fp8-act-fp16/tiny_autoquant_wfp8_afp16_lm_small",
        ] {
            std::fs::create_dir_all(d.path().join(sub)).unwrap();
        }
        let b = d.path();
        let got =
            baseline_dir(b, "models/tiny/layer-analysis/weight-int8-act-int8/tiny_autoquant_int8_lm_small", false);
        assert_eq!(got.unwrap(), b.join("weight-int8-act-int8/qwen3_vl_4b_autoquant_int8_lm_small"));
        let got =
            baseline_dir(&b.join("weight-int8-act-int8"), "m/weight-int8-act-int8/x_autoquant_int8_lm_large", false);
        assert_eq!(got.unwrap(), b.join("weight-int8-act-int8/qwen3_vl_4b_autoquant_int8_lm_large"));
        let got = baseline_dir(b, "m/weight-fp8-act-fp16/tiny_autoquant_wfp8_afp16_lm_small", false);
        assert_eq!(got.unwrap(), b.join("weight-fp8-act-fp16/tiny_autoquant_wfp8_afp16_lm_small"));
        assert_eq!(baseline_dir(b, "m/weight-int4-act-int4/x_lm_small", false), None);
    }
}
