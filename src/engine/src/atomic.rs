//! Files replaced atomically, and the temporary files a killed writer leaves behind.
//!
//! Every temporary file qpipe (or a stage, through the paths the engine hands it) writes
//! sits beside its final path and is named `.<stem>.<writer>.qpipe-tmp<.ext>`, where
//! `<writer>` is `<pid>-<process start>-<n>`: one pattern, covered by `.gitignore`
//! (`.*.qpipe-tmp*`) and removed by `qpipe clean`. A sweep removes only files whose writer
//! is gone (no process with that pid started at that time), so two qpipe processes that
//! write into one folder (two checkouts sharing a `runner.output_dir`) never delete each
//! other's files in flight.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use anyhow::{Context, Result};

/// What every temporary file name contains.
pub const TEMP_MARK: &str = ".qpipe-tmp";

/// `<pid>-<start>` of this process (`start` = its start time in clock ticks since boot,
/// from `/proc/self/stat`; 0 where there is no `/proc`).
fn writer_id() -> &'static str {
    static ID: OnceLock<String> = OnceLock::new();
    ID.get_or_init(|| {
        let pid = std::process::id();
        format!("{pid}-{}", start_time(pid).unwrap_or(0))
    })
}

/// The start time of process `pid` (field 22 of `/proc/<pid>/stat`), if it is running.
fn start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: fields resume after the
    // last `)`, at field 3.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// The temporary path for writing `final_path`: `.<stem>.<writer>.qpipe-tmp<.ext>` in the
/// same directory (so the rename into place is atomic). Unique within this process.
pub fn temp_path(final_path: &Path) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let (prefix, suffix) = temp_affixes(final_path);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    final_path.with_file_name(format!("{prefix}{}-{n}{suffix}", writer_id()))
}

/// `(".<stem>.", ".qpipe-tmp<.ext>")`: what every temporary name of `final_path` starts
/// and ends with, around its writer.
fn temp_affixes(final_path: &Path) -> (String, String) {
    let name = final_path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let (stem, ext) = match name.rsplit_once('.') {
        Some((s, e)) if !s.is_empty() => (s.to_string(), format!(".{e}")),
        _ => (name.clone(), String::new()),
    };
    (format!(".{stem}."), format!("{TEMP_MARK}{ext}"))
}

/// Whether `name` is a temporary name of `final_path` (by any writer, this version's or
/// an older one's).
pub fn is_temp_for(name: &str, final_path: &Path) -> bool {
    let (prefix, suffix) = temp_affixes(final_path);
    name.len() > prefix.len() + suffix.len()
        && name.starts_with(&prefix)
        && name.ends_with(&suffix)
        && !name[prefix.len()..name.len() - suffix.len()].contains('.')
}

/// Whether `name` is a qpipe temporary file name (any writer).
pub fn is_temp_name(name: &str) -> bool {
    name.starts_with('.') && name.contains(TEMP_MARK)
}

/// Whether the writer of the temporary file `name` may still be writing it: its pid runs
/// and started when the name says. Names without a writer (older qpipe versions) and
/// writers that are gone are not alive. Where there is no `/proc`, only this process
/// counts as alive.
pub fn writer_alive(name: &str) -> bool {
    let Some(head) = name.split(TEMP_MARK).next() else { return false };
    let Some(writer) = head.rsplit('.').next() else { return false };
    let mut parts = writer.split('-');
    let (Some(pid), Some(start)) = (parts.next(), parts.next()) else { return false };
    let (Ok(pid), Ok(start)) = (pid.parse::<u32>(), start.parse::<u64>()) else { return false };
    if pid == std::process::id() {
        return true;
    }
    start_time(pid) == Some(start)
}

/// Removes the temporary files in `dir` that `keep_name` selects and whose writer is gone
/// (see [`writer_alive`]); returns how many it removed. A missing `dir` is not an error.
pub fn sweep_dead(dir: &Path, select: impl Fn(&str) -> bool) -> usize {
    let Ok(entries) = fs::read_dir(dir) else { return 0 };
    let mut removed = 0;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let stale = (is_temp_name(&name) || is_legacy_state_temp(&name)) && select(&name) && !writer_alive(&name);
        if stale && fs::remove_file(e.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

/// `.qpipe-XXXXXX`: what older qpipe versions named a state file's (`qpipe.lock`,
/// `scratch.lock`, `stat-cache.json`) temporary copy.
pub fn is_legacy_state_temp(name: &str) -> bool {
    name.strip_prefix(".qpipe-").is_some_and(|r| r.len() == 6 && r.bytes().all(|b| b.is_ascii_alphanumeric()))
}

/// Writes `bytes` to `path` atomically: a temporary file in the same directory
/// ([`temp_path`]), renamed into place. The file keeps the mode of the one it replaces;
/// a new one gets the default mode (0666 less the umask). No fsync (it cost ~10 ms per
/// lock write): the rename is atomic for readers and for a killed qpipe; only a power cut
/// right after a write can leave a truncated file, which qpipe then reports as corrupt
/// rather than trusting.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    fs::create_dir_all(dir).with_context(|| format!("cannot create directory `{}`", dir.display()))?;
    let tmp = temp_path(path);
    let result = (|| -> Result<()> {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .with_context(|| format!("cannot create a temporary file in `{}`", dir.display()))?;
        f.write_all(bytes).with_context(|| format!("cannot write `{}`", tmp.display()))?;
        drop(f);
        keep_mode(&tmp, path)?;
        fault_pause();
        fs::rename(&tmp, path).with_context(|| format!("cannot rename into `{}`", path.display()))
    })();
    if result.is_err() {
        fs::remove_file(&tmp).ok();
    }
    result
}

/// For fault-injection tests: `QPIPE_FAULT_PAUSE_MS=N` waits N ms before each rename of a
/// finished temporary file into place (state files and stage outputs), so that a test can
/// kill a build inside that window. Unset (always, outside tests), it does nothing.
pub fn fault_pause() {
    static PAUSE: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    let pause = PAUSE.get_or_init(|| std::env::var("QPIPE_FAULT_PAUSE_MS").ok().and_then(|v| v.parse().ok()));
    if let Some(ms) = *pause {
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
}

/// Gives `tmp` the permissions of `existing` when that exists (a rename into place must not
/// change a tracked file's mode).
pub fn keep_mode(tmp: &Path, existing: &Path) -> Result<()> {
    if let Ok(meta) = fs::metadata(existing) {
        fs::set_permissions(tmp, meta.permissions())
            .with_context(|| format!("cannot set the permissions of `{}`", tmp.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temp_names_follow_the_ignored_pattern() {
        let t = temp_path(Path::new("/r/qpipe.lock"));
        let name = t.file_name().unwrap().to_string_lossy().into_owned();
        assert!(name.starts_with(".qpipe.") && name.ends_with(".qpipe-tmp.lock"), "{name}");
        assert!(is_temp_name(&name));
        assert!(writer_alive(&name), "this process is writing it");
        let t2 = temp_path(Path::new("/r/README"));
        assert!(t2.file_name().unwrap().to_string_lossy().ends_with(".qpipe-tmp"));
        assert_ne!(temp_path(Path::new("/r/a.json")), temp_path(Path::new("/r/a.json")));
        let a = Path::new("/r/a.json");
        assert!(is_temp_for(&temp_path(a).file_name().unwrap().to_string_lossy(), a));
        assert!(is_temp_for(".a.Zx81.qpipe-tmp.json", a), "an older version's name");
        assert!(!is_temp_for(".a.b.1-2-3.qpipe-tmp.json", a), "a.b.json's, not a.json's");
        assert!(!is_temp_for(".a.1-2-3.qpipe-tmp.md", a));
    }

    #[test]
    fn only_dead_writers_temps_are_swept() {
        let d = tempfile::tempdir().unwrap();
        let mine = temp_path(&d.path().join("x.json"));
        fs::write(&mine, "in flight").unwrap();
        // pid 1 runs (init), but did not start at that tick; a pid that does not exist.
        let dead = d.path().join(".x.1-999999999999-0.qpipe-tmp.json");
        let gone = d.path().join(".x.4194303-5-0.qpipe-tmp.json");
        let legacy = d.path().join(".qpipe-AbC123");
        let other = d.path().join(".hidden");
        for p in [&dead, &gone, &legacy, &other] {
            fs::write(p, "left by a killed build").unwrap();
        }
        assert_eq!(sweep_dead(d.path(), |_| true), 3);
        assert!(mine.exists() && other.exists());
        assert!(!dead.exists() && !gone.exists() && !legacy.exists());
    }

    #[cfg(unix)]
    #[test]
    fn replacing_a_file_keeps_its_mode() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("qpipe.lock");
        fs::write(&p, "old").unwrap();
        for mode in [0o644, 0o664, 0o600] {
            fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
            write_atomic(&p, b"new").unwrap();
            assert_eq!(fs::metadata(&p).unwrap().permissions().mode() & 0o777, mode);
            assert_eq!(fs::read_to_string(&p).unwrap(), "new");
        }
        // A new file gets the umask's default, as `std::fs::write` would give it.
        let fresh = d.path().join("new.json");
        let reference = d.path().join("reference");
        fs::write(&reference, "").unwrap();
        write_atomic(&fresh, b"{}").unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&fresh), mode(&reference));
        assert!(fs::read_dir(d.path()).unwrap().flatten().all(|e| !is_temp_name(&e.file_name().to_string_lossy())));
    }
}
