//! The unmodified PyPI twinkle clients against the real `twinkle serve` on the twinkle-native
//! protocol: a generated tiny Qwen3 model on CPU, scripts in `tests/twinkle/` that assert and
//! print `RESULT {json}`.
//!
//! - Gen-2, `twinkle-kit==0.5.1` (`TWINKLE_KIT05_PYTHON`): server app at `/api/v1`, model app at
//!   `/api/v1/model/qwen3-tiny`, sampler app at `/api/v1/sampler/qwen3-tiny` (the quickstart
//!   layout; the client appends `/api/v1` and `/twinkle/<op>` itself). One server runs
//!   gen2_sft.py, gen2_grpo.py and gen2_isolation.py in turn.
//! - Gen-1, `twinkle-kit==0.1.3` (`TWINKLE_KIT01_PYTHON`): the seed layout of
//!   config/twinkle-transformers.yaml (`server_type: twinkle`; `/server`, `/models/qwen3-tiny`,
//!   `/samplers/qwen3-tiny`, `/processors`) on CPU; gen1_flow.py with a local .jsonl dataset.
//!
//! The client venvs come from scripts/setup-twinkle-venv.sh (scripts/test.sh exports both
//! variables). Without them the tests print SKIP and pass, unless `TWINKLE_REQUIRE_KIT=1`.

#[path = "platform_support/mod.rs"]
mod platform_support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use platform_support::{
    Serve, deployment_head, free_port, generated_app, memorized_answers, server_app,
};
use serde_json::Value;

const MODEL: &str = "qwen3-tiny";
/// Per-script limit: a wedged flow (say, an iterator that never answers 410) fails the test.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(900);

/// The python of a client venv: `$var`, else the default location of
/// scripts/setup-twinkle-venv.sh; None (skip) when neither imports `twinkle_client`.
fn kit_python(var: &str, dir: &str) -> Result<Option<PathBuf>> {
    let py = std::env::var_os(var).filter(|v| !v.is_empty()).map(PathBuf::from).or_else(|| {
        std::env::var_os("HOME")
            .map(|h| PathBuf::from(h).join(".cache/twinkle").join(dir).join("bin/python"))
    });
    // In a temp dir: importing twinkle.utils creates ./.locks.
    let tmp = tempfile::tempdir()?;
    let ok = py.as_ref().is_some_and(|p| {
        Command::new(p)
            .args(["-c", "import twinkle_client.model, twinkle_client.sampler"])
            .current_dir(tmp.path())
            .env("HF_HUB_OFFLINE", "1")
            .output()
            .is_ok_and(|o| o.status.success())
    });
    if ok {
        return Ok(py);
    }
    let what = format!("no twinkle-kit client venv ({var}; run scripts/setup-twinkle-venv.sh)");
    if std::env::var("TWINKLE_REQUIRE_KIT").as_deref() == Ok("1") {
        bail!("{what}");
    }
    eprintln!("SKIP: {what}");
    Ok(None)
}

fn cpu_app(name: &str, prefix: &str, import_path: &str) -> String {
    generated_app(name, prefix, import_path, MODEL, "cpu")
}

/// Gen-2: the quickstart layout plus a sampler app.
fn gen2_config(port: u16) -> String {
    deployment_head("tinker", port, None)
        + &server_app("/api/v1", MODEL, &[("per_token_model_limit", "16")])
        + &cpu_app("model", &format!("/api/v1/model/{MODEL}"), "model")
        + &cpu_app("sampler", &format!("/api/v1/sampler/{MODEL}"), "sampler")
}

/// Gen-1: config/twinkle-transformers.yaml on CPU with the generated model, plus the sampler
/// app at the path the 0.1.3 client calls (`/samplers/<model>`).
fn gen1_config(port: u16) -> String {
    deployment_head("twinkle", port, None)
        + &server_app("/server", MODEL, &[])
        + &cpu_app(&format!("models-{MODEL}"), &format!("/models/{MODEL}"), "model")
        + &cpu_app(&format!("samplers-{MODEL}"), &format!("/samplers/{MODEL}"), "sampler")
        + r#"  - name: processor
    route_prefix: /processors
    import_path: processor
    args:
      device_group: {name: processor, ranks: 1, device_type: CPU}
"#
}

/// Starts `twinkle serve` with `config`, checkpoints under `save`, and waits until every
/// application runs and `ready_path` answers 200 (with `ready_body` in it).
fn start(
    config: &str,
    port: u16,
    save: &Path,
    ready_path: &str,
    ready_body: &str,
) -> Result<Serve> {
    let save_dir = save.join("checkpoints").to_string_lossy().into_owned();
    let data_dir = save.join("data").to_string_lossy().into_owned();
    let vars = [
        ("TWINKLE_SAVE_DIR", save_dir.as_str()),
        // Where gen1_flow.py's processor dataset lives (a server may restrict local datasets to
        // a data root).
        ("TWINKLE_DATA_DIR", data_dir.as_str()),
    ];
    // Each CPU application takes one CPU of the placement; the Gen-1 layout has three (model,
    // sampler, processor), more than a 2-core CI machine reports.
    let args = ["--log-level", "info", "--num-cpus", "4"];
    let mut serve = Serve::start(config, port, &args, &vars)?;
    serve.wait_all_running(Duration::from_secs(120))?;
    let headers = [
        ("Authorization", "Bearer tml-kit-probe"),
        ("Twinkle-Authorization", "Bearer tml-kit-probe"),
        ("X-Ray-Serve-Request-Id", "20260101_000000-probe000"),
        ("x-request-id", "20260101_000000-probe000"),
    ];
    let t0 = Instant::now();
    loop {
        let r =
            platform_support::http("GET", &format!("127.0.0.1:{port}"), ready_path, &headers, b"");
        if let Ok(r) = &r
            && r.status == 200
            && String::from_utf8_lossy(&r.body).contains(ready_body)
        {
            return Ok(serve);
        }
        if t0.elapsed() > Duration::from_secs(60) {
            let got = r.map(|r| format!("{} {}", r.status, String::from_utf8_lossy(&r.body)));
            bail!("GET {ready_path} never ready ({got:?}); log:\n{}", serve.log_text());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Runs `tests/twinkle/{script}` with `py` and returns its `RESULT` JSON.
fn run_script(py: &Path, port: u16, script: &str, env: &[(&str, &str)]) -> Result<Value> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/twinkle");
    let dir = if dir.is_dir() { dir } else { std::env::current_dir()?.join("tests/twinkle") };
    let work = tempfile::tempdir()?;
    let (out_path, err_path) = (work.path().join("stdout"), work.path().join("stderr"));
    let t0 = Instant::now();
    let mut cmd = Command::new(py);
    cmd.arg("-W")
        .arg("ignore")
        .arg(dir.join(script))
        .current_dir(work.path())
        .env("TWINKLE_BASE_URL", format!("http://127.0.0.1:{port}"))
        .env("TWINKLE_MODEL_ID", MODEL)
        .env("HF_HUB_OFFLINE", "1")
        .env("NO_PROXY", "127.0.0.1,localhost")
        .env("no_proxy", "127.0.0.1,localhost")
        .env_remove("TWINKLE_SERVER_URL")
        .env_remove("TWINKLE_SERVER_TOKEN")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path)?)
        .stderr(std::fs::File::create(&err_path)?);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().with_context(|| format!("run {script} with {}", py.display()))?;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break Some(s);
        }
        if t0.elapsed() > SCRIPT_TIMEOUT {
            child.kill().ok();
            child.wait().ok();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let stdout = std::fs::read_to_string(&out_path).unwrap_or_default();
    let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
    eprintln!("{script}: {:.1}s", t0.elapsed().as_secs_f64());
    for l in stdout.lines().filter(|l| !l.starts_with("RESULT ")) {
        eprintln!("  {l}");
    }
    let Some(status) = status else {
        bail!("{script} timed out after {SCRIPT_TIMEOUT:?}:\n{stdout}\n{stderr}");
    };
    ensure!(status.success(), "{script} failed ({status}):\n{stdout}\n{stderr}");
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("RESULT "))
        .with_context(|| format!("{script} printed no RESULT:\n{stdout}\n{stderr}"))?;
    Ok(serde_json::from_str(line)?)
}

/// The script's failure first, then the tail of the server log with repeated lines folded: CI
/// shows the first and last lines of a long failure, so the cause must not sit in the middle.
fn with_log(e: anyhow::Error, serve: &Serve) -> anyhow::Error {
    let log = serve.log_text();
    let mut lines: Vec<String> = Vec::new();
    let mut repeats = 0usize;
    for l in log.lines() {
        // Timestamps differ; fold lines equal after the first 28 characters.
        let key = |s: &str| s.get(28..).unwrap_or(s).to_string();
        if lines.last().is_some_and(|p| key(p) == key(l)) {
            repeats += 1;
            continue;
        }
        if repeats > 0 {
            lines.push(format!("  (... the line above {repeats} more times)"));
            repeats = 0;
        }
        lines.push(l.to_string());
    }
    if repeats > 0 {
        lines.push(format!("  (... the line above {repeats} more times)"));
    }
    let tail = lines.len().saturating_sub(40);
    anyhow::anyhow!("{e:#}\n--- serve log, last 40 lines ---\n{}", lines[tail..].join("\n"))
}

fn f(v: &Value, k: &str) -> f64 {
    v[k].as_f64().unwrap_or(f64::NAN)
}

#[test]
fn twinkle_kit_051_sft_grpo_isolation() -> Result<()> {
    let Some(py) = kit_python("TWINKLE_KIT05_PYTHON", "kit-0.5.1")? else { return Ok(()) };
    let save = tempfile::tempdir()?;
    let port = free_port()?;
    let serve = start(
        &gen2_config(port),
        port,
        save.path(),
        "/api/v1/twinkle/get_server_capabilities",
        MODEL,
    )?;
    let run = |script: &str, env: &[(&str, &str)]| {
        run_script(&py, port, script, env).map_err(|e| with_log(e, &serve))
    };

    let sft = run("gen2_sft.py", &[("TWINKLE_TOKEN", "tml-kit-sft")])?;
    assert!(f(&sft, "nll") < 0.1 * f(&sft, "first_loss"), "{sft}");
    // Converged (every target the greedy argmax) before the script's cap of 80 steps.
    assert!(f(&sft, "steps") < 80.0, "{sft}");
    assert!((f(&sft, "nll_resumed") - f(&sft, "nll")).abs() < 1e-2, "{sft}");
    assert_eq!(sft["samples"], memorized_answers());

    let grpo = run("gen2_grpo.py", &[("TWINKLE_TOKEN", "tml-kit-grpo")])?;
    assert_eq!(grpo["sequences"], 8, "{grpo}");
    assert!(f(&grpo, "moved") > 0.0, "{grpo}");

    let iso = run(
        "gen2_isolation.py",
        &[("TWINKLE_TOKEN", "tml-kit-iso-a"), ("TWINKLE_SECOND_TOKEN", "tml-kit-iso-b")],
    )?;
    let refused = iso["refused"].as_object().context("refused")?;
    assert!(refused.len() >= 20, "{iso}");
    for (what, status) in refused {
        let s = status.as_u64().unwrap_or(0);
        assert!((400..500).contains(&s), "{what}: {status}");
    }
    // The run of token A is not listed or readable by token B: the server log must not show
    // a 5xx for any of the refusals either.
    let log = serve.log_text();
    assert!(!log.contains("panicked"), "server panicked:\n{log}");
    drop(serve);
    Ok(())
}

#[test]
fn twinkle_kit_013_seed_layout_flow() -> Result<()> {
    let Some(py) = kit_python("TWINKLE_KIT01_PYTHON", "kit-0.1.3")? else { return Ok(()) };
    let save = tempfile::tempdir()?;
    let data_dir = save.path().join("data");
    std::fs::create_dir_all(&data_dir)?;
    let data = data_dir.join("self_cognition.jsonl");
    let rows = [
        ("who are you?", "I am {{NAME}}, a model trained by {{AUTHOR}}."),
        ("What is your name?", "My name is {{NAME}}."),
        ("Who made you?", "I was made by {{AUTHOR}}."),
        ("Introduce yourself.", "I am {{NAME}} from {{AUTHOR}}."),
        ("你是谁？", "我是{{NAME}}，由{{AUTHOR}}训练。"),
        ("Are you ChatGPT?", "No, I am {{NAME}}, built by {{AUTHOR}}."),
        ("what model are you", "{{NAME}}, by {{AUTHOR}}."),
        ("Tell me your name.", "{{NAME}}."),
    ];
    let mut text = String::new();
    for (q, r) in rows {
        text += &serde_json::json!({"query": q, "response": r}).to_string();
        text.push('\n');
    }
    std::fs::write(&data, text)?;
    let port = free_port()?;
    let serve = start(&gen1_config(port), port, save.path(), "/server/healthz", "")?;
    let data = data.to_string_lossy().into_owned();
    let r = run_script(
        &py,
        port,
        "gen1_flow.py",
        &[
            ("TWINKLE_TOKEN", "tml-kit-gen1"),
            ("TWINKLE_MODEL_ID", &format!("generate://{MODEL}")),
            ("TWINKLE_DATA_FILE", &data),
        ],
    )
    .map_err(|e| with_log(e, &serve))?;
    let losses = r["epoch_losses"].as_array().context("epoch_losses")?;
    let (first, last) =
        (losses[0].as_f64().unwrap_or(f64::NAN), losses.last().and_then(Value::as_f64));
    assert!(last.is_some_and(|l| l < first), "{r}");
    assert_eq!(r["rows"], 8);
    assert!(r["path"].as_str().is_some_and(|p| p.ends_with("/weights/gen1-final")), "{r}");
    drop(serve);
    Ok(())
}
