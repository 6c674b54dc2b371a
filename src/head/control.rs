//! The head's loopback control plane: children register here, `twinkle status` reads here.
//!
//! `GET /v1/status` lists pids, ports and cards, so it needs the serve's internal token in
//! `x-twinkle-token` (`twinkle status` reads it from `$TWINKLE_HOME/serve.json`, children have
//! it in their environment); `/healthz` is bare liveness, and `/v1/register` and `/v1/progress`
//! (a child downloading its model) check the child token in their body. The status adds
//! `queues`: each running child's queue depth, read from its `/metrics`.

use std::net::{SocketAddr, TcpListener};

use actix_web::dev::Server;
use actix_web::{App, HttpResponse, HttpServer, web};
use serde_json::json;

use super::HeadError;
use super::cluster::TOKEN_HEADER;
use super::registry::{ProgressRequest, RegisterError, RegisterRequest};
use super::registry_actor::{Progress, Register, RegistryActor, Snapshot};

type Registry = actix::Addr<RegistryActor>;

/// Routes of the control plane, answered by the registry actor.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/v1/register", web::post().to(register))
        .route("/v1/progress", web::post().to(progress))
        .route("/v1/status", web::get().to(status))
        .route("/healthz", web::get().to(healthz));
}

async fn register(reg: web::Data<Registry>, body: web::Json<RegisterRequest>) -> HttpResponse {
    let body = body.into_inner();
    let Ok(result) = reg.send(Register(body.clone())).await else {
        return shutting_down();
    };
    match result {
        Ok(address) => {
            tracing::info!(app = %body.app, pid = body.pid, %address, "child registered");
            HttpResponse::Ok().json(json!({"ok": true, "address": address}))
        }
        Err(e) => {
            tracing::warn!(app = %body.app, pid = body.pid, error = %e, "registration refused");
            refused(e)
        }
    }
}

/// A child that downloads its model before it can listen reports how far it is.
async fn progress(reg: web::Data<Registry>, body: web::Json<ProgressRequest>) -> HttpResponse {
    let body = body.into_inner();
    match reg.send(Progress(body)).await {
        Ok(Ok(())) => HttpResponse::Ok().json(json!({"ok": true})),
        Ok(Err(e)) => refused(e),
        Err(_) => shutting_down(),
    }
}

/// A report from something that is not the application's current child.
fn refused(e: RegisterError) -> HttpResponse {
    let detail = e.to_string();
    match e {
        RegisterError::UnknownApp(_) => HttpResponse::NotFound(),
        RegisterError::BadToken(_) => HttpResponse::Forbidden(),
        RegisterError::StalePid { .. } => HttpResponse::Conflict(),
    }
    .json(json!({"detail": detail}))
}

/// The token `/v1/status` requires.
#[derive(Clone)]
pub struct StatusToken(pub std::sync::Arc<str>);

async fn status(
    req: actix_web::HttpRequest,
    reg: web::Data<Registry>,
    token: web::Data<StatusToken>,
) -> HttpResponse {
    let got = req.headers().get(TOKEN_HEADER).and_then(|v| v.to_str().ok()).unwrap_or("");
    // An empty configured token is refused too: status must never be open by accident.
    if token.0.is_empty()
        || !super::cluster_http::constant_time_eq(got.as_bytes(), token.0.as_bytes())
    {
        return HttpResponse::Unauthorized().json(json!({
            "detail": format!("wrong or missing {TOKEN_HEADER}: `twinkle status` reads the token \
                               from $TWINKLE_HOME/serve.json")
        }));
    }
    let report = match reg.send(Snapshot).await {
        Ok(report) => report,
        Err(_) => return shutting_down(),
    };
    HttpResponse::Ok().json(super::status_cli::StatusView::with_queues(report).await)
}

/// The registry actor is gone: only while the process shuts down.
fn shutting_down() -> HttpResponse {
    HttpResponse::ServiceUnavailable().json(json!({"detail": "the head is shutting down"}))
}

async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "ok"}))
}

/// Binds the control plane on `127.0.0.1:port` (0 = ephemeral), `/v1/status` behind `token`, and returns the server (to be
/// awaited or stopped through its handle) and the bound address. Signals are left to the caller.
pub fn start(reg: Registry, port: u16, token: String) -> Result<(Server, SocketAddr), HeadError> {
    let data = web::Data::new(reg);
    let token = web::Data::new(StatusToken(token.into()));
    serve_http(&format!("127.0.0.1:{port}"), 1, move |cfg| {
        cfg.app_data(data.clone()).app_data(token.clone());
        routes(cfg);
    })
}

/// Binds `addr` and serves the app that `configure` builds on `workers` threads: the head's
/// servers share this so each binds, names a bind failure and leaves signals and slow
/// shutdowns to its caller the same way.
pub(crate) fn serve_http(
    addr: &str,
    workers: usize,
    configure: impl Fn(&mut web::ServiceConfig) + Clone + Send + 'static,
) -> Result<(Server, SocketAddr), HeadError> {
    let bind_err = |source| HeadError::Bind { addr: addr.to_string(), source };
    let listener = TcpListener::bind(addr).map_err(bind_err)?;
    let local = listener.local_addr().map_err(bind_err)?;
    let server = HttpServer::new(move || App::new().configure(configure.clone()))
        .workers(workers)
        .disable_signals()
        .shutdown_timeout(1)
        .listen(listener)
        .map_err(bind_err)?
        .run();
    Ok((server, local))
}
