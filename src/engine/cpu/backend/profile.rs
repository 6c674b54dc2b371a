//! Opt-in wall-clock accounting per kernel and per training phase (`TWINKLE_PROFILE=1`), read by
//! `twinkle bench`; off by default, when each span costs one cached flag check.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// What a span measures. Kernels do not nest inside each other; phases contain kernels.
#[derive(Debug, Clone, Copy)]
pub enum Kind {
    Matmul,
    Attention,
    Norm,
    Rope,
    Swiglu,
    StackForward,
    Head,
    StackBackward,
}

const NAMES: [&str; 8] = [
    "kernel matmul",
    "kernel attention",
    "kernel rmsnorm",
    "kernel rope",
    "kernel swiglu",
    "phase stack forward",
    "phase head (loss + dh)",
    "phase stack backward",
];

static TOTALS: [AtomicU64; 8] = [const { AtomicU64::new(0) }; 8];

/// Whether `TWINKLE_PROFILE=1` was set when first asked.
pub fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("TWINKLE_PROFILE").is_ok_and(|v| v == "1"))
}

/// Adds the time until it is dropped to `kind` (a no-op when profiling is off).
pub struct Span(Option<(Kind, Instant)>);

pub fn span(kind: Kind) -> Span {
    Span(enabled().then(|| (kind, Instant::now())))
}

impl Drop for Span {
    fn drop(&mut self) {
        if let Some((k, t)) = self.0 {
            TOTALS[k as usize].fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
        }
    }
}

/// Accumulated seconds per name since the last call, and resets them.
pub fn take() -> Vec<(&'static str, f64)> {
    NAMES
        .iter()
        .zip(&TOTALS)
        .map(|(n, t)| (*n, t.swap(0, Ordering::Relaxed) as f64 * 1e-9))
        .collect()
}
