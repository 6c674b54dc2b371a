//! Running the Python scripts of `tests/sdk` (the real tinker SDK) against a test deployment.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, ensure};
use serde_json::Value;

/// `py tests/sdk/<script>` aimed at the gateway on loopback `port` as API key `key` for
/// `model`, with no telemetry and no proxy; it runs in the scripts' directory (found from the
/// working directory when the test executable runs on another machine, as
/// scripts/gpu-check.sh does). Callers add arguments, more environment, or their own stdio.
pub fn sdk_command(py: &Path, script: &str, port: u16, key: &str, model: &str) -> Result<Command> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sdk");
    let dir = if dir.is_dir() { dir } else { std::env::current_dir()?.join("tests/sdk") };
    let mut cmd = Command::new(py);
    cmd.args(["-W", "ignore"])
        .arg(dir.join(script))
        .current_dir(&dir)
        .env("TWINKLE_BASE_URL", format!("http://127.0.0.1:{port}"))
        .env("TINKER_API_KEY", key)
        .env("TWINKLE_MODEL", model)
        .env("TINKER_TELEMETRY", "0")
        .env("NO_PROXY", "127.0.0.1,localhost")
        .env("no_proxy", "127.0.0.1,localhost");
    Ok(cmd)
}

/// Runs `cmd` (an [`sdk_command`] for `script`) to the end and returns the JSON of its
/// `RESULT ` line; a failure shows its output and then `more()` (e.g. the serve log).
pub fn sdk_result(script: &str, cmd: &mut Command, more: impl FnOnce() -> String) -> Result<Value> {
    let out = cmd.output().with_context(|| format!("run {script}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.success(),
        "{script} failed ({}):\n{stdout}\n{stderr}\n{}",
        out.status,
        more()
    );
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("RESULT "))
        .with_context(|| format!("{script} printed no RESULT:\n{stdout}\n{stderr}"))?;
    Ok(serde_json::from_str(line)?)
}

/// The answers of the four prompt/answer pairs the SDK training scripts teach (tests/sdk/
/// memorize.py, tests/twinkle/gen2_sft.py): what a converged run samples greedily.
pub fn memorized_answers() -> Value {
    serde_json::json!([
        [2000, 2001, 2002],
        [2100, 2101, 2102],
        [2200, 2201, 2202],
        [2300, 2301, 2302]
    ])
}
