//! Gen-2 gateway sessions and server information: `create_session`, `session_heartbeat`,
//! `healthz`, `get_server_capabilities`, `capacity_info` and `status`.
//!
//! Sessions live in the server's [`Store`](crate::state::Store) next to the Tinker sessions
//! (ids `session_<32hex>`, tag `twinkle`). A session whose last heartbeat is older than
//! `server_config.expiration_timeout` (default 1800 s; the client beats every 10 s) is finished
//! with reason `expired` on its next heartbeat, which answers 404 like an unknown session or one
//! of another owner.
//!
//! Capacity: `max_loras` is the sum of the model applications' configured `max_loras` (default
//! 5 each), `used_loras` the number of adapters they report in a fresh `/_internal/v1/info`, and
//! `free_loras` the difference. In this server `max_loras` bounds the adapters *resident* in
//! memory (the least recently used beyond it are spilled to disk), so `free_loras = 0` means new
//! adapters will evict idle ones, not that they are refused.

use actix_web::{HttpRequest, HttpResponse, web};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::super::Shared;
use super::{caller, parse_body};
use crate::protocol::twinkle::{TwinkleError, TwinkleReply};
use crate::state::{NewSession, StateError};

/// Tag of the sessions created through the Twinkle gateway.
pub const SESSION_TAG: &str = "twinkle";
/// Prefix of Twinkle session ids (the client shows them; the model apps use them as scope).
pub const SESSION_PREFIX: &str = "session_";

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/create_session", web::post().to(create_session))
        .route("/session_heartbeat", web::post().to(session_heartbeat))
        .route("/healthz", web::get().to(healthz))
        .route("/get_server_capabilities", web::get().to(capabilities))
        .route("/capacity_info", web::get().to(capacity_info))
        .route("/status", web::get().to(status));
}

#[derive(Debug, Deserialize)]
struct CreateSession {
    #[serde(default)]
    metadata: Value,
}

#[derive(Debug, Deserialize)]
struct Heartbeat {
    session_id: String,
}

/// `capacity_info` reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capacity {
    pub max_loras: u64,
    pub used_loras: u64,
    pub free_loras: u64,
}

impl Capacity {
    /// Sums `(max_loras, adapters)` of each model application.
    pub fn sum(apps: impl IntoIterator<Item = (u64, u64)>) -> Self {
        let (max, used) = apps.into_iter().fold((0u64, 0u64), |(m, u), (am, au)| (m + am, u + au));
        Capacity { max_loras: max, used_loras: used, free_loras: max.saturating_sub(used) }
    }
}

/// `{metadata}` → `{session_id: "session_<32hex>"}`.
async fn create_session(app: Shared, req: HttpRequest, body: web::Bytes) -> TwinkleReply {
    let who = caller(&app, &req)?;
    let r: CreateSession = parse_body(&body)?;
    let user_metadata = match r.metadata {
        Value::Null => Value::Null,
        Value::Object(m) => Value::Object(m),
        other => json!({ "metadata": other }),
    };
    let id = crate::ids::hex_id(SESSION_PREFIX);
    let rec = NewSession {
        tags: vec![SESSION_TAG.to_string()],
        user_metadata,
        ..NewSession::new(&id, &who.owner)
    };
    app.disp.db(move |s| s.create_session(&rec)).await?;
    Ok(HttpResponse::Ok().json(json!({ "session_id": id })))
}

/// `{session_id}` → `{}`; 404 for an unknown, another owner's, finished or expired session.
async fn session_heartbeat(app: Shared, req: HttpRequest, body: web::Bytes) -> TwinkleReply {
    let who = caller(&app, &req)?;
    let r: Heartbeat = parse_body(&body)?;
    let timeout_ms = i64::try_from(app.twinkle.session_timeout.as_millis()).unwrap_or(i64::MAX);
    let owner = who.owner;
    let id = r.session_id.clone();
    let alive = app
        .disp
        .db(move |s| {
            let rec = match s.get_session(&owner, &id) {
                Ok(r) => r,
                Err(StateError::NotFound { .. }) => return Ok(false),
                Err(e) => return Err(e),
            };
            if rec.finished_at.is_some() {
                return Ok(false);
            }
            if s.now().saturating_sub(rec.last_heartbeat) > timeout_ms {
                s.finish_session(&owner, &id, "expired")?;
                return Ok(false);
            }
            s.heartbeat(&owner, &id)?;
            Ok(true)
        })
        .await?;
    if !alive {
        let shown: String = r.session_id.chars().take(100).collect();
        return Err(TwinkleError::NotFound(format!(
            "unknown session `{shown}` (expired, finished or never created): create a new TwinkleClient"
        )));
    }
    Ok(HttpResponse::Ok().json(json!({})))
}

/// `{status: "ok"}`, with no authentication (load balancers and the client's `health_check`).
pub(super) async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "ok"}))
}

/// The configured `supported_models` plus any served model that is not listed, as
/// `{supported_models: [{model_name}]}`.
async fn capabilities(app: Shared, req: HttpRequest) -> TwinkleReply {
    caller(&app, &req)?;
    let ups = app.disp.up.all().await;
    let mut names: Vec<String> = app.supported_models.clone();
    for u in ups.iter().filter(|u| u.kind == "model") {
        if !names.iter().any(|n| u.info.answers_to(n)) {
            names.push(u.info.public_name().to_string());
        }
    }
    let models: Vec<Value> = names.into_iter().map(|n| json!({ "model_name": n })).collect();
    Ok(HttpResponse::Ok().json(json!({ "supported_models": models })))
}

/// `{max_loras, used_loras, free_loras}` over the running model applications (module docs).
async fn capacity_info(app: Shared, req: HttpRequest) -> TwinkleReply {
    caller(&app, &req)?;
    let ups = match app.disp.up.refresh().await {
        Ok(list) => list,
        Err(_) => app.disp.up.all().await,
    };
    let mut per_app = Vec::new();
    for u in ups.iter().filter(|u| u.kind == "model") {
        let max =
            app.twinkle.max_loras.get(&u.app).copied().unwrap_or(crate::config::DEFAULT_MAX_LORAS);
        let used = match app.disp.up.info_at(&u.address).await {
            Ok(info) => info.adapters.len(),
            Err(e) => {
                tracing::warn!(app = %u.app, error = %e, "capacity: info request failed");
                0
            }
        };
        per_app.push((u64::from(max), used as u64));
    }
    Ok(HttpResponse::Ok().json(Capacity::sum(per_app)))
}

/// `{resources, cleanup}`: the caller's own counts (never other tenants') and the session expiry.
async fn status(app: Shared, req: HttpRequest) -> TwinkleReply {
    let who = caller(&app, &req)?;
    let owner_dir = app.auth.owner_dir(&who);
    let runs = web::block(move || crate::protocol::twinkle::runs::list_runs(&owner_dir))
        .await
        .map_err(|e| TwinkleError::Internal(format!("listing runs: {e}")))??;
    let owner = who.owner;
    let (_, sessions) = app.disp.db(move |s| s.list_session_ids(&owner, 0, 0)).await?;
    let ups = app.disp.up.all().await;
    let count = |kind: &str| ups.iter().filter(|u| u.kind == kind).count();
    Ok(HttpResponse::Ok().json(json!({
        "resources": {
            "sessions": sessions,
            "training_runs": runs.len(),
            "model_apps": count("model"),
            "sampler_apps": count("sampler"),
        },
        "cleanup": {
            "running": false,
            "expiration_timeout": app.twinkle.session_timeout.as_secs_f64(),
        },
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacity_sums_and_saturates() {
        assert_eq!(Capacity::sum([]), Capacity { max_loras: 0, used_loras: 0, free_loras: 0 });
        assert_eq!(
            Capacity::sum([(5, 2), (5, 7)]),
            Capacity { max_loras: 10, used_loras: 9, free_loras: 1 }
        );
        assert_eq!(Capacity::sum([(2, 3)]).free_loras, 0);
    }
}
