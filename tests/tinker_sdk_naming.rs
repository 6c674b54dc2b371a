//! Naming through the official `tinker` SDK against the real `twinkle serve` (issue #14, item
//! 5): a checkpoint in a local directory called `model`, served by a model and a sampler
//! application at `/api/v1/{model,sampler}/acme/llama-tiny`, is listed, trained and sampled as
//! `acme/llama-tiny` — not as `model`, its directory's name. Without the venv the test prints
//! SKIP and passes, unless `TWINKLE_REQUIRE_SDK=1`.

#[path = "platform_support/mod.rs"]
mod platform_support;

use std::path::Path;
use std::time::Duration;

use anyhow::Result;
use platform_support::{
    Serve, deployment_head, free_port, sdk_command, sdk_result, server_app, venv_python,
};
use twinkle::hub::{HubEnv, resolve_with};

/// The name the routes give the model (and `supported_models` lists).
const NAME: &str = "acme/llama-tiny";

/// Copies the files of `from` (a flat model directory) into `to`.
fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        if e.file_type()?.is_file() {
            std::fs::copy(e.path(), to.join(e.file_name()))?;
        }
    }
    Ok(())
}

/// A model or sampler application at `/api/v1/{kind}/acme/llama-tiny` on the local `dir`.
fn app(kind: &str, dir: &Path) -> String {
    format!(
        "  - name: {kind}s-llama-tiny\n    route_prefix: /api/v1/{kind}/{NAME}\n    \
         import_path: {kind}\n    args:\n      model_id: {}\n      \
         device_group: {{name: {kind}, ranks: 1, device_type: cpu}}\n",
        dir.display()
    )
}

#[test]
fn sdk_uses_the_configured_name_of_a_local_model() -> Result<()> {
    let Some(py) = venv_python()? else { return Ok(()) };
    let tmp = tempfile::tempdir()?;
    // The generated tiny Qwen3, copied to a directory whose name says nothing of the model.
    let env = HubEnv { twinkle_home: Some(tmp.path().join("hub")), ..HubEnv::default() };
    let generated = resolve_with("generate://qwen3-tiny", &env)?;
    let dir = tmp.path().join("ckpt/llama-tiny/model");
    copy_dir(&generated, &dir)?;

    let port = free_port()?;
    let config = deployment_head("tinker", port, None)
        + &server_app("/api/v1", NAME, &[])
        + &app("model", &dir)
        + &app("sampler", &dir);
    let save = tmp.path().join("checkpoints").to_string_lossy().into_owned();
    let mut serve = Serve::start(&config, port, &[], &[("TWINKLE_SAVE_DIR", save.as_str())])?;
    serve.wait_all_running(Duration::from_secs(120))?;
    platform_support::wait_gateway(port, NAME, &serve)?;

    let mut cmd = sdk_command(&py, "naming.py", port, "tml-naming", NAME)?;
    cmd.env("TWINKLE_MODEL_DIR", &dir);
    let r = sdk_result("naming.py", &mut cmd, || format!("serve log:\n{}", serve.log_text()))?;
    eprintln!("naming.py: {r}");
    assert_eq!(r["names"], serde_json::json!([NAME]), "{r}");
    assert_eq!(r["model_name"], NAME, "{r}");
    // Created by its model_id, the run keeps the name it was created with (as before).
    let by_id = r["by_id_name"].as_str().unwrap_or_default();
    assert!(by_id == NAME || Path::new(by_id) == dir, "{r}");
    let refused = r["refused"].as_str().unwrap_or_default();
    assert!(refused.contains("acme/not-served") && refused.contains(NAME), "{r}");
    assert!(!refused.contains("\"model\""), "the directory's name is not a served name: {r}");
    let st = serve.status_json()?;
    serve.remember(&st);
    Ok(())
}
