//! The identity application: what every child serves until its real application exists.
//!
//! Routes (under the application's `route_prefix`, and `/healthz` also at the root):
//! * `GET {prefix}/healthz` → `{"status":"ok","app","pid","cuda_visible_devices","import_path",
//!   "route_prefix","server_type"}`: which process answered and which cards it was given.
//! * `POST {prefix}/echo` → the request body, byte for byte, with its content type: a
//!   diagnostic route for checking that the gateway passes bodies through unchanged.

use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse, web};
use serde_json::json;

use super::AppContext;
use crate::gateway::normalize_prefix;

/// Largest body `/echo` accepts.
const ECHO_LIMIT: usize = 64 << 20;

/// Who this child is, as `/healthz` reports it.
#[derive(Debug, Clone)]
pub struct Identity {
    pub app: String,
    pub import_path: String,
    pub route_prefix: String,
    pub server_type: String,
    pub cuda_visible_devices: Option<String>,
}

impl Identity {
    pub fn from_context(ctx: &AppContext) -> Self {
        let prefix = normalize_prefix(&ctx.opts.app, &ctx.opts.route_prefix)
            .unwrap_or_else(|_| "/".to_string());
        Self {
            app: ctx.opts.app.clone(),
            import_path: ctx.opts.import_path.as_str().to_string(),
            route_prefix: prefix,
            server_type: match ctx.opts.server_type {
                crate::config::ServerType::Twinkle => "twinkle".to_string(),
                crate::config::ServerType::Tinker => "tinker".to_string(),
            },
            cuda_visible_devices: std::env::var("CUDA_VISIBLE_DEVICES").ok(),
        }
    }
}

async fn healthz(id: web::Data<Identity>) -> HttpResponse {
    HttpResponse::Ok().json(json!({
        "status": "ok",
        "app": id.app,
        "pid": std::process::id(),
        "cuda_visible_devices": id.cuda_visible_devices,
        "import_path": id.import_path,
        "route_prefix": id.route_prefix,
        "server_type": id.server_type,
    }))
}

async fn echo(req: HttpRequest, body: web::Bytes) -> HttpResponse {
    let mut resp = HttpResponse::Ok();
    if let Some(ct) = req.headers().get(header::CONTENT_TYPE) {
        resp.insert_header((header::CONTENT_TYPE, ct.clone()));
    }
    resp.body(body)
}

/// Registers the identity routes for `id`.
pub fn routes(cfg: &mut web::ServiceConfig, id: Identity) {
    let scope = if id.route_prefix == "/" { String::new() } else { id.route_prefix.clone() };
    cfg.app_data(web::Data::new(id.clone())).app_data(web::PayloadConfig::new(ECHO_LIMIT));
    cfg.route(&format!("{scope}/healthz"), web::get().to(healthz))
        .route(&format!("{scope}/echo"), web::post().to(echo));
    if !scope.is_empty() {
        cfg.route("/healthz", web::get().to(healthz));
    }
}
