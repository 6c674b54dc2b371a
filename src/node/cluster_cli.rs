//! `twinkle start --head`, `twinkle join`, `twinkle stop` and `twinkle serve --address`: the
//! multi-node commands, shaped like `ray start` / `ray stop` / `serve deploy`.

use std::collections::BTreeMap;
use std::io::Read as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;

use super::agent::{self, AgentOptions};
use super::{NodeError, NodeResources};
use crate::cluster::{NodeSpec, Quantity};
use crate::config::ServerType;
use crate::head::cluster::{
    self, ClusterHead, DeployRequest, PROTOCOL_VERSION, TOKEN_HEADER, VERSION_HEADER,
};
use crate::head::cluster_actor::{ClusterActor, Reset};
use crate::head::cluster_http;
use crate::head::cluster_record::{self, ClusterRecord};
use crate::head::state_file::{self, pid_alive};

/// Options shared by `start --head` and `join`.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    pub resources: NodeResources,
    /// Custom resources as JSON, e.g. `{"accel": 2}`.
    pub custom_resources: Option<String>,
    pub node_ip: String,
    /// Stable node name (default: generated once and kept in `$TWINKLE_HOME/node_id`).
    pub node_name: Option<String>,
    pub gateway_port: Option<u16>,
    pub log_level: String,
}

/// `start --head` only.
#[derive(Debug, Clone)]
pub struct HeadOptions {
    pub port: u16,
    pub token: Option<String>,
}

fn node_id(home: &Path, name: Option<&str>) -> String {
    if let Some(n) = name.filter(|n| !n.is_empty()) {
        return n.to_string();
    }
    let path = home.join("node_id");
    if let Ok(id) = std::fs::read_to_string(&path)
        && !id.trim().is_empty()
    {
        return id.trim().to_string();
    }
    let id = format!("node-{}", crate::ids::hex(4));
    let _ = crate::private_fs::create_dir_all(home);
    let _ = crate::private_fs::write(&path, &id);
    id
}

fn node_spec(home: &Path, o: &NodeOptions) -> Result<NodeSpec, NodeError> {
    let mut spec = o.resources.detect();
    spec.node_id = node_id(home, o.node_name.as_deref());
    spec.address = o.node_ip.clone();
    if let Some(text) = &o.custom_resources {
        let map: BTreeMap<String, f64> = serde_json::from_str(text).map_err(|e| {
            NodeError::Invalid(format!("--resources must be a JSON object of numbers: {e}"))
        })?;
        for (k, v) in map {
            if !v.is_finite() || v < 0.0 {
                return Err(NodeError::Invalid(format!("--resources {k:?} must be >= 0")));
            }
            spec.custom.insert(k, Quantity::from_f64(v));
        }
    }
    Ok(spec)
}

/// Runs `shutdown_tx.send(true)` on the first SIGTERM/SIGINT.
fn on_signal(tx: watch::Sender<bool>) -> Result<(), NodeError> {
    let mut term = signal(SignalKind::terminate()).map_err(NodeError::Runtime)?;
    let mut int = signal(SignalKind::interrupt()).map_err(NodeError::Runtime)?;
    actix_web::rt::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: stopping"),
            _ = int.recv() => tracing::info!("SIGINT: stopping"),
        }
        let _ = tx.send(true);
    });
    Ok(())
}

/// `twinkle start --head --block`: the control port plus this machine's own node agent.
pub fn run_head(o: NodeOptions, h: HeadOptions) -> Result<(), NodeError> {
    let home = state_file::twinkle_home();
    ensure_home_free(&home)?;
    let spec = node_spec(&home, &o)?;
    // A head restarted after a crash keeps its recorded token, so its nodes can re-register.
    let recorded = cluster_record::read_cluster(&home)
        .filter(|r| r.address == format!("{}:{}", o.node_ip, h.port))
        .map(|r| r.token);
    let token = h
        .token
        .filter(|t| !t.is_empty())
        .or_else(|| std::env::var(cluster::TOKEN_ENV).ok().filter(|t| !t.is_empty()))
        .or(recorded)
        .unwrap_or_else(crate::ids::token);
    actix_web::rt::System::new().block_on(async move {
        let (tx, rx) = watch::channel(false);
        on_signal(tx)?;
        let node_timeout = crate::timings::Timings::resolve(None).node_timeout;
        // The actor owns the cluster's state and runs the failure detector; its control
        // address is known only once the port is bound, hence the Reset below.
        let state = ClusterActor::spawn(ClusterHead::new(node_timeout, String::new()));
        let (srv, addr) =
            cluster_http::start(state.clone(), token.clone(), home.clone(), &o.node_ip, h.port)?;
        let address = format!("{}:{}", o.node_ip, addr.port());
        let restore = cluster_record::read_deployment(&home);
        let version = restore.as_ref().map(|r| r.version);
        let reset = Reset { timeout: node_timeout, control_address: address.clone(), restore };
        match state.send(reset).await {
            Ok(Ok(())) => {
                if let Some(v) = version {
                    tracing::info!(deployment = v, "restored the deployment");
                }
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot restore the recorded deployment"),
            Err(e) => return Err(NodeError::Daemon(format!("the cluster actor stopped: {e}"))),
        }
        let handle = srv.handle();
        actix_web::rt::spawn(srv);
        cluster_record::write_cluster(
            &home,
            &ClusterRecord { address: address.clone(), token: token.clone() },
        )?;
        tracing::info!(%address, "cluster head up");
        let opts = AgentOptions {
            head: address,
            token,
            node: spec,
            node_ip: o.node_ip.clone(),
            gateway_port: o.gateway_port,
            is_head: true,
            home: home.clone(),
            log_level: o.log_level.clone(),
        };
        let result = agent::run(opts, rx, Duration::from_secs(30)).await;
        handle.stop(true).await;
        cluster_record::remove_cluster(&home);
        result
    })
}

/// `twinkle join --block`: a node agent registered with the head at `address`.
pub fn run_join(o: NodeOptions, address: String, token: String) -> Result<(), NodeError> {
    let home = state_file::twinkle_home();
    ensure_home_free(&home)?;
    let spec = node_spec(&home, &o)?;
    actix_web::rt::System::new().block_on(async move {
        let (tx, rx) = watch::channel(false);
        on_signal(tx)?;
        let opts = AgentOptions {
            head: address.clone(),
            token: token.clone(),
            node: spec,
            node_ip: o.node_ip.clone(),
            gateway_port: o.gateway_port,
            is_head: false,
            home: home.clone(),
            log_level: o.log_level.clone(),
        };
        // Recorded before registering so local commands find the cluster; a refusal removes it.
        cluster_record::write_cluster(&home, &ClusterRecord { address, token })?;
        let result = agent::run(opts, rx, Duration::from_secs(30)).await;
        if result.is_err() {
            cluster_record::remove_cluster(&home);
        }
        result
    })
}

/// Re-executes this command with `--block` in a new session, logs under `$TWINKLE_HOME/logs`,
/// and waits until the agent has registered (its record appears) or the daemon exits.
pub fn daemonize(role: &str, args: Vec<std::ffi::OsString>) -> Result<u32, NodeError> {
    let home = state_file::twinkle_home();
    // Checked here too (the daemon checks again), so the refusal reaches the user's terminal
    // instead of a log file.
    ensure_home_free(&home)?;
    let logs = home.join("logs");
    // Logs can quote request bodies and paths: owner-only like the rest of TWINKLE_HOME.
    crate::private_fs::create_dir_all(&logs).map_err(NodeError::Runtime)?;
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or_default();
    let log_path = logs.join(format!("{role}-{stamp}.log"));
    let log = crate::private_fs::open_write(&log_path, false).map_err(NodeError::Runtime)?;
    let log2 = log.try_clone().map_err(NodeError::Runtime)?;
    let exe = std::env::current_exe().map_err(NodeError::CurrentExe)?;
    let mut cmd = std::process::Command::new(exe);
    // The token travels in the environment, not argv, where `ps` would show it.
    let mut rest = args.into_iter();
    while let Some(a) = rest.next() {
        match a.to_str() {
            Some("--token") => {
                if let Some(t) = rest.next() {
                    cmd.env(cluster::TOKEN_ENV, t);
                }
            }
            Some(s) if s.starts_with("--token=") => {
                cmd.env(cluster::TOKEN_ENV, &s["--token=".len()..]);
            }
            _ => {
                cmd.arg(a);
            }
        }
    }
    cmd.arg("--block");
    cmd.stdin(std::process::Stdio::null()).stdout(log).stderr(log2);
    // SAFETY: setsid is async-signal-safe; it runs in the forked child before exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(NodeError::Runtime)?;
    let pid = child.id();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if cluster_record::read_agents(&home).iter().any(|a| a.pid == pid) {
            return Ok(pid);
        }
        if let Ok(Some(st)) = child.try_wait() {
            let mut text = String::new();
            let _ = std::fs::File::open(&log_path).and_then(|mut f| f.read_to_string(&mut text));
            let tail: Vec<&str> = text.lines().rev().take(5).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            return Err(NodeError::Daemon(format!(
                "the {role} exited ({st}) before it was up; log {}:\n{}",
                log_path.display(),
                tail.join("\n")
            )));
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            return Err(NodeError::Daemon(format!(
                "the {role} did not come up within 60 s; see {}",
                log_path.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `twinkle stop`: SIGTERM every agent started on this machine (they stop their children),
/// wait up to `grace`, then SIGKILL what is left (whole sessions). Returns how many were running.
pub fn stop(grace: Duration) -> usize {
    let home = state_file::twinkle_home();
    let agents = cluster_record::read_agents(&home);
    let live: Vec<u32> = agents.iter().map(|a| a.pid).filter(|p| pid_alive(*p)).collect();
    for pid in &live {
        if let Ok(raw) = i32::try_from(*pid) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(raw),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline && live.iter().any(|p| pid_alive(*p) && !is_zombie(*p)) {
        std::thread::sleep(Duration::from_millis(100));
    }
    for pid in &live {
        if let Ok(raw) = i32::try_from(*pid) {
            let p = nix::unistd::Pid::from_raw(raw);
            // The daemon leads its own session: its group holds everything it started.
            let _ = nix::sys::signal::killpg(p, nix::sys::signal::Signal::SIGKILL);
            let _ = nix::sys::signal::kill(p, nix::sys::signal::Signal::SIGKILL);
        }
    }
    for a in &agents {
        cluster_record::remove_agent(&home, a.pid);
    }
    cluster_record::remove_cluster(&home);
    cluster_record::remove_deployment(&home);
    live.len()
}

/// Refuses to start an agent from `home` while another live process owns it: an agent recorded
/// under `agents/` or a `twinkle serve` recorded in `serve.json`. Records of dead processes (and
/// zombies, which are dead but not yet reaped) are stale and do not block; our own pid never does.
pub fn ensure_home_free(home: &Path) -> Result<(), NodeError> {
    let me = std::process::id();
    let live = |pid: u32| pid != me && pid_alive(pid) && !is_zombie(pid);
    let in_use = |role: &str, pid: u32, node: String| NodeError::HomeInUse {
        home: home.display().to_string(),
        role: role.to_string(),
        pid,
        node,
    };
    if let Some(a) = cluster_record::read_agents(home).into_iter().find(|a| live(a.pid)) {
        let role = if a.role == "head" { "head" } else { "node agent" };
        return Err(in_use(role, a.pid, format!(", node {}", a.node_id)));
    }
    if let Ok(rec) = state_file::read(home)
        && live(rec.pid)
    {
        return Err(in_use("serve", rec.pid, String::new()));
    }
    Ok(())
}

fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit(')').next().map(|r| r.trim_start().starts_with('Z')))
        .unwrap_or(false)
}

/// Where `serve` / `status` find a cluster: the flag, `TWINKLE_ADDRESS`, or the recorded one.
/// The token: the flag, `TWINKLE_CLUSTER_TOKEN`, or the recorded one.
pub fn resolve(address: Option<String>, token: Option<String>) -> Option<ClusterRecord> {
    let home = state_file::twinkle_home();
    // A record left behind by a crashed cluster must not hijack plain `serve`: it counts only
    // while an agent started here is alive.
    let live = cluster_record::read_agents(&home).iter().any(|a| pid_alive(a.pid));
    let recorded = cluster_record::read_cluster(&home).filter(|_| live);
    let address = address
        .filter(|a| !a.is_empty())
        .or_else(|| std::env::var("TWINKLE_ADDRESS").ok().filter(|a| !a.is_empty()))
        .or_else(|| recorded.as_ref().map(|r| r.address.clone()))?;
    let token = token
        .filter(|t| !t.is_empty())
        .or_else(|| std::env::var(cluster::TOKEN_ENV).ok().filter(|t| !t.is_empty()))
        .or_else(|| recorded.filter(|r| r.address == address).map(|r| r.token))
        .unwrap_or_default();
    Some(ClusterRecord { address, token })
}

/// `twinkle serve --address`: submits the config to the head; returns the deployment number.
pub fn deploy(
    cluster: &ClusterRecord,
    config_path: &PathBuf,
    server_type: Option<ServerType>,
) -> Result<u64, NodeError> {
    crate::config::load_file(config_path)?;
    let yaml = std::fs::read_to_string(config_path).map_err(NodeError::Runtime)?;
    let req = DeployRequest { protocol: PROTOCOL_VERSION, config_yaml: yaml, server_type };
    let addr = cluster.address.clone();
    let token = cluster.token.clone();
    actix_web::rt::System::new().block_on(async move {
        let client = awc::Client::builder().timeout(Duration::from_secs(30)).finish();
        let mut resp = client
            .post(format!("http://{addr}/v1/cluster/deploy"))
            .insert_header((TOKEN_HEADER, token.as_str()))
            .insert_header((VERSION_HEADER, PROTOCOL_VERSION.to_string()))
            .send_json(&req)
            .await
            .map_err(|e| NodeError::Unreachable(format!("{addr}: {e}")))?;
        let body = resp
            .body()
            .limit(16 << 20)
            .await
            .map_err(|e| NodeError::Unreachable(format!("{addr}: {e}")))?;
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        if resp.status().is_success() {
            return Ok(v["deployment"].as_u64().unwrap_or_default());
        }
        let detail = v["detail"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
        match resp.status().as_u16() {
            409 => Err(NodeError::Infeasible(detail)),
            400 => Err(NodeError::Invalid(detail)),
            _ => Err(NodeError::Refused(detail)),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(resources: Option<&str>) -> NodeOptions {
        NodeOptions {
            resources: NodeResources { num_gpus: Some(2), num_cpus: Some(3.0) },
            custom_resources: resources.map(str::to_string),
            node_ip: "127.0.0.1".into(),
            node_name: None,
            gateway_port: None,
            log_level: "info".into(),
        }
    }

    #[test]
    fn node_id_is_kept_and_resources_parse() {
        let dir = tempfile::tempdir().expect("temp dir");
        let a = node_spec(dir.path(), &opts(Some(r#"{"accel": 2.5}"#))).expect("valid");
        let b = node_spec(dir.path(), &opts(None)).expect("valid");
        assert_eq!(a.node_id, b.node_id, "the same state directory is the same node");
        assert!(a.node_id.starts_with("node-") && a.node_id.len() == 13, "{}", a.node_id);
        assert_eq!(a.custom.get("accel"), Some(&Quantity::from_f64(2.5)));
        assert_eq!((a.gpu_ids.len(), a.cpus), (2, Quantity::from_units(3)));
        let bad = node_spec(dir.path(), &opts(Some("[1]"))).expect_err("not an object");
        assert!(bad.to_string().contains("--resources must be a JSON object"), "{bad}");
        let neg = node_spec(dir.path(), &opts(Some(r#"{"x": -1}"#))).expect_err("negative");
        assert!(neg.to_string().contains("must be >= 0"), "{neg}");
        let mut named = opts(None);
        named.node_name = Some("gpu-box".into());
        assert_eq!(
            node_spec(dir.path(), &named).map(|s| s.node_id).ok().as_deref(),
            Some("gpu-box")
        );
    }

    fn agent(pid: u32) -> cluster_record::AgentRecord {
        cluster_record::AgentRecord {
            pid,
            role: "head".into(),
            node_id: "node-abc".into(),
            address: "127.0.0.1".into(),
        }
    }

    #[test]
    fn a_live_agent_or_serve_owns_the_home_and_stale_records_do_not() {
        let dir = tempfile::tempdir().expect("temp dir");
        assert!(ensure_home_free(dir.path()).is_ok());
        // A live process that is not us: a child `sleep`.
        let mut other = std::process::Command::new("sleep").arg("30").spawn().expect("sleep");
        let pid = other.id();
        cluster_record::write_agent(dir.path(), &agent(pid)).expect("record");
        let err = ensure_home_free(dir.path()).expect_err("live agent");
        let text = err.to_string();
        assert!(
            text.contains(&format!("running twinkle head (pid {pid}, node node-abc)")),
            "{text}"
        );
        assert!(text.contains("another directory") && text.contains("`twinkle stop`"), "{text}");
        // Dead (and reaped) agent: stale, ignored.
        let _ = other.kill();
        let _ = other.wait();
        assert!(ensure_home_free(dir.path()).is_ok());
        // Our own record never blocks (the daemon re-checks after registering itself).
        cluster_record::write_agent(dir.path(), &agent(std::process::id())).expect("record");
        assert!(ensure_home_free(dir.path()).is_ok());
        // A live `twinkle serve` recorded in serve.json owns it too.
        let mut serve = std::process::Command::new("sleep").arg("30").spawn().expect("sleep");
        let rec = state_file::ServeRecord {
            control_address: "127.0.0.1:1".into(),
            gateway_address: "127.0.0.1:2".into(),
            pid: serve.id(),
            config: "c.yaml".into(),
            token: String::new(),
        };
        state_file::write(dir.path(), &rec).expect("serve record");
        let err = ensure_home_free(dir.path()).expect_err("live serve");
        assert!(err.to_string().contains("running twinkle serve"), "{err}");
        let _ = serve.kill();
        let _ = serve.wait();
        assert!(ensure_home_free(dir.path()).is_ok());
    }
}
