//! End-to-end tests of `twinkle serve` with the real binary: placement, routing, body
//! pass-through, supervision (restart after kill -9) and clean shutdown.

mod platform_support;

use std::collections::BTreeSet;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use platform_support::*;

/// Startup on a loaded 2-core machine can be slow; failures, not slowness, are what we test.
const STARTUP: Duration = Duration::from_secs(90);

fn apps(st: &serde_json::Value) -> Vec<serde_json::Value> {
    st["applications"].as_array().cloned().unwrap_or_default()
}

fn app_named<'a>(st: &'a serde_json::Value, name: &str) -> Option<&'a serde_json::Value> {
    st["applications"].as_array()?.iter().find(|a| a["name"] == name)
}

fn gpu_csv(a: &serde_json::Value) -> String {
    a["gpu_ids"]
        .as_array()
        .map(|v| v.iter().map(|g| g.to_string()).collect::<Vec<_>>().join(","))
        .unwrap_or_default()
}

#[test]
fn tinker_deployment_placement_routing_bodies_and_clean_stop() -> Result<()> {
    let mut serve = Serve::tinker(
        &["--num-gpus", "8", "--num-cpus", "4"],
        &[("TWINKLE_TRUST_REMOTE_CODE", "0")],
    )?;
    let st = serve.wait_all_running(STARTUP)?;

    // (a) placement: the node has 8 cards; three applications; cards are disjoint.
    let node = &st["nodes"][0];
    assert_eq!(node["resources"]["GPU"], 8.0);
    assert_eq!(node["resources"]["CPU"], 4.0);
    assert_eq!(node["alive"], true);
    let list = apps(&st);
    assert_eq!(list.len(), 3);
    let mut seen = BTreeSet::new();
    let mut total = 0;
    for a in &list {
        for g in a["gpu_ids"].as_array().into_iter().flatten() {
            total += 1;
            ensure!(seen.insert(g.as_u64()), "card {g} given twice: {st}");
        }
    }
    assert_eq!(total, 3, "model 2 + sampler 1 cards");

    // Each child, reached through the gateway by its prefix, reports the cards status shows.
    for a in &list {
        let prefix = a["route_prefix"].as_str().unwrap_or_default();
        let r = get(&serve.gateway, &format!("{prefix}/healthz"))?;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        let h = r.json()?;
        assert_eq!(h["app"], a["name"]);
        assert_eq!(h["pid"], a["pid"]);
        assert_eq!(h["status"], "ok");
        assert_eq!(h["import_path"], a["import_path"]);
        assert_eq!(h["cuda_visible_devices"].as_str(), Some(gpu_csv(a).as_str()), "{h}");
    }
    // An outsider gets bare liveness: no pid, no cards.
    let r = get_bare(&serve.gateway, "/api/v1/model/Qwen/Qwen2.5-0.5B-Instruct/healthz")?;
    assert_eq!(r.json()?, serde_json::json!({"status": "ok"}));
    // The control port's status needs the token that serve.json (owner-only) records.
    let rec_path = serve.home.join("serve.json");
    let rec: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&rec_path)?)?;
    let control = rec["control_address"].as_str().context("control_address")?;
    let r = get_bare(control, "/v1/status")?;
    assert_eq!(r.status, 401, "{}", String::from_utf8_lossy(&r.body));
    let r = http("GET", control, "/v1/status", &[("x-twinkle-token", TEST_TOKEN)], &[])?;
    assert_eq!(r.status, 200);
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(std::fs::metadata(&rec_path)?.permissions().mode() & 0o777, 0o600);
    let server = app_named(&st, "server").context("server app")?;
    assert_eq!(server["gpu_ids"].as_array().map(Vec::len), Some(0));
    let model = app_named(&st, "models-Qwen2.5-0.5B-Instruct").context("model app")?;
    assert_eq!(model["gpu_ids"].as_array().map(Vec::len), Some(2));

    // (d) routing: longest prefix, segment-aware; unknown prefix is a JSON 404.
    let r = get(&serve.gateway, "/api/v1/model/Qwen/Qwen2.5-0.5B-Instruct/healthz")?;
    assert_eq!(r.json()?["app"], "models-Qwen2.5-0.5B-Instruct");
    let r = get(&serve.gateway, "/api/v1/healthz?x=1")?;
    assert_eq!(r.json()?["app"], "server");
    let r = get(&serve.gateway, "/api/v10/healthz")?;
    assert_eq!(r.status, 404);
    assert_eq!(r.json()?["detail"], "no application serves /api/v10/healthz");
    let r = get(&serve.gateway, "/healthz")?;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()?["status"], "ok");

    // (e) a 1 MB binary body passes through unchanged, both ways. Every echo below is a POST
    // through the gateway with the internal token and one more header.
    let echo = |path: &str, header: (&str, &str), body: &[u8]| {
        http("POST", &serve.gateway, path, &[header, (TOKEN_HEADER, TEST_TOKEN)], body)
    };
    let body: Vec<u8> =
        (0..1_000_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let octets = ("Content-Type", "application/octet-stream");
    let r = echo("/api/v1/sampler/Qwen/Qwen2.5-0.5B-Instruct/echo", octets, &body)?;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/octet-stream"));
    ensure!(r.body == body, "echoed body differs ({} bytes back)", r.body.len());

    // A chunked upload (no Content-Length) is streamed through as well.
    let mut chunked = Vec::new();
    for part in body.chunks(300_000) {
        chunked.extend_from_slice(format!("{:x}\r\n", part.len()).as_bytes());
        chunked.extend_from_slice(part);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let r = echo("/api/v1/echo", ("Transfer-Encoding", "chunked"), &chunked)?;
    assert_eq!(r.status, 200);
    ensure!(r.body == body, "chunked echo differs ({} bytes back)", r.body.len());

    // A malformed chunked body is the client's fault: 400 JSON, not the gateway's 502.
    let bad = b"5\r\nhello\r\nzz\r\nnot a chunk\r\n0\r\n\r\n";
    let r = echo("/api/v1/echo", ("Transfer-Encoding", "chunked"), bad)?;
    assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(&r.body));
    ensure!(r.json()?["detail"].as_str().is_some_and(|d| d.contains("body")), "{:?}", r.body);

    // Children's environment: scheduler's cards, PCI order, runtime_env, serve's TWINKLE_*.
    let model_pid = model["pid"].as_u64().context("pid")? as u32;
    let env = environ(model_pid)?;
    let var = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    assert_eq!(var("CUDA_VISIBLE_DEVICES"), Some(gpu_csv(model)));
    assert_eq!(var("CUDA_DEVICE_ORDER").as_deref(), Some("PCI_BUS_ID"));
    assert_eq!(var("TWINKLE_TEST_MARKER").as_deref(), Some("model-env"));
    assert_eq!(var("TWINKLE_TRUST_REMOTE_CODE").as_deref(), Some("0"));
    let server_pid = server["pid"].as_u64().context("pid")? as u32;
    let env = environ(server_pid)?;
    ensure!(env.iter().any(|(k, v)| k == "CUDA_VISIBLE_DEVICES" && v.is_empty()), "server env");
    ensure!(!env.iter().any(|(k, _)| k == "TWINKLE_TEST_MARKER"), "runtime_env leaked to server");

    // Human status lists the node totals and every application.
    let text = serve.status_text()?;
    ensure!(text.contains("0.3/4 CPU   3/8 GPU used"), "{text}");
    for a in &list {
        ensure!(text.contains(a["name"].as_str().unwrap_or("?")), "{text}");
    }

    // (c) SIGTERM: exit 0, every child and its process group gone.
    serve.stop_all_gone(Signal::SIGTERM, Duration::from_secs(60))?;
    ensure!(!serve.home.join("serve.json").exists(), "serve.json left behind");
    Ok(())
}

#[test]
fn killed_child_restarts_and_gateway_answers_503_meanwhile() -> Result<()> {
    // Test hook: every worker waits 2 s before registering, so "down" lasts long enough to probe
    // (1 s proved too short on a loaded 2-core machine: the child was back before /readyz).
    let mut serve = Serve::tinker(
        &["--num-gpus", "4", "--num-cpus", "4"],
        &[("TWINKLE_TEST_WORKER_START_DELAY_MS", "2000"), ("TWINKLE_STOP_GRACE_S", "1")],
    )?;
    let prefix = "/api/v1/model/Qwen/Qwen2.5-0.5B-Instruct";
    let st = serve.wait_all_running(STARTUP)?;
    let model = app_named(&st, "models-Qwen2.5-0.5B-Instruct").context("model")?;
    let old_pid = model["pid"].as_u64().context("pid")? as u32;
    assert_eq!(model["restarts"], 0);
    let r = get(&serve.gateway, &format!("{prefix}/healthz"))?;
    assert_eq!(r.json()?["pid"], old_pid);

    // (b) kill -9 the model child.
    let killed_at = Instant::now();
    kill(Pid::from_raw(old_pid as i32), Signal::SIGKILL)?;

    // (d) while it is down: 503 JSON with Retry-After.
    let down = poll(Duration::from_secs(5), || {
        get(&serve.gateway, &format!("{prefix}/healthz")).ok().filter(|r| r.status == 503)
    })?;
    ensure!(down.header("retry-after").is_some(), "no Retry-After: {:?}", down.headers);
    let j = down.json()?;
    assert_eq!(j["app"], "models-Qwen2.5-0.5B-Instruct");
    ensure!(j["detail"].as_str().is_some_and(|d| d.contains("retry")), "{j}");
    // Liveness stays 200; readiness is 503 while the child is down.
    assert_eq!(get(&serve.gateway, "/healthz")?.status, 200);
    let r = get(&serve.gateway, "/readyz")?;
    assert_eq!(r.status, 503);
    ensure!(r.header("retry-after").is_some(), "{:?}", r.headers);
    assert_eq!(r.json()?["status"], "not ready");

    // Back, healthy through the gateway, with a new pid; the old one is reaped (no zombie).
    let new_pid = poll(Duration::from_secs(30), || {
        let r = get(&serve.gateway, &format!("{prefix}/healthz")).ok()?;
        let pid = r.json().ok()?["pid"].as_u64()? as u32;
        (r.status == 200 && pid != old_pid).then_some(pid)
    })?;
    let took = killed_at.elapsed();
    // 5 s budget plus the 2 s registration delay the test hook adds.
    ensure!(took <= Duration::from_secs(7), "restart took {took:?}");
    ensure!(!pid_exists(old_pid), "killed child {old_pid} not reaped");
    let st = serve.status_json()?;
    serve.remember(&st);
    let model = app_named(&st, "models-Qwen2.5-0.5B-Instruct").context("model")?;
    ensure!(model["restarts"].as_u64() >= Some(1), "{model}");
    assert_eq!(model["pid"], new_pid);
    assert_eq!(model["state"], "running");
    ensure!(model["last_exit"].as_str() == Some("signal 9"), "{model}");
    // The other children were not touched.
    for a in apps(&st).iter().filter(|a| a["name"] != "models-Qwen2.5-0.5B-Instruct") {
        assert_eq!(a["restarts"], 0, "{a}");
    }

    // Shutdown with a child that ignores SIGTERM (stopped): SIGKILL after the 1 s grace.
    let sampler = app_named(&st, "sampler-Qwen2.5-0.5B-Instruct").context("sampler")?;
    let sampler_pid = sampler["pid"].as_u64().context("pid")? as u32;
    kill(Pid::from_raw(sampler_pid as i32), Signal::SIGSTOP)?;
    serve.stop_all_gone(Signal::SIGINT, Duration::from_secs(60))?;
    ensure!(serve.log_text().contains("killed after"), "log:\n{}", serve.log_text());
    Ok(())
}

#[test]
fn children_die_with_a_killed_serve() -> Result<()> {
    let mut serve = Serve::tinker(&["--num-gpus", "3"], &[])?;
    serve.wait_all_running(STARTUP)?;
    let pids = serve.known_pids.clone();
    assert_eq!(pids.len(), 3);
    // SIGKILL: no handler runs; only the children's parent-death signal can stop them.
    let _ = serve.stop(Signal::SIGKILL, Duration::from_secs(30))?;
    poll(Duration::from_secs(10), || pids.iter().all(|p| !pid_running(*p)).then_some(()))
        .with_context(|| format!("children {pids:?} outlived a killed serve"))?;
    Ok(())
}

#[test]
fn child_that_never_registers_is_killed_and_restarted() -> Result<()> {
    // Test hook: workers wait a minute before registering, past a 1 s deadline.
    let env =
        [("TWINKLE_TEST_WORKER_START_DELAY_MS", "60000"), ("TWINKLE_REGISTER_DEADLINE_S", "1")];
    let mut serve = Serve::tinker(&["--num-gpus", "3"], &env)?;
    let st = poll(STARTUP, || {
        let st = serve.status_json().ok()?;
        apps(&st).iter().all(|a| a["restarts"].as_u64() >= Some(1)).then_some(st)
    })
    .with_context(|| format!("no restart after a missed deadline; log:\n{}", serve.log_text()))?;
    serve.remember(&st);
    for a in apps(&st) {
        let why = a["last_exit"].as_str().unwrap_or_default();
        ensure!(why.starts_with("did not register within 1s"), "{a}");
        ensure!(a["state"] != "running", "{a}");
    }
    let r = get(&serve.gateway, "/api/v1/healthz")?;
    assert_eq!(r.status, 503);
    serve.stop_all_gone(Signal::SIGTERM, Duration::from_secs(60))?;
    Ok(())
}

#[test]
fn second_signal_skips_the_grace_period() -> Result<()> {
    let mut serve = Serve::tinker(&["--num-gpus", "3"], &[("TWINKLE_STOP_GRACE_S", "120")])?;
    let st = serve.wait_all_running(STARTUP)?;
    // A stopped child cannot act on SIGTERM: only the 120 s grace or a second signal ends it.
    let server_pid = app_named(&st, "server").and_then(|a| a["pid"].as_u64()).context("pid")?;
    kill(Pid::from_raw(server_pid as i32), Signal::SIGSTOP)?;
    let serve_pid = Pid::from_raw(serve.pid() as i32);
    kill(serve_pid, Signal::SIGTERM)?;
    // Wait until the other children have stopped, i.e. shutdown is underway.
    poll(Duration::from_secs(30), || {
        let st = serve.status_json().ok()?;
        apps(&st).iter().filter(|a| a["state"] == "stopped").count().eq(&2).then_some(())
    })?;
    // Within 30 s, where the grace alone would take 120 s.
    serve
        .stop_all_gone(Signal::SIGINT, Duration::from_secs(30))
        .context("second signal did not cut the grace")
}

/// Twinkle-mode seed layout with the server mounted at `/` and a CPU-only processor.
fn twinkle_root_config(port: u16) -> String {
    as_identity(&format!(
        r#"server_type: twinkle
http_options: {{host: 127.0.0.1, port: {port}}}
applications:
  - name: server
    route_prefix: /
    import_path: server
    deployments:
      - ray_actor_options: {{num_cpus: 0.1}}
  - name: processor
    route_prefix: /processors
    import_path: processor
    args:
      ncpu_proc_per_node: 2
      device_group: {{name: processor, ranks: 0, device_type: CPU}}
      device_mesh: {{device_type: CPU, dp_size: 2}}
    deployments:
      - ray_actor_options: {{num_cpus: 0.1}}
"#
    ))
}

#[test]
fn root_prefix_app_and_gateway_healthz_and_type_override() -> Result<()> {
    let port = free_port()?;
    let mut serve = Serve::start(
        &twinkle_root_config(port),
        port,
        &["--num-gpus", "0", "--num-cpus", "4", "-t", "tinker", "--namespace", "ns1"],
        &[PINNED_TOKEN],
    )?;
    let st = serve.wait_all_running(STARTUP)?;
    assert_eq!(st["server_type"], "tinker");
    assert_eq!(st["namespace"], "ns1");
    // Processor: 0.1 CPU for the replica plus one per CPU worker (ncpu_proc_per_node: 2).
    let processor = app_named(&st, "processor").context("processor")?;
    assert_eq!(processor["gpu_ids"].as_array().map(Vec::len), Some(0));
    // `/healthz` and `/readyz` are the gateway's own, even with an application at `/`.
    let r = get(&serve.gateway, "/healthz")?;
    assert_eq!(r.json()?["status"], "ok");
    let r = get(&serve.gateway, "/readyz")?;
    assert_eq!(r.status, 200);
    let h = r.json()?;
    assert_eq!(h["status"], "ready");
    assert_eq!(h["applications"]["server"], "running");
    // Every path that no longer prefix claims goes to the root application.
    let hdrs = [("Content-Type", "text/html"), (TOKEN_HEADER, TEST_TOKEN)];
    let r = http("POST", &serve.gateway, "/echo", &hdrs, b"hi")?;
    assert_eq!((r.status, r.body.as_slice()), (200, b"hi".as_slice()));
    // Never reflected as the caller's type, and never without the token.
    assert_eq!(r.header("content-type"), Some("application/octet-stream"));
    let r = http("POST", &serve.gateway, "/echo", &[("Content-Type", "text/html")], b"hi")?;
    assert_eq!(r.status, 403);
    let r = get(&serve.gateway, "/processors/healthz")?;
    let h = r.json()?;
    assert_eq!(h["app"], "processor");
    assert_eq!(h["server_type"], "tinker");
    assert_eq!(h["cuda_visible_devices"], "");
    let r = get(&serve.gateway, "/processorsX/healthz")?;
    // The root application's own 404 answered, not the gateway's 404.
    assert_eq!(r.status, 404);
    let body = String::from_utf8_lossy(&r.body);
    ensure!(!body.contains("no application serves"), "{body}");
    serve.stop_all_gone(Signal::SIGTERM, Duration::from_secs(60))?;
    Ok(())
}

#[test]
fn hung_child_fails_health_checks_and_is_replaced() -> Result<()> {
    let env = [("TWINKLE_HEALTH_PERIOD_S", "0.5"), ("TWINKLE_HEALTH_TIMEOUT_S", "1")];
    let mut serve = Serve::tinker(&["--num-gpus", "3"], &env)?;
    let st = serve.wait_all_running(STARTUP)?;
    let name = "sampler-Qwen2.5-0.5B-Instruct";
    let old = app_named(&st, name).and_then(|a| a["pid"].as_u64()).context("pid")? as u32;
    // A stopped process keeps its socket open but never answers: hung, not dead.
    kill(Pid::from_raw(old as i32), Signal::SIGSTOP)?;
    let st = poll(Duration::from_secs(60), || {
        let st = serve.status_json().ok()?;
        let a = app_named(&st, name)?;
        (a["state"] == "running" && a["pid"].as_u64() != Some(u64::from(old))).then_some(st.clone())
    })
    .with_context(|| format!("hung child not replaced; log:\n{}", serve.log_text()))?;
    serve.remember(&st);
    let a = app_named(&st, name).context("sampler")?;
    ensure!(a["last_exit"] == "failed 3 health checks in a row", "{a}");
    ensure!(!pid_exists(old), "hung child {old} still exists");
    let r = get(&serve.gateway, "/api/v1/sampler/Qwen/Qwen2.5-0.5B-Instruct/healthz")?;
    assert_eq!(r.json()?["pid"], a["pid"]);
    serve.stop_all_gone(Signal::SIGTERM, Duration::from_secs(60))?;
    Ok(())
}

#[test]
fn infeasible_deployment_exits_2_and_starts_nothing() -> Result<()> {
    let port = free_port()?;
    let dir = tempfile::tempdir()?;
    let cfg = dir.path().join("c.yaml");
    std::fs::write(&cfg, tinker_config(port))?;
    let home = dir.path().join("home");
    let out = Command::new(bin())
        .args(["serve", "--num-gpus", "2", "--num-cpus", "4"])
        .env("TWINKLE_SERVER_CONFIG", &cfg)
        .env("TWINKLE_HOME", &home)
        .env_remove("CUDA_VISIBLE_DEVICES")
        .output()?;
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(err.contains("cannot place"), "{err}");
    ensure!(err.contains("Qwen2.5-0.5B-Instruct"), "{err}");
    ensure!(!home.join("serve.json").exists());
    ensure!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err(), "gateway was started");
    // `status` then finds nothing to talk to.
    let st = Command::new(bin()).arg("status").env("TWINKLE_HOME", &home).output()?;
    assert_eq!(st.status.code(), Some(1));
    ensure!(String::from_utf8_lossy(&st.stderr).contains("no running `twinkle serve`"));
    Ok(())
}
