//! Terminal output, cargo style: right-aligned status words on stderr, results on stdout,
//! progress bars (indicatif) only when stderr is a terminal.

use std::io::{IsTerminal, Write};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use qpipe_contract::Progress;

type Sink = Mutex<Box<dyn Write + Send>>;

/// Where a command's output goes.
pub struct Ui {
    out: Sink,
    err: Sink,
    color: bool,
    bars: bool,
    multi: MultiProgress,
    pub verbose: bool,
}

/// A shared in-memory buffer (tests).
#[derive(Clone, Default)]
pub struct Buffer(pub Arc<Mutex<Vec<u8>>>);

impl Buffer {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl Write for Buffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Ui {
    /// The process's stdout/stderr; colors and bars when stderr is a terminal.
    pub fn stdio() -> Ui {
        let tty = std::io::stderr().is_terminal();
        let color = tty && std::env::var_os("NO_COLOR").is_none();
        let multi = MultiProgress::with_draw_target(if tty {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        });
        Ui {
            out: Mutex::new(Box::new(std::io::stdout())),
            err: Mutex::new(Box::new(std::io::stderr())),
            color,
            bars: tty,
            multi,
            verbose: false,
        }
    }

    /// Output captured in buffers, no colors, no bars.
    pub fn captured() -> (Ui, Buffer, Buffer) {
        let (o, e) = (Buffer::default(), Buffer::default());
        let ui = Ui {
            out: Mutex::new(Box::new(o.clone())),
            err: Mutex::new(Box::new(e.clone())),
            color: false,
            bars: false,
            multi: MultiProgress::with_draw_target(ProgressDrawTarget::hidden()),
            verbose: false,
        };
        (ui, o, e)
    }

    fn paint(&self, code: &str, s: &str) -> String {
        if self.color {
            format!("\x1b[{code}m{s}\x1b[0m")
        } else {
            s.to_string()
        }
    }

    fn write_err(&self, line: &str) {
        self.multi.suspend(|| {
            let mut e = self.err.lock().unwrap();
            let _ = writeln!(e, "{line}");
            let _ = e.flush();
        });
    }

    /// `   Compiling foo`-style line on stderr (green word).
    pub fn status(&self, word: &str, msg: &str) {
        self.write_err(&format!("{} {msg}", self.paint("1;32", &format!("{word:>12}"))));
    }

    /// Same, in cyan (informational: `Fresh`, `Would run`).
    pub fn info(&self, word: &str, msg: &str) {
        self.write_err(&format!("{} {msg}", self.paint("1;36", &format!("{word:>12}"))));
    }

    pub fn warn(&self, msg: &str) {
        self.write_err(&format!("{}: {msg}", self.paint("1;33", "warning")));
    }

    /// `error: …` and its `caused by:` chain.
    pub fn error(&self, e: &anyhow::Error) {
        let mut s = format!("{}: {e}", self.paint("1;31", "error"));
        let causes: Vec<String> = e.chain().skip(1).map(|c| c.to_string()).collect();
        if !causes.is_empty() {
            s.push_str("\n\ncaused by:");
            for c in causes {
                for (i, line) in c.lines().enumerate() {
                    s.push_str(if i == 0 { "\n  " } else { "\n    " });
                    s.push_str(line);
                }
            }
        }
        self.write_err(&s);
    }

    /// A plain line on stderr.
    pub fn note(&self, msg: &str) {
        self.write_err(msg);
    }

    /// A line (or block) on stdout.
    pub fn out(&self, text: &str) {
        self.multi.suspend(|| {
            let mut o = self.out.lock().unwrap();
            let _ = o.write_all(text.as_bytes());
            if !text.ends_with('\n') {
                let _ = o.write_all(b"\n");
            }
            let _ = o.flush();
        });
    }

    /// Progress reporting for one running stage.
    pub fn stage_progress(&self, id: &str) -> StageProgress<'_> {
        let bar = if self.bars {
            let b = self.multi.add(ProgressBar::new_spinner());
            b.set_style(spinner_style());
            b.set_prefix(id.to_string());
            b.enable_steady_tick(Duration::from_millis(120));
            b
        } else {
            ProgressBar::hidden()
        };
        StageProgress { ui: self, bar }
    }
}

fn spinner_style() -> ProgressStyle {
    ProgressStyle::with_template("{spinner:.cyan} {prefix} {msg} {elapsed}")
        .unwrap_or_else(|_| ProgressStyle::default_spinner())
}

fn bar_style() -> ProgressStyle {
    ProgressStyle::with_template("{spinner:.cyan} {prefix} {msg} [{bar:30.cyan/blue}] {pos}/{len} ({eta})")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ")
}

/// The engine's [`Progress`]: a spinner or bar per running stage.
pub struct StageProgress<'a> {
    ui: &'a Ui,
    bar: ProgressBar,
}

impl Progress for StageProgress<'_> {
    fn phase(&self, name: &str, total: Option<u64>) {
        self.bar.reset();
        match total {
            Some(n) => {
                self.bar.set_style(bar_style());
                self.bar.set_length(n);
            }
            None => {
                self.bar.set_style(spinner_style());
                self.bar.unset_length();
            }
        }
        self.bar.set_message(name.to_string());
    }
    fn advance(&self, n: u64) {
        self.bar.inc(n);
    }
    fn detail(&self, msg: &str) {
        self.bar.set_message(msg.to_string());
    }
    fn note(&self, msg: &str) {
        match msg.strip_prefix("warning: ") {
            Some(w) => self.ui.warn(w),
            None => self.ui.note(msg),
        }
    }
}

impl Drop for StageProgress<'_> {
    fn drop(&mut self) {
        self.bar.finish_and_clear();
        self.ui.multi.remove(&self.bar);
    }
}
