//! Progress of long CLI work (`bench`, `verify-golden`, model loading): a bar on a terminal,
//! plain periodic lines otherwise (logs, CI): log lines where logging is set up, else stderr,
//! so stdout stays the result.

use std::io::IsTerminal as _;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

/// How often a plain line is written when stderr is not a terminal.
const PLAIN_EVERY: Duration = Duration::from_secs(5);

enum Out {
    Bar(ProgressBar),
    /// Done count and when the last line was written.
    Plain {
        done: u64,
        last: Instant,
    },
    /// Nothing at all (tests, or work too short to report).
    Quiet,
}

/// The progress of `total` units of one task.
pub struct Progress {
    label: String,
    total: u64,
    out: Mutex<Out>,
}

impl Progress {
    /// A bar when stderr is a terminal, else plain lines every few seconds.
    pub fn new(label: &str, total: u64) -> Self {
        Self::with(label, total, std::io::stderr().is_terminal())
    }

    /// No output (for library callers that report elsewhere).
    pub fn quiet() -> Self {
        Progress { label: String::new(), total: 0, out: Mutex::new(Out::Quiet) }
    }

    fn with(label: &str, total: u64, terminal: bool) -> Self {
        let out = if terminal {
            let bar = ProgressBar::new(total);
            let style = ProgressStyle::with_template(
                "{prefix} [{bar:30}] {pos}/{len} {elapsed_precise} eta {eta} {msg}",
            )
            .map(|s| s.progress_chars("=> "))
            .unwrap_or_else(|_| ProgressStyle::default_bar());
            bar.set_style(style);
            bar.set_prefix(label.to_string());
            Out::Bar(bar)
        } else {
            plain(label, 0, total, "");
            Out::Plain { done: 0, last: Instant::now() }
        };
        Progress { label: label.to_string(), total, out: Mutex::new(out) }
    }

    /// `n` more units done; `what` names the current one.
    pub fn advance(&self, n: u64, what: &str) {
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        match &mut *out {
            Out::Bar(bar) => {
                bar.set_message(what.to_string());
                bar.inc(n);
            }
            Out::Plain { done, last } => {
                *done += n;
                if last.elapsed() >= PLAIN_EVERY || *done >= self.total {
                    *last = Instant::now();
                    plain(&self.label, *done, self.total, what);
                }
            }
            Out::Quiet => {}
        }
    }

    /// Ends the bar (cleared, so the result printed after it starts on a clean line).
    pub fn finish(&self) {
        if let Out::Bar(bar) = &*self.out.lock().unwrap_or_else(|p| p.into_inner()) {
            bar.finish_and_clear();
        }
    }
}

/// One plain progress line: a log line where logging is set up (a child's log, JSON or
/// text), else on stderr.
fn plain(label: &str, done: u64, total: u64, what: &str) {
    if tracing::dispatcher::has_been_set() {
        tracing::info!(task = label, done, total, "{}", plain_line(label, done, total, what));
    } else {
        eprintln!("{}", plain_line(label, done, total, what));
    }
}

/// `label: done/total (pct%) what`.
fn plain_line(label: &str, done: u64, total: u64, what: &str) -> String {
    let pct = if total == 0 { 100.0 } else { done as f64 * 100.0 / total as f64 };
    let what = if what.is_empty() { String::new() } else { format!(" {what}") };
    format!("{label}: {done}/{total} ({pct:.0}%){what}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_lines_count_up_and_a_quiet_progress_is_silent() {
        assert_eq!(plain_line("bench train", 2, 4, "step 2"), "bench train: 2/4 (50%) step 2");
        assert_eq!(plain_line("x", 0, 0, ""), "x: 0/0 (100%)");
        let p = Progress::with("t", 2, false);
        p.advance(1, "a");
        p.advance(1, "b");
        p.finish();
        match &*p.out.lock().expect("not poisoned") {
            Out::Plain { done, .. } => assert_eq!(*done, 2),
            _ => panic!("expected plain output"),
        }
        Progress::quiet().advance(1, "nothing");
    }
}
