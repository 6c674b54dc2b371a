//! Shared helpers of the `platform_*` integration tests: start the real `twinkle serve`, talk
//! HTTP/1.1 over loopback, poll with deadlines, and kill everything even when a test fails.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;

mod sdk;
#[allow(unused_imports)] // each test binary uses what it needs
pub use sdk::{memorized_answers, sdk_command, sdk_result};

/// The `twinkle` binary under test: `TWINKLE_BIN` when set (a prebuilt test executable run on
/// another machine, as scripts/gpu-check.sh does), else the one cargo built with the tests.
pub fn bin() -> String {
    std::env::var("TWINKLE_BIN")
        .ok()
        .filter(|b| !b.is_empty())
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_twinkle").to_string())
}

/// The internal token the platform tests pin on serve: it unlocks the details of a child's
/// `/healthz` (pid, cards) and the identity application's `/echo`.
pub const TEST_TOKEN: &str = "platform-test-token";
/// Env for placement tests: serve uses [`TEST_TOKEN`] as its internal token.
#[allow(dead_code)]
pub const PINNED_TOKEN: (&str, &str) = ("TWINKLE_INTERNAL_TOKEN", TEST_TOKEN);
/// The header that carries [`TEST_TOKEN`].
pub const TOKEN_HEADER: &str = "X-Twinkle-Internal";

/// `config` with every application turned into the identity kind (a placement dry run that
/// loads no model; it accepts and ignores every other kind's `args`).
#[allow(dead_code)]
pub fn as_identity(config: &str) -> String {
    config
        .lines()
        .map(|l| match l.split_once("import_path:") {
            Some((indent, _)) => format!("{indent}import_path: identity"),
            None => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

/// A port that was free a moment ago.
pub fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// The top of a test deployment up to `applications:`: `server_type`, the gateway on loopback
/// `port`, and the state in the SQLite file `state_db` (in memory when `None`).
pub fn deployment_head(server_type: &str, port: u16, state_db: Option<&Path>) -> String {
    let persistence = match state_db {
        Some(p) => format!("persistence:\n  mode: file\n  file_path: {}\n", p.display()),
        None => "persistence:\n  mode: memory\n".to_string(),
    };
    format!(
        "server_type: {server_type}\nhttp_options:\n  host: 127.0.0.1\n  port: {port}\n\
         {persistence}applications:\n"
    )
}

/// The server application at `prefix` offering `model`, with the `server_config` entries.
pub fn server_app(prefix: &str, model: &str, server_config: &[(&str, &str)]) -> String {
    let mut out = format!(
        "  - name: server\n    route_prefix: {prefix}\n    import_path: server\n    args:\n      \
         supported_models: [{model}]\n"
    );
    if !server_config.is_empty() {
        out.push_str("      server_config:\n");
        for (k, v) in server_config {
            out.push_str(&format!("        {k}: {v}\n"));
        }
    }
    out
}

/// Application `name` at `prefix` of kind `import_path` on the generated model `model`, one rank
/// on `device` (`cpu` or `cuda`).
pub fn generated_app(
    name: &str,
    prefix: &str,
    import_path: &str,
    model: &str,
    device: &str,
) -> String {
    app_entry(name, prefix, import_path, &format!("generate://{model}"), import_path, device)
}

/// Application `name` at `prefix` of kind `import_path` on `model_id` (any source: `hf://`,
/// `ms://`, one that exists nowhere), one rank on `device`.
pub fn model_app(
    name: &str,
    prefix: &str,
    import_path: &str,
    model_id: &str,
    device: &str,
) -> String {
    app_entry(name, prefix, import_path, model_id, name, device)
}

/// A model application whose model exists nowhere (`ms://Nobody/Missing-Model`), at
/// `/api/v1/model/missing`: it fails to start and must not take the others down.
pub fn broken_app() -> String {
    model_app("broken", "/api/v1/model/missing", "model", "ms://Nobody/Missing-Model", "cpu")
}

/// One `applications:` entry with its `args` open: callers may append more `args` lines
/// (6 spaces) or a `deployments:` block (4 spaces).
fn app_entry(
    name: &str,
    prefix: &str,
    import_path: &str,
    model_id: &str,
    group: &str,
    device: &str,
) -> String {
    format!(
        r#"  - name: {name}
    route_prefix: {prefix}
    import_path: {import_path}
    args:
      model_id: {model_id}
      device_group: {{name: {group}, ranks: 1, device_type: {device}}}
"#
    )
}

/// The shipped Tinker deployment (`config/tinker.yaml`, seed-server.md's example): server +
/// model (2 cards) + sampler (`ranks: 1`, `num_gpus: 1`), every one as the identity kind (see
/// [`as_identity`]), served on loopback `port`, with `TWINKLE_TEST_MARKER=model-env` in the model
/// application's `runtime_env` (the first `env_vars:` of the file).
pub fn tinker_config(port: u16) -> String {
    let shipped = include_str!("../../config/tinker.yaml");
    let edits = [
        ("host: 0.0.0.0", "host: 127.0.0.1".to_string()),
        ("port: 8000", format!("port: {port}")),
        ("env_vars:\n", "env_vars:\n              TWINKLE_TEST_MARKER: model-env\n".to_string()),
    ];
    let text = edits.iter().fold(shipped.to_string(), |text, (from, to)| {
        assert!(text.contains(from), "config/tinker.yaml no longer has `{from}`");
        text.replacen(from, to, 1)
    });
    as_identity(&text)
}

/// A running `twinkle serve`; dropping it SIGKILLs serve and every child pid it learned of.
pub struct Serve {
    pub child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub home: PathBuf,
    pub gateway: String,
    pub log: PathBuf,
    pub known_pids: Vec<u32>,
}

impl Serve {
    /// Writes `config` into a temp dir and starts `twinkle serve` with its own TWINKLE_HOME.
    pub fn start(
        config: &str,
        gateway_port: u16,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let cfg = dir.path().join("server_config.yaml");
        std::fs::write(&cfg, config)?;
        let home = dir.path().join("home");
        let log = dir.path().join("serve.log");
        let logf = std::fs::File::create(&log)?;
        let mut cmd = Command::new(bin());
        cmd.arg("serve").arg("-c").arg(&cfg).args(args);
        cmd.env("TWINKLE_HOME", &home).env_remove("CUDA_VISIBLE_DEVICES");
        // Tests talk to loopback only: a hub id that no cache holds fails instead of reaching
        // for the internet (a test with a mock hub overrides this in `env`).
        cmd.env("TWINKLE_OFFLINE", "1");
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.stdin(Stdio::null()).stdout(logf.try_clone()?).stderr(logf);
        cmd.process_group(0);
        let child = cmd.spawn().context("spawn twinkle serve")?;
        Ok(Self {
            child: Some(child),
            dir,
            home,
            gateway: format!("127.0.0.1:{gateway_port}"),
            log,
            known_pids: Vec::new(),
        })
    }

    /// A CPU-only serve (no cards, four CPU slots) of `config` for a free port, with `env` set.
    pub fn start_cpu(config: impl FnOnce(u16) -> String, env: &[(&str, &str)]) -> Result<Self> {
        let port = free_port()?;
        Self::start(&config(port), port, &["--num-gpus", "0", "--num-cpus", "4"], env)
    }

    /// [`tinker_config`] on a free port with [`PINNED_TOKEN`] and `env` set.
    pub fn tinker(args: &[&str], env: &[(&str, &str)]) -> Result<Self> {
        let port = free_port()?;
        let env: Vec<_> = std::iter::once(PINNED_TOKEN).chain(env.iter().copied()).collect();
        Self::start(&tinker_config(port), port, args, &env)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `twinkle status --json` against this serve.
    pub fn status_json(&self) -> Result<serde_json::Value> {
        let out = Command::new(bin())
            .args(["status", "--json"])
            .env("TWINKLE_HOME", &self.home)
            .output()?;
        if !out.status.success() {
            bail!("status failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// Plain `twinkle status` text.
    pub fn status_text(&self) -> Result<String> {
        let out = Command::new(bin()).arg("status").env("TWINKLE_HOME", &self.home).output()?;
        if !out.status.success() {
            bail!("status failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8(out.stdout)?)
    }

    /// Polls status until every application is `running`; returns that status.
    pub fn wait_all_running(&mut self, timeout: Duration) -> Result<serde_json::Value> {
        let st = poll(timeout, || {
            let st = self.status_json().ok()?;
            let apps = st["applications"].as_array()?;
            apps.iter().all(|a| a["state"] == "running").then_some(st)
        })
        .with_context(|| {
            format!("applications not all running; serve log:\n{}", self.log_text())
        })?;
        self.remember(&st);
        Ok(st)
    }

    /// Records every child pid of a status answer for cleanup.
    pub fn remember(&mut self, st: &serde_json::Value) {
        for a in st["applications"].as_array().into_iter().flatten() {
            if let Some(p) = a["pid"].as_u64() {
                self.known_pids.push(p as u32);
            }
        }
    }

    /// Sends `sig` to serve and waits for it to exit.
    pub fn stop(&mut self, sig: Signal, timeout: Duration) -> Result<ExitStatus> {
        let pid = Pid::from_raw(self.pid() as i32);
        kill(pid, sig)?;
        let child = self.child.as_mut().ok_or_else(|| anyhow!("already stopped"))?;
        let start = Instant::now();
        loop {
            if let Some(st) = child.try_wait()? {
                self.child = None;
                return Ok(st);
            }
            if start.elapsed() > timeout {
                bail!("serve did not exit within {timeout:?} after {sig}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// [`stop`](Self::stop) that must end in exit code 0 (the serve log in the failure).
    pub fn stop_ok(&mut self, sig: Signal, timeout: Duration) -> Result<()> {
        let code = self.stop(sig, timeout)?;
        ensure!(code.code() == Some(0), "serve exited with {code}; log:\n{}", self.log_text());
        Ok(())
    }

    /// [`stop_ok`](Self::stop_ok), then neither serve nor a child pid it was seen with (see
    /// [`remember`](Self::remember)) may exist, nor their process groups.
    pub fn stop_all_gone(&mut self, sig: Signal, timeout: Duration) -> Result<()> {
        let (serve_pid, pids) = (self.pid(), self.known_pids.clone());
        self.stop_ok(sig, timeout)?;
        ensure!(!pid_exists(serve_pid), "serve pid {serve_pid} still exists");
        // Children die with serve; a reparented zombie is reaped by init shortly after, so poll.
        poll(Duration::from_secs(10), || {
            pids.iter().all(|p| !pid_exists(*p) && !group_exists(*p)).then_some(())
        })
        .with_context(|| format!("some of {pids:?} outlived serve"))
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = killpg(Pid::from_raw(c.id() as i32), Signal::SIGKILL);
            let _ = c.kill();
            let _ = c.wait();
        }
        for p in &self.known_pids {
            let _ = killpg(Pid::from_raw(*p as i32), Signal::SIGKILL);
            let _ = kill(Pid::from_raw(*p as i32), Signal::SIGKILL);
        }
    }
}

/// Runs `cmd` (a `twinkle` command of the cluster tests) with its state in `home`, short node
/// timeouts, the pinned internal token (placement and routing only: every child is the identity
/// application), no inherited cards or cluster settings, then `env`.
/// `twinkle start --head` arguments of the cluster tests' head machine: 4 cards, 8 CPUs, the
/// control port `port` and the gateway on `gateway`; callers append what is particular to them.
pub fn head_start_args<'a>(port: &'a str, gateway: &'a str) -> Vec<&'a str> {
    vec![
        "start",
        "--head",
        "--port",
        port,
        "--num-gpus",
        "4",
        "--num-cpus",
        "8",
        "--gateway-port",
        gateway,
    ]
}

pub fn run_cluster(mut cmd: Command, home: &Path, env: &[(&str, &str)]) -> Result<Output> {
    cmd.env("TWINKLE_HOME", home)
        .env("TWINKLE_NODE_TIMEOUT_S", "3")
        .env("TWINKLE_HEARTBEAT_S", "0.5")
        .env("TWINKLE_STOP_GRACE_S", "2")
        .env("TWINKLE_INTERNAL_TOKEN", TEST_TOKEN)
        .env("TWINKLE_OFFLINE", "1")
        .env_remove("CUDA_VISIBLE_DEVICES")
        .env_remove("TWINKLE_CLUSTER_TOKEN")
        .env_remove("TWINKLE_ADDRESS");
    for (k, v) in env {
        cmd.env(k, v);
    }
    Ok(cmd.output()?)
}

/// The stdout of a command that must have succeeded; else an error naming `what` with its exit
/// status and output.
pub fn stdout_ok(what: &str, out: Output) -> Result<String> {
    ensure!(
        out.status.success(),
        "{what} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Calls `f` every 50 ms until it returns Some or `timeout` passes.
pub fn poll<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Result<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if start.elapsed() > timeout {
            bail!("condition not met within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A process with this pid exists (a zombie counts: it has not been reaped).
pub fn pid_exists(pid: u32) -> bool {
    kill(Pid::from_raw(pid as i32), None).is_ok()
}

/// A process with this pid exists and is not a zombie (for processes we are not the parent of,
/// whose reaping is up to whoever PID 1 is in this container).
pub fn pid_running(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state letter follows the parenthesised command name.
        Ok(stat) => {
            stat.rsplit_once(')').is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z'))
        }
        Err(_) => false,
    }
}

/// The environment of a running process, from /proc.
pub fn environ(pid: u32) -> Result<Vec<(String, String)>> {
    let raw = std::fs::read(format!("/proc/{pid}/environ"))?;
    Ok(raw
        .split(|b| *b == 0)
        .filter_map(|kv| {
            let s = String::from_utf8_lossy(kv);
            s.split_once('=').map(|(k, v)| (k.to_string(), v.to_string()))
        })
        .collect())
}

pub fn group_exists(pgid: u32) -> bool {
    killpg(Pid::from_raw(pgid as i32), None).is_ok()
}

#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Result<serde_json::Value> {
        serde_json::from_slice(&self.body)
            .with_context(|| format!("not JSON: {}", String::from_utf8_lossy(&self.body)))
    }
}

fn decode_chunked(mut data: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let pos = data.windows(2).position(|w| w == b"\r\n").ok_or_else(|| anyhow!("bad chunk"))?;
        let size_txt = std::str::from_utf8(&data[..pos])?;
        let size = usize::from_str_radix(size_txt.split(';').next().unwrap_or("").trim(), 16)?;
        data = &data[pos + 2..];
        if size == 0 {
            return Ok(out);
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

/// One HTTP/1.1 request with `Connection: close`, read to the end.
pub fn http(
    method: &str,
    addr: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<Resp> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    let chunked_upload = headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("transfer-encoding"));
    if !chunked_upload && (!body.is_empty() || method == "POST") {
        req.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())?;
    s.write_all(body)?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let end =
        raw.windows(4).position(|w| w == b"\r\n\r\n").ok_or_else(|| anyhow!("no header end"))?;
    let head = std::str::from_utf8(&raw[..end])?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let status: u16 = status_line.split(' ').nth(1).unwrap_or("").parse()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| {
            l.split_once(':').map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        })
        .collect();
    let rest = &raw[end + 4..];
    let chunked = headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    let body = if chunked { decode_chunked(rest)? } else { rest.to_vec() };
    Ok(Resp { status, headers, body })
}

/// GET with the test token, so a child's `/healthz` answers with its details.
pub fn get(addr: &str, path: &str) -> Result<Resp> {
    http("GET", addr, path, &[(TOKEN_HEADER, TEST_TOKEN)], &[])
}

/// GET as an outsider (no token).
#[allow(dead_code)]
pub fn get_bare(addr: &str, path: &str) -> Result<Resp> {
    http("GET", addr, path, &[], &[])
}

pub fn path_of(p: &Path) -> String {
    p.display().to_string()
}

/// The venv python with `tinker` importable (`TWINKLE_VENV`, else `~/.cache/twinkle/venv`), or
/// None (the SDK tests print SKIP and pass) unless `TWINKLE_REQUIRE_SDK=1`.
pub fn venv_python() -> Result<Option<PathBuf>> {
    let venv = std::env::var_os("TWINKLE_VENV")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/twinkle/venv")));
    let py = venv.map(|v| v.join("bin/python"));
    let ok = py.as_ref().is_some_and(|p| {
        Command::new(p).args(["-c", "import tinker"]).output().is_ok_and(|o| o.status.success())
    });
    if ok {
        return Ok(py);
    }
    if std::env::var("TWINKLE_REQUIRE_SDK").as_deref() == Ok("1") {
        bail!("the tinker SDK venv is missing (run scripts/setup-venv.sh)");
    }
    eprintln!("SKIP: no venv with the tinker SDK (run scripts/setup-venv.sh)");
    Ok(None)
}

/// Waits until the gateway on `port` answers the server's capabilities with `model` listed.
pub fn wait_gateway(port: u16, model: &str, serve: &Serve) -> Result<()> {
    let start = Instant::now();
    loop {
        let r = http(
            "GET",
            &format!("127.0.0.1:{port}"),
            "/api/v1/get_server_capabilities",
            &[("X-API-Key", "tml-probe")],
            b"",
        );
        if let Ok(r) = r
            && r.status == 200
            && String::from_utf8_lossy(&r.body).contains(model)
        {
            return Ok(());
        }
        if start.elapsed() > Duration::from_secs(60) {
            bail!("server never listed {model}; log:\n{}", serve.log_text());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
