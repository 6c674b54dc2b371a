//! One supervisor task per application child: spawn, wait for registration, restart with
//! exponential backoff, and stop (SIGTERM to the process group, grace period, SIGKILL).

use std::ffi::OsString;
use std::os::unix::process::CommandExt as _;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::process::Child;
use tokio::sync::watch;

use crate::contract::{STARTUP_ERROR_EXIT, STARTUP_ERROR_FILE_ENV};
use crate::head::registry::{self, AppState, SharedRegistry};

/// Restart, health and stop timing. Defaults: 0.5 s doubling to 10 s, reset after 30 s up, 60 s
/// to register, `/healthz` every 10 s with a 10 s timeout (3 misses = hung), 10 s stop grace.
/// The stop grace, register deadline and health probing come from [`crate::timings`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RestartPolicy {
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// A child that stayed up this long restarts after `initial_backoff` again.
    pub reset_after: Duration,
    /// A child that has not registered by then is killed and restarted.
    pub register_deadline: Duration,
    pub stop_grace: Duration,
    /// How often a registered child's `/healthz` is probed, and how long a probe may take.
    pub health_period: Duration,
    pub health_timeout: Duration,
    /// Consecutive failed probes after which a (hung) child is killed and restarted.
    pub health_failures: u32,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        Self {
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(10),
            reset_after: Duration::from_secs(30),
            register_deadline: Duration::from_secs(60),
            stop_grace: Duration::from_secs(10),
            health_period: Duration::from_secs(10),
            health_timeout: Duration::from_secs(10),
            health_failures: 3,
        }
    }
}

impl RestartPolicy {
    /// The defaults with the stop grace, register deadline and health probing of `t`.
    pub fn from_timings(t: &crate::timings::Timings) -> Self {
        Self {
            stop_grace: t.stop_grace,
            register_deadline: t.register_deadline,
            health_period: t.health_period,
            health_timeout: t.health_timeout,
            ..Self::default()
        }
    }

    /// Delay before the next start, given the current backoff and how long the child was up;
    /// returns `(delay, next backoff)`.
    pub fn next_delay(&self, backoff: Duration, uptime: Duration) -> (Duration, Duration) {
        let delay = if uptime >= self.reset_after { self.initial_backoff } else { backoff };
        (delay, (delay * 2).min(self.max_backoff))
    }
}

/// How to start one application's child.
#[derive(Debug, Clone)]
pub struct ChildSpec {
    pub app: String,
    pub exe: PathBuf,
    pub args: Vec<OsString>,
    /// Set on top of the inherited environment, in order (later wins).
    pub env: Vec<(String, String)>,
}

impl ChildSpec {
    fn command(&self, token: &str) -> tokio::process::Command {
        let mut cmd = std::process::Command::new(&self.exe);
        cmd.args(&self.args);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd.env(crate::contract::WORKER_TOKEN_ENV, token);
        cmd.stdin(std::process::Stdio::null());
        cmd.process_group(0);
        let parent = std::process::id();
        // SAFETY: runs in the forked child before exec; it only calls prctl and getppid, both
        // async-signal-safe, and builds an io::Error from a raw errno (no allocation).
        unsafe {
            cmd.pre_exec(move || {
                // The signal fires when the *thread* that forked exits; spawns happen on the
                // serve process's main runtime thread, which lives until serve exits.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                // The parent may have died between fork and prctl: then nobody would kill us.
                if libc::getppid() as u32 != parent {
                    return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
                }
                Ok(())
            });
        }
        let mut cmd = tokio::process::Command::from(cmd);
        cmd.kill_on_drop(false);
        cmd
    }
}

fn describe(status: &ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt as _;
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(s)) => format!("signal {s}"),
        (None, None) => "unknown exit".to_string(),
    }
}

fn signal_group(pid: Option<u32>, sig: Signal) {
    if let Some(raw) = pid.and_then(|p| i32::try_from(p).ok()) {
        // ESRCH (group already gone) is the expected outcome after a clean exit.
        let _ = killpg(Pid::from_raw(raw), sig);
    }
}

/// SIGTERM to the child's group, wait up to `grace`, then SIGKILL; always reaps the child and
/// finally SIGKILLs the group so no grandchild survives.
async fn stop_child(child: &mut Child, pid: Option<u32>, grace: Duration) -> String {
    signal_group(pid, Signal::SIGTERM);
    let how = match tokio::time::timeout(grace, child.wait()).await {
        Ok(Ok(st)) => describe(&st),
        Ok(Err(e)) => format!("wait failed: {e}"),
        Err(_) => {
            signal_group(pid, Signal::SIGKILL);
            match child.wait().await {
                Ok(st) => format!("killed after {grace:?} grace ({})", describe(&st)),
                Err(e) => format!("wait failed: {e}"),
            }
        }
    };
    signal_group(pid, Signal::SIGKILL);
    how
}

enum Outcome {
    /// How it ended, and whether it was a permanent startup error.
    Exited(String, bool),
    NotRegistered,
    Unhealthy(u32),
    Shutdown,
}

/// One liveness probe: `GET http://{addr}/healthz` answered 2xx within `timeout`.
async fn probe(client: &awc::Client, addr: &str, timeout: Duration) -> bool {
    let req = client.get(format!("http://{addr}/healthz")).timeout(timeout).send();
    matches!(req.await, Ok(r) if r.status().is_success())
}

/// Resolves when shutdown is requested (or the sender is gone, which means the same).
async fn shutdown_requested(rx: &mut watch::Receiver<bool>) {
    loop {
        if *rx.borrow_and_update() {
            return;
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

async fn watch_child(
    child: &mut Child,
    app: &str,
    reg: &SharedRegistry,
    shutdown: &mut watch::Receiver<bool>,
    policy: &RestartPolicy,
) -> Outcome {
    let register_by = tokio::time::Instant::now() + policy.register_deadline;
    let mut poll = tokio::time::interval(Duration::from_millis(100));
    let mut registered = false;
    let mut health = tokio::time::interval(policy.health_period);
    health.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let client = awc::Client::default();
    let mut misses = 0u32;
    loop {
        tokio::select! {
            st = child.wait() => {
                return match st {
                    Ok(st) => {
                        let startup = st.code() == Some(i32::from(STARTUP_ERROR_EXIT));
                        Outcome::Exited(describe(&st), startup)
                    }
                    Err(e) => Outcome::Exited(format!("wait failed: {e}"), false),
                };
            }
            _ = shutdown_requested(shutdown) => return Outcome::Shutdown,
            _ = poll.tick(), if !registered => {
                registered = registry::read(reg).is_registered(app);
                if !registered && tokio::time::Instant::now() >= register_by {
                    return Outcome::NotRegistered;
                }
                if registered {
                    health.reset();
                }
            }
            _ = health.tick(), if registered => {
                let addr = registry::read(reg).upstream(app).ok();
                let Some(addr) = addr else { continue };
                if probe(&client, &addr, policy.health_timeout).await {
                    misses = 0;
                } else {
                    misses += 1;
                    tracing::warn!(%app, misses, "health check failed");
                    if misses >= policy.health_failures {
                        return Outcome::Unhealthy(misses);
                    }
                }
            }
        }
    }
}

/// Waits `d` unless shutdown comes first; true when shutting down.
async fn sleep_or_shutdown(d: Duration, shutdown: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => false,
        _ = shutdown_requested(shutdown) => true,
    }
}

/// Runs one application's child until shutdown: start, watch, restart with backoff, stop.
/// Must be spawned on the serve process's main runtime thread (see the PDEATHSIG note above).
pub async fn supervise(
    spec: ChildSpec,
    reg: SharedRegistry,
    mut shutdown: watch::Receiver<bool>,
    policy: RestartPolicy,
) {
    let app = spec.app.clone();
    let mut backoff = policy.initial_backoff;
    loop {
        if *shutdown.borrow() {
            break;
        }
        let token = crate::ids::token();
        let started = Instant::now();
        let error_file = std::env::temp_dir().join(format!(
            "twinkle-startup-{}-{}",
            std::process::id(),
            &token[..16.min(token.len())]
        ));
        let mut cmd = spec.command(&token);
        cmd.env(STARTUP_ERROR_FILE_ENV, &error_file);
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                let n = registry::write(&reg).spawn_failed(&app, format!("spawn failed: {e}"));
                let (delay, next) = policy.next_delay(backoff, Duration::ZERO);
                backoff = next;
                tracing::error!(%app, error = %e, restarts = n, ?delay, "cannot start child");
                if sleep_or_shutdown(delay, &mut shutdown).await {
                    break;
                }
                continue;
            }
        };
        let pid = child.id();
        registry::write(&reg).child_started(&app, pid, token);
        tracing::info!(%app, pid, "child started");
        let how = match watch_child(&mut child, &app, &reg, &mut shutdown, &policy).await {
            Outcome::Shutdown => {
                registry::write(&reg).set_state(&app, AppState::Stopping);
                let how = stop_child(&mut child, pid, policy.stop_grace).await;
                tracing::info!(%app, pid, %how, "child stopped");
                break;
            }
            Outcome::Exited(how, startup) => {
                // Leftovers of the dead child's group (its own subprocesses) go too.
                signal_group(pid, Signal::SIGKILL);
                if startup {
                    // The config can never work (e.g. the model is missing): restarting would
                    // fail the same way, so the application stays `failed` with the reason.
                    let why = std::fs::read_to_string(&error_file)
                        .ok()
                        .filter(|m| !m.trim().is_empty())
                        .unwrap_or_else(|| format!("startup error ({how}); see the log"));
                    let _ = std::fs::remove_file(&error_file);
                    registry::write(&reg).startup_failed(&app, why.trim().to_string());
                    tracing::error!(%app, pid, reason = %why.trim(), "application cannot start; not restarted");
                    shutdown_requested(&mut shutdown).await;
                    return;
                }
                how
            }
            Outcome::Unhealthy(misses) => {
                signal_group(pid, Signal::SIGKILL);
                let _ = child.wait().await;
                format!("failed {misses} health checks in a row")
            }
            Outcome::NotRegistered => {
                signal_group(pid, Signal::SIGKILL);
                let _ = child.wait().await;
                format!("did not register within {:?}", policy.register_deadline)
            }
        };
        let _ = std::fs::remove_file(&error_file);
        let (delay, next) = policy.next_delay(backoff, started.elapsed());
        backoff = next;
        let n = registry::write(&reg).child_exited(&app, how.clone());
        tracing::warn!(%app, pid, %how, restarts = n, ?delay, "child ended; restarting");
        if sleep_or_shutdown(delay, &mut shutdown).await {
            break;
        }
    }
    registry::write(&reg).set_state(&app, AppState::Stopped);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_caps_and_resets() {
        let p = RestartPolicy::default();
        let ms = Duration::from_millis;
        let (d, b) = p.next_delay(p.initial_backoff, ms(100));
        assert_eq!((d, b), (ms(500), ms(1000)));
        let (d, b) = p.next_delay(b, ms(100));
        assert_eq!((d, b), (ms(1000), ms(2000)));
        let (d, b) = p.next_delay(ms(8000), ms(100));
        assert_eq!((d, b), (ms(8000), ms(10_000)));
        let (d, b) = p.next_delay(b, ms(100));
        assert_eq!((d, b), (ms(10_000), ms(10_000)));
        // Up for 30 s: back to the first step.
        let (d, b) = p.next_delay(b, Duration::from_secs(30));
        assert_eq!((d, b), (ms(500), ms(1000)));
    }
}
