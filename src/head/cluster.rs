//! Multi-node control plane state: nodes, their heartbeats, the deployment and where each
//! application is placed (the desired state every node agent converges on).
//!
//! Pure: every method takes the current time, nothing here does I/O, so failover is unit-tested
//! on a simulated clock. The HTTP face is [`super::cluster_http`].

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::gpu_table::{self, GpuSample};
use super::registry::{AppState, AppStatus, NodeStatus, StatusReport};
use crate::cluster::{Allocation, ClusterState, Demand, NodeSpec, ScheduleResult, demand_of};
use crate::config::{Application, ServerConfig, ServerType};

/// Version of the node ↔ head protocol; a peer speaking another version is refused.
pub const PROTOCOL_VERSION: u32 = 1;
/// Header carrying the cluster token on every control-plane request.
pub const TOKEN_HEADER: &str = "x-twinkle-token";
/// Header carrying the sender's protocol version on every control-plane request.
pub const VERSION_HEADER: &str = "x-twinkle-protocol";
/// Env var with the cluster token for `join` / `serve --address` (also `--token`).
pub const TOKEN_ENV: &str = "TWINKLE_CLUSTER_TOKEN";

/// A child as its node agent reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReportedChild {
    pub app: String,
    pub gpu_ids: Vec<u32>,
    pub pid: Option<u32>,
    pub state: AppState,
    /// `node-ip:port` once the child has registered with its agent.
    pub address: Option<String>,
    pub restarts: u32,
    pub last_exit: Option<String>,
    /// The deployment the child was started for.
    #[serde(default)]
    pub deployment: u64,
    /// While `downloading`: how far its model download is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub download: Option<super::registry::DownloadStatus>,
}

/// `POST /v1/cluster/nodes`: a node agent (re-)registers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeRegistration {
    pub protocol: u32,
    pub node: NodeSpec,
    pub pid: u32,
    /// The node's gateway, when it runs one.
    pub gateway_address: Option<String>,
    /// Children already running there (a restarted head learns them back).
    #[serde(default)]
    pub children: Vec<ReportedChild>,
    /// The head's own node agent (its gateway is the one status shows first).
    #[serde(default)]
    pub is_head: bool,
}

/// `POST /v1/cluster/nodes/{id}/heartbeat`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub protocol: u32,
    pub gateway_address: Option<String>,
    pub children: Vec<ReportedChild>,
    /// The node's latest NVML samples of its cards (absent from older agents: shown as n/a).
    #[serde(default)]
    pub gpus: Vec<GpuSample>,
}

/// One child a node should run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Assignment {
    pub app: Application,
    pub gpu_ids: Vec<u32>,
    pub cpus: f64,
}

/// The head's answer to a heartbeat: the node's desired state plus the cluster's routes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DesiredState {
    /// Bumped on every deployment; children of an older deployment are restarted.
    pub deployment: u64,
    /// The deployment's config (YAML), which children read with `--config`.
    pub config_yaml: Option<String>,
    pub server_type: ServerType,
    pub assignments: Vec<Assignment>,
    /// Where every application can be reached now (`None` while it is down or pending).
    pub routes: BTreeMap<String, Option<String>>,
}

/// `POST /v1/cluster/deploy`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeployRequest {
    pub protocol: u32,
    pub config_yaml: String,
    pub server_type: Option<ServerType>,
}

/// The deployment as the head persists it, so a restarted head keeps serving it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeploymentRecord {
    pub version: u64,
    pub config_yaml: String,
    pub server_type: ServerType,
}

/// Why the head refused something.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClusterError {
    #[error("invalid deployment: {0}")]
    BadConfig(String),
    #[error("cannot place the applications on this cluster:\n{0}")]
    Infeasible(String),
    #[error("unknown node {0:?}: register again")]
    UnknownNode(String),
}

struct NodeEntry {
    spec: NodeSpec,
    pid: u32,
    last_seen: Instant,
    alive: bool,
    gateway: Option<String>,
    children: Vec<ReportedChild>,
    is_head: bool,
    gpus: Vec<GpuSample>,
}

struct AppPlan {
    app: Application,
    demand: Demand,
    alloc: Option<Allocation>,
    pending: Option<String>,
}

struct Deployment {
    version: u64,
    config_yaml: String,
    config: ServerConfig,
    server_type: ServerType,
}

/// The head's whole view of the cluster.
pub struct ClusterHead {
    timeout: Duration,
    control_address: String,
    nodes: BTreeMap<String, NodeEntry>,
    sched: ClusterState,
    deployment: Option<Deployment>,
    apps: Vec<AppPlan>,
    next_version: u64,
    /// After a restart, nothing is placed anew until this time, so that every node can report
    /// the children it still runs first (they are adopted, not moved).
    recover_until: Option<Instant>,
}

impl ClusterHead {
    pub fn new(timeout: Duration, control_address: String) -> Self {
        Self {
            timeout,
            control_address,
            nodes: BTreeMap::new(),
            sched: ClusterState::new(Vec::new()),
            deployment: None,
            apps: Vec::new(),
            next_version: 1,
            recover_until: None,
        }
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// A node (re-)registers. A node that was dead comes back with all its resources free; a
    /// node that is still alive (an agent restarted within the timeout) keeps its placements,
    /// so its children are handed back to it.
    pub fn register(&mut self, reg: &NodeRegistration, now: Instant) -> String {
        let id = reg.node.node_id.clone();
        let known_alive = self.nodes.get(&id).is_some_and(|n| n.alive && n.spec == reg.node);
        if !known_alive {
            // Anything still placed there (a changed spec) is released first.
            self.evict_node(&id, "its node re-registered with different resources");
            self.sched.add_node(reg.node.clone());
            self.sched.set_alive(&id, true);
        }
        self.nodes.insert(
            id.clone(),
            NodeEntry {
                spec: reg.node.clone(),
                pid: reg.pid,
                last_seen: now,
                alive: true,
                gateway: reg.gateway_address.clone(),
                children: reg.children.clone(),
                is_head: reg.is_head,
                gpus: Vec::new(),
            },
        );
        self.adopt(&id, &reg.children);
        self.schedule_pending(now);
        id
    }

    /// Takes over children a node reports for unplaced applications of the current deployment
    /// (what a restarted head learns back), when their cards are still free.
    fn adopt(&mut self, node_id: &str, children: &[ReportedChild]) {
        let Some(version) = self.deployment.as_ref().map(|d| d.version) else {
            return;
        };
        for c in children.iter().filter(|c| c.deployment == version) {
            let Some(p) = self.apps.iter_mut().find(|p| p.app.name == c.app && p.alloc.is_none())
            else {
                continue;
            };
            if p.demand.gpus as usize != c.gpu_ids.len() {
                continue;
            }
            let alloc = Allocation {
                app: c.app.clone(),
                node_id: node_id.to_string(),
                gpu_ids: c.gpu_ids.clone(),
                cpus: p.demand.cpus,
                custom: p.demand.custom.clone(),
            };
            if self.sched.reserve(&alloc) {
                p.alloc = Some(alloc);
                p.pending = None;
            }
        }
    }

    /// Restores a persisted deployment after a head restart: nothing is placed until the nodes
    /// had one timeout to register again and report their children.
    pub fn restore(&mut self, rec: &DeploymentRecord, now: Instant) -> Result<(), ClusterError> {
        let config = crate::config::load_str(&rec.config_yaml)
            .map_err(|e| ClusterError::BadConfig(e.to_string()))?;
        self.apps = config
            .applications
            .iter()
            .map(|app| AppPlan {
                app: app.clone(),
                demand: demand_of(app),
                alloc: None,
                pending: Some("waiting for the nodes to report back after a head restart".into()),
            })
            .collect();
        self.next_version = rec.version + 1;
        self.deployment = Some(Deployment {
            version: rec.version,
            config_yaml: rec.config_yaml.clone(),
            server_type: rec.server_type,
            config,
        });
        self.recover_until = Some(now + self.timeout);
        Ok(())
    }

    /// The current deployment, for persisting.
    pub fn deployment_record(&self) -> Option<DeploymentRecord> {
        self.deployment.as_ref().map(|d| DeploymentRecord {
            version: d.version,
            config_yaml: d.config_yaml.clone(),
            server_type: d.server_type,
        })
    }

    /// A heartbeat: records the node's children and returns what it should run.
    pub fn heartbeat(
        &mut self,
        node_id: &str,
        hb: &Heartbeat,
        now: Instant,
    ) -> Result<DesiredState, ClusterError> {
        match self.nodes.get_mut(node_id) {
            Some(n) if n.alive => {
                n.last_seen = now;
                n.gateway = hb.gateway_address.clone();
                n.children = hb.children.clone();
                n.gpus = hb.gpus.clone();
            }
            // A node declared dead must register again (its placements were moved away).
            _ => return Err(ClusterError::UnknownNode(node_id.to_string())),
        }
        Ok(self.desired(node_id))
    }

    /// Marks nodes without a heartbeat for the timeout dead and reschedules their applications.
    /// Returns the ids of the nodes that died now.
    pub fn tick(&mut self, now: Instant) -> Vec<String> {
        let dead: Vec<String> = self
            .nodes
            .iter()
            .filter(|(_, n)| n.alive && now.saturating_duration_since(n.last_seen) > self.timeout)
            .map(|(id, _)| id.clone())
            .collect();
        for id in &dead {
            if let Some(n) = self.nodes.get_mut(id) {
                n.alive = false;
                n.children.clear();
            }
            self.sched.set_alive(id, false);
            self.evict_node(id, &format!("node {id} missed heartbeats and is dead"));
        }
        let recovered = self.recover_until.is_some_and(|t| now >= t);
        if recovered {
            self.recover_until = None;
        }
        if !dead.is_empty() || recovered {
            self.schedule_pending(now);
        }
        dead
    }

    fn evict_node(&mut self, node_id: &str, why: &str) {
        for p in &mut self.apps {
            if p.alloc.as_ref().is_some_and(|a| a.node_id == node_id) {
                if let Some(a) = p.alloc.take() {
                    self.sched.release(&a);
                }
                p.pending = Some(why.to_string());
            }
        }
    }

    /// Places every unplaced application, largest GPU demand first.
    fn schedule_pending(&mut self, now: Instant) {
        if self.recover_until.is_some_and(|t| now < t) {
            return;
        }
        let mut order: Vec<usize> =
            (0..self.apps.len()).filter(|&i| self.apps[i].alloc.is_none()).collect();
        order.sort_by_key(|&i| {
            std::cmp::Reverse((self.apps[i].demand.gpus, self.apps[i].demand.cpus))
        });
        for i in order {
            match self.sched.schedule(&self.apps[i].demand) {
                ScheduleResult::Scheduled(a) => {
                    self.apps[i].alloc = Some(a);
                    self.apps[i].pending = None;
                }
                ScheduleResult::Retry(m) | ScheduleResult::Infeasible(m) => {
                    self.apps[i].pending = Some(m);
                }
            }
        }
    }

    /// Replaces the deployment. Refused (nothing changes) when some application could never
    /// fit on the alive nodes even if they were empty; applications that only lack free room
    /// now stay pending.
    pub fn deploy(&mut self, req: &DeployRequest) -> Result<u64, ClusterError> {
        let config = crate::config::load_str(&req.config_yaml)
            .map_err(|e| ClusterError::BadConfig(e.to_string()))?;
        if config.applications.is_empty() {
            return Err(ClusterError::BadConfig("the config has no applications to run".into()));
        }
        crate::gateway::RouteTable::new(
            config.applications.iter().map(|a| (a.name.as_str(), a.route_prefix.as_str())),
        )
        .map_err(|e| ClusterError::BadConfig(e.to_string()))?;
        let demands: Vec<Demand> = config.applications.iter().map(demand_of).collect();
        let alive: Vec<NodeSpec> =
            self.nodes.values().filter(|n| n.alive).map(|n| n.spec.clone()).collect();
        let mut trial = ClusterState::new(alive);
        let infeasible: Vec<String> = trial
            .schedule_all(&demands)
            .into_iter()
            .filter_map(|r| match r {
                ScheduleResult::Infeasible(m) => Some(m),
                _ => None,
            })
            .collect();
        if !infeasible.is_empty() {
            return Err(ClusterError::Infeasible(infeasible.join("\n")));
        }
        for p in std::mem::take(&mut self.apps) {
            if let Some(a) = p.alloc {
                self.sched.release(&a);
            }
        }
        self.apps = config
            .applications
            .iter()
            .zip(demands)
            .map(|(app, demand)| AppPlan { app: app.clone(), demand, alloc: None, pending: None })
            .collect();
        let version = self.next_version;
        self.next_version += 1;
        self.deployment = Some(Deployment {
            version,
            config_yaml: req.config_yaml.clone(),
            server_type: req.server_type.unwrap_or(config.server_type),
            config,
        });
        self.recover_until = None;
        self.schedule_pending(Instant::now());
        Ok(version)
    }

    fn route_of(&self, p: &AppPlan) -> Option<String> {
        let a = p.alloc.as_ref()?;
        let node = self.nodes.get(&a.node_id).filter(|n| n.alive)?;
        node.children
            .iter()
            .find(|c| c.app == p.app.name && c.gpu_ids == a.gpu_ids && c.state == AppState::Running)
            .and_then(|c| c.address.clone())
    }

    /// What `node_id` should run, plus every application's current address.
    pub fn desired(&self, node_id: &str) -> DesiredState {
        let assignments = self
            .apps
            .iter()
            .filter_map(|p| {
                let a = p.alloc.as_ref().filter(|a| a.node_id == node_id)?;
                Some(Assignment {
                    app: p.app.clone(),
                    gpu_ids: a.gpu_ids.clone(),
                    cpus: a.cpus.as_f64(),
                })
            })
            .collect();
        let routes = self.apps.iter().map(|p| (p.app.name.clone(), self.route_of(p))).collect();
        DesiredState {
            deployment: self.deployment.as_ref().map(|d| d.version).unwrap_or(0),
            config_yaml: self.deployment.as_ref().map(|d| d.config_yaml.clone()),
            server_type: self.deployment.as_ref().map(|d| d.server_type).unwrap_or_default(),
            assignments,
            routes,
        }
    }

    /// Node pids known to the head (for diagnostics).
    pub fn node_pid(&self, node_id: &str) -> Option<u32> {
        self.nodes.get(node_id).map(|n| n.pid)
    }

    /// `GET /v1/status`: every node and where each application runs.
    pub fn status(&self) -> StatusReport {
        let mut nodes: Vec<NodeStatus> = self
            .sched
            .nodes()
            .iter()
            .map(|s| {
                let mut st = NodeStatus::from_state(s);
                if let Some(n) = self.nodes.get(&st.id) {
                    st.alive = n.alive;
                    st.address = n.spec.address.clone();
                }
                st
            })
            .collect();
        let applications: Vec<AppStatus> = self
            .apps
            .iter()
            .map(|p| {
                let child = p.alloc.as_ref().and_then(|a| {
                    self.nodes
                        .get(&a.node_id)
                        .and_then(|n| n.children.iter().find(|c| c.app == p.app.name))
                });
                let state = match (&p.alloc, child) {
                    (None, _) => AppState::Pending,
                    (Some(_), None) => AppState::Starting,
                    (Some(_), Some(c)) => c.state,
                };
                let node = p.alloc.as_ref().map(|a| a.node_id.as_str()).unwrap_or_default();
                let gpus = p.alloc.as_ref().map(|a| a.gpu_ids.clone()).unwrap_or_default();
                let (kind, prefix) = (p.app.import_path.as_str(), &p.app.route_prefix);
                AppStatus {
                    pid: child.and_then(|c| c.pid),
                    state,
                    restarts: child.map(|c| c.restarts).unwrap_or(0),
                    address: self.route_of(p),
                    last_exit: child.and_then(|c| c.last_exit.clone()),
                    pending_reason: if p.alloc.is_none() { p.pending.clone() } else { None },
                    download: child.and_then(|c| c.download),
                    ..AppStatus::new(&p.app.name, kind, prefix, node, gpus, p.demand.cpus.as_f64())
                }
            })
            .collect();
        for st in &mut nodes {
            let samples = self.nodes.get(&st.id).map_or(&[][..], |n| n.gpus.as_slice());
            gpu_table::fill_gpu_rows(st, samples, &applications);
        }
        let mut alive: Vec<&NodeEntry> = self.nodes.values().filter(|n| n.alive).collect();
        alive.sort_by_key(|n| !n.is_head);
        let gateway = alive.iter().find_map(|n| n.gateway.clone()).unwrap_or_default();
        let d = self.deployment.as_ref();
        StatusReport {
            server_type: match d.map(|d| d.server_type) {
                Some(ServerType::Tinker) => "tinker".into(),
                _ => "twinkle".into(),
            },
            namespace: d.and_then(|d| d.config.ray_namespace.clone()),
            head_pid: std::process::id(),
            control_address: self.control_address.clone(),
            gateway_address: gateway,
            nodes,
            applications,
        }
    }
}

#[cfg(test)]
#[path = "cluster_tests.rs"]
mod tests;
