//! The cluster head's control port: node registration and heartbeats, deployments, status.
//!
//! Routes (all but `/healthz` need the cluster token in `x-twinkle-token` and protocol
//! [`PROTOCOL_VERSION`] in `x-twinkle-protocol`; a wrong token is 401, another version 426,
//! both with a JSON `detail` that says what to fix):
//! * `POST /v1/cluster/nodes` — [`NodeRegistration`] → `{"node_id","heartbeat_s","timeout_s"}`
//! * `POST /v1/cluster/nodes/{id}/heartbeat` — [`Heartbeat`] → [`DesiredState`]; 404 when the
//!   head does not know the node (it restarted, or declared the node dead): register again.
//! * `POST /v1/cluster/deploy` — [`DeployRequest`] → `{"deployment"}`; 400/409 with the reason.
//! * `GET /v1/status` — the same [`super::StatusReport`] as single-machine serve.
//! * `GET /healthz` — liveness, no token.

use std::net::SocketAddr;

use actix_web::dev::{Payload, Server};
use actix_web::error::InternalError;
use actix_web::http::StatusCode;
use actix_web::{FromRequest, HttpRequest, HttpResponse, web};
use futures_util::future::LocalBoxFuture;
use serde::de::DeserializeOwned;
use serde_json::json;

use super::HeadError;
use super::cluster::{
    ClusterError, DeployRequest, Heartbeat, NodeRegistration, PROTOCOL_VERSION, TOKEN_HEADER,
    VERSION_HEADER,
};
use super::cluster_actor::{ClusterActor, ClusterStatus, Deploy, NodeHeartbeat, RegisterNode};

/// Where the control port's handlers send their questions.
pub type HeadAddr = actix::Addr<ClusterActor>;

struct Ctx {
    head: HeadAddr,
    token: String,
    /// Where the deployment is persisted for a head restart.
    state_dir: std::path::PathBuf,
}

fn refuse(status: StatusCode, detail: String) -> HttpResponse {
    HttpResponse::build(status).json(json!({"detail": detail}))
}

/// Checks the version first (an old peer may not even send a token) and then the token.
/// `Some(refusal)` when the request may not proceed.
fn authorize(req: &HttpRequest, ctx: &Ctx, body_version: u32) -> Option<HttpResponse> {
    let header_version =
        req.headers().get(VERSION_HEADER).and_then(|v| v.to_str().ok()?.trim().parse().ok());
    let version = header_version.unwrap_or(body_version);
    if version != PROTOCOL_VERSION || body_version != PROTOCOL_VERSION {
        return Some(refuse(
            StatusCode::UPGRADE_REQUIRED,
            format!(
                "protocol version mismatch: this head speaks twinkle cluster protocol \
                 {PROTOCOL_VERSION}, the request uses {version}; run the same twinkle version \
                 on every node"
            ),
        ));
    }
    if !token_matches(req, ctx) {
        return Some(refuse(
            StatusCode::UNAUTHORIZED,
            "wrong or missing cluster token: pass the token printed by `twinkle start --head` \
             with --token or TWINKLE_CLUSTER_TOKEN"
                .to_string(),
        ));
    }
    None
}

/// Whether the request carries the cluster token.
fn token_matches(req: &HttpRequest, ctx: &Ctx) -> bool {
    let token = req.headers().get(TOKEN_HEADER).and_then(|v| v.to_str().ok()).unwrap_or("");
    !token.is_empty() && constant_time_eq(token.as_bytes(), ctx.token.as_bytes())
}

/// A body that states the protocol version its sender speaks.
trait Versioned {
    fn protocol(&self) -> u32;
}

macro_rules! versioned {
    ($($t:ty),*) => {$(
        impl Versioned for $t {
            fn protocol(&self) -> u32 {
                self.protocol
            }
        }
    )*};
}
versioned!(NodeRegistration, Heartbeat, DeployRequest);

/// A JSON body whose request passed [`authorize`], with the handlers' context: the extractor
/// answers the refusal itself, so no handler can forget the check.
struct Authorized<T> {
    body: T,
    ctx: web::Data<Ctx>,
}

impl<T: DeserializeOwned + Versioned + 'static> FromRequest for Authorized<T> {
    type Error = actix_web::Error;
    type Future = LocalBoxFuture<'static, Result<Self, Self::Error>>;

    fn from_request(req: &HttpRequest, payload: &mut Payload) -> Self::Future {
        let json = web::Json::<T>::from_request(req, payload);
        let req = req.clone();
        Box::pin(async move {
            let body = json.await?.into_inner();
            let Some(ctx) = req.app_data::<web::Data<Ctx>>().cloned() else {
                return Err(actix_web::error::ErrorInternalServerError("no control context"));
            };
            match authorize(&req, &ctx, body.protocol()) {
                Some(refusal) => {
                    tracing::warn!(path = %req.path(), "cluster request refused");
                    Err(InternalError::from_response("refused", refusal).into())
                }
                None => Ok(Authorized { body, ctx }),
            }
        })
    }
}

/// Token comparison whose time does not depend on where the first difference is.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn register(Authorized { body, ctx }: Authorized<NodeRegistration>) -> HttpResponse {
    let node = body.node.clone();
    let Ok((id, timeout)) = ctx.head.send(RegisterNode(body)).await else {
        return shutting_down();
    };
    let timeout = timeout.as_secs_f64();
    tracing::info!(node = %id, gpus = ?node.gpu_ids, cpus = %node.cpus, "node registered");
    HttpResponse::Ok().json(json!({"node_id": id, "heartbeat_s": 1.0, "timeout_s": timeout}))
}

async fn heartbeat(
    path: web::Path<String>,
    Authorized { body, ctx }: Authorized<Heartbeat>,
) -> HttpResponse {
    let hb = NodeHeartbeat { node: path.into_inner(), heartbeat: body };
    match ctx.head.send(hb).await {
        Ok(Ok(desired)) => HttpResponse::Ok().json(desired),
        Ok(Err(e)) => refuse(StatusCode::NOT_FOUND, e.to_string()),
        Err(_) => shutting_down(),
    }
}

async fn deploy(Authorized { body, ctx }: Authorized<DeployRequest>) -> HttpResponse {
    let Ok(result) = ctx.head.send(Deploy(body)).await else {
        return shutting_down();
    };
    if let Ok((_, Some(rec))) = &result
        && let Err(e) = super::cluster_record::write_deployment(&ctx.state_dir, rec)
    {
        tracing::warn!(error = %e, "cannot persist the deployment; a restarted head loses it");
    }
    match result {
        Ok((version, _)) => {
            tracing::info!(deployment = version, "deployment accepted");
            HttpResponse::Ok().json(json!({"deployment": version}))
        }
        Err(e @ ClusterError::Infeasible(_)) => refuse(StatusCode::CONFLICT, e.to_string()),
        Err(e) => refuse(StatusCode::BAD_REQUEST, e.to_string()),
    }
}

async fn status(req: HttpRequest, ctx: web::Data<Ctx>) -> HttpResponse {
    // Status lists every node's address and every child's pid: the cluster token is required
    // (`twinkle status` sends the one recorded by `twinkle start`/`join`).
    if !token_matches(&req, &ctx) {
        return refuse(StatusCode::UNAUTHORIZED, "wrong or missing cluster token".to_string());
    }
    match ctx.head.send(ClusterStatus).await {
        Ok(report) => {
            HttpResponse::Ok().json(super::status_cli::StatusView::with_queues(report).await)
        }
        Err(_) => shutting_down(),
    }
}

/// The cluster actor is gone: only while the head shuts down.
fn shutting_down() -> HttpResponse {
    refuse(StatusCode::SERVICE_UNAVAILABLE, "the head is shutting down".to_string())
}

async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "ok", "protocol": PROTOCOL_VERSION}))
}

/// Binds the control port on `host:port` and builds its server (not yet awaited).
pub fn start(
    head: HeadAddr,
    token: String,
    state_dir: std::path::PathBuf,
    host: &str,
    port: u16,
) -> Result<(Server, SocketAddr), HeadError> {
    let data = web::Data::new(Ctx { head, token, state_dir });
    let json_cfg = web::JsonConfig::default().limit(16 << 20);
    super::control::serve_http(&format!("{host}:{port}"), 2, move |cfg| {
        cfg.app_data(data.clone())
            .app_data(json_cfg.clone())
            .route("/v1/cluster/nodes", web::post().to(register))
            .route("/v1/cluster/nodes/{id}/heartbeat", web::post().to(heartbeat))
            .route("/v1/cluster/deploy", web::post().to(deploy))
            .route("/v1/status", web::get().to(status))
            .route("/healthz", web::get().to(healthz));
    })
}
