//! Ready means ready (issue 12, item 3), with the real binary, server and model applications:
//! while a configured model application is still starting, the gateway's `/healthz` is 200
//! (liveness) but `/readyz` is 503, and Tinker calls for that model answer 503 + Retry-After
//! (which the SDK retries) instead of "not served here"; once it registers everything works and
//! `serve --wait` prints its `ready` line. A model application that fails makes `/readyz` 503
//! naming it, its model answers a non-retryable error, and `serve --wait` exits 1.

mod platform_support;

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use nix::sys::signal::Signal;
use platform_support::*;
use serde_json::{Value, json};

const STARTUP: Duration = Duration::from_secs(90);
const KEY: (&str, &str) = ("X-API-Key", "tml-ready-test");

/// Server at `/api/v1`; the tiny model, whose worker waits `delay_ms` before registering (the
/// test hook, set through the application's own env so the server app is not delayed); and,
/// with `broken`, a model application whose model exists nowhere.
fn config(port: u16, delay_ms: u64, broken: bool) -> String {
    let mut text = deployment_head("tinker", port, None)
        + "  - name: server\n    route_prefix: /api/v1\n    import_path: server\n"
        + &generated_app("model", "/api/v1/model/tiny", "model", "qwen3-tiny", "cpu")
        + &format!(
            r#"    deployments:
      - ray_actor_options:
          num_cpus: 0.1
          runtime_env:
            env_vars: {{TWINKLE_TEST_WORKER_START_DELAY_MS: "{delay_ms}"}}
"#
        );
    if broken {
        text.push_str(&broken_app());
    }
    text
}

fn start(port: u16, cfg: &str, args: &[&str], tmp: &tempfile::TempDir) -> Result<Serve> {
    let home = tmp.path().join("home");
    let save = tmp.path().join("save");
    let ms_cache = tmp.path().join("ms-cache");
    let mut all = vec!["--num-gpus", "0", "--num-cpus", "4"];
    all.extend_from_slice(args);
    Serve::start(
        cfg,
        port,
        &all,
        &[
            ("HOME", home.to_str().context("utf-8")?),
            ("TWINKLE_SAVE_DIR", save.to_str().context("utf-8")?),
            ("MODELSCOPE_CACHE", ms_cache.to_str().context("utf-8")?),
            ("TWINKLE_API_KEYS", KEY.1),
        ],
    )
}

fn post(gw: &str, path: &str, body: &Value) -> Result<Resp> {
    let text = body.to_string();
    http("POST", gw, path, &[KEY, ("Content-Type", "application/json")], text.as_bytes())
}

/// Waits until status shows each `(application, state)` of `want` at once, and remembers the
/// pids that status names (so that they are killed with the test).
fn wait_states(serve: &mut Serve, want: &[(&str, &str)]) -> Result<()> {
    let st = poll(STARTUP, || {
        let st = serve.status_json().ok()?;
        want.iter().all(|(app, s)| state(&st, app) == *s).then_some(st)
    })
    .with_context(|| format!("never {want:?}; serve log:\n{}", serve.log_text()))?;
    serve.remember(&st);
    Ok(())
}

fn state(st: &Value, app: &str) -> String {
    st["applications"]
        .as_array()
        .and_then(|a| a.iter().find(|a| a["name"] == app))
        .and_then(|a| a["state"].as_str())
        .unwrap_or_default()
        .to_string()
}

fn create_model(gw: &str, session: &str, base_model: &str) -> Result<Resp> {
    let body = json!({"session_id": session, "model_seq_id": 0, "base_model": base_model,
        "lora_config": {"rank": 4}});
    post(gw, "/api/v1/create_model", &body)
}

#[test]
fn starting_model_is_503_with_retry_after_until_ready() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let port = free_port()?;
    let mut serve = start(port, &config(port, 8000, false), &["--wait"], &tmp)?;
    let gw = serve.gateway.clone();
    // The server is up, the model still sleeping before its registration.
    wait_states(&mut serve, &[("server", "running"), ("model", "starting")])?;

    let live = get(&gw, "/healthz")?;
    assert_eq!(live.status, 200, "liveness: {}", String::from_utf8_lossy(&live.body));
    let ready = get(&gw, "/readyz")?;
    assert_eq!(ready.status, 503);
    ensure!(ready.header("retry-after").is_some(), "{:?}", ready.headers);
    let j = ready.json()?;
    assert_eq!(j["applications"]["model"], "starting", "{j}");
    assert_eq!(j["applications"]["server"], "running", "{j}");

    let caps = http("GET", &gw, "/api/v1/get_server_capabilities", &[KEY], b"")?;
    assert_eq!(caps.status, 503, "{}", String::from_utf8_lossy(&caps.body));
    ensure!(caps.header("retry-after").is_some(), "{:?}", caps.headers);
    let session = post(&gw, "/api/v1/create_session", &json!({"tags": []}))?;
    assert_eq!(session.status, 200, "{}", String::from_utf8_lossy(&session.body));
    let sid = session.json()?["session_id"].as_str().context("session_id")?.to_string();
    let r = create_model(&gw, &sid, "qwen3-tiny")?;
    assert_eq!(r.status, 503, "{}", String::from_utf8_lossy(&r.body));
    ensure!(r.header("retry-after").is_some(), "{:?}", r.headers);
    let detail = r.json()?["detail"].as_str().unwrap_or_default().to_string();
    ensure!(detail.contains("configured") && detail.contains("starting"), "{detail}");
    // A model nobody configured is still a plain 404.
    let r = create_model(&gw, &sid, "Nobody/Other-Model")?;
    assert_eq!(r.status, 404, "{}", String::from_utf8_lossy(&r.body));
    ensure!(!serve.log_text().contains("twinkle serve: ready"), "ready too early");

    // Once the model registers: ready, the line for scripts, and the same calls work.
    poll(STARTUP, || get(&gw, "/readyz").ok().filter(|r| r.status == 200))
        .with_context(|| format!("never ready; serve log:\n{}", serve.log_text()))?;
    poll(Duration::from_secs(5), || {
        serve.log_text().contains("twinkle serve: ready").then_some(())
    })
    .with_context(|| format!("no ready line; serve log:\n{}", serve.log_text()))?;
    let caps = http("GET", &gw, "/api/v1/get_server_capabilities", &[KEY], b"")?;
    assert_eq!(caps.status, 200, "{}", String::from_utf8_lossy(&caps.body));
    // Listed under the name its route gives it (`/model/tiny`); its model id's name still works.
    let listed = caps.json()?["supported_models"].clone();
    ensure!(listed.to_string().contains(r#""model_name":"tiny""#), "{listed}");
    let r = create_model(&gw, &sid, "qwen3-tiny")?;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let st = serve.status_json()?;
    serve.remember(&st);
    serve.stop_ok(Signal::SIGTERM, Duration::from_secs(60))?;
    Ok(())
}

#[test]
fn failed_model_app_makes_readyz_503_and_serve_wait_exit_1() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let port = free_port()?;
    let mut serve = start(port, &config(port, 0, true), &[], &tmp)?;
    let gw = serve.gateway.clone();
    wait_states(&mut serve, &[("broken", "failed"), ("model", "running")])?;
    wait_states(&mut serve, &[("server", "running")])?;

    let ready = get(&gw, "/readyz")?;
    assert_eq!(ready.status, 503);
    let j = ready.json()?;
    let why = j["failed"]["broken"].as_str().unwrap_or_default();
    ensure!(why.contains("Nobody/Missing-Model"), "{j}");
    ensure!(j["detail"].as_str().is_some_and(|d| d.contains("\"broken\" failed")), "{j}");
    ensure!(ready.header("retry-after").is_none(), "waiting does not fix a failure");
    assert_eq!(get(&gw, "/healthz")?.status, 200);

    // The failed model: a clear error the SDK does not retry; the healthy model still serves.
    let session = post(&gw, "/api/v1/create_session", &json!({"tags": []}))?;
    let sid = session.json()?["session_id"].as_str().context("session_id")?.to_string();
    let r = create_model(&gw, &sid, "Nobody/Missing-Model")?;
    assert_eq!(r.status, 500, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.header("x-should-retry"), Some("false"));
    let detail = r.json()?["detail"].as_str().unwrap_or_default().to_string();
    ensure!(detail.contains("`broken` failed") && detail.contains("looked in"), "{detail}");
    let r = get(&gw, "/api/v1/model/missing/healthz")?;
    assert_eq!((r.status, r.header("x-should-retry")), (500, Some("false")));
    let caps = http("GET", &gw, "/api/v1/get_server_capabilities", &[KEY], b"")?;
    assert_eq!(caps.status, 200, "{}", String::from_utf8_lossy(&caps.body));
    assert_eq!(create_model(&gw, &sid, "qwen3-tiny")?.status, 200);
    serve.stop_ok(Signal::SIGTERM, Duration::from_secs(60))?;

    // `--wait`: the same failure stops everything and exits 1 with the reason.
    let port = free_port()?;
    let mut serve = start(port, &config(port, 0, true), &["--wait"], &tmp)?;
    let exited = poll(STARTUP, || serve.child.as_mut()?.try_wait().ok()?)
        .with_context(|| format!("serve --wait did not exit; log:\n{}", serve.log_text()))?;
    serve.child = None;
    let log = serve.log_text();
    assert_eq!(exited.code(), Some(1), "{log}");
    ensure!(log.contains("not ready: application `broken` failed"), "{log}");
    ensure!(!log.contains("twinkle serve: ready"), "{log}");
    Ok(())
}
