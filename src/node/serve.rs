//! `twinkle serve`: one machine's whole platform in one process — head control plane, gateway,
//! and the node agent that runs one supervised child per application.
//!
//! Actors (all on the main thread's actix system): a [`RegistryActor`] owns the children's
//! record (the control plane and the gateway ask it), a [`Reconciler`] owns the children (one
//! [`super::supervise::SupervisorActor`] each) and is sent every placement once. This function
//! owns only the servers' handles and the signal handling.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use actix::Addr;
use tokio::signal::unix::{SignalKind, signal};

use super::gpu_monitor::GpuMonitor;
use super::reconcile::{Converge, Reconciler, StopAll, Wanted};
use super::supervise::{ChildSpec, RestartPolicy};
use super::{NodeError, NodeResources};
use crate::cluster::{Allocation, ClusterState, NodeSpec, Quantity, ScheduleResult, demand_of};
use crate::config::{self, Application, ServerConfig, ServerType};
use crate::contract::APP_SPEC_ENV;
use crate::gateway::{self, RouteTable};
use crate::head::control;
use crate::head::registry::{AppStatus, NodeStatus, Registry};
use crate::head::registry_actor::{RegistryActor, SetAddresses, SetGpuSamples, Snapshot};
use crate::head::state_file::{self, ServeRecord};
use crate::timings::Timings;

/// Command-line options of `twinkle serve`.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub config_path: PathBuf,
    /// Overrides the file's `server_type`.
    pub server_type: Option<ServerType>,
    pub namespace: Option<String>,
    pub resources: NodeResources,
    /// Loopback port of the control plane (0 = any free port).
    pub control_port: u16,
    /// Passed to the children's `--log-level`.
    pub log_level: String,
    /// `--wait`: print a `ready` line on stdout once every application is running, and stop
    /// everything and fail if an application fails before that.
    pub wait: bool,
}

/// One application and where the scheduler put it.
#[derive(Debug, Clone)]
pub struct Placement {
    pub app: Application,
    pub alloc: Allocation,
}

/// Schedules every application on `node`, all or nothing. Anything that is not placed is an
/// error naming the application, its demand and what the node has.
pub fn plan(
    config: &ServerConfig,
    node: NodeSpec,
) -> Result<(Vec<Placement>, Vec<NodeStatus>), NodeError> {
    if config.applications.is_empty() {
        return Err(NodeError::Invalid("the config has no applications to run".to_string()));
    }
    let demands: Vec<_> = config.applications.iter().map(demand_of).collect();
    let offered = format!(
        "this machine offers {} GPU {:?} and {} CPU (change with --num-gpus / --num-cpus or \
         CUDA_VISIBLE_DEVICES)",
        node.gpu_ids.len(),
        node.gpu_ids,
        node.cpus
    );
    let mut cluster = ClusterState::new(vec![node]);
    let results = cluster.schedule_all(&demands);
    let mut placements = Vec::new();
    let mut errors = Vec::new();
    for (app, r) in config.applications.iter().zip(results) {
        match r {
            ScheduleResult::Scheduled(alloc) => {
                placements.push(Placement { app: app.clone(), alloc })
            }
            // With one node nothing will ever be released: Retry is as final as Infeasible.
            ScheduleResult::Retry(m) | ScheduleResult::Infeasible(m) => errors.push(m),
        }
    }
    if !errors.is_empty() {
        let gpus: u32 = demands.iter().map(|d| d.gpus).sum();
        let cpus = demands.iter().fold(Quantity::ZERO, |acc, d| acc + d.cpus);
        errors.push(format!("all applications together need {gpus} GPU and {cpus} CPU; {offered}"));
        return Err(NodeError::Infeasible(errors.join("\n")));
    }
    let nodes = cluster.nodes().iter().map(NodeStatus::from_state).collect();
    Ok((placements, nodes))
}

fn server_type_str(t: ServerType) -> &'static str {
    match t {
        ServerType::Twinkle => "twinkle",
        ServerType::Tinker => "tinker",
    }
}

use crate::contract::INTERNAL_TOKEN_ENV;
/// One internal token per serve process, shared by every child.
static INTERNAL_TOKEN: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// This process's internal token: what its children present to each other's `/_internal/`
/// routes and to the control port's `/v1/status`, and what unlocks the details of a child's
/// `/healthz`. An operator (or a test) may pin it by giving serve the variable itself.
pub fn internal_token() -> String {
    INTERNAL_TOKEN
        .get_or_init(|| {
            std::env::var(INTERNAL_TOKEN_ENV)
                .ok()
                .filter(|t| !t.is_empty())
                .unwrap_or_else(crate::ids::token)
        })
        .clone()
}

/// Variables that the scheduler owns; an application's `runtime_env` may not override them.
const RESERVED_ENV: [&str; 2] = ["CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER"];

/// How to start the child of `p`: `twinkle worker ...` with the scheduler's physical GPU ids in
/// `CUDA_VISIBLE_DEVICES` (empty for CPU-only), the app's `runtime_env.env_vars`, and the
/// inherited environment (so `TWINKLE_*` variables of serve reach every child).
pub fn child_spec(
    exe: &Path,
    config_path: &Path,
    p: &Placement,
    server_type: ServerType,
    head: &str,
    log_level: &str,
) -> ChildSpec {
    let mut env: Vec<(String, String)> = Vec::new();
    if let Some(d) = p.app.deployments.first() {
        for (k, v) in &d.ray_actor_options.runtime_env.env_vars {
            if RESERVED_ENV.contains(&k.as_str()) {
                tracing::warn!(app = %p.app.name, var = %k, "ignoring runtime_env variable: the scheduler sets it");
                continue;
            }
            env.push((k.clone(), v.clone()));
        }
    }
    env.push(("CUDA_VISIBLE_DEVICES".into(), p.alloc.cuda_visible_devices()));
    env.push(("CUDA_DEVICE_ORDER".into(), "PCI_BUS_ID".into()));
    env.push(("TWINKLE_SERVER_TYPE".into(), server_type_str(server_type).into()));
    env.push((INTERNAL_TOKEN_ENV.into(), internal_token()));
    // Serialising a plain data struct to JSON cannot fail; an empty spec makes the worker fall
    // back to its command-line identity.
    env.push((APP_SPEC_ENV.into(), serde_json::to_string(&p.app).unwrap_or_default()));
    let args: Vec<OsString> = vec![
        "worker".into(),
        "--app".into(),
        p.app.name.clone().into(),
        "--import-path".into(),
        p.app.import_path.as_str().into(),
        "--route-prefix".into(),
        p.app.route_prefix.clone().into(),
        "--server-type".into(),
        server_type_str(server_type).into(),
        "--head".into(),
        head.into(),
        "--config".into(),
        config_path.as_os_str().to_owned(),
        "--log-level".into(),
        log_level.into(),
    ];
    ChildSpec { app: p.app.name.clone(), exe: exe.to_path_buf(), args, env }
}

/// The registry entry of a placed application before its child starts.
pub fn app_status(p: &Placement) -> AppStatus {
    AppStatus::new(
        &p.app.name,
        p.app.import_path.as_str(),
        &p.app.route_prefix,
        &p.alloc.node_id,
        p.alloc.gpu_ids.clone(),
        p.alloc.cpus.as_f64(),
    )
}

/// Runs `twinkle serve` until SIGINT/SIGTERM. Returns after every child is stopped and reaped.
pub fn run(opts: ServeOptions) -> Result<(), NodeError> {
    let (config, ignored) = config::load_file_with_warnings(&opts.config_path)?;
    for w in ignored {
        tracing::warn!("config: {w}");
    }
    let server_type = opts.server_type.unwrap_or(config.server_type);
    // As the Python launcher: tinker mode defaults to the `twinkle_cluster` namespace.
    let namespace = opts
        .namespace
        .clone()
        .or_else(|| config.ray_namespace.clone())
        .or_else(|| (server_type == ServerType::Tinker).then(|| "twinkle_cluster".to_string()));
    let routes = RouteTable::new(
        config.applications.iter().map(|a| (a.name.as_str(), a.route_prefix.as_str())),
    )
    .map_err(|e| NodeError::Invalid(e.to_string()))?;
    let node = opts.resources.detect();
    let node_id = node.node_id.clone();
    let gpu_ids = node.gpu_ids.clone();
    let (placements, nodes) = plan(&config, node)?;
    for p in &placements {
        tracing::info!(app = %p.app.name, node = %p.alloc.node_id, gpus = ?p.alloc.gpu_ids,
            cpus = %p.alloc.cpus, "placed");
    }
    let exe = std::env::current_exe().map_err(NodeError::CurrentExe)?;
    let config_path =
        std::fs::canonicalize(&opts.config_path).unwrap_or_else(|_| opts.config_path.clone());
    let home = state_file::twinkle_home();
    state_file::ensure_free(&home)?;
    // Entries exist before any child starts, so `/readyz` and status show every application.
    let reg = Registry::new(
        server_type_str(server_type).to_string(),
        namespace,
        nodes,
        placements.iter().map(app_status).collect(),
    );
    let timings = Timings::resolve(config.timings.as_ref());
    let gpu_period = timings.gpu_stats;
    let ctx =
        Running { config, server_type, placements, routes, exe, config_path, home, opts, timings };
    actix_web::rt::System::new().block_on(async move {
        // Actors need the running system: started here, on the main thread.
        let (reg, upstreams) = RegistryActor::spawn_with_view(reg);
        // Lives as long as serve: dropping it ends the sampling thread.
        let _gpu_monitor = {
            let reg = reg.clone();
            GpuMonitor::start(gpu_ids, gpu_period, move |samples| {
                reg.do_send(SetGpuSamples { node: node_id.clone(), samples });
            })
        };
        ctx.serve(reg, upstreams).await
    })
}

/// SIGKILL to every child's process group (second signal during shutdown).
async fn kill_all_children(reg: &Addr<RegistryActor>) {
    tracing::warn!("second signal: killing every child now");
    let pids: Vec<u32> = match reg.send(Snapshot).await {
        Ok(s) => s.applications.iter().filter_map(|a| a.pid).collect(),
        Err(_) => Vec::new(),
    };
    for pid in pids {
        if let Ok(raw) = i32::try_from(pid) {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(raw),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

struct Running {
    config: ServerConfig,
    server_type: ServerType,
    placements: Vec<Placement>,
    routes: RouteTable,
    exe: PathBuf,
    config_path: PathBuf,
    home: PathBuf,
    opts: ServeOptions,
    timings: Timings,
}

impl Running {
    async fn serve(
        self,
        reg: Addr<RegistryActor>,
        upstreams: gateway::Upstreams,
    ) -> Result<(), NodeError> {
        // Handlers first: a signal during startup must go through the orderly shutdown.
        let mut sigterm = signal(SignalKind::terminate()).map_err(NodeError::Runtime)?;
        let mut sigint = signal(SignalKind::interrupt()).map_err(NodeError::Runtime)?;

        let (control_srv, control_addr) =
            control::start(reg.clone(), self.opts.control_port, internal_token())?;
        let http = &self.config.http_options;
        let head_metrics = Some(crate::metrics::status::source(reg.clone()));
        let (gateway_srv, gateway_addr) =
            gateway::start(&http.host, http.port, self.routes, upstreams, head_metrics)?;
        reg.do_send(SetAddresses {
            control: control_addr.to_string(),
            gateway: gateway_addr.to_string(),
        });
        let control_handle = control_srv.handle();
        let gateway_handle = gateway_srv.handle();
        let control_task = actix_web::rt::spawn(control_srv);
        let gateway_task = actix_web::rt::spawn(gateway_srv);

        let record = ServeRecord {
            control_address: control_addr.to_string(),
            gateway_address: gateway_addr.to_string(),
            pid: std::process::id(),
            config: self.config_path.display().to_string(),
            token: internal_token(),
        };
        if let Err(e) = state_file::write(&self.home, &record) {
            gateway_handle.stop(false).await;
            control_handle.stop(false).await;
            return Err(e.into());
        }

        let policy = RestartPolicy::from_timings(&self.timings);
        let head = control_addr.to_string();
        // Started here, on the main thread, like every supervisor it starts: the children's
        // parent-death signal is tied to this thread.
        let reconciler = Reconciler::spawn(reg.clone(), policy);
        let wanted: Vec<Wanted> = self
            .placements
            .iter()
            .map(|p| Wanted {
                spec: child_spec(
                    &self.exe,
                    &self.config_path,
                    p,
                    self.server_type,
                    &head,
                    &self.opts.log_level,
                ),
                status: app_status(p),
                deployment: 0,
            })
            .collect();
        reconciler.do_send(Converge(wanted));
        tracing::info!(gateway = %gateway_addr, control = %control_addr,
            state = %state_file::serve_file(&self.home).display(), "twinkle serve is up");
        let wait = self.opts.wait;
        let mut ready =
            actix_web::rt::spawn(watch_ready(reg.clone(), gateway_addr.to_string(), wait));

        let mut failure = None;
        tokio::select! {
            _ = sigterm.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = sigint.recv() => tracing::info!("SIGINT: shutting down"),
            r = &mut ready, if wait => {
                failure = r.ok();
                tracing::error!("an application failed before the deployment was ready (--wait): shutting down");
            }
        }
        let orderly = async {
            gateway_handle.stop(true).await;
            // An error means the reconciler is gone, and its supervisors with it.
            let _ = reconciler.send(StopAll).await;
        };
        tokio::pin!(orderly);
        loop {
            tokio::select! {
                _ = &mut orderly => break,
                // An impatient second Ctrl-C: skip the grace period, the supervisors reap.
                _ = sigterm.recv() => kill_all_children(&reg).await,
                _ = sigint.recv() => kill_all_children(&reg).await,
            }
        }
        control_handle.stop(true).await;
        let _ = gateway_task.await;
        let _ = control_task.await;
        state_file::remove_if_ours(&self.home);
        tracing::info!("all children stopped");
        ready.abort();
        match failure {
            Some(why) => Err(NodeError::NotReady(why)),
            None => Ok(()),
        }
    }
}

/// How often readiness is checked (one registry message: cheap).
const READY_POLL: std::time::Duration = std::time::Duration::from_millis(200);

/// Watches the registry until every application is running, then logs `twinkle serve is ready`
/// (with `announce`, `--wait`, also prints `twinkle serve: ready ...` on stdout, the line
/// scripts look for) and stays pending. Returns only if an application fails first, with why.
async fn watch_ready(reg: Addr<RegistryActor>, gateway: String, announce: bool) -> String {
    loop {
        let Ok(r) = reg.send(crate::gateway::ReadyQuery).await else {
            // The registry is gone: serve is shutting down anyway.
            return std::future::pending::<String>().await;
        };
        if !r.failed.is_empty() {
            let why: Vec<String> =
                r.failed.iter().map(|(n, w)| format!("application `{n}` failed: {w}")).collect();
            let why = why.join("; ");
            tracing::error!(%why, "not ready: /readyz answers 503");
            return why;
        }
        if r.is_ready() {
            break;
        }
        tokio::time::sleep(READY_POLL).await;
    }
    tracing::info!(gateway = %gateway, "twinkle serve is ready: every application is running");
    if announce {
        use std::io::Write as _;
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "twinkle serve: ready (gateway http://{gateway})");
        let _ = out.flush();
    }
    std::future::pending::<String>().await
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    const TINKER: &str = r#"
server_type: tinker
http_options: {host: 127.0.0.1, port: 8000}
applications:
  - name: server
    route_prefix: /api/v1
    import_path: server
    deployments:
      - ray_actor_options: {num_cpus: 0.1}
  - name: model
    route_prefix: /api/v1/model/Qwen/Qwen2.5-0.5B-Instruct
    import_path: model
    args:
      model_id: "ms://Qwen/Qwen2.5-0.5B-Instruct"
      device_group: {name: model, ranks: 2, device_type: cuda}
    deployments:
      - ray_actor_options:
          num_cpus: 0.1
          runtime_env:
            env_vars: {FOO: bar, CUDA_VISIBLE_DEVICES: "9"}
  - name: sampler
    route_prefix: /api/v1/sampler/Qwen/Qwen2.5-0.5B-Instruct
    import_path: sampler
    args:
      device_group: {name: sampler, ranks: 1, device_type: cuda}
    deployments:
      - ray_actor_options: {num_cpus: 0.1, num_gpus: 1}
"#;

    fn node(gpus: Vec<u32>) -> NodeSpec {
        NodeSpec {
            node_id: "node-0".into(),
            address: "127.0.0.1".into(),
            cpus: Quantity::from_units(4),
            gpu_ids: gpus,
            custom: BTreeMap::new(),
        }
    }

    #[test]
    fn plan_gives_disjoint_physical_cards() {
        let cfg = config::load_str(TINKER).expect("config parses");
        let (placed, nodes) = plan(&cfg, node(vec![4, 5, 6, 7])).expect("fits");
        let ids: Vec<Vec<u32>> = placed.iter().map(|p| p.alloc.gpu_ids.clone()).collect();
        assert_eq!(ids[0], Vec::<u32>::new());
        assert_eq!(ids[1].len(), 2);
        assert_eq!(ids[2].len(), 1);
        let mut all: Vec<u32> = ids.concat();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), 3, "no card twice: {ids:?}");
        assert!(all.iter().all(|g| (4..8).contains(g)));
        assert_eq!(nodes[0].available.get("GPU"), Some(&1.0));
    }

    #[test]
    fn plan_rejects_what_cannot_fit_and_names_the_app() {
        let cfg = config::load_str(TINKER).expect("config parses");
        let err = plan(&cfg, node(vec![0, 1])).expect_err("3 cards needed");
        assert_eq!(err.exit_code(), 2);
        let msg = err.to_string();
        assert!(msg.contains("cannot place"), "{msg}");
        assert!(msg.contains("model") || msg.contains("sampler"), "{msg}");
        assert!(msg.contains("together need 3 GPU and 0.3 CPU"), "{msg}");
        assert!(msg.contains("offers 2 GPU [0, 1] and 4 CPU"), "{msg}");
    }

    #[test]
    fn child_env_uses_scheduler_ids_and_keeps_runtime_env() {
        let cfg = config::load_str(TINKER).expect("config parses");
        let (placed, _) = plan(&cfg, node(vec![4, 5, 6, 7])).expect("fits");
        let spec_of = |p| {
            child_spec(
                Path::new("/bin/twinkle"),
                Path::new("/c.yaml"),
                p,
                ServerType::Tinker,
                "127.0.0.1:9",
                "info",
            )
        };
        let spec = spec_of(&placed[1]);
        let get = |k: &str| spec.env.iter().rev().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        assert_eq!(get("CUDA_VISIBLE_DEVICES"), Some(placed[1].alloc.cuda_visible_devices()));
        assert_ne!(get("CUDA_VISIBLE_DEVICES").as_deref(), Some("9"));
        assert_eq!(spec.env.iter().filter(|(k, _)| k == "CUDA_VISIBLE_DEVICES").count(), 1);
        assert_eq!(get("FOO").as_deref(), Some("bar"));
        assert_eq!(get("CUDA_DEVICE_ORDER").as_deref(), Some("PCI_BUS_ID"));
        let server = spec_of(&placed[0]);
        let cvd = server.env.iter().find(|(k, _)| k == "CUDA_VISIBLE_DEVICES").map(|(_, v)| v);
        assert_eq!(cvd.map(String::as_str), Some(""));
        assert_eq!(spec.args[0], "worker");
    }
}
