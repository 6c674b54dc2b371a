//! Issue 16 end to end: the real `twinkle serve` (server + a generated tiny model on CPU) with
//! `--log-format json`; the unmodified `tinker` SDK trains a step and samples with its own
//! `X-Request-Id`; then `tests/sdk/metrics.py` scrapes the gateway's `/metrics` and parses it
//! with Prometheus's Python parser (counts, histogram consistency, monotonic counters). Here:
//! the client's request id is in the model application's log line for its job, error bodies
//! carry the request id, `twinkle status --json` has the queues, and the Grafana dashboard
//! names only metrics the scrape returns. Skips without the venv unless `TWINKLE_REQUIRE_SDK=1`.

#[path = "platform_support/mod.rs"]
mod platform_support;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use platform_support::{
    Serve, deployment_head, free_port, generated_app, http, sdk_command, sdk_result, server_app,
    venv_python, wait_gateway,
};
use serde_json::Value;

const MODEL: &str = "qwen3-tiny";
const REQUEST_ID: &str = "obs-test-req-1";

/// The venv python when it also has `prometheus_client` (scripts/setup-venv.sh installs it).
fn python() -> Result<Option<std::path::PathBuf>> {
    let Some(py) = venv_python()? else { return Ok(None) };
    let ok = Command::new(&py)
        .args(["-c", "import prometheus_client"])
        .output()
        .is_ok_and(|o| o.status.success());
    if ok {
        return Ok(Some(py));
    }
    if std::env::var("TWINKLE_REQUIRE_SDK").as_deref() == Ok("1") {
        bail!("the venv has no prometheus_client (run scripts/setup-venv.sh)");
    }
    eprintln!("SKIP: the venv has no prometheus_client (run scripts/setup-venv.sh)");
    Ok(None)
}

/// Every `twinkle_…` metric name the dashboard's queries use.
fn dashboard_metrics() -> Result<BTreeSet<String>> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/grafana/twinkle.json");
    let dash: Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
    let re = regex::Regex::new(r"twinkle_[a-z_]+")?;
    let mut names = BTreeSet::new();
    for panel in dash["panels"].as_array().context("panels")? {
        for t in panel["targets"].as_array().context("targets")? {
            let expr = t["expr"].as_str().context("expr")?;
            names.extend(re.find_iter(expr).map(|m| m.as_str().to_string()));
        }
    }
    Ok(names)
}

#[test]
fn metrics_request_ids_status_and_dashboard() -> Result<()> {
    let Some(py) = python()? else { return Ok(()) };
    let port = free_port()?;
    let save = tempfile::tempdir()?;
    let config = deployment_head("tinker", port, None)
        + &server_app("/api/v1", MODEL, &[])
        + &generated_app("model", &format!("/api/v1/model/{MODEL}"), "model", MODEL, "cpu");
    let save_dir = save.path().join("checkpoints").display().to_string();
    let args = ["--log-level", "info,twinkle::apps::model::http=debug", "--log-format", "json"];
    let mut serve = Serve::start(&config, port, &args, &[("TWINKLE_SAVE_DIR", &save_dir)])?;
    serve.wait_all_running(Duration::from_secs(120))?;
    wait_gateway(port, MODEL, &serve)?;

    let mut cmd = sdk_command(&py, "metrics.py", port, "tml-metrics", MODEL)?;
    cmd.env("TWINKLE_REQUEST_ID", REQUEST_ID);
    let result =
        sdk_result("metrics.py", &mut cmd, || format!("serve log:\n{}", serve.log_text()))?;
    let scraped: BTreeSet<String> = result["names"]
        .as_array()
        .context("names")?
        .iter()
        .filter_map(|n| n.as_str().map(str::to_string))
        .collect();

    // The dashboard queries only what the scrape has (histograms by their `_bucket` series).
    let missing: Vec<String> =
        dashboard_metrics()?.into_iter().filter(|n| !scraped.contains(n)).collect();
    assert!(missing.is_empty(), "dashboard metrics not in the scrape: {missing:?}");

    // Every log line is JSON, and the model application's job line carries the client's id.
    let log = serve.log_text();
    let lines: Vec<Value> = log.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    let job = lines.iter().find(|v| {
        v["target"] == "twinkle::apps::model::http"
            && v["fields"]["message"] == "compute done"
            && v["fields"]["route"] == "forward_backward"
    });
    let job = job.with_context(|| format!("no forward_backward job line; log:\n{log}"))?;
    assert_eq!(job["span"]["request_id"], REQUEST_ID, "{job}");

    // An error body names its request: the client's id, or a generated one.
    let gw = format!("127.0.0.1:{port}");
    let key = ("X-API-Key", "tml-metrics");
    let json = ("Content-Type", "application/json");
    let bad = http(
        "POST",
        &gw,
        "/api/v1/forward_backward",
        &[key, json, ("X-Request-Id", "bad-1")],
        b"{",
    )?;
    assert!((400..500).contains(&bad.status), "{bad:?}");
    assert_eq!(bad.header("x-request-id"), Some("bad-1"));
    assert_eq!(bad.json()?["request_id"], "bad-1");
    let bad = http("POST", &gw, "/api/v1/forward_backward", &[key, json], b"{")?;
    let made = bad.json()?["request_id"].as_str().map(str::to_string).unwrap_or_default();
    assert!(made.starts_with("req-"), "{made}");
    let unknown = http("GET", &gw, "/nowhere", &[], b"")?;
    assert_eq!(unknown.status, 404);
    assert!(unknown.json()?["request_id"].as_str().is_some_and(|s| !s.is_empty()));

    // `twinkle status --json` has each running application's queue depth.
    let st = serve.status_json()?;
    assert_eq!(st["queues"]["model"], 0, "{st}");
    assert!(st["queues"]["server"].is_u64(), "{st}");
    let text = serve.status_text()?;
    assert!(text.contains("QUEUE"), "{text}");
    drop(serve);
    Ok(())
}
