//! The head's record of nodes and application children: what the supervisors write and the
//! control plane, the gateway and `twinkle status` read.
//!
//! [`Registry`] is plain data with its rules (tokens, pids, states); it is owned by exactly one
//! [`super::registry_actor::RegistryActor`], and everyone else reaches it through that actor's
//! messages, so there is no lock and no shared mutable copy.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::gpu_table::{self, GpuSample, GpuStatus};
use crate::cluster::NodeState;
use crate::gateway::{ReadyReport, Upstream};

/// Lifecycle of one application child, as `twinkle status` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AppState {
    /// Spawned, not yet registered with the head.
    Starting,
    /// Spawned and fetching its model from a hub (`download` says how far); registers after.
    Downloading,
    /// Registered: the gateway forwards to it.
    Running,
    /// Exited or killed; waiting out the restart backoff.
    Restarting,
    /// The last spawn attempt failed (the binary could not be started; retried with backoff),
    /// or the application reported a permanent startup error (not restarted; `last_exit` says why).
    Failed,
    /// `twinkle serve` is shutting down and has asked the child to stop.
    Stopping,
    /// Stopped for good (shutdown finished).
    Stopped,
    /// Cluster mode: not placed on any node yet (`pending_reason` says why).
    Pending,
}

impl AppState {
    pub fn as_str(self) -> &'static str {
        match self {
            AppState::Starting => "starting",
            AppState::Downloading => "downloading",
            AppState::Running => "running",
            AppState::Restarting => "restarting",
            AppState::Failed => "failed",
            AppState::Stopping => "stopping",
            AppState::Stopped => "stopped",
            AppState::Pending => "pending",
        }
    }
}

/// One application as `GET /v1/status` reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AppStatus {
    pub name: String,
    pub import_path: String,
    pub route_prefix: String,
    pub node: String,
    /// Physical GPU ids (the child's `CUDA_VISIBLE_DEVICES`).
    pub gpu_ids: Vec<u32>,
    pub cpus: f64,
    pub pid: Option<u32>,
    pub state: AppState,
    /// How many times the child has been restarted since `serve` started.
    pub restarts: u32,
    /// The child's loopback HTTP address once registered.
    pub address: Option<String>,
    /// How the previous child ended (`exit code 1`, `signal 9`, ...).
    pub last_exit: Option<String>,
    /// Cluster mode: why the application is not placed (state `pending`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_reason: Option<String>,
    /// While `downloading`: how far the model download is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub download: Option<DownloadStatus>,
}

/// A model download in progress, as the child last reported it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DownloadStatus {
    pub bytes_done: u64,
    /// 0 while the child has not listed the files yet.
    pub bytes_total: u64,
    /// 0–100 (0 while the total is unknown).
    pub percent: f64,
}

impl DownloadStatus {
    pub fn new(bytes_done: u64, bytes_total: u64) -> Self {
        let percent = crate::hub::progress::percent(bytes_done, bytes_total);
        DownloadStatus { bytes_done, bytes_total, percent }
    }
}

impl AppStatus {
    /// An application placed on `node` whose child has not started yet.
    pub fn new(
        name: &str,
        import_path: &str,
        route_prefix: &str,
        node: &str,
        gpu_ids: Vec<u32>,
        cpus: f64,
    ) -> Self {
        AppStatus {
            name: name.to_string(),
            import_path: import_path.to_string(),
            route_prefix: route_prefix.to_string(),
            node: node.to_string(),
            gpu_ids,
            cpus,
            pid: None,
            state: AppState::Starting,
            restarts: 0,
            address: None,
            last_exit: None,
            pending_reason: None,
            download: None,
        }
    }
}

/// One node as `GET /v1/status` reports it. `resources`/`available` use Ray's keys (`CPU`, `GPU`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub id: String,
    pub address: String,
    pub resources: BTreeMap<String, f64>,
    pub available: BTreeMap<String, f64>,
    pub gpu_ids: Vec<u32>,
    pub alive: bool,
    /// One row per card of `gpu_ids`: the last NVML sample and the application holding it.
    #[serde(default)]
    pub gpus: Vec<GpuStatus>,
}

impl NodeStatus {
    /// Totals and what is still free after scheduling, from the scheduler's view of a node.
    pub fn from_state(n: &NodeState) -> Self {
        let mut resources = BTreeMap::new();
        let mut available = BTreeMap::new();
        resources.insert("CPU".to_string(), n.spec.cpus.as_f64());
        resources.insert("GPU".to_string(), n.spec.gpu_ids.len() as f64);
        available.insert("CPU".to_string(), n.free_cpus.as_f64());
        available.insert("GPU".to_string(), n.free_gpu_ids.len() as f64);
        for (k, v) in &n.spec.custom {
            resources.insert(k.clone(), v.as_f64());
        }
        for (k, v) in &n.free_custom {
            available.insert(k.clone(), v.as_f64());
        }
        Self {
            id: n.spec.node_id.clone(),
            address: n.spec.address.clone(),
            resources,
            available,
            gpu_ids: n.spec.gpu_ids.clone(),
            alive: n.alive,
            gpus: Vec::new(),
        }
    }
}

/// The whole `GET /v1/status` answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    pub server_type: String,
    pub namespace: Option<String>,
    pub head_pid: u32,
    pub control_address: String,
    pub gateway_address: String,
    pub nodes: Vec<NodeStatus>,
    pub applications: Vec<AppStatus>,
}

/// A child's registration (`POST /v1/register`), defined with the rest of the parent/child
/// contract.
pub use crate::contract::{ProgressRequest, RegisterRequest};

/// Why a registration was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegisterError {
    #[error("no application named {0:?} is deployed")]
    UnknownApp(String),
    #[error("registration token of {0:?} does not match the current child")]
    BadToken(String),
    #[error("pid {pid} is not the current child of {app:?} (expected {expected:?})")]
    StalePid { app: String, pid: u32, expected: Option<u32> },
}

struct AppEntry {
    status: AppStatus,
    /// Token handed to the current child; a registration must carry it.
    token: Option<String>,
    /// Progress reports from the current child (the supervisor waits while they grow).
    reports: u64,
    /// Supervised on this node (false: a cluster route to another node's child).
    local: bool,
}

/// Where the current child of an application is on its way to serving (the supervisor's
/// question while it waits for the registration).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Registration {
    pub registered: bool,
    /// Progress reports received from this child so far.
    pub reports: u64,
}

/// Nodes and application children of one head (or one cluster node agent).
pub struct Registry {
    server_type: String,
    namespace: Option<String>,
    control_address: String,
    gateway_address: String,
    nodes: Vec<NodeStatus>,
    apps: Vec<AppEntry>,
    /// The host children listen on (their registered address is `child_host:port`).
    child_host: String,
    /// Latest GPU samples per node id, written by the node's GPU monitor thread.
    gpu_samples: BTreeMap<String, Vec<GpuSample>>,
}

impl Registry {
    pub fn new(
        server_type: String,
        namespace: Option<String>,
        nodes: Vec<NodeStatus>,
        apps: Vec<AppStatus>,
    ) -> Self {
        Self {
            server_type,
            namespace,
            control_address: String::new(),
            gateway_address: String::new(),
            nodes,
            apps: apps
                .into_iter()
                .map(|status| AppEntry { status, token: None, reports: 0, local: true })
                .collect(),
            child_host: "127.0.0.1".to_string(),
            gpu_samples: BTreeMap::new(),
        }
    }

    pub fn set_addresses(&mut self, control: String, gateway: String) {
        self.control_address = control;
        self.gateway_address = gateway;
    }

    fn entry_mut(&mut self, app: &str) -> Option<&mut AppEntry> {
        self.apps.iter_mut().find(|a| a.status.name == app)
    }

    /// A new child process exists; it is `Starting` until it registers with `token`.
    pub fn child_started(&mut self, app: &str, pid: Option<u32>, token: String) {
        if let Some(e) = self.entry_mut(app) {
            e.status.pid = pid;
            e.status.state = AppState::Starting;
            e.status.address = None;
            e.status.download = None;
            e.token = Some(token);
            e.reports = 0;
        }
    }

    /// The entry of `app` when `token` and `pid` are its current child's.
    fn current_child(
        &mut self,
        app: &str,
        token: &str,
        pid: u32,
    ) -> Result<&mut AppEntry, RegisterError> {
        let e = self.entry_mut(app).ok_or_else(|| RegisterError::UnknownApp(app.to_string()))?;
        if e.token.as_deref() != Some(token) {
            return Err(RegisterError::BadToken(app.to_string()));
        }
        if e.status.pid != Some(pid) {
            return Err(RegisterError::StalePid {
                app: app.to_string(),
                pid,
                expected: e.status.pid,
            });
        }
        Ok(e)
    }

    /// A download report from the current child of `req.app`: it is `downloading` until it
    /// registers (a report after the registration changes nothing).
    pub fn progress(&mut self, req: &ProgressRequest) -> Result<(), RegisterError> {
        let e = self.current_child(&req.app, &req.token, req.pid)?;
        if matches!(e.status.state, AppState::Starting | AppState::Downloading) {
            e.status.state = AppState::Downloading;
            e.status.download = Some(DownloadStatus::new(req.bytes_done, req.bytes_total));
            e.reports += 1;
        }
        Ok(())
    }

    /// Accepts a registration from the current child of `req.app`; returns its address.
    pub fn register(&mut self, req: &RegisterRequest) -> Result<String, RegisterError> {
        let host = self.child_host.clone();
        let e = self.current_child(&req.app, &req.token, req.pid)?;
        let address = if host.contains(':') {
            format!("[{host}]:{}", req.port)
        } else {
            format!("{host}:{}", req.port)
        };
        e.status.address = Some(address.clone());
        e.status.state = AppState::Running;
        e.status.download = None;
        Ok(address)
    }

    /// The latest GPU samples of `node` (replacing the previous ones).
    pub fn set_gpu_samples(&mut self, node: &str, samples: Vec<GpuSample>) {
        self.gpu_samples.insert(node.to_string(), samples);
    }

    /// Cluster node agents: children listen on the node's address instead of loopback.
    pub fn set_child_host(&mut self, host: String) {
        self.child_host = host;
    }

    /// Adds an application entry (cluster node agents learn their applications at run time);
    /// an existing entry of that name is replaced.
    pub fn add_app(&mut self, status: AppStatus) {
        self.apps.retain(|a| a.status.name != status.name);
        self.apps.push(AppEntry { status, token: None, reports: 0, local: true });
    }

    /// Drops an application entry (its child was stopped for good).
    pub fn remove_app(&mut self, app: &str) {
        self.apps.retain(|a| a.status.name != app);
    }

    /// Replaces the node list (cluster mode: the head's view of every node).
    pub fn set_nodes(&mut self, nodes: Vec<NodeStatus>) {
        self.nodes = nodes;
    }

    /// Gateway routing table of a cluster node: `app` is reachable at `address` (None = down).
    pub fn set_upstream(&mut self, app: &str, address: Option<String>) {
        if self.entry_mut(app).is_none() {
            self.apps.push(AppEntry {
                status: AppStatus {
                    state: AppState::Pending,
                    ..AppStatus::new(app, "", "", "", Vec::new(), 0.0)
                },
                token: None,
                reports: 0,
                local: false,
            });
        }
        if let Some(e) = self.entry_mut(app) {
            e.status.state = if address.is_some() { AppState::Running } else { AppState::Pending };
            e.status.address = address;
        }
    }

    /// Applications supervised on this node (not the cluster routes to other nodes' children
    /// that [`Self::set_upstream`] adds).
    pub fn local_apps(&self) -> std::collections::BTreeSet<String> {
        self.apps.iter().filter(|a| a.local).map(|a| a.status.name.clone()).collect()
    }

    /// [`Self::snapshot`] with only this node's applications (what its metrics report).
    pub fn local_snapshot(&self) -> StatusReport {
        let mut report = self.snapshot();
        let local = self.local_apps();
        report.applications.retain(|a| local.contains(&a.name));
        report
    }

    /// Whether the current child of `app` has registered, and how many progress reports it
    /// sent before.
    pub fn registration(&self, app: &str) -> Registration {
        self.apps
            .iter()
            .find(|a| a.status.name == app)
            .map(|a| Registration {
                registered: a.status.state == AppState::Running,
                reports: a.reports,
            })
            .unwrap_or_default()
    }

    /// The current child of `app` is gone: forget it and record `state` and why. Returns the
    /// entry, or None for an unknown application.
    fn child_gone(&mut self, app: &str, state: AppState, why: String) -> Option<&mut AppEntry> {
        let e = self.entry_mut(app)?;
        e.status.pid = None;
        e.status.address = None;
        e.token = None;
        e.status.download = None;
        e.status.state = state;
        e.status.last_exit = Some(why);
        Some(e)
    }

    /// The child ended; it will be restarted after a backoff (counted now).
    pub fn child_exited(&mut self, app: &str, how: String) -> u32 {
        self.child_gone(app, AppState::Restarting, how).map_or(0, |e| {
            e.status.restarts += 1;
            e.status.restarts
        })
    }

    /// The binary could not be spawned at all (retried with backoff, counted now).
    pub fn spawn_failed(&mut self, app: &str, why: String) -> u32 {
        self.child_gone(app, AppState::Failed, why).map_or(0, |e| {
            e.status.restarts += 1;
            e.status.restarts
        })
    }

    /// The child exited with a permanent startup error: `failed` with the reason, no restart.
    pub fn startup_failed(&mut self, app: &str, why: String) {
        self.child_gone(app, AppState::Failed, why);
    }

    pub fn set_state(&mut self, app: &str, state: AppState) {
        if let Some(e) = self.entry_mut(app) {
            e.status.state = state;
            if matches!(state, AppState::Stopping | AppState::Stopped) {
                e.status.address = None;
            }
            if state == AppState::Stopped {
                e.status.pid = None;
                e.token = None;
                e.status.download = None;
            }
        }
    }

    /// Where to forward a request for `app`: its address when running, else its state.
    pub fn upstream(&self, app: &str) -> Result<String, AppState> {
        match self.apps.iter().find(|a| a.status.name == app) {
            Some(a) => match (&a.status.address, a.status.state) {
                (Some(addr), AppState::Running) => Ok(addr.clone()),
                (_, state) => Err(state),
            },
            None => Err(AppState::Stopped),
        }
    }

    /// Every application's state, and which keep the deployment from being ready (what
    /// `/readyz` and `twinkle serve --wait` report).
    pub fn readiness(&self) -> ReadyReport {
        let mut r = ReadyReport::default();
        for a in &self.apps {
            r.apps.push((a.status.name.clone(), a.status.state.as_str()));
            match a.status.state {
                AppState::Running => {}
                AppState::Failed => {
                    let why = a.status.last_exit.clone().unwrap_or_else(|| "unknown".into());
                    r.failed.push((a.status.name.clone(), why));
                }
                other => r.waiting.push((a.status.name.clone(), other.as_str())),
            }
        }
        r
    }

    /// The gateway's question: where to forward a request for `app`.
    pub fn lookup(&self, app: &str) -> Upstream {
        match self.upstream(app) {
            Ok(addr) => Upstream::At(addr),
            Err(AppState::Failed) => Upstream::Failed(self.failure(app).unwrap_or_default()),
            Err(state) => Upstream::Down(state.as_str()),
        }
    }

    /// The latest GPU samples of `node` (what a cluster agent's heartbeat carries).
    pub fn gpu_samples(&self, node: &str) -> Vec<GpuSample> {
        self.gpu_samples.get(node).cloned().unwrap_or_default()
    }

    /// The reason `app` is failed (`last_exit`), when it is.
    pub fn failure(&self, app: &str) -> Option<String> {
        let a = self.apps.iter().find(|a| a.status.name == app)?;
        (a.status.state == AppState::Failed)
            .then(|| a.status.last_exit.clone().unwrap_or_else(|| "unknown".into()))
    }

    pub fn snapshot(&self) -> StatusReport {
        let applications: Vec<AppStatus> = self.apps.iter().map(|a| a.status.clone()).collect();
        let mut nodes = self.nodes.clone();
        for n in &mut nodes {
            let samples = self.gpu_samples.get(&n.id).map_or(&[][..], Vec::as_slice);
            gpu_table::fill_gpu_rows(n, samples, &applications);
        }
        StatusReport {
            server_type: self.server_type.clone(),
            namespace: self.namespace.clone(),
            head_pid: std::process::id(),
            control_address: self.control_address.clone(),
            gateway_address: self.gateway_address.clone(),
            nodes,
            applications,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app(name: &str) -> AppStatus {
        AppStatus::new(name, "model", "/m", "node-0", vec![2, 3], 0.1)
    }

    fn reg() -> Registry {
        Registry::new("tinker".into(), None, vec![], vec![app("m")])
    }

    fn req(pid: u32, token: &str) -> RegisterRequest {
        RegisterRequest { app: "m".into(), pid, port: 4242, token: token.into() }
    }

    #[test]
    fn registration_needs_current_token_and_pid() {
        let mut r = reg();
        r.child_started("m", Some(10), "tok".into());
        assert_eq!(r.upstream("m"), Err(AppState::Starting));
        assert_eq!(r.register(&req(10, "nope")), Err(RegisterError::BadToken("m".into())));
        assert!(matches!(r.register(&req(11, "tok")), Err(RegisterError::StalePid { .. })));
        assert_eq!(r.register(&req(10, "tok")), Ok("127.0.0.1:4242".to_string()));
        assert_eq!(r.upstream("m"), Ok("127.0.0.1:4242".to_string()));
        let mut unknown = req(10, "tok");
        unknown.app = "x".into();
        assert_eq!(r.register(&unknown), Err(RegisterError::UnknownApp("x".into())));
    }

    #[test]
    fn progress_reports_show_downloading_until_registration() {
        let mut r = reg();
        r.child_started("m", Some(10), "tok".into());
        let report = |done, token: &str| ProgressRequest {
            app: "m".into(),
            pid: 10,
            token: token.into(),
            bytes_done: done,
            bytes_total: 400,
        };
        assert_eq!(r.progress(&report(1, "nope")), Err(RegisterError::BadToken("m".into())));
        assert_eq!(r.registration("m").reports, 0);
        r.progress(&report(100, "tok")).unwrap();
        r.progress(&report(300, "tok")).unwrap();
        assert_eq!(r.registration("m"), Registration { registered: false, reports: 2 });
        assert_eq!(r.lookup("m"), Upstream::Down("downloading"));
        assert_eq!(r.readiness().waiting, vec![("m".to_string(), "downloading")]);
        let d = r.snapshot().applications[0].download.expect("download shown");
        assert_eq!((d.bytes_done, d.bytes_total, d.percent), (300, 400, 75.0));
        r.register(&req(10, "tok")).unwrap();
        assert!(r.snapshot().applications[0].download.is_none());
        // A late report does not turn a serving application back into a downloading one.
        r.progress(&report(400, "tok")).unwrap();
        assert_eq!(r.registration("m"), Registration { registered: true, reports: 2 });
        r.child_exited("m", "signal 9".into());
        assert_eq!(r.progress(&report(1, "tok")), Err(RegisterError::BadToken("m".into())));
    }

    #[test]
    fn exit_counts_restart_and_invalidates_old_token() {
        let mut r = reg();
        r.child_started("m", Some(10), "tok".into());
        assert!(r.register(&req(10, "tok")).is_ok());
        assert_eq!(r.child_exited("m", "signal 9".into()), 1);
        assert_eq!(r.upstream("m"), Err(AppState::Restarting));
        // The dead child's token no longer works, even with the same pid.
        assert_eq!(r.register(&req(10, "tok")), Err(RegisterError::BadToken("m".into())));
        r.child_started("m", Some(12), "tok2".into());
        assert!(r.register(&req(12, "tok2")).is_ok());
        let s = r.snapshot();
        assert_eq!(s.applications[0].restarts, 1);
        assert_eq!(s.applications[0].pid, Some(12));
        assert_eq!(s.applications[0].last_exit.as_deref(), Some("signal 9"));
    }

    #[test]
    fn readiness_names_waiting_and_failed_applications() {
        let mut r = Registry::new("tinker".into(), None, vec![], vec![app("m"), app("s")]);
        r.child_started("m", Some(10), "tok".into());
        let ready = r.readiness();
        assert!(!ready.is_ready());
        assert_eq!(ready.waiting.len(), 2);
        assert!(r.register(&req(10, "tok")).is_ok());
        r.startup_failed("s", "model missing".into());
        let ready = r.readiness();
        assert_eq!(ready.waiting, vec![]);
        assert_eq!(ready.failed, vec![("s".to_string(), "model missing".to_string())]);
        assert_eq!(r.failure("s").as_deref(), Some("model missing"));
        assert_eq!(r.failure("m"), None);
        r.child_started("s", Some(11), "t2".into());
        let mut again = req(11, "t2");
        again.app = "s".into();
        assert!(r.register(&again).is_ok());
        assert!(r.readiness().is_ready());
        assert_eq!(r.lookup("s"), Upstream::At("127.0.0.1:4242".to_string()));
        assert_eq!(r.lookup("x"), Upstream::Down("stopped"));
        r.startup_failed("m", "gone".into());
        assert_eq!(r.lookup("m"), Upstream::Failed("gone".to_string()));
    }
}
