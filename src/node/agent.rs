//! Cluster node agent: registers with the head, heartbeats, and converges this node's children
//! (and its gateway) on the desired state the head answers with.
//!
//! Children register with the agent's own loopback control plane (the same one single-machine
//! serve uses), so the existing supervisor runs unchanged; the agent reports each child's
//! `node-ip:port` to the head, which hands every gateway the cluster-wide routes.
//!
//! Actors: a local [`RegistryActor`] (this node's children, what the control plane and the
//! heartbeat read; the GPU monitor sends it its samples), a routing [`RegistryActor`] (the
//! cluster-wide routes this node's gateway asks), and a [`Reconciler`] that owns the children
//! and converges them on each heartbeat's answer. The heartbeat loop itself owns only the head
//! connection and this node's gateway server.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use actix::Addr;
use awc::http::StatusCode;
use serde::de::DeserializeOwned;
use tokio::sync::watch;

use super::NodeError;
use super::gpu_monitor::GpuMonitor;
use super::reconcile::{Converge, Reconciler, Report, StopAll, Wanted};
use super::serve::{Placement, child_spec};
use super::supervise::RestartPolicy;
use crate::cluster::{Allocation, NodeSpec, Quantity};
use crate::config::{ProxyLocation, ServerType};
use crate::gateway::Upstreams;
use crate::gateway::{self, RouteTable};
use crate::head::cluster::{
    Assignment, DesiredState, Heartbeat, NodeRegistration, PROTOCOL_VERSION, ReportedChild,
    TOKEN_HEADER, VERSION_HEADER,
};
use crate::head::cluster_record::{self, AgentRecord};
use crate::head::control;
use crate::head::registry::{AppStatus, Registry};
use crate::head::registry_actor::{GpuSamples, RegistryActor, SetGpuSamples, SetUpstream};

/// How one node agent runs.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// The head's control address `HOST:PORT`.
    pub head: String,
    pub token: String,
    pub node: NodeSpec,
    /// The address other nodes reach this node's children at.
    pub node_ip: String,
    /// Overrides the deployment's `http_options.port` for this node's gateway.
    pub gateway_port: Option<u16>,
    pub is_head: bool,
    pub home: PathBuf,
    pub log_level: String,
}

struct Gateway {
    deployment: u64,
    address: String,
    handle: actix_web::dev::ServerHandle,
}

enum Answer<T> {
    Ok(T),
    /// The head does not know us (it restarted or declared us dead): register again.
    Unknown,
}

struct Agent {
    opts: AgentOptions,
    client: awc::Client,
    exe: PathBuf,
    /// This node's children's record (also holds the GPU monitor's samples).
    local: Addr<RegistryActor>,
    local_control: String,
    /// The cluster-wide routes this node's gateway forwards by, and the gateway's view of them.
    routing: Addr<RegistryActor>,
    routes_view: Upstreams,
    /// Owns the children.
    reconciler: Addr<Reconciler>,
    gateway: Option<Gateway>,
}

impl Agent {
    async fn post<B: serde::Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<Answer<T>, NodeError> {
        let url = format!("http://{}{path}", self.opts.head);
        let unreachable = |d: String| NodeError::Unreachable(format!("{}: {d}", self.opts.head));
        let mut resp = self
            .client
            .post(&url)
            .insert_header((TOKEN_HEADER, self.opts.token.as_str()))
            .insert_header((VERSION_HEADER, PROTOCOL_VERSION.to_string()))
            .send_json(body)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let bytes = resp.body().limit(64 << 20).await.map_err(|e| unreachable(e.to_string()))?;
        let status = resp.status();
        if status.is_success() {
            return serde_json::from_slice(&bytes)
                .map(Answer::Ok)
                .map_err(|e| unreachable(format!("bad answer: {e}")));
        }
        if status == StatusCode::NOT_FOUND {
            return Ok(Answer::Unknown);
        }
        let detail = serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|v| v["detail"].as_str().map(str::to_string))
            .unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned());
        if status.is_client_error() {
            return Err(NodeError::Refused(format!("{} ({status})", detail)));
        }
        Err(unreachable(format!("answered {status}: {detail}")))
    }

    /// The children as the head wants them reported; none while the reconciler is gone.
    async fn report(&self) -> Vec<ReportedChild> {
        self.reconciler.send(Report).await.unwrap_or_default()
    }

    async fn register(&self) -> Result<(), NodeError> {
        let reg = NodeRegistration {
            protocol: PROTOCOL_VERSION,
            node: self.opts.node.clone(),
            pid: std::process::id(),
            gateway_address: self.gateway.as_ref().map(|g| g.address.clone()),
            children: self.report().await,
            is_head: self.opts.is_head,
        };
        match self.post::<_, serde_json::Value>("/v1/cluster/nodes", &reg).await? {
            Answer::Ok(_) => Ok(()),
            Answer::Unknown => Err(NodeError::Refused(format!(
                "{} has no cluster registration route: is it a twinkle head?",
                self.opts.head
            ))),
        }
    }

    fn config_path(&self, deployment: u64, yaml: &str) -> Result<PathBuf, NodeError> {
        let dir = self.opts.home.join("deployments");
        let path = dir.join(format!("deployment-{deployment}.yaml"));
        if !path.exists() {
            // A deployment config may carry API keys: owner-only in TWINKLE_HOME.
            crate::private_fs::create_dir_all(&dir).map_err(NodeError::Runtime)?;
            crate::private_fs::write(&path, yaml).map_err(NodeError::Runtime)?;
        }
        Ok(path)
    }

    /// What to run for assignment `a` of deployment `deployment`.
    fn wanted(
        &self,
        a: &Assignment,
        deployment: u64,
        config: &std::path::Path,
        server_type: ServerType,
    ) -> Wanted {
        let name = a.app.name.clone();
        let status = AppStatus::new(
            &name,
            a.app.import_path.as_str(),
            &a.app.route_prefix,
            &self.opts.node.node_id,
            a.gpu_ids.clone(),
            a.cpus,
        );
        let placement = Placement {
            app: a.app.clone(),
            alloc: Allocation {
                app: name,
                node_id: self.opts.node.node_id.clone(),
                gpu_ids: a.gpu_ids.clone(),
                cpus: Quantity::from_f64(a.cpus),
                custom: BTreeMap::new(),
            },
        };
        let mut spec = child_spec(
            &self.exe,
            config,
            &placement,
            server_type,
            &self.local_control,
            &self.opts.log_level,
        );
        spec.env.push((crate::contract::BIND_HOST_ENV.into(), self.opts.node_ip.clone()));
        Wanted { spec, status, deployment }
    }

    async fn converge(&mut self, d: &DesiredState) -> Result<(), NodeError> {
        // Without a deployment nothing is assigned: every child stops.
        let wanted = match &d.config_yaml {
            Some(yaml) if !d.assignments.is_empty() => {
                let path = self.config_path(d.deployment, yaml)?;
                d.assignments
                    .iter()
                    .map(|a| self.wanted(a, d.deployment, &path, d.server_type))
                    .collect()
            }
            _ => Vec::new(),
        };
        // Answered once stale children are reaped and missing ones started; an error means
        // the reconciler is gone (shutdown).
        let _ = self.reconciler.send(Converge(wanted)).await;
        if let Some(yaml) = &d.config_yaml {
            self.converge_gateway(d, yaml).await;
        }
        for (app, addr) in &d.routes {
            self.routing.do_send(SetUpstream { app: app.clone(), address: addr.clone() });
        }
        Ok(())
    }

    async fn converge_gateway(&mut self, d: &DesiredState, yaml: &str) {
        if self.gateway.as_ref().is_some_and(|g| g.deployment == d.deployment) {
            return;
        }
        if let Some(g) = self.gateway.take() {
            g.handle.stop(true).await;
        }
        let config = match crate::config::load_str(yaml) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "deployment config does not load; no gateway");
                return;
            }
        };
        let wanted = match config.proxy_location {
            ProxyLocation::EveryNode => true,
            ProxyLocation::HeadOnly => self.opts.is_head,
            ProxyLocation::Disabled => false,
        };
        if !wanted {
            return;
        }
        let routes = RouteTable::new(
            config.applications.iter().map(|a| (a.name.as_str(), a.route_prefix.as_str())),
        );
        let port = self.opts.gateway_port.unwrap_or(config.http_options.port);
        let started = routes.map_err(|e| e.to_string()).and_then(|r| {
            let up = self.routes_view.clone();
            // `/metrics` adds this node's own registry: its children's states, restarts, cards.
            let head = Some(crate::metrics::status::source(self.local.clone()));
            gateway::start(&config.http_options.host, port, r, up, head).map_err(|e| e.to_string())
        });
        match started {
            Ok((srv, addr)) => {
                let handle = srv.handle();
                actix_web::rt::spawn(srv);
                tracing::info!(gateway = %addr, "gateway up");
                self.gateway =
                    Some(Gateway { deployment: d.deployment, address: addr.to_string(), handle });
            }
            Err(e) => tracing::error!(error = %e, "cannot start this node's gateway"),
        }
    }

    async fn heartbeat(&mut self) -> Result<(), NodeError> {
        let hb = Heartbeat {
            protocol: PROTOCOL_VERSION,
            gateway_address: self.gateway.as_ref().map(|g| g.address.clone()),
            children: self.report().await,
            // The monitor thread sends its samples to the local registry; the heartbeat reads them.
            gpus: self
                .local
                .send(GpuSamples(self.opts.node.node_id.clone()))
                .await
                .unwrap_or_default(),
        };
        let path = format!("/v1/cluster/nodes/{}/heartbeat", self.opts.node.node_id);
        match self.post::<_, DesiredState>(&path, &hb).await? {
            Answer::Ok(d) => self.converge(&d).await,
            Answer::Unknown => {
                tracing::warn!(head = %self.opts.head, "the head does not know this node; registering again");
                self.register().await
            }
        }
    }

    async fn shutdown(&mut self) {
        if let Some(g) = self.gateway.take() {
            g.handle.stop(true).await;
        }
        let _ = self.reconciler.send(StopAll).await;
    }
}

/// Runs a node agent until `shutdown` turns true: registers (retrying for `register_within`
/// while the head is unreachable), then heartbeats and converges. A refusal (wrong token or
/// protocol version) ends it with [`NodeError::Refused`]. Must run on the main thread's
/// actix system (children's parent-death signal).
pub async fn run(
    opts: AgentOptions,
    mut shutdown: watch::Receiver<bool>,
    register_within: Duration,
) -> Result<(), NodeError> {
    let exe = std::env::current_exe().map_err(NodeError::CurrentExe)?;
    let mut reg = Registry::new("twinkle".into(), None, vec![], vec![]);
    reg.set_child_host(opts.node_ip.clone());
    // Started here, on the main thread's system, like the supervisors the reconciler starts.
    let local = RegistryActor::spawn(reg);
    let (control_srv, control_addr) =
        control::start(local.clone(), 0, super::serve::internal_token())?;
    let control_handle = control_srv.handle();
    actix_web::rt::spawn(control_srv);
    let (routing, routes_view) =
        RegistryActor::spawn_with_view(Registry::new("twinkle".into(), None, vec![], vec![]));
    let client = awc::Client::builder().timeout(Duration::from_secs(5)).finish();
    // No config file here: defaults and the environment only.
    let timings = crate::timings::Timings::resolve(None);
    let reconciler = Reconciler::spawn(local.clone(), RestartPolicy::from_timings(&timings));
    // Lives as long as the agent: dropping it ends the sampling thread.
    let _gpu_monitor = {
        let local = local.clone();
        let node = opts.node.node_id.clone();
        GpuMonitor::start(opts.node.gpu_ids.clone(), timings.gpu_stats, move |samples| {
            local.do_send(SetGpuSamples { node: node.clone(), samples })
        })
    };
    let mut agent = Agent {
        opts,
        client,
        exe,
        local,
        local_control: control_addr.to_string(),
        routing,
        routes_view,
        reconciler,
        gateway: None,
    };
    let deadline = tokio::time::Instant::now() + register_within;
    loop {
        match agent.register().await {
            Ok(()) => break,
            Err(NodeError::Unreachable(d)) if tokio::time::Instant::now() < deadline => {
                tracing::warn!(detail = %d, "head not reachable yet; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => {
                control_handle.stop(false).await;
                return Err(e);
            }
        }
    }
    let record = AgentRecord {
        pid: std::process::id(),
        role: if agent.opts.is_head { "head".into() } else { "node".into() },
        node_id: agent.opts.node.node_id.clone(),
        address: agent.opts.head.clone(),
    };
    cluster_record::write_agent(&agent.opts.home, &record)?;
    tracing::info!(node = %agent.opts.node.node_id, head = %agent.opts.head,
        gpus = ?agent.opts.node.gpu_ids, "node registered with the head");
    let mut tick = tokio::time::interval(timings.heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let result = loop {
        tokio::select! {
            _ = shutdown.changed() => break Ok(()),
            _ = tick.tick() => {
                match agent.heartbeat().await {
                    Ok(()) => {}
                    Err(e @ NodeError::Refused(_)) => break Err(e),
                    // The head may be restarting: keep the children, keep trying.
                    Err(e) => tracing::warn!(error = %e, "heartbeat failed"),
                }
            }
        }
        if *shutdown.borrow() {
            break Ok(());
        }
    };
    agent.shutdown().await;
    control_handle.stop(true).await;
    cluster_record::remove_agent(&agent.opts.home, std::process::id());
    result
}
