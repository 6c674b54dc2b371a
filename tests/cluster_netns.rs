//! The cluster across real interfaces: the head in this namespace on a test-made bridge, two node
//! agents in their own network namespaces joined to it by veth pairs (all created and removed by
//! the test, on a private 10.213.x.0/24). Needs root and `ip`; otherwise it says so and skips.

mod platform_support;

use std::process::{Command, Output};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use platform_support::*;

const CONFIG: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/config/three-node-ranks.yaml");

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip").args(args).output()?;
    ensure!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    Ok(())
}

/// A bridge in this namespace plus one namespace per node, removed on drop.
struct Net {
    tag: String,
    subnet: String,
    namespaces: Vec<String>,
    homes: Vec<tempfile::TempDir>,
}

impl Net {
    fn bridge(&self) -> String {
        format!("tkb{}", self.tag)
    }

    fn addr(&self, host: u8) -> String {
        format!("{}.{host}", self.subnet)
    }

    fn create(nodes: usize) -> Result<Self> {
        let n = std::process::id() % 10_000;
        let tag = format!("{n}");
        let mut net = Net {
            subnet: format!("10.213.{}", 20 + n % 200),
            tag,
            namespaces: vec![],
            homes: vec![],
        };
        let br = net.bridge();
        ip(&["link", "add", &br, "type", "bridge"])?;
        ip(&["addr", "add", &format!("{}/24", net.addr(1)), "dev", &br])?;
        ip(&["link", "set", &br, "up"])?;
        for i in 0..nodes {
            let ns = format!("tk{}n{i}", net.tag);
            let (host_end, ns_end) = (format!("tk{}h{i}", net.tag), format!("tk{}v{i}", net.tag));
            ip(&["netns", "add", &ns])?;
            net.namespaces.push(ns.clone());
            ip(&["link", "add", &host_end, "type", "veth", "peer", "name", &ns_end])?;
            ip(&["link", "set", &host_end, "master", &br, "up"])?;
            ip(&["link", "set", &ns_end, "netns", &ns])?;
            let cidr = format!("{}/24", net.addr(2 + i as u8));
            ip(&["-n", &ns, "addr", "add", &cidr, "dev", &ns_end])?;
            ip(&["-n", &ns, "link", "set", &ns_end, "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        }
        for _ in 0..=nodes {
            net.homes.push(tempfile::tempdir()?);
        }
        Ok(net)
    }

    /// `twinkle ARGS` on machine `m` (0 = this namespace, i+1 = node namespace i).
    fn twinkle(&self, m: usize, args: &[&str], env: &[(&str, &str)]) -> Result<Output> {
        let mut cmd = if m == 0 {
            Command::new(bin())
        } else {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", &self.namespaces[m - 1], &bin()]);
            c
        };
        cmd.args(args);
        run_cluster(cmd, self.homes[m].path(), env)
    }

    fn ok(&self, m: usize, args: &[&str], env: &[(&str, &str)]) -> Result<String> {
        stdout_ok(&format!("twinkle {args:?} on machine {m}"), self.twinkle(m, args, env)?)
    }

    fn agent_pids(&self, m: usize) -> Vec<u32> {
        std::fs::read_dir(self.homes[m].path().join("agents"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.strip_suffix(".json")?.parse().ok())
            .collect()
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for m in 0..self.homes.len() {
            let pids = self.agent_pids(m);
            let _ = self.twinkle(m, &["stop", "--grace-s", "2"], &[]);
            for p in pids {
                let _ = killpg(Pid::from_raw(p as i32), Signal::SIGKILL);
                let _ = kill(Pid::from_raw(p as i32), Signal::SIGKILL);
            }
        }
        for ns in &self.namespaces {
            let _ = ip(&["netns", "del", ns]);
        }
        let _ = ip(&["link", "del", &self.bridge()]);
    }
}

fn app<'a>(st: &'a serde_json::Value, name: &str) -> Option<&'a serde_json::Value> {
    st["applications"].as_array()?.iter().find(|a| a["name"] == name)
}

#[test]
fn nodes_in_separate_network_namespaces() -> Result<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    let probe = format!("tkprobe{}", std::process::id() % 10_000);
    if !root || ip(&["netns", "add", &probe]).is_err() {
        eprintln!("skipped: needs root and `ip netns` to create namespaces");
        return Ok(());
    }
    let _ = ip(&["netns", "del", &probe]);
    let net = Net::create(2)?;
    let port = free_port()?.to_string();
    let gw = free_port()?.to_string();
    let head = net.addr(1);
    let head_addr = format!("{head}:{port}");
    let mut args = head_start_args(&port, &gw);
    args.extend(["--node-ip", &head]);
    net.ok(0, &args, &[("CUDA_VISIBLE_DEVICES", "0,1,2,3")])?;
    let rec: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(net.homes[0].path().join("cluster.json"))?)?;
    let token = rec["token"].as_str().context("token")?.to_string();
    for (m, gpus, cvd) in [(1, "4", "4,5,6,7"), (2, "0", "")] {
        let node_ip = net.addr(1 + m as u8);
        let env: Vec<(&str, &str)> =
            if cvd.is_empty() { vec![] } else { vec![("CUDA_VISIBLE_DEVICES", cvd)] };
        net.ok(
            m,
            &[
                "join",
                "--address",
                &head_addr,
                "--token",
                &token,
                "--node-ip",
                &node_ip,
                "--num-gpus",
                gpus,
                "--num-cpus",
                "8",
                "--gateway-port",
                &gw,
            ],
            &env,
        )?;
    }
    // The example config as a placement dry run: every application the identity kind.
    let dry = net.homes[0].path().join("identity.yaml");
    std::fs::write(&dry, as_identity(&std::fs::read_to_string(CONFIG)?))?;
    let dry = dry.display().to_string();
    net.ok(0, &["serve", "-c", &dry, "--address", &head_addr, "--token", &token], &[])?;
    let st = poll(Duration::from_secs(90), || {
        let out = net.twinkle(0, &["status", "--json"], &[]).ok()?;
        let st: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        let apps = st["applications"].as_array()?;
        (apps.len() == 3 && apps.iter().all(|a| a["state"] == "running")).then_some(st)
    })?;
    // Each child listens on its own node's address.
    for (name, host) in [
        ("models-Qwen2.5-7B-Instruct", net.addr(1)),
        ("sampler-Qwen2.5-7B-Instruct", net.addr(2)),
        ("processor", net.addr(3)),
    ] {
        let addr = app(&st, name).and_then(|a| a["address"].as_str()).unwrap_or("");
        ensure!(addr.starts_with(&format!("{host}:")), "{name} at {addr}, expected on {host}");
    }
    // The gateway inside the first node's namespace reaches the processor in the second
    // namespace and the model on the head: requests cross the veth pairs and the bridge.
    for (path, who, cvd) in [
        ("/processors/healthz", "processor", ""),
        ("/models/Qwen/Qwen2.5-7B-Instruct/healthz", "models-Qwen2.5-7B-Instruct", "0,1,2,3"),
    ] {
        let url = format!("http://127.0.0.1:{gw}{path}");
        // The details of a child's /healthz need the (pinned) internal token.
        let token = format!("{TOKEN_HEADER}: {TEST_TOKEN}");
        let body = poll(Duration::from_secs(10), || {
            let out = Command::new("ip")
                .args(["netns", "exec", &net.namespaces[0], "curl", "-sf", "-H", &token, &url])
                .output()
                .ok()?;
            out.status.success().then_some(out.stdout)
        })
        .with_context(|| format!("{url} in {}", net.namespaces[0]))?;
        let v: serde_json::Value = serde_json::from_slice(&body)?;
        assert_eq!(v["app"], who);
        assert_eq!(v["cuda_visible_devices"], cvd);
    }
    // And the head's own gateway reaches the sampler in the first namespace.
    let r = poll(Duration::from_secs(10), || {
        get(&format!("127.0.0.1:{gw}"), "/sampler/Qwen/Qwen2.5-7B-Instruct/healthz")
            .ok()
            .filter(|r| r.status == 200)
    })?;
    assert_eq!(r.json()?["cuda_visible_devices"], "4,5");
    Ok(())
}
