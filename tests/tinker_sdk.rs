//! The official `tinker` SDK 0.38 (unmodified, from the project venv) against the real
//! `twinkle serve`: a generated tiny Qwen3 model on CPU, scripts in `tests/sdk/` that assert and
//! print `RESULT {json}`. Without the venv the tests print SKIP and pass, unless
//! `TWINKLE_REQUIRE_SDK=1` (scripts/test.sh sets it).

#[path = "platform_support/mod.rs"]
mod platform_support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use nix::sys::signal::Signal;
use platform_support::{
    Serve, deployment_head, free_port, generated_app, memorized_answers, sdk_command, sdk_result,
    server_app, venv_python,
};
use serde_json::Value;

const MODEL: &str = "qwen3-tiny";

/// A deployment of server + one model app on `device` (`cpu` or `cuda`) (+ a CPU sampler app
/// when `sampler`) on `port`, state in `state_db` (file) or memory.
fn config(
    port: u16,
    state_db: Option<&Path>,
    model_limit: u32,
    sampler: bool,
    device: &str,
) -> String {
    let limit = model_limit.to_string();
    let limits = [("per_token_model_limit", limit.as_str()), ("max_tokens_per_request", "4096")];
    let mut out = deployment_head("tinker", port, state_db)
        + &server_app("/api/v1", MODEL, &limits)
        + &generated_app("model", &format!("/api/v1/model/{MODEL}"), "model", MODEL, device);
    if sampler {
        out +=
            &generated_app("sampler", &format!("/api/v1/sampler/{MODEL}"), "sampler", MODEL, "cpu");
    }
    out
}

/// The per-serve internal token of the tests that talk to the applications directly.
const INTERNAL_TOKEN: &str = "tok-sdk-test";

struct Env {
    port: u16,
    save: tempfile::TempDir,
    state_db: Option<PathBuf>,
    sampler: bool,
    /// `Some`: the model app runs with `device_type: cuda` on one card, with the driver of
    /// [`cuda_driver`] (`Some(dir)`: the stand-in library in `dir`).
    cuda: Option<Option<PathBuf>>,
}

impl Env {
    fn new(durable: bool) -> Result<Self> {
        let save = tempfile::tempdir()?;
        let state_db = durable.then(|| save.path().join("state/twinkle.db"));
        Ok(Env { port: free_port()?, save, state_db, sampler: false, cuda: None })
    }

    /// The venv's Python (`None`: the SDK is not installed, skip the test) and serve started on
    /// a fresh [`Env::new`]`(durable)`.
    fn started(durable: bool) -> Result<Option<(PathBuf, Env, Serve)>> {
        let Some(py) = venv_python()? else { return Ok(None) };
        let env = Env::new(durable)?;
        let serve = env.start()?;
        Ok(Some((py, env, serve)))
    }

    /// Where restart.py hands its state from one phase to the next.
    fn handoff(&self) -> String {
        self.save.path().join("handoff.json").to_string_lossy().into_owned()
    }

    /// Runs restart.py's `phase` as `key` against `serve` (its log goes with a failure).
    fn restart_phase(&self, py: &Path, serve: &Serve, key: &str, phase: &str) -> Result<Value> {
        run_script(py, self.port, key, "restart.py", &[phase, &self.handoff()])
            .with_context(|| format!("serve log:\n{}", serve.log_text()))
    }

    fn start(&self) -> Result<Serve> {
        let mut serve = self.spawn(&[])?;
        serve.wait_all_running(Duration::from_secs(120))?;
        platform_support::wait_gateway(self.port, MODEL, &serve)?;
        Ok(serve)
    }

    /// Starts serve (with `extra` env) without waiting for anything.
    fn spawn(&self, extra: &[(&str, &str)]) -> Result<Serve> {
        let save_dir = self.save.path().join("checkpoints");
        let save = save_dir.to_string_lossy().into_owned();
        let device = if self.cuda.is_some() { "cuda" } else { "cpu" };
        let mut args = vec!["--log-level", "info"];
        let mut vars = vec![
            ("TWINKLE_SAVE_DIR", save.clone()),
            ("TWINKLE_INTERNAL_TOKEN", INTERNAL_TOKEN.into()),
        ];
        if let Some(lib) = &self.cuda {
            args.extend(["--num-gpus", "1"]);
            if let Some(dir) = lib {
                let old = std::env::var("LD_LIBRARY_PATH").unwrap_or_default();
                vars.push(("LD_LIBRARY_PATH", format!("{}:{old}", dir.display())));
            }
        }
        let mut vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
        vars.extend_from_slice(extra);
        Serve::start(
            &config(self.port, self.state_db.as_deref(), 16, self.sampler, device),
            self.port,
            &args,
            &vars,
        )
    }
}

/// Runs `tests/sdk/{script}` and returns its `RESULT` JSON.
fn run_script(py: &Path, port: u16, key: &str, script: &str, args: &[&str]) -> Result<Value> {
    let mut cmd = sdk_command(py, script, port, key, MODEL)?;
    cmd.args(args).env("TWINKLE_SECOND_KEY", format!("{key}-other"));
    sdk_result(script, &mut cmd, String::new)
}

/// Where the `device_type: cuda` model application gets its driver: `Some(Some(dir))` puts the
/// CPU execution layer in `dir` (tools/cuda-emu, `TWINKLE_CUDA_EMU`) on the children's library
/// path; `Some(None)` uses the driver this process already loads (a GPU machine, or the
/// emulator already on `LD_LIBRARY_PATH` as in scripts/gpu-check.sh); `None` skips, unless
/// `TWINKLE_REQUIRE_CUDA_EMU=1` or `TWINKLE_REQUIRE_GPU=1`.
fn cuda_driver() -> Result<Option<Option<PathBuf>>> {
    if let Some(d) = std::env::var_os("TWINKLE_CUDA_EMU").map(PathBuf::from) {
        ensure!(
            d.join("libcuda.so.1").exists(),
            "TWINKLE_CUDA_EMU={} has no libcuda.so.1",
            d.display()
        );
        return Ok(Some(Some(d)));
    }
    if twinkle::engine::cuda::driver_available().is_ok() {
        return Ok(Some(None));
    }
    let required = ["TWINKLE_REQUIRE_CUDA_EMU", "TWINKLE_REQUIRE_GPU"]
        .iter()
        .any(|k| std::env::var(k).as_deref() == Ok("1"));
    ensure!(
        !required,
        "no CUDA driver and no TWINKLE_CUDA_EMU (tools/cuda-emu) to stand in for one"
    );
    eprintln!(
        "SKIP: no CUDA driver (scripts/gpu-check.sh runs this on a GPU or on tools/cuda-emu)"
    );
    Ok(None)
}

fn f(v: &Value, k: &str) -> f64 {
    v[k].as_f64().unwrap_or(f64::NAN)
}

#[test]
fn sdk_minimal_flow_and_acceptance_scripts() -> Result<()> {
    let Some((py, env, serve)) = Env::started(false)? else { return Ok(()) };
    let run = |key: &str, script: &str| {
        run_script(&py, env.port, key, script, &[])
            .with_context(|| format!("serve log:\n{}", serve.log_text()))
    };

    // (a) the minimal flow.
    let a = run("tml-flow", "flow_minimal.py")?;
    assert!(f(&a, "loss_after_step") < f(&a, "first_loss"), "{a}");
    assert!((f(&a, "restored_loss") - f(&a, "loss_after_step")).abs() < 1e-3, "{a}");
    assert_eq!(a["checkpoints"], serde_json::json!(["weights/ckpt-1"]));
    assert_eq!(a["logprobs"][0], Value::Null);
    assert_eq!(a["sample"].as_array().map(Vec::len), Some(4));
    assert_eq!(a["custom"], "ran", "the venv must have torch (scripts/setup-venv.sh)");

    // forward_backward_custom: a client-side weighted loss (torch in the SDK's process) reports
    // the loss of the returned logprobs and steps exactly like the equivalent cross_entropy.
    let cl = run("tml-custom", "custom_loss.py")?;
    assert!((f(&cl, "loss") - f(&cl, "local")).abs() <= 1e-4 * f(&cl, "local").abs().max(1.0));
    assert!(f(&cl, "diff") < 1e-4 && f(&cl, "moved") > 1e-3, "{cl}");
    assert!(cl["metrics"].as_array().is_some_and(|m| m.contains(&"custom_metric:mean".into())));

    // (c) RL losses change the weights.
    let c = run("tml-rl", "rl_losses.py")?;
    for loss in ["importance_sampling", "ppo"] {
        assert_ne!(f(&c[loss], "probe_before"), f(&c[loss], "probe_after"), "{c}");
    }

    // (e) two keys and path traversal.
    let e = run("tml-iso", "isolation.py")?;
    for op in ["list", "get_run", "load", "delete"] {
        assert_eq!(e["refused"][op], "NotFoundError", "{e}");
    }
    for (path, status) in e["traversal"].as_object().context("traversal")? {
        assert_eq!(status.as_u64(), Some(400), "{path}");
    }

    // (f) the hostile-input table of issue #12 (rows: [item, status, detail]): a 4xx with a
    // detail each, a row for every item with an HTTP input, and the server still trains.
    let m = run("tml-bad", "malformed.py")?;
    let table = m["table"].as_object().context("table")?;
    assert!(table.len() >= 30, "{m}");
    let mut items = std::collections::BTreeSet::new();
    for (name, row) in table {
        items.insert(row[0].as_u64().unwrap_or(0));
        let status = row[1].as_u64().unwrap_or(0);
        assert!((400..500).contains(&status), "{name}: {row}");
    }
    assert_eq!(items.into_iter().collect::<Vec<_>>(), [1, 2, 4, 5, 6, 8], "{m}");
    assert!(f(&m, "loss_after") > 0.0);
    assert!(m["overflow"].as_str().is_some_and(|s| s.contains("overflowed")), "{m}");
    drop(serve);
    Ok(())
}

/// Ready means ready (issue 12, item 3): a script run right after `twinkle serve` starts, while
/// the applications are still coming up (every worker waits 3 s before registering), succeeds:
/// the SDK retries the gateway's and the server's 503 + Retry-After instead of failing with 404.
#[test]
fn sdk_script_run_right_after_serve_waits_for_the_model() -> Result<()> {
    let Some(py) = venv_python()? else { return Ok(()) };
    let env = Env::new(false)?;
    let mut serve = env.spawn(&[("TWINKLE_TEST_WORKER_START_DELAY_MS", "3000")])?;
    let r = run_script(&py, env.port, "tml-early", "early_start.py", &[])
        .with_context(|| format!("serve log:\n{}", serve.log_text()))?;
    assert!(r["models"].as_array().is_some_and(|m| m.contains(&MODEL.into())), "{r}");
    assert!(f(&r, "loss") > 0.0, "{r}");
    assert!(f(&r, "waited_s") >= 2.0, "the script started before the deployment was ready: {r}");
    let st = serve.status_json()?;
    serve.remember(&st);
    Ok(())
}

#[test]
fn sdk_memorizes_four_pairs() -> Result<()> {
    let Some((py, env, serve)) = Env::started(false)? else { return Ok(()) };
    let b = run_script(&py, env.port, "tml-memo", "memorize.py", &[])
        .with_context(|| format!("serve log:\n{}", serve.log_text()))?;
    assert!(f(&b, "final_loss") < 0.05 * f(&b, "first_loss"), "{b}");
    // The budget: ~30 steps at lr ~1e-2.
    assert!(f(&b, "steps") <= 35.0 && f(&b, "lr") >= 1e-2, "{b}");
    assert_eq!(b["samples"], memorized_answers());
    Ok(())
}

/// The `sampler` application of `st` (a `twinkle status --json` answer) and the model app.
fn app_address(st: &Value, import_path: &str) -> Result<String> {
    let apps = st["applications"].as_array().context("applications")?;
    let a = apps.iter().find(|a| a["import_path"] == import_path).context("no such app")?;
    Ok(a["address"].as_str().context("address")?.to_string())
}

#[test]
fn sdk_samples_saved_weights_on_the_sampler_application() -> Result<()> {
    let Some(py) = venv_python()? else { return Ok(()) };
    let mut env = Env::new(false)?;
    env.sampler = true;
    let mut serve = env.start()?;
    let st = serve.wait_all_running(Duration::from_secs(60))?;
    let (sampler, model) = (app_address(&st, "sampler")?, app_address(&st, "model")?);
    let internal = [("X-Twinkle-Internal", INTERNAL_TOKEN), ("Content-Type", "application/json")];
    let info = |addr: &str| -> Result<Value> {
        platform_support::http("GET", addr, "/_internal/v1/info", &internal, b"")?.json()
    };
    assert_eq!(info(&sampler)?["adapters"], serde_json::json!([]));

    let r = run_script(&py, env.port, "tml-sampler", "sampler_route.py", &[])
        .with_context(|| format!("serve log:\n{}", serve.log_text()))?;
    // The sampler application loaded the saved checkpoint: it served the samples.
    let path = r["path"].as_str().context("path")?;
    let tail = path.split_once("://").map(|(_, t)| t).context("tinker path")?;
    let cached = info(&sampler)?["adapters"].clone();
    let cached: Vec<&str> =
        cached.as_array().into_iter().flatten().filter_map(Value::as_str).collect();
    assert!(cached.len() == 1 && cached[0].ends_with(tail), "{cached:?} vs {path}");

    // The model application's in-memory adapter samples the same greedy tokens.
    let model_id = r["model_id"].as_str().context("model_id")?;
    for (prompt, tokens) in r["prompts"]
        .as_array()
        .into_iter()
        .flatten()
        .zip(r["tokens"].as_array().into_iter().flatten())
    {
        let body = serde_json::json!({"model_id": model_id, "prompt": prompt, "num_samples": 1,
            "max_tokens": 6, "temperature": 0.0, "stop": []});
        let resp = platform_support::http(
            "POST",
            &model,
            "/_internal/v1/sample",
            &internal,
            &serde_json::to_vec(&body)?,
        )?;
        assert_eq!(resp.status, 200);
        assert_eq!(&resp.json()?["sequences"][0]["tokens"], tokens, "prompt {prompt}");
    }
    Ok(())
}

#[test]
fn sdk_training_resumes_across_restart() -> Result<()> {
    let Some((py, env, mut serve)) = Env::started(true)? else { return Ok(()) };
    let p1 = env.restart_phase(&py, &serve, "tml-restart", "phase1")?;
    serve.stop_ok(Signal::SIGTERM, Duration::from_secs(60))?;
    drop(serve);
    let serve = env.start()?;
    let p2 = env.restart_phase(&py, &serve, "tml-restart", "phase2")?;
    // The durable store knows the first run's session: its restored adapter is no orphan (the
    // start-up pass of `sdk_orphaned_adapters_go_after_a_memory_restart` ran by now).
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(live_snapshots(&env), 2, "{}", serve.log_text());
    assert_eq!(p1["reference"].as_array().map(Vec::len), Some(3));
    for (a, b) in p2["resumed"]
        .as_array()
        .into_iter()
        .flatten()
        .zip(p1["reference"].as_array().into_iter().flatten())
    {
        let (a, b) = (a.as_f64().unwrap_or(f64::NAN), b.as_f64().unwrap_or(f64::NAN));
        assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0), "{p1} vs {p2}");
    }
    Ok(())
}

/// The minimal SDK flow against a model application with `device_type: cuda`: it computes on
/// the CUDA stack (here on the CPU execution layer standing in for the driver and cuBLAS), its
/// info names the card, and the flow trains, saves, restores and samples as on the CPU.
#[test]
fn sdk_flow_on_a_cuda_model_app() -> Result<()> {
    let Some(py) = venv_python()? else { return Ok(()) };
    let Some(driver) = cuda_driver()? else { return Ok(()) };
    let mut env = Env::new(false)?;
    env.cuda = Some(driver);
    let mut serve = env.start()?;
    let st = serve.wait_all_running(Duration::from_secs(60))?;
    let model = app_address(&st, "model")?;
    let internal = [("X-Twinkle-Internal", INTERNAL_TOKEN)];
    let info =
        platform_support::http("GET", &model, "/_internal/v1/info", &internal, b"")?.json()?;
    assert_eq!(info["devices"], serde_json::json!(["cuda:0"]), "{info}");

    let a = run_script(&py, env.port, "tml-cuda", "flow_minimal.py", &[])
        .with_context(|| format!("serve log:\n{}", serve.log_text()))?;
    assert!(f(&a, "loss_after_step") < f(&a, "first_loss"), "{a}");
    assert!((f(&a, "restored_loss") - f(&a, "loss_after_step")).abs() < 1e-3, "{a}");
    assert_eq!(a["checkpoints"], serde_json::json!(["weights/ckpt-1"]));
    assert_eq!(a["sample"].as_array().map(Vec::len), Some(4));
    serve.stop_ok(Signal::SIGTERM, Duration::from_secs(60))?;
    Ok(())
}

/// Crash during training (issue #12, item 2): `crash.py` kills the model application with
/// SIGKILL mid-run; the node agent restarts it, it restores the adapter from its last snapshot,
/// and the same TrainingClient continues at the last completed step (equal to a control client
/// loaded from a save_state taken before the kill).
#[test]
fn sdk_training_client_survives_a_model_app_crash() -> Result<()> {
    let Some((py, env, mut serve)) = Env::started(false)? else { return Ok(()) };
    let st = serve.wait_all_running(Duration::from_secs(60))?;
    let apps = st["applications"].as_array().context("applications")?;
    let model = apps.iter().find(|a| a["import_path"] == "model").context("model app")?;
    let pid = model["pid"].as_u64().context("model pid")?.to_string();
    let live = env.save.path().join("checkpoints/.spill/model/live");
    let (bin, home) = (platform_support::bin(), serve.home.to_string_lossy().into_owned());
    let args = [pid.as_str(), &bin, &home, &live.to_string_lossy()];
    let r = run_script(&py, env.port, "tml-crash", "crash.py", &args)
        .with_context(|| format!("serve log:\n{}", serve.log_text()))?;
    assert!((f(&r, "after") - f(&r, "before")).abs() <= 1e-5 * f(&r, "before").abs().max(1.0));
    assert_eq!(r["continued"].as_array().map(Vec::len), Some(2), "{r}");
    assert!(f(&r, "recovered").is_finite(), "{r}");
    // Both crashes were real: the agent restarted the model child twice.
    let st = serve.wait_all_running(Duration::from_secs(60))?;
    let apps = st["applications"].as_array().context("applications")?;
    let now = apps.iter().find(|a| a["import_path"] == "model").context("model app")?;
    assert!(now["restarts"].as_u64().unwrap_or(2) >= 2, "{st}");
    assert_ne!(now["pid"].as_u64().map(|p| p.to_string()), Some(pid), "{st}");
    Ok(())
}

/// The live adapter snapshots in the model application's spill directory (one directory each).
fn live_snapshots(env: &Env) -> usize {
    let live = env.save.path().join("checkpoints/.spill/model/live");
    std::fs::read_dir(live)
        .map(|d| d.flatten().filter(|e| !e.file_name().to_string_lossy().starts_with('.')).count())
        .unwrap_or(0)
}

/// With `persistence: memory` a full restart forgets every session, so the adapters the model
/// application restores from its snapshots belong to no one: the server unloads them (and their
/// snapshots) once the model application is up, instead of keeping them forever. With a durable
/// store (`sdk_training_resumes_across_restart`) the same restart keeps them.
#[test]
fn sdk_orphaned_adapters_go_after_a_memory_restart() -> Result<()> {
    let Some((py, env, mut serve)) = Env::started(false)? else { return Ok(()) };
    env.restart_phase(&py, &serve, "tml-orphan", "phase1")?;
    // Written in the background right after the step.
    let t0 = Instant::now();
    while live_snapshots(&env) == 0 && t0.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(live_snapshots(&env), 1, "the run's snapshot is on disk");
    serve.stop_ok(Signal::SIGTERM, Duration::from_secs(60))?;
    drop(serve);
    let serve = env.start()?;
    let t0 = Instant::now();
    while live_snapshots(&env) > 0 {
        if t0.elapsed() > Duration::from_secs(60) {
            bail!("the orphaned adapter was kept:\n{}", serve.log_text());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(serve.log_text().contains("unloaded an adapter no session refers to"));
    Ok(())
}
