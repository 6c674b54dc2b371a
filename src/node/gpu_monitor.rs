//! Periodic NVML sampling of this node's cards (memory used/total, utilisation, name) for
//! `twinkle status`.
//!
//! NVML calls block (a busy driver can take many milliseconds), so they run on a plain thread of
//! their own, never on the async runtime or a request path; each round hands its samples to a
//! sink (the registry on a single machine, the heartbeat's slot in a cluster agent). NVML is the
//! driver's management library, not CUDA: using it here creates no CUDA context, so forking
//! children afterwards stays safe. Without NVML every figure is simply unknown.

use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::Duration;

use nvml_wrapper::Nvml;

use crate::head::gpu_table::GpuSample;

const BYTES_PER_MIB: u64 = 1024 * 1024;

/// The running sampler; dropping it stops the thread at its next wake-up (it is not joined, so
/// a driver call that hangs cannot hang shutdown).
pub struct GpuMonitor {
    _stop: mpsc::Sender<()>,
}

impl GpuMonitor {
    /// Samples the physical cards `gpu_ids` now and then every `period`, giving each round to
    /// `sink`. Returns `None` (nothing to watch) for a node without cards, or when the thread
    /// cannot be created; status then shows the cards' figures as unknown.
    pub fn start(
        gpu_ids: Vec<u32>,
        period: Duration,
        sink: impl Fn(Vec<GpuSample>) + Send + 'static,
    ) -> Option<Self> {
        if gpu_ids.is_empty() {
            return None;
        }
        let (stop, stopped) = mpsc::channel::<()>();
        let spawned = std::thread::Builder::new()
            .name("gpu-monitor".into())
            .spawn(move || watch(&gpu_ids, period, &sink, &stopped));
        match spawned {
            Ok(_) => Some(Self { _stop: stop }),
            Err(e) => {
                tracing::warn!(error = %e, "cannot start the GPU monitor; GPU figures stay n/a");
                None
            }
        }
    }
}

fn watch(
    ids: &[u32],
    period: Duration,
    sink: &dyn Fn(Vec<GpuSample>),
    stopped: &mpsc::Receiver<()>,
) {
    // NVML is loaded once: without it (no driver, CPU machine) there is nothing to retry, and
    // dlopen-ing a missing library every few seconds would only add noise.
    let nvml = match Nvml::init() {
        Ok(n) => n,
        Err(e) => {
            tracing::debug!(error = %e, "NVML not available; GPU figures are n/a");
            sink(ids.iter().map(|&id| GpuSample::unknown(id)).collect());
            return;
        }
    };
    loop {
        sink(ids.iter().map(|&id| sample(&nvml, id)).collect());
        match stopped.recv_timeout(period) {
            Err(RecvTimeoutError::Timeout) => {}
            // The monitor was dropped (or sent a stop): end the thread.
            Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}

/// One card's figures; each query that fails (an index NVML does not know, a query the card
/// does not support) leaves just that figure unknown.
fn sample(nvml: &Nvml, id: u32) -> GpuSample {
    let Ok(dev) = nvml.device_by_index(id) else {
        return GpuSample::unknown(id);
    };
    let memory = dev.memory_info().ok();
    GpuSample {
        id,
        name: dev.name().ok(),
        memory_used_mib: memory.as_ref().map(|m| m.used / BYTES_PER_MIB),
        memory_total_mib: memory.as_ref().map(|m| m.total / BYTES_PER_MIB),
        utilization_pct: dev.utilization_rates().ok().map(|u| u.gpu),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[test]
    fn no_cards_no_thread() {
        assert!(GpuMonitor::start(Vec::new(), Duration::from_secs(1), |_| {}).is_none());
    }

    /// On a machine without NVML (CI) the monitor reports every card as unknown, once.
    #[test]
    fn without_nvml_every_card_is_unknown() {
        if Nvml::init().is_ok() {
            return; // a real driver is present: covered by the integration test's fake instead
        }
        let got = Arc::new(Mutex::new(Vec::new()));
        let slot = got.clone();
        let m = GpuMonitor::start(vec![0, 3], Duration::from_millis(10), move |s| {
            slot.lock().unwrap_or_else(|e| e.into_inner()).push(s);
        });
        assert!(m.is_some());
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while got.lock().unwrap_or_else(|e| e.into_inner()).is_empty()
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(10));
        }
        let rounds = got.lock().unwrap_or_else(|e| e.into_inner()).clone();
        assert_eq!(rounds, vec![vec![GpuSample::unknown(0), GpuSample::unknown(3)]]);
    }
}
