//! Shared download progress: the downloader adds bytes, and the status report, the log lines
//! and the terminal bar read snapshots of it (atomics, so readers never block the transfer).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Byte and file counters of one model download (all files together).
#[derive(Debug)]
pub struct DownloadProgress {
    started: Instant,
    bytes_done: AtomicU64,
    bytes_total: AtomicU64,
    files_done: AtomicU64,
    files_total: AtomicU64,
}

/// A consistent-enough reading of [`DownloadProgress`] with the derived rate and ETA.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProgressSnapshot {
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub files_done: u64,
    pub files_total: u64,
    /// Bytes per second since the download started.
    pub rate: f64,
    /// Time left at `rate`; `None` until something has been transferred.
    pub eta: Option<Duration>,
}

impl ProgressSnapshot {
    /// Percent done (0–100); 0 while the total is not known yet.
    pub fn percent(&self) -> f64 {
        percent(self.bytes_done, self.bytes_total)
    }
}

/// `done` of `total` in percent (0–100); 0 while the total is not known.
pub fn percent(done: u64, total: u64) -> f64 {
    if total == 0 {
        return 0.0;
    }
    (done as f64 * 100.0 / total as f64).min(100.0)
}

/// Bytes in binary units with one decimal: `12.3 MiB` (`512 B` below a KiB).
pub fn human_bytes(n: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 { format!("{n} B") } else { format!("{v:.1} {}", units[u]) }
}

impl Default for DownloadProgress {
    fn default() -> Self {
        Self::new()
    }
}

impl DownloadProgress {
    pub fn new() -> Self {
        DownloadProgress {
            started: Instant::now(),
            bytes_done: AtomicU64::new(0),
            bytes_total: AtomicU64::new(0),
            files_done: AtomicU64::new(0),
            files_total: AtomicU64::new(0),
        }
    }

    /// The plan: how many bytes and files this download covers (cached files included, counted
    /// done through [`Self::add_bytes`] / [`Self::file_done`] like the fetched ones).
    pub fn set_total(&self, bytes: u64, files: u64) {
        self.bytes_total.store(bytes, Ordering::Relaxed);
        self.files_total.store(files, Ordering::Relaxed);
    }

    pub fn add_bytes(&self, n: u64) {
        self.bytes_done.fetch_add(n, Ordering::Relaxed);
    }

    /// Takes back bytes counted before (a partial file that had to be restarted from zero).
    pub fn remove_bytes(&self, n: u64) {
        let _ = self
            .bytes_done
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| Some(v.saturating_sub(n)));
    }

    pub fn file_done(&self) {
        self.files_done.fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> ProgressSnapshot {
        let bytes_done = self.bytes_done.load(Ordering::Relaxed);
        let bytes_total = self.bytes_total.load(Ordering::Relaxed);
        let secs = self.started.elapsed().as_secs_f64().max(1e-3);
        let rate = bytes_done as f64 / secs;
        let eta = (rate > 0.0 && bytes_total >= bytes_done)
            .then(|| Duration::from_secs_f64((bytes_total - bytes_done) as f64 / rate));
        ProgressSnapshot {
            bytes_done,
            bytes_total,
            files_done: self.files_done.load(Ordering::Relaxed),
            files_total: self.files_total.load(Ordering::Relaxed),
            rate,
            eta,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_and_eta_follow_the_counters() {
        let p = DownloadProgress::new();
        assert_eq!(p.snapshot().percent(), 0.0);
        assert!(p.snapshot().eta.is_none());
        p.set_total(200, 2);
        p.add_bytes(50);
        p.file_done();
        let s = p.snapshot();
        assert_eq!((s.bytes_done, s.bytes_total, s.files_done, s.files_total), (50, 200, 1, 2));
        assert_eq!(s.percent(), 25.0);
        assert!(s.rate > 0.0 && s.eta.is_some());
    }
}
