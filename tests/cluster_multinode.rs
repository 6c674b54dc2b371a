//! End-to-end tests of the multi-node cluster on one machine (loopback only): a head and two
//! joined node agents as separate daemons with their own `TWINKLE_HOME`, simulated GPU sets and
//! gateway ports; placement of the seed's 3-node rank example, cross-node routing, failover after
//! `kill -9` of a node agent, rejoin, `twinkle stop`, and refusal of a wrong token or version.

mod platform_support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use platform_support::*;

const STARTUP: Duration = Duration::from_secs(90);
const CONFIG: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/config/three-node-ranks.yaml");
const MODEL: &str = "models-Qwen2.5-7B-Instruct";
const SAMPLER: &str = "sampler-Qwen2.5-7B-Instruct";

/// One simulated machine: its own state directory.
struct Machine {
    home: tempfile::TempDir,
}

impl Machine {
    fn new() -> Result<Self> {
        Ok(Self { home: tempfile::tempdir()? })
    }

    fn home(&self) -> &Path {
        self.home.path()
    }

    fn run(&self, args: &[&str], env: &[(&str, &str)]) -> Result<Output> {
        let mut cmd = Command::new(bin());
        cmd.args(args);
        run_cluster(cmd, self.home(), env)
    }

    fn ok(&self, args: &[&str], env: &[(&str, &str)]) -> Result<String> {
        stdout_ok(&format!("twinkle {args:?}"), self.run(args, env)?)
    }

    fn status(&self) -> Result<serde_json::Value> {
        let text = self.ok(&["status", "--json"], &[])?;
        Ok(serde_json::from_str(&text)?)
    }

    fn node_id(&self) -> Result<String> {
        Ok(std::fs::read_to_string(self.home().join("node_id"))?.trim().to_string())
    }

    /// Pids of the agents recorded on this machine.
    fn agent_pids(&self) -> Vec<u32> {
        let dir: PathBuf = self.home().join("agents");
        std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok())
            .filter_map(|e| std::fs::read_to_string(e.path()).ok())
            .filter_map(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .filter_map(|v| v["pid"].as_u64().map(|p| p as u32))
            .collect()
    }

    fn logs(&self) -> String {
        let mut out = String::new();
        for e in std::fs::read_dir(self.home().join("logs")).into_iter().flatten().flatten() {
            out.push_str(&format!("--- {}\n", e.path().display()));
            out.push_str(&std::fs::read_to_string(e.path()).unwrap_or_default());
        }
        out
    }
}

/// Kills whatever a failed test left behind.
struct Cleanup {
    machines: Vec<Machine>,
    pids: Vec<u32>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for m in &self.machines {
            self.pids.extend(m.agent_pids());
            let _ = m.run(&["stop", "--grace-s", "2"], &[]);
        }
        for p in &self.pids {
            let _ = killpg(Pid::from_raw(*p as i32), Signal::SIGKILL);
            let _ = kill(Pid::from_raw(*p as i32), Signal::SIGKILL);
        }
    }
}

fn app<'a>(st: &'a serde_json::Value, name: &str) -> Option<&'a serde_json::Value> {
    st["applications"].as_array()?.iter().find(|a| a["name"] == name)
}

fn gpus(v: &serde_json::Value) -> Vec<u64> {
    v["gpu_ids"].as_array().into_iter().flatten().filter_map(|g| g.as_u64()).collect()
}

fn all_running(st: &serde_json::Value) -> bool {
    st["applications"]
        .as_array()
        .is_some_and(|a| a.len() == 3 && a.iter().all(|x| x["state"] == "running"))
}

fn child_pids(st: &serde_json::Value) -> Vec<u32> {
    st["applications"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| a["pid"].as_u64().map(|p| p as u32))
        .collect()
}

fn token_of(m: &Machine) -> Result<String> {
    let text = std::fs::read_to_string(m.home().join("cluster.json"))?;
    let v: serde_json::Value = serde_json::from_str(&text)?;
    v["token"].as_str().map(str::to_string).context("token in cluster.json")
}

#[test]
fn rank_example_spreads_routes_fails_over_rejoins_and_stops() -> Result<()> {
    let mut c =
        Cleanup { machines: vec![Machine::new()?, Machine::new()?, Machine::new()?], pids: vec![] };
    let port = free_port()?.to_string();
    let gw: Vec<String> =
        (0..3).map(|_| free_port().map(|p| p.to_string())).collect::<Result<_>>()?;
    let head_addr = format!("127.0.0.1:{port}");

    // The head machine: 4 cards, 8 CPUs, an extra resource; started again after its kill below.
    let start_head = |m: &Machine| {
        let mut args = head_start_args(&port, &gw[0]);
        args.extend(["--resources", r#"{"accel": 2}"#]);
        m.ok(&args, &[("CUDA_VISIBLE_DEVICES", "0,1,2,3")])
    };
    let out = start_head(&c.machines[0])?;
    ensure!(out.contains(&format!("twinkle join --address {head_addr} --token ")), "{out}");
    let token = token_of(&c.machines[0])?;
    ensure!(out.contains(&token), "the join command carries the token: {out}");
    let join = |m: &Machine, gpus: &str, gw: &str, cvd: &str| -> Result<String> {
        let mut env = vec![];
        if !cvd.is_empty() {
            env.push(("CUDA_VISIBLE_DEVICES", cvd));
        }
        m.ok(
            &[
                "join",
                "--address",
                &head_addr,
                "--token",
                &token,
                "--num-gpus",
                gpus,
                "--num-cpus",
                "8",
                "--gateway-port",
                gw,
            ],
            &env,
        )
    };
    join(&c.machines[1], "4", &gw[1], "4,5,6,7")?;
    // `start --address` is the same as `join`.
    c.machines[2].ok(
        &[
            "start",
            "--address",
            &head_addr,
            "--token",
            &token,
            "--num-gpus",
            "0",
            "--num-cpus",
            "8",
            "--gateway-port",
            &gw[2],
        ],
        &[],
    )?;
    // The token is not on any daemon's command line.
    for m in &c.machines {
        for pid in m.agent_pids() {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))?;
            ensure!(!String::from_utf8_lossy(&cmdline).contains(&token), "token in argv of {pid}");
        }
    }

    // Deploy from the head machine (the recorded cluster).
    // The example config as a placement dry run: every application the identity kind.
    let dry = c.machines[0].home().join("identity.yaml");
    std::fs::write(&dry, as_identity(&std::fs::read_to_string(CONFIG)?))?;
    let out = c.machines[0].ok(&["serve", "-c", &dry.display().to_string()], &[])?;
    ensure!(out.contains("Deployment 1 submitted"), "{out}");
    let st = poll(STARTUP, || c.machines[0].status().ok().filter(all_running))
        .with_context(|| c.machines.iter().map(Machine::logs).collect::<String>())?;
    c.pids.extend(child_pids(&st));

    let ids: Vec<String> = c.machines.iter().map(Machine::node_id).collect::<Result<_>>()?;
    let model = app(&st, MODEL).context("model")?;
    let sampler = app(&st, SAMPLER).context("sampler")?;
    let processor = app(&st, "processor").context("processor")?;
    assert_eq!((model["node"].as_str(), gpus(model)), (Some(ids[0].as_str()), vec![0, 1, 2, 3]));
    assert_eq!((sampler["node"].as_str(), gpus(sampler)), (Some(ids[1].as_str()), vec![4, 5]));
    assert_eq!((processor["node"].as_str(), gpus(processor)), (Some(ids[2].as_str()), vec![]));
    // The head scrapes each child on its node for its queue depth (idle identity children: 0).
    for a in [MODEL, SAMPLER, "processor"] {
        assert_eq!(st["queues"][a], 0, "queue of {a}: {st}");
    }
    let nodes = st["nodes"].as_array().context("nodes")?;
    assert_eq!(nodes.len(), 3);
    ensure!(nodes.iter().all(|n| n["alive"] == true), "{st}");
    let head_node = nodes.iter().find(|n| n["id"] == ids[0].as_str()).context("head node")?;
    assert_eq!(head_node["resources"]["accel"], 2.0);
    assert_eq!(head_node["gpu_ids"], serde_json::json!([0, 1, 2, 3]));
    let text = c.machines[0].ok(&["status"], &[])?;
    ensure!(text.contains("GPU ids [4,5,6,7]") && text.contains("GPU [4,5]"), "{text}");

    // Every node's gateway reaches every application, wherever it runs, and each child got the
    // physical cards the head assigned.
    for g in &gw {
        let addr = format!("127.0.0.1:{g}");
        for (name, cvd) in [(MODEL, "0,1,2,3"), (SAMPLER, "4,5"), ("processor", "")] {
            let prefix = app(&st, name).and_then(|a| a["route_prefix"].as_str()).unwrap_or("");
            // Gateways learn a new address on their next heartbeat: poll briefly.
            let path = format!("{prefix}/healthz");
            let r =
                poll(Duration::from_secs(5), || get(&addr, &path).ok().filter(|r| r.status == 200))
                    .with_context(|| format!("{name} not reachable via {addr}"))?;
            let h = r.json()?;
            assert_eq!(h["app"], name);
            assert_eq!(h["cuda_visible_devices"], cvd);
        }
    }

    // kill -9 the second node's agent: its child dies with it, the node is declared dead within
    // the 3 s timeout, and the sampler (nowhere else has 2 free cards) goes pending with a reason.
    let agents = c.machines[1].agent_pids();
    assert_eq!(agents.len(), 1);
    let sampler_pid = sampler["pid"].as_u64().context("sampler pid")? as u32;
    kill(Pid::from_raw(agents[0] as i32), Signal::SIGKILL)?;
    let st = poll(Duration::from_secs(15), || {
        let st = c.machines[0].status().ok()?;
        (app(&st, SAMPLER)?["state"] == "pending").then_some(st)
    })
    .context("sampler never went pending")?;
    let why = app(&st, SAMPLER).and_then(|a| a["pending_reason"].as_str()).unwrap_or("");
    ensure!(why.contains("needs 2 GPU"), "{why}");
    let dead = st["nodes"].as_array().into_iter().flatten().find(|n| n["id"] == ids[1].as_str());
    assert_eq!(dead.map(|n| n["alive"].clone()), Some(serde_json::json!(false)));
    assert_eq!(app(&st, MODEL).map(|a| a["state"].clone()), Some(serde_json::json!("running")));
    poll(Duration::from_secs(10), || (!pid_running(sampler_pid)).then_some(()))
        .context("the dead agent's child outlived it")?;
    let r = get(&format!("127.0.0.1:{}", gw[0]), "/sampler/Qwen/Qwen2.5-7B-Instruct/healthz")?;
    assert_eq!(r.status, 503);

    // The node comes back (same state directory = same node id) and gets its sampler back.
    join(&c.machines[1], "4", &gw[1], "4,5,6,7")?;
    let st = poll(STARTUP, || c.machines[0].status().ok().filter(all_running))
        .with_context(|| c.machines[1].logs())?;
    c.pids.extend(child_pids(&st));
    let sampler = app(&st, SAMPLER).context("sampler")?;
    assert_eq!((sampler["node"].as_str(), gpus(sampler)), (Some(ids[1].as_str()), vec![4, 5]));
    ensure!(sampler["pid"].as_u64() != Some(u64::from(sampler_pid)));

    // kill -9 the head (its own node's model dies with it); a restarted head keeps the token,
    // restores the deployment, adopts the children the nodes still run, and re-places the model.
    let kept: Vec<(String, u64)> = [SAMPLER, "processor"]
        .iter()
        .filter_map(|n| Some((n.to_string(), app(&st, n)?["pid"].as_u64()?)))
        .collect();
    assert_eq!(kept.len(), 2);
    let head_pid = c.machines[0].agent_pids();
    assert_eq!(head_pid.len(), 1);
    kill(Pid::from_raw(head_pid[0] as i32), Signal::SIGKILL)?;
    poll(Duration::from_secs(10), || (!pid_running(head_pid[0])).then_some(()))?;
    std::thread::sleep(Duration::from_millis(500));
    start_head(&c.machines[0])?;
    assert_eq!(token_of(&c.machines[0])?, token);
    let st = poll(STARTUP, || c.machines[0].status().ok().filter(all_running))
        .with_context(|| c.machines[0].logs())?;
    c.pids.extend(child_pids(&st));
    for (name, pid) in &kept {
        assert_eq!(app(&st, name).and_then(|a| a["pid"].as_u64()), Some(*pid), "{name} kept");
    }
    let model = app(&st, MODEL).context("model")?;
    assert_eq!((model["node"].as_str(), gpus(model)), (Some(ids[0].as_str()), vec![0, 1, 2, 3]));

    // A new deployment with `proxy_location: HeadOnly`: the other nodes' gateways go away, the
    // head's keeps routing to every node.
    let base = as_identity(&std::fs::read_to_string(CONFIG)?);
    let head_only = c.machines[0].home().join("head-only.yaml");
    std::fs::write(&head_only, format!("proxy_location: HeadOnly\n{base}"))?;
    let out = c.machines[0].ok(&["serve", "-c", &head_only.display().to_string()], &[])?;
    ensure!(out.contains("Deployment 2 submitted"), "{out}");
    poll(Duration::from_secs(20), || {
        let gone = |g: &str| get(&format!("127.0.0.1:{g}"), "/healthz").is_err();
        (gone(&gw[1]) && gone(&gw[2])).then_some(())
    })
    .context("non-head gateways still up under HeadOnly")?;
    let st = poll(STARTUP, || c.machines[0].status().ok().filter(all_running))?;
    c.pids.extend(child_pids(&st));
    let r = poll(Duration::from_secs(10), || {
        get(&format!("127.0.0.1:{}", gw[0]), "/processors/healthz").ok().filter(|r| r.status == 200)
    })?;
    assert_eq!(r.json()?["app"], "processor");

    // `twinkle stop` on every machine leaves no agent and no child.
    let mut all: Vec<u32> = child_pids(&st);
    for m in &c.machines {
        all.extend(m.agent_pids());
    }
    for m in &c.machines {
        let out = m.ok(&["stop"], &[])?;
        ensure!(out.contains("Stopped 1 twinkle node agent"), "{out}");
        ensure!(!m.home().join("cluster.json").exists());
    }
    poll(Duration::from_secs(10), || all.iter().all(|p| !pid_running(*p)).then_some(()))
        .with_context(|| format!("processes left after stop among {all:?}"))?;
    ensure!(c.machines[0].run(&["status"], &[])?.status.code() != Some(0));
    Ok(())
}

#[test]
fn wrong_token_or_protocol_version_is_refused() -> Result<()> {
    let c = Cleanup { machines: vec![Machine::new()?, Machine::new()?], pids: vec![] };
    let port = free_port()?.to_string();
    let addr = format!("127.0.0.1:{port}");
    c.machines[0]
        .ok(&["start", "--head", "--port", &port, "--num-gpus", "0", "--num-cpus", "2"], &[])?;
    let token = token_of(&c.machines[0])?;

    let out = c.machines[1].run(&["join", "--address", &addr, "--token", "not-the-token"], &[])?;
    ensure!(!out.status.success(), "a wrong token must fail");
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(err.contains("wrong or missing cluster token"), "{err}");
    ensure!(c.machines[1].agent_pids().is_empty());

    let body = serde_json::json!({
        "protocol": 1, "pid": 1, "gateway_address": null,
        "node": {"node_id": "x", "address": "127.0.0.1", "cpus": 1.0, "gpu_ids": []}
    })
    .to_string();
    let json = ("Content-Type", "application/json");
    let register = |headers: &[(&str, &str)]| {
        let headers: Vec<(&str, &str)> =
            std::iter::once(json).chain(headers.iter().copied()).collect();
        http("POST", &addr, "/v1/cluster/nodes", &headers, body.as_bytes())
    };
    let r = register(&[("x-twinkle-token", "nope")])?;
    assert_eq!(r.status, 401);
    let r = register(&[("x-twinkle-token", &token), ("x-twinkle-protocol", "99")])?;
    assert_eq!(r.status, 426);
    let detail = r.json()?["detail"].as_str().unwrap_or_default().to_string();
    ensure!(detail.contains("protocol version mismatch") && detail.contains("99"), "{detail}");
    // The right token and version are accepted.
    let r = register(&[("x-twinkle-token", &token), ("x-twinkle-protocol", "1")])?;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    // Deploying without the token is refused as well.
    let out =
        c.machines[1].run(&["serve", "-c", CONFIG, "--address", &addr, "--token", "bad"], &[])?;
    ensure!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    if !err.contains("cluster token") {
        bail!("{err}");
    }
    Ok(())
}

/// A `TWINKLE_HOME` is one node's identity: `join` or a second `start --head` from the home of a
/// running head is refused (it would re-register as the same node and replace it), with a message
/// that says what to do; the running head is untouched.
#[test]
fn second_agent_from_a_running_home_is_refused() -> Result<()> {
    let c = Cleanup { machines: vec![Machine::new()?], pids: vec![] };
    let m = &c.machines[0];
    let port = free_port()?.to_string();
    let addr = format!("127.0.0.1:{port}");
    m.ok(&["start", "--head", "--port", &port, "--num-gpus", "2", "--num-cpus", "2"], &[])?;
    let head_pids = m.agent_pids();
    ensure!(head_pids.len() == 1, "{head_pids:?}");
    let token = token_of(m)?;

    let refusals = [
        vec!["join", "--address", &addr, "--token", &token, "--num-gpus", "0"],
        vec!["join", "--address", &addr, "--token", &token, "--block"],
        vec!["start", "--head", "--port", "0", "--num-gpus", "0"],
    ];
    for args in &refusals {
        let out = m.run(args, &[])?;
        ensure!(!out.status.success(), "twinkle {args:?} must be refused");
        let err = String::from_utf8_lossy(&out.stderr);
        ensure!(err.contains("already belongs to a running twinkle head"), "{args:?}: {err}");
        ensure!(err.contains("TWINKLE_HOME") && err.contains("twinkle stop"), "{args:?}: {err}");
    }
    // Still one agent, the head, with its two cards.
    assert_eq!(m.agent_pids(), head_pids);
    let st = m.status()?;
    let nodes = st["nodes"].as_array().cloned().unwrap_or_default();
    ensure!(nodes.len() == 1 && nodes[0]["resources"]["GPU"] == 2.0, "{st}");
    Ok(())
}
