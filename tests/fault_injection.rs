//! Fault injection: the real `qpipe build` of a published analysis folder (every stage
//! kind: fetch-model, build-calib, score, aggregate, render, docs) is killed with SIGKILL
//! again and again — at seeded random times, and inside the window between writing a lock
//! file's temporary copy and renaming it into place; half the rounds re-run it with
//! `--force`, half build it after a calibration caption changed (restored after the kill,
//! so that what the killed build finished is now stale) — and after each kill:
//!
//! - every file in the workspace is one the uninterrupted build makes, or a git-ignored
//!   temporary file (or, after a changed caption, its calibration set in `tmp/qpipe`);
//! - every JSON file parses (the lock included);
//! - `qpipe status` tells the truth: it says "up to date" only when every tracked file
//!   has the uninterrupted build's bytes;
//! - the next `qpipe build` converges: the uninterrupted build's bytes everywhere, no
//!   temporary file left, `status` up to date; tracked files are unchanged or restored.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod support;
use support::real::{copy_into, text, workspace_copy};

const TARGET: &str = "models/tiny_qwen3_vl/layer-analysis/weight-fp8-act-fp16";
const KILLS: usize = 20;
const SEED: u64 = 0x5eed_2026_1205;

fn qpipe(dir: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_qpipe"));
    c.current_dir(dir).env("NO_COLOR", "1");
    c
}

fn is_temp(p: &Path) -> bool {
    p.file_name().is_some_and(|n| n.to_string_lossy().contains(".qpipe-tmp"))
}

/// Every file under `dir` (but `.git`), relative, with its bytes.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    walkdir::WalkDir::new(dir)
        .into_iter()
        .filter_entry(|e| e.file_name() != ".git")
        .flatten()
        .filter(|e| e.file_type().is_file())
        .map(|e| (e.path().strip_prefix(dir).unwrap().to_path_buf(), fs::read(e.path()).unwrap()))
        .collect()
}

/// The files a user would commit: the analyses and the lock (not qpipe's `tmp/` state).
fn tracked(p: &Path) -> bool {
    (p.starts_with("models") || p == Path::new("qpipe.lock")) && !is_temp(p) && p.extension() != Some("pt".as_ref())
}

fn git_ignores(dir: &Path, rel: &Path) -> bool {
    Command::new("git").current_dir(dir).args(["check-ignore", "-q"]).arg(rel).status().is_ok_and(|s| s.success())
}

fn status_code(dir: &Path) -> i32 {
    let o = qpipe(dir).arg("status").output().unwrap();
    o.status.code().unwrap_or(-1)
}

fn xorshift(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
}

#[test]
fn killed_builds_leave_nothing_broken_and_the_next_build_converges() {
    let have_git = Command::new("git").arg("--version").output().is_ok_and(|o| o.status.success());
    assert!(have_git, "git is needed to check which leftovers are ignored");
    let dir = workspace_copy();
    let dir = dir.path();
    copy_into(dir, &["qpipe.lock", "models/tiny_qwen3_vl/layer-analysis", ".gitignore", "models/.gitignore"]);
    assert!(Command::new("git").current_dir(dir).args(["init", "-q"]).status().unwrap().success());

    // The uninterrupted build: its bytes are what every recovery must reach.
    let t0 = Instant::now();
    let o = qpipe(dir).args(["build", "--force", TARGET]).output().unwrap();
    let full = t0.elapsed();
    assert!(o.status.success(), "{}", text(&o).1);
    let reference = snapshot(dir);
    assert!(reference.keys().all(|p| !is_temp(p)), "an uninterrupted build leaves no temporary file");
    assert_eq!(status_code(dir), 0);

    // `QPIPE_FAULT_SEED=N` explores other kill points; the suite runs the fixed seed.
    let seed = std::env::var("QPIPE_FAULT_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(SEED);
    let mut rng = seed;
    let (mut killed, mut in_lock_write, mut stale_seen) = (0, 0, 0);
    let started = Instant::now();
    let captions = dir.join("data/calibration/captions.txt");
    let original = fs::read(&captions).unwrap();
    for round in 0..KILLS {
        let lock_window = round % 2 == 1;
        let changed_input = round % 4 >= 2;
        let mut cmd = qpipe(dir);
        if changed_input {
            let mut other = b"a caption that was not there before\n".to_vec();
            other.extend_from_slice(&original);
            fs::write(&captions, other).unwrap();
            cmd.args(["build", TARGET]);
        } else {
            cmd.args(["build", "--force", TARGET]);
        }
        cmd.stdout(Stdio::null()).stderr(Stdio::null());
        if lock_window {
            cmd.env("QPIPE_FAULT_PAUSE_MS", "150");
        }
        let mut child = cmd.spawn().unwrap();
        let t = Instant::now();
        // Lock rounds: kill at the n-th lock write's rename window. Other rounds: after a
        // random part of an uninterrupted build's time.
        let nth = 1 + xorshift(&mut rng) % 4;
        let delay = Duration::from_millis(xorshift(&mut rng) % (full.as_millis() as u64).max(1));
        let (mut seen, mut in_window) = (0, false);
        let finished = loop {
            if child.try_wait().unwrap().is_some() {
                break true;
            }
            if lock_window {
                let now = fs::read_dir(dir)
                    .unwrap()
                    .flatten()
                    .any(|e| e.file_name().to_string_lossy().ends_with(".qpipe-tmp.lock"));
                if now && !in_window {
                    seen += 1;
                    if seen == nth {
                        break false;
                    }
                }
                in_window = now;
                std::thread::sleep(Duration::from_millis(5));
            } else if t.elapsed() >= delay {
                break false;
            } else {
                std::thread::sleep(Duration::from_millis(2));
            }
        };
        if !finished {
            child.kill().unwrap();
            killed += 1;
            in_lock_write += usize::from(lock_window);
        }
        child.wait().unwrap();
        fs::write(&captions, &original).unwrap();

        // After the kill: only known files or ignored temporaries; all JSON parses.
        let now = snapshot(dir);
        for (p, bytes) in &now {
            if !reference.contains_key(p) {
                // A temporary file, or an intermediate of the changed calibration set in
                // qpipe's own state folder — git-ignored either way.
                let known = is_temp(p) || (changed_input && p.starts_with("tmp/qpipe"));
                assert!(known && git_ignores(dir, p), "round {round}: stray file {}", p.display());
                continue;
            }
            let lock = p.file_name().is_some_and(|n| n == "qpipe.lock" || n == "scratch.lock");
            if (lock || p.extension().is_some_and(|e| e == "json")) && !is_temp(p) {
                assert!(
                    serde_json::from_slice::<serde_json::Value>(bytes).is_ok(),
                    "round {round}: {} does not parse",
                    p.display()
                );
            }
        }
        // status tells the truth.
        let differs: Vec<&PathBuf> =
            reference.iter().filter(|(p, b)| tracked(p) && now.get(*p) != Some(*b)).map(|(p, _)| p).collect();
        let status = qpipe(dir).args(["status", "-v"]).output().unwrap();
        let code = status.status.code().unwrap_or(-1);
        if code == 0 {
            assert!(differs.is_empty(), "round {round}: status says up to date, but these differ: {differs:?}");
        } else {
            assert_eq!(code, 1, "round {round}: status failed");
            stale_seen += 1;
        }
        // The next build converges to the uninterrupted bytes.
        let o = qpipe(dir).args(["build", "-v", TARGET]).output().unwrap();
        let log = format!("status:\n{}{}\nbuild:\n{}", text(&status).0, text(&status).1, text(&o).1);
        assert!(o.status.success(), "round {round}: {log}");
        let after = snapshot(dir);
        let leftovers: Vec<&PathBuf> = after.keys().filter(|p| is_temp(p)).collect();
        assert!(leftovers.is_empty(), "round {round}: the build left {leftovers:?}");
        for (p, b) in &reference {
            if tracked(p) {
                assert!(after.get(p) == Some(b), "round {round}: {} is not restored\n{log}", p.display());
            }
        }
        assert_eq!(status_code(dir), 0, "round {round}: not up to date after the recovery build");
    }
    eprintln!(
        "fault injection: {KILLS} rounds (seed {seed:#x}), {killed} killed ({in_lock_write} inside a lock write), \
         status stale after {stale_seen}; uninterrupted build {:.1} s, all rounds {:.1} s",
        full.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    assert!(killed >= KILLS / 2, "most rounds must actually kill the build ({killed} of {KILLS})");
}
