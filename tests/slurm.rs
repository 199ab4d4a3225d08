//! `qpipe build --executor slurm` against a real Slurm (a one-node cluster on this machine:
//! `scripts/slurm_local.sh start`, which `.ci/run` runs). Without a healthy cluster every
//! test here says SKIP on stderr and passes — unless `QPIPE_REQUIRE_SLURM=1` (CI sets it
//! once the cluster is up), where a missing cluster fails them.

mod support;

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use support::real::{repo, text, workspace_copy};

/// Whether the cluster answers and its node takes jobs; prints why not.
fn slurm_ready(test: &str) -> bool {
    let out = Command::new("sinfo").args(["-h", "-o", "%t"]).output();
    let ok = matches!(&out, Ok(o) if o.status.success()
        && String::from_utf8_lossy(&o.stdout).lines().any(|s| ["idle", "mix", "alloc"].contains(&s.trim())));
    if !ok {
        let why = match out {
            Ok(o) => {
                format!("sinfo says: {}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
            }
            Err(e) => format!("no `sinfo` ({e})"),
        };
        assert!(
            std::env::var("QPIPE_REQUIRE_SLURM").map_or(true, |v| v != "1"),
            "{test}: QPIPE_REQUIRE_SLURM=1 but no healthy Slurm cluster: {why}"
        );
        eprintln!("SKIP {test}: no healthy Slurm cluster ({why}); start one with `scripts/slurm_local.sh start`");
    }
    ok
}

/// Adds an `executor:` section to the copy's pipeline.yaml (it changes no key).
fn with_executor(dir: &Path, section: &str) {
    let p = dir.join("pipeline.yaml");
    let base = fs::read_to_string(repo().join("pipeline.yaml")).unwrap();
    fs::write(p, format!("{base}\nexecutor:\n{section}")).unwrap();
}

fn qpipe_env(dir: &Path, args: &[&str], env: &[(&str, &Path)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_qpipe"));
    c.current_dir(dir).args(args).env("NO_COLOR", "1");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

/// A `qpipe` build running in the background, its stderr going to a file.
struct Background {
    child: Child,
    err: PathBuf,
}

impl Background {
    fn start(dir: &Path, args: &[&str]) -> Background {
        let err = dir.join("build.stderr");
        let child = Command::new(env!("CARGO_BIN_EXE_qpipe"))
            .current_dir(dir)
            .args(args)
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(fs::File::create(&err).unwrap())
            .spawn()
            .unwrap();
        Background { child, err }
    }

    fn stderr(&self) -> String {
        let mut s = String::new();
        fs::File::open(&self.err).unwrap().read_to_string(&mut s).unwrap();
        s
    }

    /// The job id of the n-th `Submitted … (Slurm job N)` line, waiting up to a minute.
    fn submitted(&self, n: usize) -> String {
        let t0 = Instant::now();
        loop {
            let jobs: Vec<String> = self
                .stderr()
                .lines()
                .filter(|l| l.contains("Submitted"))
                .filter_map(|l| l.rsplit("Slurm job ").next()?.strip_suffix(')').map(str::to_string))
                .collect();
            if let Some(j) = jobs.get(n) {
                return j.clone();
            }
            assert!(t0.elapsed() < Duration::from_secs(60), "no job submitted:\n{}", self.stderr());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn wait(mut self) -> (Option<i32>, String) {
        let status = self.child.wait().unwrap();
        (status.code(), self.stderr())
    }
}

/// `scontrol show job -o ID`.
fn job_record(job: &str) -> String {
    let o = Command::new("scontrol").args(["show", "job", "-o", job]).output().unwrap();
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The files git tracks below `sub` in the repository.
fn tracked(sub: &str) -> Vec<String> {
    let o = Command::new("git").current_dir(repo()).args(["ls-files", sub]).output().unwrap();
    assert!(o.status.success());
    String::from_utf8_lossy(&o.stdout).lines().map(str::to_string).collect()
}

/// The published grid built through Slurm in a fresh copy is the committed one byte for
/// byte (analyses and `qpipe.lock`); the score jobs asked for a GPU through `--gres`; a
/// second copy sharing the cache then builds it locally with nothing run.
#[test]
fn the_published_grid_built_on_slurm_is_the_committed_one_and_a_second_clone_restores_it() {
    if !slurm_ready("the_published_grid_built_on_slurm") {
        return;
    }
    let cache = tempfile::tempdir().unwrap();
    let a = workspace_copy();
    with_executor(
        a.path(),
        "  slurm:\n    poll_seconds: 0.2\n    stages:\n      score: {sbatch_args: [\"--gres=gpu:1\"]}\n      docs: {local: true}\n",
    );
    let o = qpipe_env(a.path(), &["build", "--executor", "slurm"], &[("QPIPE_CACHE_DIR", cache.path())]);
    let (_, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("Submitted"), "{err}");
    // `local: true` kinds run in the submitting process.
    assert!(err.contains("Running docs@") && !err.contains("Submitted docs@"), "{err}");
    for f in tracked("models/tiny_qwen3_vl/layer-analysis").iter().chain([&"qpipe.lock".to_string()]) {
        let built = fs::read(a.path().join(f)).unwrap_or_else(|e| panic!("{f} was not built: {e}\n{err}"));
        assert!(built == fs::read(repo().join(f)).unwrap(), "{f} differs from the committed file");
    }
    // The score jobs' GPU request reached Slurm (the node has a configured `gpu:2`).
    let score_job = err
        .lines()
        .find(|l| l.contains("Submitted") && l.contains("score@"))
        .and_then(|l| l.rsplit("Slurm job ").next()?.strip_suffix(')'))
        .unwrap_or_else(|| panic!("no score job:\n{err}"));
    let rec = job_record(score_job);
    assert!(rec.contains("gpu:1") || rec.contains("gpu=1"), "job {score_job}: {rec}");
    // No job left in flight, so status has nothing queued to show.
    let o = qpipe_env(a.path(), &["status"], &[]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o).0);

    let b = workspace_copy();
    let o = qpipe_env(b.path(), &["build"], &[("QPIPE_CACHE_DIR", cache.path())]);
    let (_, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("(0 ran, 67 restored from the cache, 0 fresh)") && !err.contains("Running"), "{err}");
    assert_eq!(fs::read(b.path().join("qpipe.lock")).unwrap(), fs::read(repo().join("qpipe.lock")).unwrap());
}

/// Control of jobs in flight: `status` shows a queued one; `scancel` fails the build
/// cleanly (naming the job), also after `--retries`; Ctrl-C cancels what qpipe submitted;
/// the next build completes. Jobs are held in the queue with `--begin` so that each step
/// finds them there.
#[test]
fn cancelled_jobs_fail_the_build_cleanly_and_the_rerun_completes() {
    if !slurm_ready("cancelled_jobs_fail_the_build_cleanly") {
        return;
    }
    let d = workspace_copy();
    let dir = d.path();
    with_executor(dir, "  slurm:\n    poll_seconds: 0.2\n    sbatch_args: [\"--begin=now+600\"]\n");
    let run =
        ["quant_pair=wint8_aint8", "dataset.max_calib_samples=8", "dataset.calib_seq_len=32", "output_layout=tmp"];
    let build = |extra: &[&str]| {
        let mut a = vec!["build", "--executor", "slurm"];
        a.extend_from_slice(extra);
        a.extend_from_slice(&run);
        Background::start(dir, &a)
    };

    // 1. Queued: `status` says so; `scancel` fails the build, naming the job.
    let bg = build(&[]);
    let job = bg.submitted(0);
    let mut st = vec!["status"];
    st.extend_from_slice(&run);
    let o = qpipe_env(dir, &st, &[]);
    let (out, _) = text(&o);
    assert!(out.contains("queued") && out.contains(&format!("Slurm job {job}")), "{out}");
    assert!(Command::new("scancel").arg(&job).status().unwrap().success());
    let (code, err) = bg.wait();
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains(&format!("Slurm job {job}")) && err.contains("CANCELLED"), "{err}");

    // 2. `--retries 1` resubmits it once.
    let bg = build(&["--retries", "1"]);
    let first = bg.submitted(0);
    Command::new("scancel").arg(&first).status().unwrap();
    let second = bg.submitted(1);
    assert_ne!(first, second);
    Command::new("scancel").arg(&second).status().unwrap();
    let (code, err) = bg.wait();
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("retrying (1 of 1)") && err.contains(&format!("Slurm job {second}")), "{err}");

    // 3. Ctrl-C: qpipe cancels its job and exits 130.
    let bg = build(&[]);
    let job = bg.submitted(0);
    let pid = bg.child.id().to_string();
    assert!(Command::new("kill").args(["-INT", &pid]).status().unwrap().success());
    let (code, err) = bg.wait();
    assert_eq!(code, Some(130), "{err}");
    assert!(err.contains("cancelled 1 Slurm job(s)") && err.contains(&job), "{err}");
    let t0 = Instant::now();
    while !job_record(&job).contains("JobState=CANCELLED") {
        assert!(t0.elapsed() < Duration::from_secs(30), "job {job} not cancelled: {}", job_record(&job));
        std::thread::sleep(Duration::from_millis(200));
    }

    // 4. Without the hold the same build completes, and is then up to date.
    with_executor(dir, "  slurm:\n    poll_seconds: 0.2\n");
    let (code, err) = build(&[]).wait();
    assert_eq!(code, Some(0), "{err}");
    let o = qpipe_env(dir, &st, &[]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o).0);
}

/// A worker refuses work whose key is not the one it was submitted under.
#[test]
fn a_job_whose_inputs_changed_after_submission_does_not_run() {
    if !slurm_ready("a_job_whose_inputs_changed_after_submission_does_not_run") {
        return;
    }
    let d = workspace_copy();
    let dir = d.path();
    with_executor(dir, "  slurm:\n    poll_seconds: 0.2\n    sbatch_args: [\"--begin=now+3\"]\n");
    let bg = Background::start(
        dir,
        &["build", "--executor", "slurm", "output_layout=tmp", "quant_pair=wint8_aint8", "dataset.max_calib_samples=8"],
    );
    // The second job (build-calib, after fetch-model) reads the captions: change them while
    // it waits in the queue.
    bg.submitted(1);
    let captions = dir.join("data/calibration/captions.txt");
    let mut text_now = fs::read_to_string(&captions).unwrap();
    text_now.insert_str(0, "A caption added after submission.\n");
    fs::write(&captions, text_now).unwrap();
    let (code, err) = bg.wait();
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("is not the work that was submitted"), "{err}");
}
