//! Models by hub id under `twinkle serve` (issue 14, items 1 and 3), with the real binary and
//! a loopback mock of the Hugging Face Hub (`hub_support`): a model application and a sampler
//! application both name `hf://acme/tiny`, which no cache holds. While the model downloads
//! (the mock slows the transfer) both are `downloading` with a percentage in `twinkle status`,
//! the gateway answers 503 + Retry-After for their routes and the Tinker server says how far the
//! download is; then both serve, the model under its route name, and the mock served every
//! file exactly once (one download shared through the lock file). A second start sends the hub
//! no request.

mod hub_support;
mod platform_support;

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use hub_support::{MockFile, MockHub, MockRepo};
use platform_support::*;
use serde_json::{Value, json};

const STARTUP: Duration = Duration::from_secs(120);
const KEY: (&str, &str) = ("X-API-Key", "tml-hub-serve-test");

fn config(port: u16) -> String {
    let app = |name: &str, kind: &str, prefix: &str| {
        model_app(name, prefix, kind, "hf://acme/tiny", "cpu")
    };
    deployment_head("tinker", port, None)
        + &server_app("/api/v1", "acme/tiny", &[])
        + &app("models-tiny", "model", "/api/v1/model/acme/tiny")
        + &app("sampler-tiny", "sampler", "/api/v1/sampler/acme/tiny")
}

/// The generated tiny model as a hub repository (safetensors as LFS files).
fn tiny_model_repo(dir: &std::path::Path) -> Result<MockRepo> {
    let model = twinkle::hub::generate::ensure_preset("qwen3-tiny", dir)?;
    let mut files = Vec::new();
    for e in std::fs::read_dir(&model)? {
        let path = e?.path();
        let name = path.file_name().and_then(|n| n.to_str()).context("file name")?.to_string();
        let lfs = name.ends_with(".safetensors");
        files.push(MockFile { path: name, data: std::fs::read(&path)?, lfs });
    }
    ensure!(files.iter().any(|f| f.path == "config.json"), "no config.json in {}", model.display());
    Ok(MockRepo {
        id: "acme/tiny".into(),
        commit: "0123456789abcdef0123456789abcdef01234567".into(),
        revisions: vec!["main".into()],
        files,
    })
}

fn app_entry<'a>(st: &'a Value, app: &str) -> Option<&'a Value> {
    st["applications"].as_array()?.iter().find(|a| a["name"] == app)
}

fn post(gw: &str, path: &str, body: &Value) -> Result<Resp> {
    let text = body.to_string();
    http("POST", gw, path, &[KEY, ("Content-Type", "application/json")], text.as_bytes())
}

#[test]
fn applications_download_their_model_once_and_show_progress() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let repo = tiny_model_repo(&tmp.path().join("src"))?;
    let total: usize = repo.files.iter().map(|f| f.data.len()).sum();
    let sizes: Vec<(String, u64)> =
        repo.files.iter().map(|f| (f.path.clone(), f.data.len() as u64)).collect();
    let hub = MockHub::start(vec![repo]);
    // About 4 s of transfer, long enough to watch, short enough for CI.
    let chunks = (total / (16 << 10)).max(1) as u64;
    hub.set(|s| {
        s.slow = true;
        s.chunk_delay = Some(Duration::from_micros(4_000_000 / chunks));
    });

    let hf_cache = tmp.path().join("hf-cache");
    let home = tmp.path().join("home");
    let env = [
        ("TWINKLE_OFFLINE", "0"),
        ("HF_ENDPOINT", hub.url.as_str()),
        ("HF_HUB_CACHE", hf_cache.to_str().context("utf-8")?),
        ("HOME", home.to_str().context("utf-8")?),
        ("TWINKLE_API_KEYS", KEY.1),
    ];
    let mut serve = Serve::start_cpu(config, &env)?;
    let gw = serve.gateway.clone();

    // Both applications are `downloading`: whichever took the lock first transfers and shows
    // how far it is, the other waits for it.
    let apps = ["models-tiny", "sampler-tiny"];
    let (st, fetcher) = poll(STARTUP, || {
        let st = serve.status_json().ok()?;
        let fetcher = apps.into_iter().find(|app| {
            app_entry(&st, app).is_some_and(|a| {
                let pct = a["download"]["percent"].as_f64().unwrap_or(0.0);
                // Under half way, so the checks below run while the download still goes on.
                a["state"] == "downloading" && pct > 0.0 && pct < 50.0
            })
        })?;
        let both =
            apps.iter().all(|a| app_entry(&st, a).is_some_and(|a| a["state"] == "downloading"));
        both.then_some((st, fetcher))
    })
    .with_context(|| format!("never seen downloading; serve log:\n{}", serve.log_text()))?;
    serve.remember(&st);
    let d = &app_entry(&st, fetcher).context("downloading app")?["download"];
    assert_eq!(d["bytes_total"].as_u64(), Some(total as u64), "{st}");
    let text = serve.status_text()?;
    ensure!(text.contains("downloading: ") && text.contains('%'), "{text}");

    // Its routes answer 503 + Retry-After, and the Tinker server says the model is coming.
    let r = http("GET", &gw, "/api/v1/model/acme/tiny/healthz", &[], b"")?;
    assert_eq!(r.status, 503, "{}", String::from_utf8_lossy(&r.body));
    ensure!(r.header("retry-after").is_some(), "{:?}", r.headers);
    assert_eq!(r.json()?["state"], "downloading");
    let session = poll(Duration::from_secs(30), || {
        post(&gw, "/api/v1/create_session", &json!({"tags": []})).ok().filter(|r| r.status == 200)
    })?;
    let sid = session.json()?["session_id"].as_str().context("session_id")?.to_string();
    let body = json!({"session_id": sid, "model_seq_id": 0, "base_model": "acme/tiny",
        "lora_config": {"rank": 4}});
    let r = post(&gw, "/api/v1/create_model", &body)?;
    assert_eq!(r.status, 503, "{}", String::from_utf8_lossy(&r.body));
    ensure!(r.header("retry-after").is_some(), "{:?}", r.headers);
    let detail = r.json()?["detail"].as_str().unwrap_or_default().to_string();
    ensure!(detail.contains("downloading its model"), "{detail}");

    // Then both serve, and every file crossed the network once.
    let st = serve.wait_all_running(STARTUP)?;
    for app in apps {
        let a = app_entry(&st, app).context("app")?;
        ensure!(a["download"].is_null() && a["restarts"] == 0, "{st}");
    }
    for (path, size) in &sizes {
        assert_eq!(hub.served(path), *size, "{path} served once in full");
    }
    let snapshots = hf_cache.join("models--acme--tiny/snapshots");
    ensure!(
        snapshots
            .join(format!("{}/config.json", "0123456789abcdef0123456789abcdef01234567"))
            .is_file()
    );
    let caps = http("GET", &gw, "/api/v1/get_server_capabilities", &[KEY], b"")?;
    let caps = caps.json()?;
    ensure!(caps.to_string().contains("acme/tiny"), "{caps}");
    let r = post(&gw, "/api/v1/create_model", &body)?;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    serve.stop_ok(nix::sys::signal::Signal::SIGTERM, Duration::from_secs(20))?;

    // A second start finds the model in the cache: no request reaches the hub at all.
    hub.clear();
    let mut again = Serve::start_cpu(config, &env)?;
    let st = again.wait_all_running(STARTUP)?;
    for app in apps {
        ensure!(app_entry(&st, app).is_some_and(|a| a["restarts"] == 0), "{st}");
    }
    ensure!(hub.requests().is_empty(), "second start asked the hub: {:?}", hub.requests());
    again.stop_ok(nix::sys::signal::Signal::SIGTERM, Duration::from_secs(20))
}
