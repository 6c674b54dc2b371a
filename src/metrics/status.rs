//! The head's families, rendered from a registry snapshot: each application's state, restarts
//! and download progress, and each card's memory and utilisation (the NVML samples).
//!
//! These samples name their application (or node and card) themselves, so the merge keeps
//! them unlabelled ([`super::expo::Source`] with `app: None`).

use std::sync::Arc;

use super::expo::Writer;
use crate::gateway::metrics::StatusSource;
use crate::head::registry_actor::LocalSnapshot;
use crate::head::{AppState, RegistryActor, StatusReport};

/// Every state an application can be in, so each has a series (0 or 1) for dashboards.
const STATES: [AppState; 8] = [
    AppState::Starting,
    AppState::Downloading,
    AppState::Running,
    AppState::Restarting,
    AppState::Failed,
    AppState::Stopping,
    AppState::Stopped,
    AppState::Pending,
];

const MIB: f64 = 1024.0 * 1024.0;

/// The gateway's source of the head's families: a snapshot of this node's applications in
/// `reg`, rendered on each scrape (a cluster node leaves the others to their own gateways).
pub fn source(reg: actix::Addr<RegistryActor>) -> StatusSource {
    Arc::new(move || {
        let reg = reg.clone();
        Box::pin(async move { reg.send(LocalSnapshot).await.ok().map(|r| render(&r)) })
    })
}

/// The head's families in exposition text.
pub fn render(report: &StatusReport) -> String {
    let mut w = Writer::default();
    let apps = &report.applications;
    w.family("twinkle_app_state", "gauge", "1 for the application's current state.");
    for a in apps {
        for s in STATES {
            let v = if a.state == s { 1.0 } else { 0.0 };
            w.sample("twinkle_app_state", &[("app", &a.name), ("state", s.as_str())], v);
        }
    }
    w.family("twinkle_app_restarts", "counter", "Restarts of the application's child.");
    for a in apps {
        w.sample("twinkle_app_restarts_total", &[("app", &a.name)], f64::from(a.restarts));
    }
    w.family("twinkle_download_done_bytes", "gauge", "Model bytes downloaded so far.");
    for a in apps {
        let done = a.download.map_or(0, |d| d.bytes_done);
        w.sample("twinkle_download_done_bytes", &[("app", &a.name)], done as f64);
    }
    w.family("twinkle_download_size_bytes", "gauge", "Model bytes to download (0: unknown).");
    for a in apps {
        let total = a.download.map_or(0, |d| d.bytes_total);
        w.sample("twinkle_download_size_bytes", &[("app", &a.name)], total as f64);
    }
    type Pick = fn(&crate::head::gpu_table::GpuStatus) -> Option<f64>;
    let gpu_families: [(&str, &str, Pick); 3] = [
        ("twinkle_gpu_memory_used_bytes", "GPU memory in use (NVML).", |g| {
            g.sample.memory_used_mib.map(|m| m as f64 * MIB)
        }),
        ("twinkle_gpu_memory_total_bytes", "GPU memory of the card (NVML).", |g| {
            g.sample.memory_total_mib.map(|m| m as f64 * MIB)
        }),
        ("twinkle_gpu_utilization_ratio", "GPU utilisation, 0 to 1 (NVML).", |g| {
            g.sample.utilization_pct.map(|u| f64::from(u) / 100.0)
        }),
    ];
    for (name, help, pick) in gpu_families {
        w.family(name, "gauge", help);
        for n in &report.nodes {
            for g in &n.gpus {
                let Some(v) = pick(g) else { continue };
                let id = g.sample.id.to_string();
                let app = g.app.as_deref().unwrap_or("");
                w.sample(name, &[("node", &n.id), ("gpu", &id), ("app", app)], v);
            }
        }
    }
    w.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::head::gpu_table::{GpuSample, GpuStatus};
    use crate::head::registry::DownloadStatus;
    use crate::head::{AppStatus, NodeStatus};

    #[test]
    fn states_restarts_downloads_and_cards_are_rendered() {
        let mut a = AppStatus::new("m", "model", "/m", "n0", vec![0], 1.0);
        a.state = AppState::Downloading;
        a.restarts = 2;
        a.download = Some(DownloadStatus::new(50, 200));
        let node = NodeStatus {
            id: "n0".into(),
            address: "127.0.0.1".into(),
            resources: Default::default(),
            available: Default::default(),
            gpu_ids: vec![0],
            alive: true,
            gpus: vec![GpuStatus {
                sample: GpuSample::known(0, "H100", 1024, 2048, 50),
                app: Some("m".into()),
            }],
        };
        let report = StatusReport {
            server_type: "tinker".into(),
            namespace: None,
            head_pid: 1,
            control_address: String::new(),
            gateway_address: String::new(),
            nodes: vec![node],
            applications: vec![a],
        };
        let text = render(&report);
        assert!(text.contains("twinkle_app_state{app=\"m\",state=\"downloading\"} 1"), "{text}");
        assert!(text.contains("twinkle_app_state{app=\"m\",state=\"running\"} 0"));
        assert!(text.contains("twinkle_app_restarts_total{app=\"m\"} 2"));
        assert!(text.contains("twinkle_download_done_bytes{app=\"m\"} 50"));
        assert!(text.contains("twinkle_download_size_bytes{app=\"m\"} 200"));
        assert!(
            text.contains(
                "twinkle_gpu_memory_used_bytes{node=\"n0\",gpu=\"0\",app=\"m\"} 1073741824"
            )
        );
        assert!(
            text.contains("twinkle_gpu_utilization_ratio{node=\"n0\",gpu=\"0\",app=\"m\"} 0.5")
        );
    }
}
