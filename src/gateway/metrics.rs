//! The gateway's `GET /metrics`: one Prometheus scrape for the whole node.
//!
//! It merges this process's own families (labelled `app="gateway"`), the head's registry
//! families (from a [`StatusSource`] the head hands over, so the gateway never names the head)
//! and every running child's own `/metrics` (fetched over loopback, labelled with its
//! application's name). A child that does not answer is left out of that scrape.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use actix_web::body::{BoxBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::middleware::Next;
use actix_web::{HttpResponse, web};

use super::GatewayState;
use crate::metrics::expo::{Source, merge};

/// Renders the head's families on demand (`None` when the head cannot answer).
pub type StatusSource =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Option<String>>>> + Send + Sync>;

/// The routes the gateway answers itself (counted by route, not by upstream).
const OWN: [&str; 3] = ["/healthz", "/readyz", "/metrics"];

/// Request ids and metrics for every gateway request: forwarded ones by upstream application.
pub async fn middleware(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<BoxBody>, actix_web::Error> {
    let path = req.path();
    let upstream = if OWN.contains(&path) {
        None
    } else {
        let state = req.app_data::<web::Data<GatewayState>>();
        let app = state.and_then(|s| s.routes.lookup(path).map(|r| r.app.clone()));
        Some(app.unwrap_or_else(|| "none".to_string()))
    };
    crate::metrics::request::handle(req, next, upstream).await
}

/// `GET /metrics`.
pub async fn scrape(
    state: web::Data<GatewayState>,
    client: web::Data<awc::Client>,
) -> HttpResponse {
    let own = crate::metrics::global().encode().unwrap_or_default();
    let head = match &state.status_metrics {
        Some(source) => source().await.unwrap_or_default(),
        None => String::new(),
    };
    let apps = state.upstreams.running();
    let fetched = futures_util::future::join_all(
        apps.iter().map(|(_, addr)| crate::metrics::scrape::fetch(&client, addr)),
    )
    .await;
    let mut sources =
        vec![Source { app: Some("gateway"), text: &own }, Source { app: None, text: &head }];
    for ((app, _), text) in apps.iter().zip(&fetched) {
        if let Some(text) = text {
            sources.push(Source { app: Some(app), text });
        }
    }
    HttpResponse::Ok().content_type(crate::metrics::PROMETHEUS_TEXT).body(merge(&sources))
}
