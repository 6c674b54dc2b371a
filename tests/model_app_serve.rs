//! End to end under `twinkle serve`: model and sampler children on `generate://qwen3-tiny`,
//! reached directly on loopback with the serve-wide internal token.

#[path = "platform_support/mod.rs"]
mod platform_support;

use std::time::Duration;

use anyhow::{Context, Result};
use nix::sys::signal::Signal;
use platform_support::*;
use serde_json::{Value, json};

fn config(port: u16) -> String {
    let deployments = "    deployments:\n      - ray_actor_options: {num_cpus: 0.1}\n";
    deployment_head("tinker", port, None)
        + &generated_app("model", "/api/v1/model/tiny", "model", "qwen3-tiny", "cpu")
        + "      adapter_config: {adapter_timeout: 600}\n"
        + deployments
        + &generated_app("sampler", "/api/v1/sampler/tiny", "sampler", "qwen3-tiny", "cpu")
        + deployments
}

/// A deployment whose model app names a model that is nowhere on disk, beside a working one.
fn missing_model_config(port: u16) -> String {
    deployment_head("tinker", port, None)
        + &generated_app("model", "/api/v1/model/tiny", "model", "qwen3-tiny", "cpu")
        + &broken_app()
}

fn post(addr: &str, path: &str, token: &str, body: &Value) -> Result<Resp> {
    let bytes = serde_json::to_vec(body)?;
    http(
        "POST",
        addr,
        path,
        &[("Content-Type", "application/json"), ("X-Twinkle-Internal", token)],
        &bytes,
    )
}

#[test]
fn model_and_sampler_children_train_save_and_sample() -> Result<()> {
    // A scratch HOME, so no model cache of the machine's user is read.
    let tmp = tempfile::tempdir()?;
    let save = tmp.path().join("saves");
    let env = [
        ("TWINKLE_INTERNAL_TOKEN", "tok-123"),
        ("TWINKLE_SAVE_DIR", save.to_str().context("utf-8")?),
        ("HOME", tmp.path().to_str().context("utf-8")?),
    ];
    let mut serve = Serve::start_cpu(config, &env)?;
    let st = serve.wait_all_running(Duration::from_secs(90))?;
    let addr = |name: &str| -> Result<String> {
        let apps = st["applications"].as_array().context("apps")?;
        let a = apps.iter().find(|a| a["name"] == name).context("app")?;
        Ok(a["address"].as_str().context("address")?.to_string())
    };
    let (model, sampler) = (addr("model")?, addr("sampler")?);

    let r = get(&model, "/_internal/v1/info")?;
    assert_eq!(r.status, 403);
    let r = http("GET", &model, "/_internal/v1/info", &[("X-Twinkle-Internal", "tok-123")], b"")?;
    assert_eq!(r.status, 200, "{}", serve.log_text());
    let info = r.json()?;
    assert_eq!(info["vocab_size"], 151_936);
    assert_eq!(info["base_model"], "generate://qwen3-tiny");
    // The prefix's /healthz still answers through the gateway: bare for anyone, who answered
    // only with the internal token.
    let h = get_bare(&serve.gateway, "/api/v1/model/tiny/healthz")?.json()?;
    assert_eq!(h, json!({"status": "ok"}));
    let hdr = [("X-Twinkle-Internal", "tok-123")];
    let h = http("GET", &serve.gateway, "/api/v1/model/tiny/healthz", &hdr, b"")?.json()?;
    assert_eq!(h["app"], "model");

    let create = json!({"model_id": "s:train:0", "rank": 8, "train_attn": true, "train_mlp": true,
        "train_unembed": true, "seed": 1});
    assert_eq!(post(&model, "/_internal/v1/create_adapter", "tok-123", &create)?.status, 200);
    let seq: Vec<u32> = vec![9707, 11, 1879, 0, 198, 40, 1079];
    let fb = json!({"model_id": "s:train:0", "loss_fn": "cross_entropy", "forward_only": false,
        "data": [{"tokens": &seq[..6], "target_tokens": &seq[1..]}]});
    let r = post(&model, "/_internal/v1/forward_backward", "tok-123", &fb)?;
    assert_eq!(r.status, 200);
    let step = json!({"model_id": "s:train:0", "adam_params": {"learning_rate": 0.01}});
    assert_eq!(post(&model, "/_internal/v1/optim_step", "tok-123", &step)?.status, 200);
    let dir = save.join("run/sampler_weights/one");
    let r = post(
        &model,
        "/_internal/v1/save",
        "tok-123",
        &json!({"model_id": "s:train:0", "dir": dir, "kind": "sampler"}),
    )?;
    assert_eq!(r.status, 200);
    let sample = json!({"prompt": &seq[..3], "num_samples": 2, "max_tokens": 5, "temperature": 1.0,
        "top_k": 50, "top_p": 0.9, "seed": 5, "stop": []});
    let mut a = sample.clone();
    a["model_id"] = json!("s:train:0");
    let from_model = post(&model, "/_internal/v1/sample", "tok-123", &a)?.json()?;
    let mut b = sample;
    b["adapter_dir"] = json!(dir);
    let r = post(&sampler, "/_internal/v1/sample", "tok-123", &b)?;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()?, from_model);
    assert_eq!(from_model["sequences"][1]["tokens"].as_array().map(Vec::len), Some(5));

    serve.stop_ok(Signal::SIGTERM, Duration::from_secs(60))?;
    Ok(())
}

/// A missing model is a startup error: the application is `failed` with a message naming every
/// directory that was searched, it is not restarted, and the rest of the deployment serves.
#[test]
fn missing_model_fails_at_startup_and_is_not_restarted() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let home = tmp.path().join("home");
    let ms_cache = tmp.path().join("ms-cache");
    let env = [
        ("HOME", home.to_str().context("utf-8")?),
        ("MODELSCOPE_CACHE", ms_cache.to_str().context("utf-8")?),
    ];
    let mut serve = Serve::start_cpu(missing_model_config, &env)?;
    let app = |st: &Value, name: &str| -> Value {
        st["applications"]
            .as_array()
            .and_then(|a| a.iter().find(|a| a["name"] == name).cloned())
            .unwrap_or(Value::Null)
    };
    let st = poll(Duration::from_secs(90), || {
        let st = serve.status_json().ok()?;
        (app(&st, "broken")["state"] == "failed" && app(&st, "model")["state"] == "running")
            .then_some(st)
    })
    .with_context(|| format!("serve log:\n{}", serve.log_text()))?;
    serve.remember(&st);
    let why = app(&st, "broken")["last_exit"].as_str().unwrap_or_default().to_string();
    assert!(why.contains("application `broken`: cannot download"), "{why}");
    assert!(why.contains("Nobody/Missing-Model") && why.contains("looked in"), "{why}");
    // The searched place is named: the ModelScope cache from the env.
    assert!(why.contains(ms_cache.to_str().context("utf-8")?), "{why}");
    assert!(serve.status_text()?.contains("Nobody/Missing-Model"));

    // Not restarted in a loop: still failed, no restarts, no pid, a while later.
    std::thread::sleep(Duration::from_secs(3));
    let st = serve.status_json()?;
    let broken = app(&st, "broken");
    assert_eq!(broken["state"], "failed", "{broken}");
    assert_eq!(broken["restarts"], 0, "{broken}");
    assert_eq!(broken["pid"], Value::Null, "{broken}");
    // The broken prefix is not served; the healthy application still is.
    assert!(get(&serve.gateway, "/api/v1/model/missing/healthz")?.status >= 500);
    assert_eq!(get(&serve.gateway, "/api/v1/model/tiny/healthz")?.status, 200);

    serve.stop_ok(Signal::SIGTERM, Duration::from_secs(60))?;
    Ok(())
}

/// A deployment of one model application `gpu` on `ranks` cuda cards (`dp_size` = `ranks`).
fn cuda_app_config(port: u16, ranks: u32) -> String {
    format!(
        r#"server_type: tinker
http_options: {{host: 127.0.0.1, port: {port}}}
applications:
  - name: gpu
    route_prefix: /api/v1/model/gpu
    import_path: model
    args:
      model_id: "generate://qwen3-tiny"
      device_group: {{name: gpu, ranks: {ranks}, device_type: cuda}}
      device_mesh: {{device_type: cuda, dp_size: {ranks}}}
"#
    )
}

/// Serves a deployment of one app on `ranks` cuda cards and waits until the app is `failed`; returns
/// why it exited, after checking that it stays failed without restarts and that serve stops
/// cleanly.
fn start_and_wait_failed(ranks: u32, env: &[(&str, &str)]) -> Result<String> {
    let port = free_port()?;
    let gpus = ranks.to_string();
    let args = ["--num-gpus", gpus.as_str(), "--num-cpus", "4"];
    let mut serve = Serve::start(&cuda_app_config(port, ranks), port, &args, env)?;
    let gpu_app = |serve: &Serve| -> Option<Value> {
        let st = serve.status_json().ok()?;
        st["applications"].as_array()?.iter().find(|a| a["name"] == "gpu").cloned()
    };
    let st = poll(Duration::from_secs(90), || gpu_app(&serve).filter(|g| g["state"] == "failed"))
        .with_context(|| format!("serve log:\n{}", serve.log_text()))?;
    std::thread::sleep(Duration::from_secs(2));
    let later = gpu_app(&serve).context("gpu app")?;
    assert_eq!(later["state"], "failed", "{later}");
    assert_eq!(later["restarts"], 0, "{later}");
    serve.stop_ok(Signal::SIGTERM, Duration::from_secs(60))?;
    Ok(st["last_exit"].as_str().unwrap_or_default().to_string())
}

/// An application that asks for a GPU computes on one or fails: with no usable CUDA driver the
/// model application is `failed` at start-up with the cause, not restarted, and never quietly
/// served from the CPU.
#[test]
fn cuda_app_without_a_driver_fails_at_startup() -> Result<()> {
    if twinkle::engine::cuda::driver_available().is_ok() {
        eprintln!(
            "SKIP: this machine has a CUDA driver; the no-driver start-up error is not testable"
        );
        return Ok(());
    }
    let why = start_and_wait_failed(1, &[])?;
    assert!(why.contains("device_type is cuda") && why.contains("driver"), "{why}");
    Ok(())
}

/// A `dp_size` larger than the cards the driver shows is a start-up error naming both numbers
/// (here the CPU execution layer of tools/cuda-emu, which shows one card, stands in for a driver;
/// `TWINKLE_CUDA_EMU` names it, scripts/test.sh sets it).
#[test]
fn cuda_app_with_fewer_visible_cards_than_dp_size_fails_at_startup() -> Result<()> {
    let Some(emu) = std::env::var_os("TWINKLE_CUDA_EMU").map(std::path::PathBuf::from) else {
        assert!(
            std::env::var("TWINKLE_REQUIRE_CUDA_EMU").as_deref() != Ok("1"),
            "TWINKLE_REQUIRE_CUDA_EMU=1 but TWINKLE_CUDA_EMU is not set"
        );
        eprintln!("SKIP: no CUDA stand-in (TWINKLE_CUDA_EMU); scripts/test.sh builds one");
        return Ok(());
    };
    let lib = format!("{}:{}", emu.display(), std::env::var("LD_LIBRARY_PATH").unwrap_or_default());
    let why = start_and_wait_failed(2, &[("LD_LIBRARY_PATH", lib.as_str())])?;
    assert!(why.contains("dp_size 2") && why.contains("sees 1 device(s)"), "{why}");
    Ok(())
}
