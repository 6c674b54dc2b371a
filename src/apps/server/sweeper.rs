//! Housekeeping of the server application, so state stays bounded on a long-running server:
//!
//! * finished futures (complete or failed) are deleted once they are older than the retention
//!   period (`TWINKLE_FUTURE_RETENTION_S`, default `server_config.expiration_timeout`, 1 day):
//!   a client polls its result within seconds, and a later poll gets 410 (retryable), not 404;
//! * checkpoints whose `ttl_seconds` has run out are deleted, record and files, exactly as
//!   `DELETE .../checkpoints/...` would;
//! * the weight snapshots of `save_weights_and_get_sampling_client` live as long as their
//!   session: [`remove_snapshots`] runs when the session finishes, and the sweep removes those
//!   of sessions that finished or went silent (no heartbeat for `expiration_timeout`: a client
//!   that crashed never finishes), and orphans no sampling session claims (a memory store lost
//!   them in a restart) once they are older than the retention period.
//!
//! The sweep runs every `server_config.cleanup_interval` seconds, capped at
//! [`MAX_INTERVAL`] so a short TTL is not overrun by an hour.

use std::path::Path;
use std::time::Duration;

use super::{ServerApp, Shared};
use crate::protocol::tinker::paths::{TinkerPath, checkpoint_dir};
use crate::state::{StateError, Store};

/// Longest pause between two sweeps, whatever `cleanup_interval` says.
pub const MAX_INTERVAL: Duration = Duration::from_secs(60);
/// Env var overriding how long finished futures are kept (seconds).
pub const FUTURE_RETENTION_ENV: &str = "TWINKLE_FUTURE_RETENTION_S";
/// Default retention of finished futures.
pub const DEFAULT_FUTURE_RETENTION: Duration = Duration::from_secs(86_400);

/// How often to sweep and how long finished futures stay.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Housekeeping {
    pub interval: Duration,
    pub future_retention: Duration,
    /// A session without a heartbeat for this long is over (its snapshots go).
    pub session_timeout: Duration,
}

impl Default for Housekeeping {
    fn default() -> Self {
        Housekeeping {
            interval: MAX_INTERVAL,
            future_retention: DEFAULT_FUTURE_RETENTION,
            session_timeout: DEFAULT_FUTURE_RETENTION,
        }
    }
}

impl Housekeeping {
    /// From `server_config` (`cleanup_interval`, `expiration_timeout`) and the env override.
    pub fn from_config(cleanup_interval: Option<f64>, expiration_timeout: Option<f64>) -> Self {
        let secs = |s: f64| (s.is_finite() && s > 0.0).then(|| Duration::from_secs_f64(s));
        let env = std::env::var(FUTURE_RETENTION_ENV).ok().and_then(|v| v.trim().parse().ok());
        Housekeeping {
            interval: cleanup_interval.and_then(secs).unwrap_or(MAX_INTERVAL).min(MAX_INTERVAL),
            future_retention: env
                .and_then(secs)
                .or_else(|| expiration_timeout.and_then(secs))
                .unwrap_or(DEFAULT_FUTURE_RETENTION),
            session_timeout: expiration_timeout.and_then(secs).unwrap_or(DEFAULT_FUTURE_RETENTION),
        }
    }
}

/// What one sweep removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Swept {
    pub futures: usize,
    pub checkpoints: usize,
    pub snapshots: usize,
}

/// One sweep at the store's current time. Files are removed best-effort: the records are the
/// truth, and a leftover directory is an orphan, not a bad state.
pub fn sweep_once(app: &ServerApp, store: &Store) -> Result<Swept, StateError> {
    let now = store.now();
    let retention_ms =
        i64::try_from(app.housekeeping.future_retention.as_millis()).unwrap_or(i64::MAX);
    let futures = store.delete_finished_futures_before(now.saturating_sub(retention_ms))?;
    let mut checkpoints = 0;
    for rec in store.expired_checkpoints(now)? {
        match store.delete_checkpoint(&rec.owner, &rec.run_id, &rec.checkpoint_id) {
            Ok(_) => checkpoints += 1,
            // Deleted by its owner in between: nothing left to do.
            Err(StateError::NotFound { .. }) => continue,
            Err(e) => return Err(e),
        }
        let dir = TinkerPath::parse(&rec.tinker_path)
            .ok()
            .and_then(|tp| checkpoint_dir(&app.save_root, &rec.owner, &tp).ok());
        if let Some(dir) = dir {
            remove_best_effort(&dir);
        }
        tracing::info!(path = %rec.tinker_path, "checkpoint expired (ttl_seconds) and was deleted");
    }
    let snapshots = sweep_snapshots(app, store, now);
    Ok(Swept { futures, checkpoints, snapshots })
}

/// Removes `{save_root}/{owner}/ephemeral/{sampling id}` snapshots whose session is over. Driven
/// by the directories, so the cost follows the snapshots that exist, not the history.
fn sweep_snapshots(app: &ServerApp, store: &Store, now: i64) -> usize {
    let ms = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
    let silent_before = now.saturating_sub(ms(app.housekeeping.session_timeout));
    let orphan_grace = app.housekeeping.future_retention;
    let mut removed = 0;
    let Ok(owners) = std::fs::read_dir(&app.save_root) else {
        return 0;
    };
    for owner_dir in owners.flatten() {
        let owner = owner_dir.file_name().to_string_lossy().into_owned();
        let Ok(snaps) = std::fs::read_dir(owner_dir.path().join("ephemeral")) else {
            continue;
        };
        for snap in snaps.flatten() {
            let sid = snap.file_name().to_string_lossy().into_owned();
            let over = match store.get_sampling_session(&owner, &sid) {
                Ok(s) => match store.get_session(&owner, &s.session_id) {
                    Ok(sess) => sess.finished_at.is_some() || sess.last_heartbeat < silent_before,
                    Err(_) => true,
                },
                // No sampling session claims it (yet: the row is written after the snapshot),
                // so only an old one is an orphan.
                Err(_) => snap
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age > orphan_grace),
            };
            if over {
                remove_best_effort(&snap.path());
                removed += 1;
            }
        }
    }
    removed
}

/// Deletes the weight snapshots of `session_id`'s sampling sessions (each in
/// `{save_root}/{owner}/ephemeral/{sampling_id}`).
pub fn remove_snapshots(app: &ServerApp, store: &Store, owner: &str, session_id: &str) {
    match store.list_sampling_session_ids(owner, session_id) {
        Ok(ids) => {
            for id in ids {
                remove_best_effort(&super::handlers::ephemeral_dir(app, owner, &id));
            }
        }
        Err(e) => tracing::warn!(session = %session_id, error = %e, "cannot list snapshots"),
    }
}

fn remove_best_effort(dir: &Path) {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(dir = %dir.display(), error = %e, "cannot remove files"),
    }
}

/// Sweeps forever every `housekeeping.interval` (spawned beside the HTTP server).
pub async fn run(app: Shared) {
    actix_web::rt::spawn(super::orphans::at_start(app.clone()));
    let mut tick = tokio::time::interval(app.housekeeping.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let a = app.clone();
        let swept = app.disp.db(move |s| sweep_once(&a, s)).await;
        match swept {
            Ok(s) if s != Swept::default() => {
                let (f, c, n) = (s.futures, s.checkpoints, s.snapshots);
                tracing::info!(futures = f, checkpoints = c, snapshots = n, "swept");
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "housekeeping sweep failed"),
        }
        super::orphans::sweep(&app).await;
    }
}
