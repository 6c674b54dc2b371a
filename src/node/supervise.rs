//! One supervisor actor per application child: spawn, wait for registration, probe health,
//! restart with exponential backoff, and stop (SIGTERM to the process group, grace period,
//! SIGKILL).
//!
//! [`SupervisorActor`] owns its child's lifecycle: the child process itself lives inside the
//! actor's one running future ([`supervise`]); its state (pid, token, `starting` /
//! `running` / ...) is reported to the registry actor, which owns it. Others talk to the
//! supervisor only through [`Stop`].

use std::ffi::OsString;
use std::os::unix::process::CommandExt as _;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use actix::{
    Actor, ActorContext as _, ActorFutureExt as _, Addr, AsyncContext as _, Context, Handler,
    Message, ResponseFuture, WrapFuture as _,
};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::process::Child;
use tokio::sync::watch;

use crate::contract::{STARTUP_ERROR_EXIT, STARTUP_ERROR_FILE_ENV};
use crate::gateway::{Lookup, Upstream};
use crate::head::registry::AppState;
use crate::head::registry_actor::{
    ChildExited, ChildStarted, IsRegistered, RegistryActor, SetState, SpawnFailed, StartupFailed,
};

type Registry = Addr<RegistryActor>;

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
    reg: &Registry,
    shutdown: &mut watch::Receiver<bool>,
    policy: &RestartPolicy,
) -> Outcome {
    // A child that downloads its model reports progress; each report moves the deadline, so
    // a large download is waited for while a silent child is still restarted.
    let mut register_by = tokio::time::Instant::now() + policy.register_deadline;
    let mut reports = 0u64;
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
                // A registry that is gone means shutdown is under way: keep waiting for it.
                let now = reg.send(IsRegistered(app.to_string())).await.unwrap_or_default();
                registered = now.registered;
                if now.reports > reports {
                    reports = now.reports;
                    register_by = tokio::time::Instant::now() + policy.register_deadline;
                }
                if !registered && tokio::time::Instant::now() >= register_by {
                    return Outcome::NotRegistered;
                }
                if registered {
                    health.reset();
                }
            }
            _ = health.tick(), if registered => {
                let up = reg.send(Lookup(app.to_string())).await;
                let Ok(Upstream::At(addr)) = up else { continue };
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
/// Must run on the serve process's main runtime thread (see the PDEATHSIG note above): the
/// [`SupervisorActor`] started there runs it.
pub async fn supervise(
    spec: ChildSpec,
    reg: Registry,
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
                let why = format!("spawn failed: {e}");
                let n = reg.send(SpawnFailed { app: app.clone(), why }).await.unwrap_or(0);
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
        // Awaited: the registry must know the token before the child can register with it.
        let _ = reg.send(ChildStarted { app: app.clone(), pid, token }).await;
        tracing::info!(%app, pid, "child started");
        let how = match watch_child(&mut child, &app, &reg, &mut shutdown, &policy).await {
            Outcome::Shutdown => {
                reg.do_send(SetState { app: app.clone(), state: AppState::Stopping });
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
                    let why = why.trim().to_string();
                    reg.do_send(StartupFailed { app: app.clone(), why: why.clone() });
                    tracing::error!(%app, pid, reason = %why, "application cannot start; not restarted");
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
        let n = reg.send(ChildExited { app: app.clone(), how: how.clone() }).await.unwrap_or(0);
        tracing::warn!(%app, pid, %how, restarts = n, ?delay, "child ended; restarting");
        if sleep_or_shutdown(delay, &mut shutdown).await {
            break;
        }
    }
    reg.do_send(SetState { app, state: AppState::Stopped });
}

/// Supervises one application child; see the module docs. Stops itself once the child is
/// stopped for good.
pub struct SupervisorActor {
    /// Taken when the supervising future starts.
    start: Option<(ChildSpec, Registry, RestartPolicy)>,
    /// Turned true by [`Stop`]; the supervising future watches it.
    stop: watch::Sender<bool>,
    /// Turns true once the child is stopped and reaped.
    done: watch::Sender<bool>,
}

impl SupervisorActor {
    /// Starts supervising `spec` on the current arbiter, which must be the main thread's (the
    /// children's parent-death signal is tied to the thread that forks them).
    pub fn spawn(spec: ChildSpec, reg: Registry, policy: RestartPolicy) -> Addr<Self> {
        Self {
            start: Some((spec, reg, policy)),
            stop: watch::channel(false).0,
            done: watch::channel(false).0,
        }
        .start()
    }
}

impl Actor for SupervisorActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        let Some((spec, reg, policy)) = self.start.take() else { return };
        let run = supervise(spec, reg, self.stop.subscribe(), policy);
        ctx.spawn(run.into_actor(self).map(|(), act, ctx| {
            act.done.send_replace(true);
            ctx.stop();
        }));
    }
}

/// Stop the child (SIGTERM, grace, SIGKILL) and do not restart it; answered once it is reaped.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Stop;

impl Handler<Stop> for SupervisorActor {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, _: Stop, _: &mut Context<Self>) -> Self::Result {
        self.stop.send_replace(true);
        let mut done = self.done.subscribe();
        Box::pin(async move {
            // An error means the actor is gone, which happens only after the child is reaped.
            let _ = done.wait_for(|d| *d).await;
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::head::registry::{AppStatus, Registry};
    use crate::head::registry_actor::Snapshot;

    fn sh(script: &str) -> ChildSpec {
        ChildSpec {
            app: "m".into(),
            exe: "/bin/sh".into(),
            args: vec!["-c".into(), script.into()],
            env: vec![],
        }
    }

    fn registry() -> Registry {
        let status = AppStatus::new("m", "model", "/m", "node-0", vec![], 0.1);
        Registry::new("twinkle".into(), None, vec![], vec![status])
    }

    fn quick() -> RestartPolicy {
        RestartPolicy {
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_millis(200),
            stop_grace: Duration::from_secs(2),
            ..RestartPolicy::default()
        }
    }

    /// Polls the registry until `done` holds for application `m` (at most 10 s).
    async fn wait_until(reg: &Addr<RegistryActor>, done: impl Fn(&AppStatus) -> bool) -> AppStatus {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let snap = reg.send(Snapshot).await.expect("registry alive");
            let app = snap.applications[0].clone();
            if done(&app) || Instant::now() > deadline {
                return app;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[test]
    fn exiting_child_is_restarted_with_backoff_and_stop_ends_it() {
        actix::System::new().block_on(async {
            let reg = RegistryActor::spawn(registry());
            let started = Instant::now();
            let sup = SupervisorActor::spawn(sh("exit 3"), reg.clone(), quick());
            let app = wait_until(&reg, |a| a.restarts >= 4).await;
            assert!(app.restarts >= 4, "{app:?}");
            assert_eq!(app.last_exit.as_deref(), Some("exit code 3"));
            // The fourth exit comes after waiting 50, 100 and 200 ms (doubling, capped).
            assert!(started.elapsed() >= Duration::from_millis(350), "{:?}", started.elapsed());
            sup.send(Stop).await.expect("supervisor alive");
            let app = wait_until(&reg, |a| a.state == AppState::Stopped).await;
            assert_eq!(app.state, AppState::Stopped);
            assert_eq!(app.pid, None);
        });
    }

    #[test]
    fn stop_terminates_a_running_child_and_reaps_it() {
        actix::System::new().block_on(async {
            let reg = RegistryActor::spawn(registry());
            let sup = SupervisorActor::spawn(sh("sleep 30"), reg.clone(), quick());
            let app = wait_until(&reg, |a| a.pid.is_some()).await;
            let pid = app.pid.expect("child started");
            assert_eq!(app.state, AppState::Starting);
            let t = Instant::now();
            sup.send(Stop).await.expect("supervisor alive");
            assert!(t.elapsed() < Duration::from_secs(2), "SIGTERM ends sleep at once");
            let gone = nix::sys::signal::kill(Pid::from_raw(pid as i32), None).is_err();
            assert!(gone, "child {pid} still exists");
            let app = wait_until(&reg, |a| a.state == AppState::Stopped).await;
            assert_eq!((app.state, app.restarts), (AppState::Stopped, 0));
        });
    }

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
