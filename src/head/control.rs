//! The head's loopback control plane: children register here, `twinkle status` reads here.

use std::net::{SocketAddr, TcpListener};

use actix_web::dev::Server;
use actix_web::{App, HttpResponse, HttpServer, web};
use serde_json::json;

use super::HeadError;
use super::registry::{self, RegisterError, RegisterRequest, SharedRegistry};

/// Routes of the control plane, on top of a shared registry.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/v1/register", web::post().to(register))
        .route("/v1/status", web::get().to(status))
        .route("/healthz", web::get().to(healthz));
}

async fn register(
    reg: web::Data<SharedRegistry>,
    body: web::Json<RegisterRequest>,
) -> HttpResponse {
    let result = registry::write(&reg).register(&body);
    match result {
        Ok(address) => {
            tracing::info!(app = %body.app, pid = body.pid, %address, "child registered");
            HttpResponse::Ok().json(json!({"ok": true, "address": address}))
        }
        Err(e) => {
            tracing::warn!(app = %body.app, pid = body.pid, error = %e, "registration refused");
            let detail = e.to_string();
            match e {
                RegisterError::UnknownApp(_) => HttpResponse::NotFound(),
                RegisterError::BadToken(_) => HttpResponse::Forbidden(),
                RegisterError::StalePid { .. } => HttpResponse::Conflict(),
            }
            .json(json!({"detail": detail}))
        }
    }
}

async fn status(reg: web::Data<SharedRegistry>) -> HttpResponse {
    let report = registry::read(&reg).snapshot();
    HttpResponse::Ok().json(report)
}

async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "ok"}))
}

/// Binds the control plane on `127.0.0.1:port` (0 = ephemeral) and returns the server (to be
/// awaited or stopped through its handle) and the bound address. Signals are left to the caller.
pub fn start(reg: SharedRegistry, port: u16) -> Result<(Server, SocketAddr), HeadError> {
    let addr = format!("127.0.0.1:{port}");
    let bind_err = |source| HeadError::Bind { addr: addr.clone(), source };
    let listener = TcpListener::bind(&addr).map_err(bind_err)?;
    let local = listener.local_addr().map_err(bind_err)?;
    let data = web::Data::new(reg);
    let server = HttpServer::new(move || App::new().app_data(data.clone()).configure(routes))
        .workers(1)
        .disable_signals()
        .shutdown_timeout(1)
        .listen(listener)
        .map_err(bind_err)?
        .run();
    Ok((server, local))
}
