//! Per-kernel roofline accounting (`twinkle bench --device cuda --explain`). A launcher may state
//! what its launch costs — floating-point operations and bytes moved to or from device memory,
//! counted from its shapes — and while profiling is on, every launch on the device's stream is
//! bracketed by two timing events. [`Profiler::take`] then gives per kernel the launches, the
//! summed cost and the measured time, and [`roofline`] sets each next to the time it would take
//! at the card's stated peak: the table every tuning decision is read from.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaEvent, CudaStream};

use super::CudaError;

/// What one launch costs, counted from its shapes.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Cost {
    pub flops: f64,
    pub bytes: f64,
}

impl Cost {
    pub fn new(flops: f64, bytes: f64) -> Self {
        Cost { flops, bytes }
    }
}

/// One kernel's share of a profiled run.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct KernelStat {
    pub name: String,
    pub launches: usize,
    /// Summed cost of the launches that stated one (`None`: no launch did).
    pub cost: Option<Cost>,
    /// Measured device time of all its launches, milliseconds.
    pub measured_ms: f64,
}

struct Pending {
    name: &'static str,
    cost: Option<Cost>,
    start: CudaEvent,
    end: CudaEvent,
}

/// The device's profiler: off unless a benchmark turns it on.
#[derive(Default)]
pub(crate) struct Profiler {
    on: AtomicBool,
    pending: Mutex<Vec<Pending>>,
}

impl Profiler {
    /// Starts recording (anything recorded before is dropped).
    pub fn start(&self) {
        self.lock().clear();
        self.on.store(true, Ordering::SeqCst);
    }

    /// Runs `launch` (which enqueues one kernel on `stream`), bracketed by timing events when
    /// profiling is on.
    /// True between `start` and `take`.
    pub fn is_on(&self) -> bool {
        self.on.load(Ordering::Relaxed)
    }

    pub fn around<T>(
        &self,
        stream: &CudaStream,
        name: &'static str,
        cost: Option<Cost>,
        launch: impl FnOnce() -> Result<T, CudaError>,
    ) -> Result<T, CudaError> {
        if !self.on.load(Ordering::Relaxed) {
            return launch();
        }
        let event = || {
            stream
                .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(CudaError::driver("recording a profiling event"))
        };
        let start = event()?;
        let out = launch()?;
        let end = event()?;
        self.lock().push(Pending { name, cost, start, end });
        Ok(out)
    }

    /// Stops recording and returns the per-kernel totals, the most measured time first
    /// (waits for the recorded work).
    pub fn take(&self) -> Result<Vec<KernelStat>, CudaError> {
        self.on.store(false, Ordering::SeqCst);
        let pending = std::mem::take(&mut *self.lock());
        let mut by: BTreeMap<&str, KernelStat> = BTreeMap::new();
        for p in pending {
            let ms = p.start.elapsed_ms(&p.end).map_err(CudaError::driver("reading a profile"))?;
            let s = by
                .entry(p.name)
                .or_insert_with(|| KernelStat { name: p.name.to_string(), ..Default::default() });
            s.launches += 1;
            s.measured_ms += f64::from(ms);
            if let Some(c) = p.cost {
                let t = s.cost.get_or_insert_with(Cost::default);
                t.flops += c.flops;
                t.bytes += c.bytes;
            }
        }
        let mut out: Vec<KernelStat> = by.into_values().collect();
        out.sort_by(|a, b| b.measured_ms.total_cmp(&a.measured_ms));
        Ok(out)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Pending>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The time a cost takes at the peaks (FLOP/s, bytes/s), and which one bounds it.
pub fn at_peak(c: Cost, peak_flops: f64, peak_bw: f64) -> (f64, &'static str) {
    let (tf, tb) = (c.flops / peak_flops, c.bytes / peak_bw);
    if tf >= tb { (tf, "compute") } else { (tb, "memory") }
}

/// The roofline table: per kernel its launches, GFLOP, GB, the time at the card's peak (and
/// which bound; "-" where the kernel states no cost or the card's peaks are unknown), the
/// measured time and the share of the peak that measurement reaches. (On the emulator the
/// measured times are the CPU's and mean nothing.)
pub fn roofline(stats: &[KernelStat], peaks: Option<(f64, f64)>) -> String {
    let mut out = format!(
        "{:<28} {:>8} {:>10} {:>9} {:>12} {:>8} {:>12} {:>7}\n",
        "kernel", "launches", "GFLOP", "GB", "at peak ms", "bound", "measured ms", "% peak"
    );
    let (mut total_peak, mut total_meas) = (0.0, 0.0);
    for s in stats {
        let peak = s.cost.zip(peaks).map(|(c, (f, b))| at_peak(c, f, b));
        let (gf, gb) = s.cost.map_or(("-".into(), "-".into()), |c| {
            (format!("{:.3}", c.flops / 1e9), format!("{:.4}", c.bytes / 1e9))
        });
        let (pk, bound) = peak.map_or(("-".into(), "-"), |(t, b)| (format!("{:.4}", t * 1e3), b));
        let meas = format!("{:.4}", s.measured_ms);
        let share = match peak {
            Some((t, _)) if s.measured_ms > 0.0 => {
                format!("{:.1}", 100.0 * t * 1e3 / s.measured_ms)
            }
            _ => "-".into(),
        };
        total_peak += peak.map_or(0.0, |p| p.0 * 1e3);
        total_meas += s.measured_ms;
        out += &format!(
            "{:<28} {:>8} {:>10} {:>9} {:>12} {:>8} {:>12} {:>7}\n",
            s.name, s.launches, gf, gb, pk, bound, meas, share
        );
    }
    out += &format!(
        "{:<28} {:>8} {:>10} {:>9} {:>12.4} {:>8} {:>12.4}\n",
        "total", "", "", "", total_peak, "", total_meas
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bound_is_the_slower_side() {
        // 1 TFLOP at 1 PFLOP/s = 1 ms; 1 GB at 2 TB/s = 0.5 ms: compute-bound
        assert_eq!(at_peak(Cost::new(1e12, 1e9), 1e15, 2e12), (1e-3, "compute"));
        assert_eq!(at_peak(Cost::new(1e9, 4e9), 1e15, 2e12), (2e-3, "memory"));
    }

    #[test]
    fn the_table_sums_and_marks_what_is_unknown() {
        let stats = vec![
            KernelStat {
                name: "gemm".into(),
                launches: 2,
                cost: Some(Cost::new(2e12, 1e9)),
                measured_ms: 4.0,
            },
            KernelStat { name: "other".into(), launches: 1, cost: None, measured_ms: 1.0 },
        ];
        let t = roofline(&stats, Some((1e15, 2e12)));
        let gemm = t.lines().find(|l| l.starts_with("gemm")).unwrap_or_default().to_string();
        // 2 ms at peak of 4 ms measured: 50 %
        assert!(
            gemm.contains("2.0000") && gemm.contains("compute") && gemm.contains("50.0"),
            "{t}"
        );
        let other = t.lines().find(|l| l.starts_with("other")).unwrap_or_default().to_string();
        assert!(other.split_whitespace().filter(|w| *w == "-").count() >= 4, "{t}");
        let total = t.lines().last().unwrap_or_default().to_string();
        assert!(total.contains("2.0000") && total.contains("5.0000"), "{t}");
        // unknown peaks: no time at peak, no share
        assert!(!roofline(&stats, None).contains("50.0"));
    }
}
