//! Download progress for people: bytes, rate and ETA for the current file and for the whole
//! model, as two indicatif bars on a terminal or as periodic `tracing` lines otherwise. The
//! numbers also go to the shared [`DownloadProgress`] that the status report reads.

use std::io::IsTerminal as _;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::BarMode;
use crate::hub::progress::DownloadProgress;

/// How often a log line is written in [`BarMode::Lines`].
const LINE_EVERY: Duration = Duration::from_secs(10);

#[derive(Debug)]
struct FileState {
    name: String,
    size: Option<u64>,
    done: u64,
    started: Instant,
    /// Bytes already on disk when the file started (they do not count towards its rate).
    resumed: u64,
}

struct Shared {
    label: String,
    total: Arc<DownloadProgress>,
    file: Mutex<Option<FileState>>,
}

enum Sink {
    Off,
    Bars { _multi: MultiProgress, total: ProgressBar, file: ProgressBar },
    Lines { stop: mpsc::Sender<()>, thread: Option<JoinHandle<()>> },
}

/// Progress of one model download.
pub(crate) struct Reporter {
    shared: Arc<Shared>,
    sink: Sink,
}

pub(crate) use crate::hub::progress::human_bytes;

fn eta_text(left: u64, rate: f64) -> String {
    if rate <= 0.0 {
        return "?".into();
    }
    let s = (left as f64 / rate).round() as u64;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    } else {
        format!("{}m{:02}s", s / 60, s % 60)
    }
}

fn bar_style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar())
}

impl Shared {
    /// One status line: the current file and the total, each with rate and ETA.
    fn line(&self) -> String {
        let t = self.total.snapshot();
        let total = format!(
            "total {}/{} files, {} of {} ({:.0}%), {}/s, ETA {}",
            t.files_done,
            t.files_total,
            human_bytes(t.bytes_done),
            human_bytes(t.bytes_total),
            t.percent(),
            human_bytes(t.rate as u64),
            eta_text(t.bytes_total.saturating_sub(t.bytes_done), t.rate)
        );
        let file = self.file.lock().ok().and_then(|g| {
            let f = g.as_ref()?;
            let rate = f.done.saturating_sub(f.resumed) as f64
                / f.started.elapsed().as_secs_f64().max(1e-3);
            let size = f.size.map_or("?".into(), human_bytes);
            let left = f.size.map_or(0, |s| s.saturating_sub(f.done));
            Some(format!(
                "{}: {} of {}, {}/s, ETA {}; ",
                f.name,
                human_bytes(f.done),
                size,
                human_bytes(rate as u64),
                eta_text(left, rate)
            ))
        });
        format!("downloading {}: {}{total}", self.label, file.unwrap_or_default())
    }
}

impl Reporter {
    /// Starts reporting the download of `label` into `total` (a fresh counter when `None`).
    pub(crate) fn new(label: &str, total: Option<Arc<DownloadProgress>>, mode: BarMode) -> Self {
        let shared = Arc::new(Shared {
            label: label.to_string(),
            total: total.unwrap_or_default(),
            file: Mutex::new(None),
        });
        let mode = match mode {
            BarMode::Auto if std::io::stderr().is_terminal() => BarMode::Bars,
            BarMode::Auto => BarMode::Lines,
            m => m,
        };
        let sink = match mode {
            BarMode::Off => Sink::Off,
            BarMode::Bars | BarMode::Auto => {
                let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
                let total = multi.add(ProgressBar::new(0));
                total.set_style(bar_style(
                    "{msg:>24} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
                ));
                total.set_message(format!("total {label}"));
                let file = multi.add(ProgressBar::new(0));
                file.set_style(bar_style(
                    "{msg:>24} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
                ));
                Sink::Bars { _multi: multi, total, file }
            }
            BarMode::Lines => {
                let (stop, rx) = mpsc::channel::<()>();
                let s = Arc::clone(&shared);
                let thread = std::thread::Builder::new()
                    .name("hub-progress".into())
                    .spawn(move || {
                        while let Err(RecvTimeoutError::Timeout) = rx.recv_timeout(LINE_EVERY) {
                            tracing::info!("{}", s.line());
                        }
                    })
                    .ok();
                Sink::Lines { stop, thread }
            }
        };
        Reporter { shared, sink }
    }

    /// The plan: bytes and files of the whole download (cached files included).
    pub(crate) fn plan(&self, bytes: u64, files: u64) {
        self.shared.total.set_total(bytes, files);
        if let Sink::Bars { total, .. } = &self.sink {
            total.set_length(bytes);
        }
        tracing::info!("downloading {}: {files} files, {}", self.shared.label, human_bytes(bytes));
    }

    /// A file's transfer starts; `on_disk` bytes of it are already there (a resumed file).
    pub(crate) fn start_file(&self, name: &str, size: Option<u64>, on_disk: u64) {
        if let Ok(mut g) = self.shared.file.lock() {
            *g = Some(FileState {
                name: name.to_string(),
                size,
                done: 0,
                started: Instant::now(),
                resumed: on_disk,
            });
        }
        if let Sink::Bars { file, .. } = &self.sink {
            file.set_length(size.unwrap_or(0));
            file.set_position(0);
            file.reset_eta();
            file.set_message(short(name));
        }
        self.add(on_disk);
    }

    pub(crate) fn add(&self, n: u64) {
        self.shared.total.add_bytes(n);
        if let Ok(mut g) = self.shared.file.lock()
            && let Some(f) = g.as_mut()
        {
            f.done += n;
        }
        if let Sink::Bars { total, file, .. } = &self.sink {
            total.inc(n);
            file.inc(n);
        }
    }

    /// Bytes counted before are gone (a partial file restarted from zero).
    pub(crate) fn rewind(&self, n: u64) {
        self.shared.total.remove_bytes(n);
        if let Ok(mut g) = self.shared.file.lock()
            && let Some(f) = g.as_mut()
        {
            f.done = f.done.saturating_sub(n);
            f.resumed = f.resumed.saturating_sub(n);
        }
        if let Sink::Bars { total, file, .. } = &self.sink {
            total.dec(n);
            file.dec(n);
        }
    }

    pub(crate) fn file_done(&self) {
        self.shared.total.file_done();
    }

    /// A file that was already in the cache: counted done without a transfer.
    pub(crate) fn cached_file(&self, size: u64) {
        self.shared.total.add_bytes(size);
        self.shared.total.file_done();
        if let Sink::Bars { total, .. } = &self.sink {
            total.inc(size);
        }
    }

    /// Ends the report with a summary line.
    pub(crate) fn finish(mut self) {
        let t = self.shared.total.snapshot();
        tracing::info!(
            "downloaded {}: {} files, {}",
            self.shared.label,
            t.files_done,
            human_bytes(t.bytes_done)
        );
        self.stop();
    }

    fn stop(&mut self) {
        match &mut self.sink {
            Sink::Bars { total, file, .. } => {
                file.finish_and_clear();
                total.finish_and_clear();
            }
            Sink::Lines { stop, thread } => {
                let _ = stop.send(());
                if let Some(t) = thread.take() {
                    let _ = t.join();
                }
            }
            Sink::Off => {}
        }
    }
}

impl Drop for Reporter {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The last 24 characters of a file name (the bar's label column).
fn short(name: &str) -> String {
    let n = name.chars().count();
    if n <= 24 {
        name.to_string()
    } else {
        format!("…{}", name.chars().skip(n - 23).collect::<String>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_carry_file_and_total() {
        let r = Reporter::new("Org/Name", None, BarMode::Off);
        r.plan(2048, 2);
        r.start_file("model.safetensors", Some(1024), 512);
        r.add(256);
        let line = r.shared.line();
        assert!(line.contains("model.safetensors: 768 B of 1.0 KiB"), "{line}");
        assert!(line.contains("total 0/2 files, 768 B of 2.0 KiB (38%)"), "{line}");
        r.rewind(768);
        assert_eq!(r.shared.total.snapshot().bytes_done, 0);
        assert_eq!(human_bytes(3 << 20), "3.0 MiB");
        // The bar sink keeps the same counters.
        let p = Arc::new(DownloadProgress::new());
        let b = Reporter::new("Org/Name", Some(p.clone()), BarMode::Bars);
        b.plan(100, 1);
        b.start_file("config.json", Some(100), 0);
        b.add(100);
        b.file_done();
        b.finish();
        let s = p.snapshot();
        assert_eq!((s.bytes_done, s.files_done), (100, 1));
    }
}
