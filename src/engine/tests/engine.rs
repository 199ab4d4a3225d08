//! End-to-end tests of the engine's commands, driven through `qpipe_engine::cli::run` with a fake
//! domain whose stages are trivial file copies (the real stages are tested in `stages/`).

#[path = "support/fake.rs"]
mod fake;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use fake::{Fake, PIPELINE};
use qpipe_engine::ui::Ui;

struct Env {
    dir: tempfile::TempDir,
    fake: Fake,
}

struct Out {
    code: i32,
    out: String,
    err: String,
}

impl Env {
    fn new() -> Env {
        Env::with(Fake::new(false))
    }

    fn with(fake: Fake) -> Env {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("pipeline.yaml"), PIPELINE).unwrap();
        fs::create_dir(dir.path().join("data")).unwrap();
        fs::write(dir.path().join("data/a.txt"), "alpha").unwrap();
        fs::write(dir.path().join("data/b.txt"), "beta").unwrap();
        Env { dir, fake }
    }

    fn root(&self) -> PathBuf {
        fs::canonicalize(self.dir.path()).unwrap()
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn read(&self, rel: &str) -> String {
        fs::read_to_string(self.path(rel)).unwrap()
    }

    fn qp(&self, args: &[&str]) -> Out {
        let (ui, o, e) = Ui::captured();
        let argv = std::iter::once("qpipe").chain(args.iter().copied());
        let code = qpipe_engine::cli::run(argv, &self.fake, self.dir.path(), ui);
        Out { code, out: o.text(), err: e.text() }
    }

    /// Run and expect success; returns the ids that ran.
    fn ok(&self, args: &[&str]) -> Vec<String> {
        let r = self.qp(args);
        assert_eq!(r.code, 0, "qpipe {args:?} failed:\n{}\n{}", r.out, r.err);
        let mut ran = self.fake.log.take();
        ran.sort();
        ran
    }

    fn git(&self, args: &[&str]) {
        let st = Command::new("git").current_dir(self.dir.path()).args(args).output().unwrap();
        assert!(st.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&st.stderr));
    }

    fn temp_leftovers(&self) -> Vec<String> {
        walkdir::WalkDir::new(self.dir.path())
            .into_iter()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().contains(".qpipe-tmp"))
            .map(|e| e.path().display().to_string())
            .collect()
    }
}

fn have_git() -> bool {
    let ok = Command::new("git").arg("--version").output().is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("SKIP: git is not installed; qpipe clean needs it");
    }
    ok
}

#[test]
fn build_everything_then_a_noop_build_runs_nothing() {
    let env = Env::new();
    let ran = env.ok(&["build"]);
    assert_eq!(ran.len(), 10, "{ran:?}"); // 2 preps + 4 × (score, render)
    assert_eq!(env.read("out/a/large/report.md"), "# report\nresult of ALPHA size=\"large\" scale=1\n");
    assert!(env.path("qpipe.lock").is_file());
    let lock: serde_json::Value = serde_json::from_str(&env.read("qpipe.lock")).unwrap();
    let entry = &lock["instances"]["score@out/b/small"];
    assert_eq!(entry["kind"], "score");
    assert_eq!(entry["deps"][0]["path"], "tmp/prep/b.txt");
    assert_eq!(entry["outs"][0]["intermediate"], true);
    assert_eq!(entry["params"]["size"], "small");
    assert!(env.ok(&["build"]).is_empty());
    let st = env.qp(&["status"]);
    assert_eq!(st.code, 0, "{}{}", st.out, st.err);
    assert!(st.out.contains("up to date: 10 instances"), "{}", st.out);
    // Dropping runs from `publish` prunes their entries from qpipe.lock on the next full build.
    fs::write(env.path("pipeline.yaml"), PIPELINE.replace("source: [a, b]", "source: [a]")).unwrap();
    let r = env.qp(&["build"]);
    assert!(r.err.contains("Pruned 5 entries of qpipe.lock"), "{}", r.err);
    assert!(!env.read("qpipe.lock").contains("out/b/"));
    fs::write(env.path("pipeline.yaml"), PIPELINE).unwrap();
    assert_eq!(env.ok(&["build"]).len(), 5, "pruned entries are built again when published again");
    // --force reruns the selection.
    assert_eq!(env.ok(&["build", "--force", "render"]).len(), 10);
}

#[test]
fn status_says_why_an_instance_is_stale() {
    let env = Env::new();
    let st = env.qp(&["status"]);
    assert_eq!(st.code, 1);
    assert!(st.out.contains("missing prep@a") && st.out.contains("never built"), "{}", st.out);
    env.ok(&["build"]);

    // A parameter changed in the pipeline file.
    fs::write(env.path("pipeline.yaml"), PIPELINE.replace("scale: 1", "scale: 2")).unwrap();
    let st = env.qp(&["status"]);
    assert_eq!(st.code, 1);
    assert!(st.out.contains("stale score@out/a/small"), "{}", st.out);
    assert!(st.out.contains("parameters changed: `scale`: 1 → 2"), "{}", st.out);
    assert!(st.out.contains("upstream `score@out/a/small` is stale"), "{}", st.out);
    assert!(!st.out.contains("stale prep@a"), "{}", st.out);
    fs::write(env.path("pipeline.yaml"), PIPELINE).unwrap();
    assert_eq!(env.qp(&["status"]).code, 0);

    // An input file changed.
    fs::write(env.path("data/b.txt"), "beta2").unwrap();
    let st = env.qp(&["status", "--json"]);
    assert_eq!(st.code, 1);
    let j: serde_json::Value = serde_json::from_str(&st.out).unwrap();
    let prep_b = j["instances"].as_array().unwrap().iter().find(|i| i["id"] == "prep@b").unwrap();
    assert_eq!(prep_b["reasons"][0]["kind"], "dep-changed");
    assert_eq!(prep_b["reasons"][0]["detail"], "data/b.txt");
    assert_eq!(j["stale"], 5);
    fs::write(env.path("data/b.txt"), "beta").unwrap();

    // The stage's code changed.
    env.fake.render.set_version("v2");
    let st = env.qp(&["status"]);
    assert!(st.out.contains("stage code changed (version v1 → v2)"), "{}", st.out);
    assert!(st.out.contains("4 of 10 instances stale"), "{}", st.out);
    assert_eq!(env.ok(&["build"]).len(), 4);

    // A published output was deleted or edited.
    fs::remove_file(env.path("out/a/small/report.md")).unwrap();
    fs::write(env.path("out/b/large/result.txt"), "edited").unwrap();
    let st = env.qp(&["status"]);
    assert!(st.out.contains("output `out/a/small/report.md` is missing"), "{}", st.out);
    assert!(st.out.contains("output `out/b/large/result.txt` was modified"), "{}", st.out);
    // score@out/b/large re-makes the same result.txt, so its render stays fresh (early cutoff).
    let ran = env.ok(&["build"]);
    assert_eq!(ran, ["render@out/a/small", "score@out/b/large"]);
    assert_eq!(env.qp(&["status"]).code, 0);
}

#[test]
fn overrides_and_sweeps_build_ad_hoc_runs_into_the_scratch_lock() {
    let env = Env::new();
    let ran = env.ok(&["build", "source=b", "size=medium,huge", "out_dir=tmp/runs/${source.name}-${size}"]);
    assert_eq!(
        ran,
        [
            "prep@b",
            "render@tmp/runs/b-huge",
            "render@tmp/runs/b-medium",
            "score@tmp/runs/b-huge",
            "score@tmp/runs/b-medium"
        ]
    );
    assert!(env.read("tmp/runs/b-huge/result.txt").contains("size=\"huge\""));
    let scratch = env.read("tmp/qpipe/scratch.lock");
    assert!(scratch.contains("score@tmp/runs/b-medium"));
    // prep@b is also an instance of the publish matrix: its entry is committed.
    let committed = env.read("qpipe.lock");
    assert!(committed.contains("\"prep@b\"") && !committed.contains("b-medium"), "{committed}");
    // Same overrides: nothing to do.
    assert!(env.ok(&["build", "source=b", "size=medium,huge", "out_dir=tmp/runs/${source.name}-${size}"]).is_empty());
    // Numbers are YAML-typed: scale=2.5 is a float in the params.
    env.ok(&["build", "scale=2.5", "size=tiny"]);
    assert!(env.read("out/a/tiny/result.txt").contains("scale=2.5"));
}

#[test]
fn the_domains_plan_warnings_are_printed_before_any_work() {
    let env = Env::new();
    for cmd in ["dag", "status", "build"] {
        let r = env.qp(&[cmd, "+warn=this pair is experimental"]);
        assert!(r.err.contains("warning: this pair is experimental"), "{cmd}: {}", r.err);
    }
}

#[test]
fn unknown_names_and_malformed_yaml_are_clear_errors() {
    let env = Env::new();
    let r = env.qp(&["status", "sise=small"]);
    assert_eq!(r.code, 2);
    assert!(r.err.contains("error: unknown key `sise`") && r.err.contains("did you mean `size`"), "{}", r.err);
    let r = env.qp(&["build", "source=c"]);
    assert_eq!(r.code, 1);
    assert!(r.err.contains("unknown option `c` for group `source`; valid options: a, b"), "{}", r.err);
    let r = env.qp(&["build", "prpe"]);
    assert!(r.err.contains("no stage matches target `prpe`") && r.err.contains("did you mean `prep`"), "{}", r.err);
    fs::write(env.path("pipeline.yaml"), "version: 1\nconfig:\n  a: [1, 2\n  b: 3\n").unwrap();
    let r = env.qp(&["dag"]);
    assert_eq!(r.code, 1);
    let first = r.err.lines().next().unwrap();
    assert!(first.starts_with("error: ") && first.contains("pipeline.yaml:4:"), "{}", r.err);
}

#[test]
fn cycles_and_escaping_outputs_are_refused() {
    let env = Env::new();
    let r = env.qp(&["dag", "cycle=true"]);
    assert_eq!(r.code, 1);
    assert!(r.err.contains("dependency cycle: `loop@a` → `loop@b` → `loop@a`"), "{}", r.err);
    let r = env.qp(&["build", "--overwrite-published", "escape=true"]);
    assert_eq!(r.code, 1);
    assert!(r.err.contains("`../escaped.txt`, which escapes the repository root"), "{}", r.err);
    assert!(!env.path("out").exists() && !env.dir.path().parent().unwrap().join("escaped.txt").exists());
}

#[test]
fn a_failing_or_panicking_stage_leaves_no_half_written_output_and_no_lock_entry() {
    let env = Env::new();
    for flag in ["fail=true", "panic=true"] {
        let r = env.qp(&["build", "--overwrite-published", flag, "-j", "1"]);
        assert_eq!(r.code, 1, "{}", r.err);
        assert!(r.err.contains("stage `score@out/a/small` failed"), "{}", r.err);
        assert!(!env.path("out/a/small/result.txt").exists());
        assert!(env.temp_leftovers().is_empty(), "{:?}", env.temp_leftovers());
        let lock = fs::read_to_string(env.path("tmp/qpipe/scratch.lock")).unwrap_or_default()
            + &fs::read_to_string(env.path("qpipe.lock")).unwrap_or_default();
        assert!(lock.contains("prep@a") && !lock.contains("score@"), "{lock}");
        env.fake.log.take();
    }
    // What a killed build left behind is swept when the output is next written.
    fs::create_dir_all(env.path("out/a/small")).unwrap();
    fs::write(env.path("out/a/small/.result.Zx81.qpipe-tmp.txt"), "killed half-way").unwrap();
    // With a good build in place, a failed rebuild keeps the old outputs and entry.
    env.ok(&["build"]);
    let (before, lock_before) = (env.read("out/a/small/result.txt"), env.read("qpipe.lock"));
    let r = env.qp(&["build", "--overwrite-published", "fail=true", "-j", "1", "out/a/small"]);
    assert_eq!(r.code, 1);
    assert_eq!(env.read("out/a/small/result.txt"), before);
    assert_eq!(env.read("qpipe.lock"), lock_before);
    assert!(env.temp_leftovers().is_empty());
    assert!(r.err.contains("not built"), "{}", r.err);
}

/// Not a test by itself: the body of the child process that
/// `a_killed_build_leaves_no_half_written_output_and_no_lock_entry` starts and kills.
#[test]
fn child_build_that_stalls() {
    let Ok(dir) = std::env::var("QPIPE_TEST_CHILD_DIR") else { return };
    let (ui, _, _) = Ui::captured();
    let fake = Fake::new(false);
    qpipe_engine::cli::run(
        ["qpipe", "build", "--overwrite-published", "-j", "1", "stall_ms=60000", "out/a/small"],
        &fake,
        Path::new(&dir),
        ui,
    );
}

#[test]
fn a_killed_build_leaves_no_half_written_output_and_no_lock_entry() {
    let env = Env::new();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_build_that_stalls", "--nocapture"])
        .env("QPIPE_TEST_CHILD_DIR", env.dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t = Instant::now();
    // Wait until score is half-way through writing, and prep's entry (written at most
    // ~100 ms after it finished) is in the lock.
    let prep_locked = || fs::read_to_string(env.path("qpipe.lock")).is_ok_and(|l| l.contains("prep@a"));
    while env.temp_leftovers().is_empty() || !prep_locked() {
        assert!(t.elapsed().as_secs() < 30, "the child never started scoring");
        assert!(child.try_wait().unwrap().is_none(), "the child exited early");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL: no destructor runs
    child.wait().unwrap();
    assert!(!env.path("out/a/small/result.txt").exists(), "a half-written output is in place");
    let lock = fs::read_to_string(env.path("qpipe.lock")).unwrap_or_default()
        + &fs::read_to_string(env.path("tmp/qpipe/scratch.lock")).unwrap_or_default();
    assert!(lock.contains("prep@a") && !lock.contains("score@"), "{lock}");
    assert_eq!(env.temp_leftovers().len(), 1, "the half-written temporary file is all that is left");
    // The next build is not confused, and sweeps the leftover.
    assert_eq!(env.ok(&["build", "out/a/small"]), ["render@out/a/small", "score@out/a/small"]);
    assert!(env.temp_leftovers().is_empty(), "{:?}", env.temp_leftovers());
}

#[test]
fn a_second_build_of_the_same_tree_is_refused() {
    let env = Env::new();
    let held = qpipe_engine::workspace::BuildLock::acquire(&env.root()).unwrap();
    let r = env.qp(&["build"]);
    assert_eq!(r.code, 1);
    assert!(r.err.contains("another qpipe process is building"), "{}", r.err);
    assert!(env.fake.log.take().is_empty());
    // Reading commands do not need the lock.
    assert_eq!(env.qp(&["status"]).code, 1);
    drop(held);
    assert_eq!(env.ok(&["build"]).len(), 10);
}

#[test]
fn targets_are_paths_ids_or_kinds_plus_what_they_need() {
    let env = Env::new();
    assert_eq!(env.ok(&["build", "out/a/small"]), ["prep@a", "render@out/a/small", "score@out/a/small"]);
    assert_eq!(env.ok(&["build", "score@out/b/large"]), ["prep@b", "score@out/b/large"]);
    assert_eq!(env.ok(&["build", "--dry-run", "render"]), Vec::<String>::new());
    let r = env.qp(&["build", "--dry-run", "render"]);
    assert!(r.err.contains("Would run render@out/b/large (never built)"), "{}", r.err);
    assert!(!env.path("out/b/large/report.md").exists());
    let st = env.qp(&["status", "out/a"]);
    assert_eq!(st.code, 1, "out/a/large is not built yet");
    assert_eq!(env.ok(&["build", &env.path("out/a").display().to_string()]).len(), 2);
    assert_eq!(env.qp(&["status", "out/a"]).code, 0);
}

/// An intermediate that is there but holds other bytes than the lock records (a build
/// killed after moving it into place, before recording it) makes its producer stale, so
/// consumers never read it as if it were current (found by `tests/fault_injection.rs`).
#[test]
fn an_intermediate_with_other_bytes_than_recorded_is_remade() {
    let env = Env::new();
    env.ok(&["build"]);
    fs::write(env.path("tmp/prep/a.txt"), "what a killed build of other inputs left").unwrap();
    let st = env.qp(&["status"]);
    assert_eq!(st.code, 1, "{}{}", st.out, st.err);
    assert!(st.out.contains("output `tmp/prep/a.txt` was modified since it was built"), "{}", st.out);
    assert!(env.ok(&["build"]).contains(&"prep@a".to_string()));
    assert_eq!(env.qp(&["status"]).code, 0);
}

#[test]
fn a_missing_intermediate_is_remade_only_when_a_consumer_must_run() {
    let env = Env::new();
    env.ok(&["build"]);
    fs::remove_dir_all(env.path("tmp/prep")).unwrap();
    fs::remove_file(env.path("out/a/small/state.pt")).unwrap();
    assert_eq!(env.qp(&["status"]).code, 0);
    assert!(env.ok(&["build"]).is_empty());
    // A parameter change makes score run, which needs prep's (deleted) output first.
    fs::write(env.path("pipeline.yaml"), PIPELINE.replace("scale: 1", "scale: 3")).unwrap();
    let ran = env.ok(&["build", "out/a/small"]);
    assert_eq!(ran, ["prep@a", "render@out/a/small", "score@out/a/small"]);
    assert!(env.path("tmp/prep/a.txt").is_file());
    // A stage that writes different bytes from the same inputs is called out.
    env.fake.prep.nondeterministic.store(true, std::sync::atomic::Ordering::SeqCst);
    let r = env.qp(&["build", "--force", "prep@a"]);
    assert!(r.err.contains("warning: `prep@a` wrote different bytes to `tmp/prep/a.txt`"), "{}", r.err);
}

#[test]
fn directory_inputs_wait_for_every_producer_and_ignore_intermediates() {
    let env = Env::new();
    let args = ["build", "summary=true", "source=a", "size=small,large"];
    let ran = env.ok(&args);
    assert_eq!(ran.last().map(String::as_str), Some("summary@a"), "{ran:?}");
    assert_eq!(env.read("summaries/a.md"), "6 files");
    let status = ["status", "summary=true", "source=a", "size=small,large"];
    fs::remove_file(env.path("out/a/small/state.pt")).unwrap();
    assert_eq!(env.qp(&status).code, 0, "a deleted intermediate changed a directory input");
    fs::write(env.path("out/a/extra.txt"), "new").unwrap();
    let r = env.qp(&status);
    assert!(r.out.contains("stale summary@a") && r.out.contains("input `out/a` changed"), "{}", r.out);
}

#[test]
fn clean_deletes_only_ignored_declared_intermediates() {
    if !have_git() {
        return;
    }
    let env = Env::new();
    fs::write(env.path(".gitignore"), "*.pt\n/tmp/\n").unwrap();
    env.git(&["init", "-q"]);
    env.ok(&["build"]);
    // A tracked .pt file stays, even though the pipeline declares it an intermediate.
    env.git(&["add", "-A"]);
    env.git(&["add", "-f", "out/b/large/state.pt"]);
    env.git(&["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "built"]);
    fs::write(env.path("out/notes.pt"), "undeclared, ignored").unwrap();
    fs::write(env.path("out/a/.result.x1.qpipe-tmp.txt"), "left by a killed build").unwrap();
    let r = env.qp(&["clean", "--dry-run"]);
    assert_eq!(r.code, 0, "{}", r.err);
    assert!(r.out.contains("out/a/small/state.pt") && r.out.contains("tmp/prep/a.txt"), "{}", r.out);
    assert!(!r.out.contains("out/b/large/state.pt") && !r.out.contains("notes.pt"), "{}", r.out);
    assert!(r.out.contains("out/a/.result.x1.qpipe-tmp.txt"), "{}", r.out);
    assert!(r.err.contains("Would remove 6 files"), "{}", r.err);
    assert!(env.path("out/a/small/state.pt").exists());
    let r = env.qp(&["clean", "--cache"]);
    assert_eq!(r.code, 0, "{}", r.err);
    assert!(!env.path("out/a/small/state.pt").exists() && !env.path("tmp/prep/b.txt").exists());
    assert!(env.path("out/b/large/state.pt").exists() && env.path("out/notes.pt").exists());
    assert!(env.temp_leftovers().is_empty());
    assert!(env.path("out/a/small/result.txt").exists() && env.path("qpipe.lock").exists());
    assert!(!env.path("tmp/qpipe/stat-cache.json").exists());
    assert!(env.ok(&["build"]).is_empty(), "clean made the next build do work");
    assert_eq!(env.qp(&["status"]).code, 0);
}

#[test]
fn clean_outside_a_git_work_tree_refuses() {
    if !have_git() {
        return;
    }
    let env = Env::new();
    env.ok(&["build"]);
    let r = env.qp(&["clean"]);
    if r.code == 0 {
        // The temp dir itself lies inside some git work tree on this machine.
        eprintln!("SKIP: the temporary directory is inside a git work tree");
        return;
    }
    assert!(r.err.contains("asks git which files are ignored"), "{}", r.err);
    assert!(env.path("tmp/prep/a.txt").exists());
}

#[test]
fn independent_stages_run_in_parallel_and_exclusive_ones_alone() {
    let env = Env::new();
    env.ok(&["build", "prep"]);
    let t = Instant::now();
    env.ok(&["build", "sleep_ms=300", "size=s1,s2,s3,s4", "score", "-j", "4"]);
    assert!(t.elapsed().as_millis() < 1100, "4 × 300 ms took {:?} with -j 4", t.elapsed());
    assert!(env.fake.log.max_running.load(std::sync::atomic::Ordering::SeqCst) >= 2);

    let env = Env::with(Fake::new(true));
    env.ok(&["build", "sleep_ms=50", "size=s1,s2,s3", "-j", "4"]);
    assert_eq!(env.fake.log.max_exclusive.load(std::sync::atomic::Ordering::SeqCst), 1, "exclusive stages overlapped");
}

#[test]
fn dag_prints_text_dot_mermaid_and_json() {
    let env = Env::new();
    let r = env.qp(&["dag"]);
    assert!(r.out.contains("score@out/a/small  (score a (\"small\"))\n  after  prep@a\n"), "{}", r.out);
    assert!(env.qp(&["dag", "--format", "dot"]).out.contains("\"prep@a\" -> \"score@out/a/small\";"));
    assert!(env.qp(&["dag", "--format", "mermaid"]).out.starts_with("flowchart LR"));
    let j: serde_json::Value = serde_json::from_str(&env.qp(&["dag", "--format", "json", "out/b"]).out).unwrap();
    assert_eq!(j["nodes"].as_array().unwrap().len(), 5);
    assert_eq!(j["edges"].as_array().unwrap().len(), 4);
}

#[test]
fn verify_rebuilds_into_scratch_and_compares() {
    let env = Env::new();
    env.ok(&["build"]);
    let lock = env.read("qpipe.lock");
    let r = env.qp(&["verify", "--parity", "out/a"]);
    assert_eq!(r.code, 0, "{}{}", r.out, r.err);
    assert!(r.out.contains("2 run(s): 2 at parity"), "{}", r.out);
    assert!(env.path("tmp/qpipe/verify/out/a/small/result.txt").is_file());
    assert_eq!(env.read("qpipe.lock"), lock, "verify touched the committed lock");
    // By folder name; a tampered committed file drifts.
    fs::write(env.path("out/b/large/result.txt"), "tampered").unwrap();
    let r = env.qp(&["verify", "--parity", "large", "--json"]);
    assert_eq!(r.code, 1, "{}{}", r.out, r.err);
    let j: serde_json::Value = serde_json::from_str(&r.out).unwrap();
    assert_eq!(j["result"], "drift");
    assert_eq!(env.read("out/b/large/result.txt"), "tampered");
    // Against a baseline folder.
    let base = tempfile::tempdir().unwrap();
    fs::create_dir_all(base.path().join("x/small")).unwrap();
    fs::copy(env.path("out/a/small/result.txt"), base.path().join("x/small/result.txt")).unwrap();
    let r = env.qp(&["verify", "--parity", "out/a/small", "--baseline", &base.path().display().to_string()]);
    assert_eq!(r.code, 0, "{}{}", r.out, r.err);
    let r = env.qp(&["verify", "--parity", "out/a/large", "--baseline", &base.path().display().to_string()]);
    assert_eq!(r.code, 2, "{}{}", r.out, r.err);
    let r = env.qp(&["verify", "--parity", "weight-int9"]);
    assert_eq!(r.code, 2);
    assert!(r.err.contains("no published run matches"), "{}", r.err);
}

#[test]
fn help_is_everywhere() {
    let env = Env::new();
    for cmd in [
        &["--help"][..],
        &["build", "--help"],
        &["status", "--help"],
        &["verify", "--help"],
        &["clean", "--help"],
        &["dag", "--help"],
    ] {
        let r = env.qp(cmd);
        assert_eq!(r.code, 0, "{cmd:?}");
        assert!(r.out.contains("Usage: qpipe"), "{cmd:?}: {}", r.out);
    }
    assert_eq!(env.qp(&["bogus"]).code, 2);
}

#[test]
fn an_ad_hoc_run_cannot_silently_replace_a_published_one() {
    let env = Env::new();
    assert_eq!(env.ok(&["build"]).len(), 10);
    let published = env.read("out/a/large/result.txt");
    let lock = env.read("qpipe.lock");
    // A small run of `a` pointed at the published large run's folder.
    let r = env.qp(&["build", "size=small", "runner.output_dir=out/a/large"]);
    assert_eq!(r.code, 1, "{}{}", r.out, r.err);
    assert!(r.err.contains("would overwrite the published `score@out/a/large`"), "{}", r.err);
    assert!(r.err.contains("--overwrite-published") && r.err.contains("size=small"), "{}", r.err);
    assert_eq!(env.read("out/a/large/result.txt"), published);
    assert_eq!(env.read("qpipe.lock"), lock);
    assert!(env.fake.log.take().is_empty());
    // Composing exactly the published run is that run: nothing to do.
    assert!(env.ok(&["build", "size=large", "runner.output_dir=out/a/large"]).is_empty());
    // Asked for explicitly, it replaces them.
    assert_eq!(env.ok(&["build", "--overwrite-published", "size=small", "runner.output_dir=out/a/large"]).len(), 2);
    assert!(env.read("out/a/large/result.txt").contains("size=\"small\""));
}

#[test]
fn bad_flags_and_pipeline_paths_are_named() {
    let env = Env::new();
    let r = env.qp(&["build", "-j", "0"]);
    assert_eq!(r.code, 2, "{}{}", r.out, r.err);
    assert!(r.err.contains("at least 1"), "{}", r.err);
    fs::create_dir(env.path("models")).unwrap();
    let r = env.qp(&["--pipeline", "models", "status"]);
    assert_eq!(r.code, 2);
    assert!(r.err.contains("is a directory, not a pipeline file"), "{}", r.err);
    let r = env.qp(&["--pipeline", ".", "status"]);
    assert!(r.err.contains("did you mean `--pipeline"), "{}", r.err);
    assert!(env.fake.log.take().is_empty());
}

#[cfg(unix)]
#[test]
fn builds_keep_the_state_files_mode_and_sweep_a_killed_writers_temporaries() {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::new();
    env.ok(&["build", "out/a/small"]);
    fs::set_permissions(env.path("qpipe.lock"), fs::Permissions::from_mode(0o644)).unwrap();
    // What a build killed between creating the lock's temporary copy and renaming it left:
    // this version's name (a writer that is gone) and an older version's.
    fs::write(env.path(".qpipe.4194303-1-0.qpipe-tmp.lock"), "{}").unwrap();
    fs::write(env.path(".qpipe-Ab12Cd"), "{}").unwrap();
    fs::create_dir_all(env.path("tmp/qpipe")).unwrap();
    fs::write(env.path("tmp/qpipe/.scratch.4194303-1-3.qpipe-tmp.lock"), "{}").unwrap();
    env.ok(&["build"]);
    assert_eq!(fs::metadata(env.path("qpipe.lock")).unwrap().permissions().mode() & 0o777, 0o644);
    assert!(env.temp_leftovers().is_empty(), "{:?}", env.temp_leftovers());
    assert!(!env.path(".qpipe-Ab12Cd").exists());
}

#[test]
fn two_workspaces_building_into_one_output_folder_do_not_break_each_other() {
    let shared = tempfile::tempdir().unwrap();
    let out = shared.path().join("run");
    let out_arg = format!("runner.output_dir={}", out.display());
    let envs = [Env::new(), Env::new()];
    std::thread::scope(|s| {
        for env in &envs {
            let out_arg = out_arg.clone();
            s.spawn(move || {
                for _ in 0..15 {
                    let r = env.qp(&["build", "--force", "sleep_ms=2", &out_arg, "size=small"]);
                    assert_eq!(r.code, 0, "{}{}", r.out, r.err);
                }
            });
        }
    });
    assert!(fs::read_to_string(out.join("result.txt")).unwrap().starts_with("result of ALPHA"));
    let left: Vec<_> = fs::read_dir(&out).unwrap().flatten().map(|e| e.file_name()).collect();
    assert!(left.iter().all(|n| !n.to_string_lossy().contains(".qpipe-tmp")), "{left:?}");
}

/// A build killed while a stage wrote its output leaves that output's temporary file; when
/// the old output is still in place the instance is fresh and does not run, and the next
/// build must sweep the leftover anyway (found by `tests/fault_injection.rs`).
#[test]
fn leftovers_of_a_fresh_instances_output_are_swept() {
    let env = Env::new();
    env.ok(&["build", "out/a/small"]);
    let dead = env.path("out/a/small/.result.4194303-1-0.qpipe-tmp.txt");
    fs::write(&dead, "half").unwrap();
    assert!(env.ok(&["build", "out/a/small"]).is_empty(), "everything is fresh");
    assert!(env.temp_leftovers().is_empty(), "{:?}", env.temp_leftovers());
}

/// Two workspaces share a cache folder: what one built, the other restores instead of
/// running (same bytes, same lock), `--force` still runs, a damaged entry is reported and
/// the stage runs instead, and `qpipe cache gc` empties it.
#[test]
fn a_shared_cache_restores_what_another_workspace_built() {
    let cache = tempfile::tempdir().unwrap();
    let pipeline = format!("{PIPELINE}cache:\n  dir: {}\n", cache.path().display());
    let envs = [Env::new(), Env::new(), Env::new()];
    for env in &envs {
        fs::write(env.path("pipeline.yaml"), &pipeline).unwrap();
    }
    let [a, b, c] = &envs;
    let ran = a.ok(&["build"]);
    assert!(ran.len() >= 8, "{ran:?}");

    let r = b.qp(&["build"]);
    assert_eq!(r.code, 0, "{}", r.err);
    assert!(b.fake.log.take().is_empty(), "a stage ran where the cache had it:\n{}", r.err);
    assert!(r.err.contains(&format!("(0 ran, {} restored from the cache, 0 fresh)", ran.len())), "{}", r.err);
    for f in ["qpipe.lock", "out/a/small/result.txt", "out/b/large/report.md", "tmp/prep/a.txt"] {
        assert_eq!(a.read(f), b.read(f), "{f}");
    }
    assert_eq!(b.qp(&["status"]).code, 0);
    assert!(b.temp_leftovers().is_empty(), "{:?}", b.temp_leftovers());
    // --force runs, whatever the cache holds.
    assert_eq!(b.ok(&["build", "--force", "out/a/small"]).len(), 3);

    // A damaged entry: reported, and the stage runs instead.
    for e in walkdir::WalkDir::new(cache.path()).into_iter().flatten() {
        if e.file_type().is_file() && e.file_name() == "0" {
            fs::write(e.path(), "damaged").unwrap();
        }
    }
    let r = c.qp(&["build", "out/a/small"]);
    assert_eq!(r.code, 0, "{}", r.err);
    assert!(r.err.contains("a damaged cache") && r.err.contains("running `"), "{}", r.err);
    assert_eq!(c.fake.log.take().len(), 3, "{}", r.err);
    assert_eq!(a.read("out/a/small/result.txt"), c.read("out/a/small/result.txt"));

    let r = a.qp(&["cache", "gc", "--older-than", "0"]);
    assert_eq!(r.code, 0, "{}", r.err);
    assert!(r.err.contains(&format!("Removed {} cache entries", ran.len())), "{}", r.err);
    let left: Vec<_> =
        walkdir::WalkDir::new(cache.path()).into_iter().flatten().filter(|e| e.file_type().is_file()).collect();
    assert!(left.is_empty(), "{left:?}");
}

/// Instances with one fusion key run as one execution (the stage's `run_fused`), each with
/// its own outputs and lock entry: the same bytes as run alone; one going stale runs alone.
#[test]
fn instances_with_one_fusion_key_run_as_one_execution() {
    let (fused, alone) = (Env::new(), Env::new());
    for (env, fuse) in [(&fused, "true"), (&alone, "false")] {
        fs::write(
            env.path("pipeline.yaml"),
            PIPELINE.replace("  size: small\n", &format!("  size: small\n  fuse: {fuse}\n")),
        )
        .unwrap();
        env.ok(&["build", "-j", "1"]);
    }
    let groups = fused.fake.log.fused.lock().unwrap().clone();
    assert!(alone.fake.log.fused.lock().unwrap().is_empty());
    // 4 runs: a and b at sizes small and large; each source's two become ready together.
    assert_eq!(groups.iter().map(Vec::len).sum::<usize>(), 4, "{groups:?}");
    assert!(groups.iter().all(|g| g.len() >= 2), "{groups:?}");
    for f in ["qpipe.lock", "out/a/small/result.txt", "out/b/large/result.txt", "out/a/large/report.md"] {
        assert_eq!(fused.read(f), alone.read(f), "{f}");
    }
    let lock: serde_json::Value = serde_json::from_str(&fused.read("qpipe.lock")).unwrap();
    let entries = lock["instances"].as_object().unwrap();
    assert_eq!(entries.keys().filter(|k| k.starts_with("score@")).count(), 4, "{entries:?}");
    assert_eq!(fused.qp(&["status"]).code, 0);
    // One instance stale: it runs alone (and writes what render read before: render is fresh).
    fs::write(fused.path("out/a/small/result.txt"), "edited").unwrap();
    fused.fake.log.fused.lock().unwrap().clear();
    let ran = fused.ok(&["build", "-j", "1"]);
    assert_eq!(ran, ["score@out/a/small"]);
    assert!(fused.fake.log.fused.lock().unwrap().is_empty(), "a group of one is an ordinary run");
}

#[test]
fn keep_going_builds_everything_that_does_not_depend_on_a_failure() {
    let env = Env::new();
    let r = env.qp(&["build", "-k", "-j", "1", "fail=true,false", "out_dir=tmp/k/${fail}"]);
    assert_eq!(r.code, 1, "{}", r.err);
    assert!(r.err.contains("scoring failed half-way"), "{}", r.err);
    // (Without -k the same order stops after `score@tmp/k/true` fails: no report.)
    assert!(env.path("tmp/k/false/report.md").exists(), "the run that does not fail is built:\n{}", r.err);
    assert!(!env.path("tmp/k/true/result.txt").exists());
    assert!(env.temp_leftovers().is_empty(), "{:?}", env.temp_leftovers());
    let r = env.qp(&["build", "--retries", "1"]);
    assert_eq!(r.code, 1);
    assert!(r.err.contains("--executor slurm"), "{}", r.err);
}
