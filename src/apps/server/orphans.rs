//! Adapters that no session refers to any more are unloaded from the model applications (and
//! their durable snapshots with them).
//!
//! A model application restores every adapter it snapshotted when it starts again. With
//! `persistence: memory`, a restart of the whole server (or of the server application alone)
//! forgets every session and run, so those restored adapters could never be reached by any
//! client, yet they would hold memory, be spilled and re-snapshotted, and stay on disk forever.
//! A Tinker model id is `{session}:train:{n}`, and a session is recorded before any of its models
//! is created, so "its session is unknown" is a race-free test for an orphan (a run being created
//! right now has its session already). Twinkle-native adapters are the Twinkle layer's own
//! (`apps::model::twinkle::journal`) and are not touched here.
//!
//! With more than one server application in the cluster, another server may own the session:
//! nothing is unloaded then.

use std::time::Duration;

use super::Shared;
use crate::protocol::tinker::paths::parse_model_id;

/// How often the start-up pass looks for the model applications, and for how long.
const START_POLL: Duration = Duration::from_secs(2);
const START_LIMIT: Duration = Duration::from_secs(600);

/// One pass over every running model application; returns how many adapters were unloaded.
pub async fn sweep(app: &Shared) -> usize {
    let ups = app.disp.up.all().await;
    if app.disp.up.server_count() > 1 {
        return 0;
    }
    let mut unloaded = 0;
    for up in ups.iter().filter(|u| u.kind == "model") {
        let Ok(info) = app.disp.up.info_at(&up.address).await else { continue };
        for id in info.adapters {
            let Ok(scoped) = parse_model_id(&id) else { continue };
            let session = scoped.session_id.clone();
            match app.disp.db(move |s| s.session_exists(&session)).await {
                Ok(false) => {}
                _ => continue,
            }
            match app.disp.up.unload_at(&up.address, &id).await {
                Ok(()) => {
                    tracing::info!(model_id = %id, app = %up.app, "unloaded an adapter no session refers to");
                    unloaded += 1;
                }
                Err(e) => {
                    tracing::warn!(model_id = %id, error = %e, "cannot unload an orphaned adapter")
                }
            }
        }
    }
    unloaded
}

/// The pass right after start-up: waits until the model applications are running (a restart of
/// everything starts them beside this one), then sweeps once. Later passes ride on the
/// housekeeping sweep.
pub async fn at_start(app: Shared) {
    let t0 = std::time::Instant::now();
    while t0.elapsed() < START_LIMIT {
        let ready =
            app.disp.up.refresh().await.is_ok_and(|ups| ups.iter().any(|u| u.kind == "model"))
                && !app.disp.up.is_pending("model");
        if ready {
            sweep(&app).await;
            return;
        }
        actix_web::rt::time::sleep(START_POLL).await;
    }
}
