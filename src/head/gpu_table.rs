//! Live per-card GPU figures as `twinkle status` shows them.
//!
//! A node samples its cards through NVML off the request path ([`crate::node::gpu_monitor`]) and
//! hands the head [`GpuSample`]s (single machine: straight into the registry; cluster: in the
//! heartbeat). The head never touches a GPU itself: it only joins the latest samples with the
//! scheduler's allocations into one [`GpuStatus`] row per physical card.

use serde::{Deserialize, Serialize};

use super::registry::{AppStatus, NodeStatus};

/// What NVML said about one physical card at the last sample. Every figure is `None` when it
/// could not be read (no NVML, a card NVML does not know, or a query the card does not support).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuSample {
    /// Physical id: the NVML index, which is the id in `CUDA_VISIBLE_DEVICES` because children
    /// run with `CUDA_DEVICE_ORDER=PCI_BUS_ID`.
    pub id: u32,
    pub name: Option<String>,
    pub memory_used_mib: Option<u64>,
    pub memory_total_mib: Option<u64>,
    pub utilization_pct: Option<u32>,
}

impl GpuSample {
    /// A card whose figures are unknown.
    pub fn unknown(id: u32) -> Self {
        Self {
            id,
            name: None,
            memory_used_mib: None,
            memory_total_mib: None,
            utilization_pct: None,
        }
    }
}

#[cfg(test)]
impl GpuSample {
    /// A card whose every figure is known (the status tests' samples).
    pub(crate) fn known(id: u32, name: &str, used_mib: u64, total_mib: u64, util_pct: u32) -> Self {
        Self {
            id,
            name: Some(name.into()),
            memory_used_mib: Some(used_mib),
            memory_total_mib: Some(total_mib),
            utilization_pct: Some(util_pct),
        }
    }
}

/// One card of a node in `GET /v1/status`: the last sample plus the application holding it.
/// `None` figures serialise as `null` (unknown), never as a made-up 0.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuStatus {
    /// The card's last sample; flattened, so the JSON row keeps the sample's field names.
    #[serde(flatten)]
    pub sample: GpuSample,
    /// The application the scheduler gave this card to.
    pub app: Option<String>,
}

/// Fills `node.gpus`: one row per card of the node, in the node's id order, with the sample of
/// that id (unknown when there is none, or when the node is dead and its samples are stale)
/// and the application on that node whose allocation holds the card.
pub fn fill_gpu_rows(node: &mut NodeStatus, samples: &[GpuSample], apps: &[AppStatus]) {
    node.gpus = node
        .gpu_ids
        .iter()
        .map(|&id| {
            let sample = samples
                .iter()
                .find(|s| s.id == id && node.alive)
                .cloned()
                .unwrap_or_else(|| GpuSample::unknown(id));
            let app = apps
                .iter()
                .find(|a| a.node == node.id && a.gpu_ids.contains(&id))
                .map(|a| a.name.clone());
            GpuStatus { sample, app }
        })
        .collect();
}

/// `used/total MiB`, or `n/a` unless both are known.
pub fn fmt_memory(g: &GpuSample) -> String {
    match (g.memory_used_mib, g.memory_total_mib) {
        (Some(used), Some(total)) => format!("{used}/{total} MiB"),
        _ => "n/a".to_string(),
    }
}

/// `37%`, or `n/a`.
pub fn fmt_util(g: &GpuSample) -> String {
    g.utilization_pct.map_or_else(|| "n/a".to_string(), |u| format!("{u}%"))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::head::registry::AppState;

    fn node(alive: bool) -> NodeStatus {
        NodeStatus {
            id: "node-0".into(),
            address: "127.0.0.1".into(),
            resources: BTreeMap::new(),
            available: BTreeMap::new(),
            gpu_ids: vec![4, 5, 6],
            alive,
            gpus: Vec::new(),
        }
    }

    fn app(name: &str, node: &str, gpus: Vec<u32>) -> AppStatus {
        AppStatus {
            state: AppState::Running,
            ..AppStatus::new(name, "model", "/m", node, gpus, 0.1)
        }
    }

    fn sample(id: u32) -> GpuSample {
        GpuSample::known(id, "Fake A100", 1024, 40960, 37)
    }

    #[test]
    fn rows_join_samples_and_holders_by_physical_id() {
        let mut n = node(true);
        // Another node's app holding the same physical id must not be credited here.
        let apps = [app("model", "node-0", vec![5, 6]), app("other", "node-1", vec![4])];
        fill_gpu_rows(&mut n, &[sample(6), sample(4)], &apps);
        let ids: Vec<u32> = n.gpus.iter().map(|g| g.sample.id).collect();
        assert_eq!(ids, [4, 5, 6]);
        assert_eq!(
            (n.gpus[0].app.as_deref(), n.gpus[0].sample.memory_used_mib),
            (None, Some(1024))
        );
        assert_eq!(n.gpus[1], GpuStatus { app: Some("model".into()), ..unknown_row(5) });
        assert_eq!(n.gpus[2].app.as_deref(), Some("model"));
        assert_eq!(n.gpus[2].sample.utilization_pct, Some(37));
    }

    #[test]
    fn a_dead_node_shows_no_stale_figures() {
        let mut n = node(false);
        fill_gpu_rows(&mut n, &[sample(4)], &[]);
        assert_eq!(n.gpus[0], unknown_row(4));
    }

    fn unknown_row(id: u32) -> GpuStatus {
        GpuStatus { sample: GpuSample::unknown(id), app: None }
    }

    #[test]
    fn unknown_figures_read_n_a_and_serialise_as_null() {
        let mut g = unknown_row(0);
        assert_eq!(
            (fmt_memory(&g.sample), fmt_util(&g.sample)),
            ("n/a".to_string(), "n/a".to_string())
        );
        let json = serde_json::to_value(&g).unwrap_or_default();
        assert!(json["memory_used_mib"].is_null() && json["app"].is_null(), "{json}");
        g.sample.memory_total_mib = Some(81559);
        g.sample.memory_used_mib = Some(0);
        g.sample.utilization_pct = Some(100);
        let shown = (fmt_memory(&g.sample), fmt_util(&g.sample));
        assert_eq!(shown, ("0/81559 MiB".into(), "100%".into()));
        g.sample.memory_used_mib = None;
        assert_eq!(fmt_memory(&g.sample), "n/a");
    }
}
