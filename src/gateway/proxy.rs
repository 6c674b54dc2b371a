//! Forwarding one request to an application child, streaming bodies both ways.

use std::sync::{Arc, Mutex};

use actix_web::body::SizedStream;
use actix_web::http::header::{self, HeaderMap, HeaderName};
use actix_web::http::{Method, StatusCode};
use actix_web::{HttpRequest, HttpResponse, web};
use futures_util::StreamExt as _;
use serde_json::json;

use super::{GatewayState, Upstream};

/// Seconds a client should wait before retrying an application that is not up.
const RETRY_AFTER_S: &str = "1";

/// The upstream client of one gateway worker thread: no timeout (Tinker futures long-poll), no
/// redirects followed, no headers added, idle connections dropped before the worker drops them
/// ([`POOL_IDLE`](crate::contract::POOL_IDLE)), and no cap on pooled connections: awc's default
/// of 100 per worker made the 101st concurrent request (a burst of long-polling futures) wait
/// for a free connection and then fail as "unreachable" (503). The gateway opens at most one
/// upstream connection per downstream request in flight, so its own connection bound holds.
pub fn client() -> awc::Client {
    let pool = awc::Connector::new().limit(0).conn_keep_alive(crate::contract::POOL_IDLE);
    awc::Client::builder()
        .connector(pool)
        .disable_timeout()
        .disable_redirects()
        .no_default_headers()
        .finish()
}

/// RFC 9110 §7.6.1 connection-specific headers, which a proxy must not forward.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Whether `name` must not be copied: hop-by-hop, listed in `Connection`, or
/// `Content-Length` (the body we send sets its own length).
fn skip_header(name: &HeaderName, headers: &HeaderMap) -> bool {
    if HOP_BY_HOP.contains(name) || name == header::CONTENT_LENGTH {
        return true;
    }
    headers.get_all(header::CONNECTION).any(|v| {
        v.to_str()
            .map(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(name.as_str())))
            .unwrap_or(false)
    })
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers.get(header::CONTENT_LENGTH)?.to_str().ok()?.trim().parse().ok()
}

fn is_chunked(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::TRANSFER_ENCODING)
        .any(|v| v.to_str().map(|s| s.to_ascii_lowercase().contains("chunked")).unwrap_or(false))
}

fn error_json(status: StatusCode, body: serde_json::Value) -> HttpResponse {
    HttpResponse::build(status).json(body)
}

fn unavailable(app: &str, state: &str, path: &str) -> HttpResponse {
    HttpResponse::ServiceUnavailable().insert_header((header::RETRY_AFTER, RETRY_AFTER_S)).json(
        json!({
            "detail": format!("application {app:?} is {state}; retry shortly"),
            "app": app,
            "state": state,
            "path": path,
        }),
    )
}

/// A failed application: not retried by the Tinker SDK (`x-should-retry: false`; 5xx are
/// otherwise retried for minutes) and the reason is named, since waiting will not fix it.
fn failed(app: &str, why: &str, path: &str) -> HttpResponse {
    HttpResponse::InternalServerError().insert_header(("x-should-retry", "false")).json(json!({
        "detail": format!("application {app:?} failed and is not serving: {why} (see `twinkle status`)"),
        "app": app,
        "state": "failed",
        "path": path,
    }))
}

/// `GET /healthz` of the gateway itself: liveness only (the gateway answers), always 200.
/// Whether the applications are up is `/readyz`.
pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "ok"}))
}

/// `GET /readyz`: 200 `ready` once every application is running; else 503 `not ready` with each
/// application's state and, for failed ones, why. Retry-After only while something is still
/// coming up: a failed application does not recover by waiting.
pub async fn readyz(state: web::Data<GatewayState>) -> HttpResponse {
    let ready = state.upstreams.readiness();
    let apps: serde_json::Map<String, serde_json::Value> =
        ready.apps.iter().map(|(name, s)| (name.clone(), json!(s))).collect();
    if ready.is_ready() {
        return HttpResponse::Ok().json(json!({"status": "ready", "applications": apps}));
    }
    let failed: serde_json::Map<String, serde_json::Value> =
        ready.failed.iter().map(|(n, why)| (n.clone(), json!(why))).collect();
    let mut detail: Vec<String> =
        ready.failed.iter().map(|(n, why)| format!("application {n:?} failed: {why}")).collect();
    detail.extend(ready.waiting.iter().map(|(n, s)| format!("application {n:?} is {s}")));
    let mut out = HttpResponse::ServiceUnavailable();
    if ready.failed.is_empty() {
        out.insert_header((header::RETRY_AFTER, RETRY_AFTER_S));
    }
    out.json(json!({
        "status": "not ready",
        "detail": detail.join("; "),
        "applications": apps,
        "failed": failed,
    }))
}

/// The first error reading the client's body, if any.
type BodyFault = Arc<Mutex<Option<String>>>;

/// The client's body as a stream that records its first error (a malformed chunked encoding,
/// a connection closed before Content-Length bytes), so that failure is answered as the
/// client's 400 rather than blamed on the application as a 502.
fn watched(
    payload: web::Payload,
    fault: BodyFault,
) -> impl futures_util::Stream<Item = Result<web::Bytes, actix_web::error::PayloadError>> {
    payload.inspect(move |item| {
        if let Err(e) = item
            && let Ok(mut f) = fault.lock()
        {
            f.get_or_insert_with(|| e.to_string());
        }
    })
}

/// Every other request: find the application, forward, stream the answer back.
pub async fn forward(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<GatewayState>,
    client: web::Data<awc::Client>,
) -> HttpResponse {
    let path = req.uri().path().to_string();
    let Some(route) = state.routes.lookup(&path) else {
        let prefixes: Vec<&str> = state.routes.routes().iter().map(|r| r.prefix.as_str()).collect();
        return error_json(
            StatusCode::NOT_FOUND,
            json!({"detail": format!("no application serves {path}"), "route_prefixes": prefixes}),
        );
    };
    let app = route.app.clone();
    // Read without an await: see `upstreams` on why.
    let addr = match state.upstreams.lookup(&app) {
        Upstream::At(a) => a,
        Upstream::Failed(why) => return failed(&app, &why, &path),
        // Starting (never registered yet), restarting, pending: it is coming.
        Upstream::Down(s) => return unavailable(&app, s, &path),
    };
    let pq = req.uri().path_and_query().map(|p| p.as_str()).unwrap_or(path.as_str());
    let url = format!("http://{addr}{pq}");

    let mut up = client.request(req.method().clone(), url);
    for (name, value) in req.headers() {
        if !skip_header(name, req.headers()) {
            up = up.append_header((name.clone(), value.clone()));
        }
    }
    if let Some(peer) = req.peer_addr() {
        up = up.append_header(("x-forwarded-for", peer.ip().to_string()));
    }
    let fault = BodyFault::default();
    let body = watched(payload, fault.clone());
    let sent = match (content_length(req.headers()), is_chunked(req.headers())) {
        (_, true) => up.send_stream(body).await,
        (Some(n), false) if n > 0 => up.send_body(SizedStream::new(n, Box::pin(body))).await,
        _ => up.send().await,
    };
    let client_fault = fault.lock().ok().and_then(|f| f.clone());
    if let Some(detail) = client_fault {
        // Whatever the application answered (if anything), the request it got was truncated.
        return error_json(
            StatusCode::BAD_REQUEST,
            json!({"detail": format!("the request body could not be read: {detail}")}),
        );
    }
    let resp = match sent {
        Ok(r) => r,
        // The child went away between the lookup and the connect: same as not running.
        Err(awc::error::SendRequestError::Connect(e)) => {
            tracing::debug!(%app, error = %e, "upstream connect failed");
            return unavailable(&app, "unreachable", &path);
        }
        Err(e) => {
            tracing::warn!(%app, error = %e, "upstream request failed");
            return error_json(
                StatusCode::BAD_GATEWAY,
                json!({"detail": format!("application {app:?} failed the request: {e}"), "app": app}),
            );
        }
    };

    let mut out = HttpResponse::build(resp.status());
    for (name, value) in resp.headers() {
        if !skip_header(name, resp.headers()) {
            out.append_header((name.clone(), value.clone()));
        }
    }
    let no_body = req.method() == Method::HEAD
        || resp.status().is_informational()
        || resp.status() == StatusCode::NO_CONTENT
        || resp.status() == StatusCode::NOT_MODIFIED;
    if no_body {
        return out.finish();
    }
    match content_length(resp.headers()) {
        Some(n) => out.body(SizedStream::new(n, resp)),
        None => out.streaming(resp),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::http::header::HeaderValue;

    #[test]
    fn hop_by_hop_and_connection_listed_headers_are_dropped() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, X-Secret"));
        h.insert(HeaderName::from_static("x-secret"), HeaderValue::from_static("1"));
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        let x_secret = HeaderName::from_static("x-secret");
        assert!(skip_header(&x_secret, &h));
        assert!(skip_header(&header::TRANSFER_ENCODING, &h));
        assert!(skip_header(&header::CONTENT_LENGTH, &h));
        assert!(!skip_header(&header::CONTENT_TYPE, &h));
        assert!(!skip_header(&header::AUTHORIZATION, &h));
    }
}
