//! Identity routes that every child serves, and the `identity` application kind.
//!
//! Routes (under the application's `route_prefix`, and `/healthz` also at the root):
//! * `GET {prefix}/healthz` → `{"status":"ok"}`: bare liveness, for anyone. With the serve's
//!   internal token in `X-Twinkle-Internal` it adds who answered — `app`, `pid`,
//!   `cuda_visible_devices`, `import_path`, `route_prefix`, `server_type` — which only the
//!   operator may learn (pids and card ids help an attacker more than a user).
//!
//! `import_path: identity` is an application that serves nothing else, plus, with the same
//! token, `POST {prefix}/echo` (the body back, byte for byte, always as
//! `application/octet-stream` so it can never be rendered as a page): a placement dry run that
//! loads no model, which the platform tests use to check scheduling and the gateway's body
//! streaming. It is harmless in a production config (no data, nothing open without the token),
//! so it is not refused; the product applications never serve `/echo`.

use std::sync::Arc;

use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse, web};
use serde_json::json;

use super::AppContext;
use crate::gateway::normalize_prefix;
use crate::protocol::internal::TOKEN_HEADER;

/// Largest body `/echo` accepts.
const ECHO_LIMIT: usize = 64 << 20;

/// Who this child is, as `/healthz` reports it to the holder of the internal token.
#[derive(Debug, Clone)]
pub struct Identity {
    pub app: String,
    pub import_path: String,
    pub route_prefix: String,
    pub server_type: String,
    pub cuda_visible_devices: Option<String>,
    /// The serve's internal token; empty means the details are never shown.
    pub token: Arc<str>,
}

impl Identity {
    pub fn from_context(ctx: &AppContext) -> Self {
        let prefix = normalize_prefix(&ctx.opts.app, &ctx.opts.route_prefix)
            .unwrap_or_else(|_| "/".to_string());
        let token = std::env::var(crate::contract::INTERNAL_TOKEN_ENV).unwrap_or_default();
        Self {
            app: ctx.opts.app.clone(),
            import_path: ctx.opts.import_path.as_str().to_string(),
            route_prefix: prefix,
            server_type: match ctx.opts.server_type {
                crate::config::ServerType::Twinkle => "twinkle".to_string(),
                crate::config::ServerType::Tinker => "tinker".to_string(),
            },
            cuda_visible_devices: std::env::var("CUDA_VISIBLE_DEVICES").ok(),
            token: token.into(),
        }
    }

    /// Whether `req` carries the internal token (compared in constant time).
    fn authorized(&self, req: &HttpRequest) -> bool {
        let got = req.headers().get(TOKEN_HEADER).and_then(|v| v.to_str().ok()).unwrap_or("");
        !self.token.is_empty()
            && crate::head::cluster_http::constant_time_eq(got.as_bytes(), self.token.as_bytes())
    }
}

async fn healthz(req: HttpRequest, id: web::Data<Identity>) -> HttpResponse {
    if !id.authorized(&req) {
        return HttpResponse::Ok().json(json!({"status": "ok"}));
    }
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

async fn echo(req: HttpRequest, id: web::Data<Identity>, body: web::Bytes) -> HttpResponse {
    if !id.authorized(&req) {
        return HttpResponse::Forbidden()
            .json(json!({"detail": format!("missing or wrong {TOKEN_HEADER} header")}));
    }
    HttpResponse::Ok().insert_header((header::CONTENT_TYPE, "application/octet-stream")).body(body)
}

fn scope_of(id: &Identity) -> String {
    if id.route_prefix == "/" { String::new() } else { id.route_prefix.clone() }
}

/// Registers the identity routes (`/healthz`) of every application for `id`.
pub fn routes(cfg: &mut web::ServiceConfig, id: Identity) {
    let scope = scope_of(&id);
    cfg.app_data(web::Data::new(id));
    cfg.route(&format!("{scope}/healthz"), web::get().to(healthz));
    if !scope.is_empty() {
        cfg.route("/healthz", web::get().to(healthz));
    }
}

/// The whole `import_path: identity` application: [`routes`] plus the token-gated `/echo`.
pub fn identity_app(cfg: &mut web::ServiceConfig, id: Identity) {
    let echo_path = format!("{}/echo", scope_of(&id));
    routes(cfg, id);
    cfg.service(
        web::resource(echo_path)
            .app_data(web::PayloadConfig::new(ECHO_LIMIT))
            .route(web::post().to(echo)),
    );
}

#[cfg(test)]
mod tests {
    use actix_web::{App, test};

    use super::*;

    fn id(token: &str) -> Identity {
        Identity {
            app: "m".into(),
            import_path: "model".into(),
            route_prefix: "/api/v1/m".into(),
            server_type: "tinker".into(),
            cuda_visible_devices: Some("3".into()),
            token: token.into(),
        }
    }

    #[actix_web::test]
    async fn healthz_details_need_the_token_and_products_have_no_echo() {
        let app = test::init_service(App::new().configure(|c| routes(c, id("s3cret")))).await;
        for (hdr, detailed) in [(None, false), (Some("nope"), false), (Some("s3cret"), true)] {
            let mut req = test::TestRequest::get().uri("/api/v1/m/healthz");
            if let Some(h) = hdr {
                req = req.insert_header((TOKEN_HEADER, h));
            }
            let v: serde_json::Value = test::call_and_read_body_json(&app, req.to_request()).await;
            assert_eq!(v["status"], "ok");
            assert_eq!(v.get("pid").is_some(), detailed, "{v}");
            assert_eq!(v.get("cuda_visible_devices").is_some(), detailed, "{v}");
        }
        let v: serde_json::Value = test::call_and_read_body_json(
            &app,
            test::TestRequest::get().uri("/healthz").to_request(),
        )
        .await;
        assert_eq!(v, json!({"status": "ok"}));
        let req = test::TestRequest::post().uri("/api/v1/m/echo").set_payload("x").to_request();
        assert_eq!(test::call_service(&app, req).await.status(), 404);
    }

    #[actix_web::test]
    async fn an_empty_token_never_shows_details_and_echo_needs_the_token() {
        let app = test::init_service(App::new().configure(|c| identity_app(c, id("")))).await;
        let req = test::TestRequest::get()
            .uri("/api/v1/m/healthz")
            .insert_header((TOKEN_HEADER, ""))
            .to_request();
        let v: serde_json::Value = test::call_and_read_body_json(&app, req).await;
        assert_eq!(v, json!({"status": "ok"}));

        let app = test::init_service(App::new().configure(|c| identity_app(c, id("t")))).await;
        let req = test::TestRequest::post()
            .uri("/api/v1/m/echo")
            .insert_header((header::CONTENT_TYPE, "text/html"))
            .set_payload("<script>")
            .to_request();
        assert_eq!(test::call_service(&app, req).await.status(), 403);
        let req = test::TestRequest::post()
            .uri("/api/v1/m/echo")
            .insert_header((header::CONTENT_TYPE, "text/html"))
            .insert_header((TOKEN_HEADER, "t"))
            .set_payload("<script>")
            .to_request();
        let resp = test::call_service(&app, req).await;
        assert_eq!(resp.status(), 200);
        let ct = resp.headers().get(header::CONTENT_TYPE).cloned();
        assert_eq!(ct.as_ref().and_then(|v| v.to_str().ok()), Some("application/octet-stream"));
        assert_eq!(test::read_body(resp).await, "<script>");
    }
}
