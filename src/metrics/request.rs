//! Request ids and per-request HTTP metrics: the middleware every HTTP server of the node wraps.
//!
//! A request's id is the client's `X-Request-Id` (when it is a sane token) or a generated one.
//! The middleware runs the request inside a `request` tracing span carrying `request_id` (so
//! every log line of the request names it) and inside a task-local scope ([`current`]), which
//! the server application's dispatcher and its internal hop read to forward the id to the model
//! application (see `apps::server::upstream`). The answer carries `X-Request-Id`, and a JSON
//! error body gets `"request_id"`. It also counts the request by route pattern, method and
//! status and observes its latency (see [`super::Metrics`]).

use std::future::Future;
use std::time::Instant;

use actix_web::body::{BoxBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::Method;
use actix_web::http::header::{self, HeaderName, HeaderValue};
use actix_web::middleware::Next;
use tracing::Instrument as _;

use super::{HttpLabels, RouteLabels, UpstreamLabels};

/// The header that carries a request's id, both ways and on the internal hop.
pub const HEADER: HeaderName = HeaderName::from_static("x-request-id");

/// Longest client-chosen id kept; a longer or odd one is replaced (it goes into every log line).
const MAX_ID: usize = 128;

tokio::task_local! {
    static REQUEST_ID: String;
}

/// The id of the request being served on this task, if any.
pub fn current() -> Option<String> {
    REQUEST_ID.try_with(Clone::clone).ok().filter(|id| !id.is_empty())
}

/// Runs `fut` as part of request `id` (a job that outlives its handler keeps its request's id).
pub fn scope<F: Future>(id: String, fut: F) -> impl Future<Output = F::Output> {
    REQUEST_ID.scope(id, fut)
}

/// A request's span and id, carried to work it leaves behind (a queued job).
#[derive(Debug, Clone)]
pub struct Carried {
    span: tracing::Span,
    id: String,
}

impl Carried {
    /// The current request's span and id (empty outside a request).
    pub fn here() -> Self {
        Carried { span: tracing::Span::current(), id: current().unwrap_or_default() }
    }

    /// Runs `fut` in the carried span and id scope.
    pub fn run<F: Future>(self, fut: F) -> impl Future<Output = F::Output> {
        scope(self.id, fut).instrument(self.span)
    }
}

/// The span a request's (or its job's) log lines are written in.
pub fn span(id: &str) -> tracing::Span {
    tracing::info_span!("request", request_id = %id)
}

/// The client's id when it is 1–128 characters of `[A-Za-z0-9._:-]`, else a new one.
pub fn accept_or_new(sent: Option<&str>) -> String {
    match sent {
        Some(s)
            if !s.is_empty()
                && s.len() <= MAX_ID
                && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b)) =>
        {
            s.to_string()
        }
        _ => crate::ids::hex_id("req-"),
    }
}

/// The method as a bounded label (extension methods are `other`).
fn method_label(m: &Method) -> &'static str {
    const KNOWN: [(Method, &str); 7] = [
        (Method::GET, "GET"),
        (Method::POST, "POST"),
        (Method::PUT, "PUT"),
        (Method::DELETE, "DELETE"),
        (Method::HEAD, "HEAD"),
        (Method::PATCH, "PATCH"),
        (Method::OPTIONS, "OPTIONS"),
    ];
    KNOWN.iter().find(|(k, _)| k == m).map_or("other", |(_, l)| l)
}

/// Adds `"request_id"` to a JSON object error body (other bodies are left alone).
async fn with_id_in_error(res: ServiceResponse<BoxBody>, id: &str) -> ServiceResponse<BoxBody> {
    let is_json = res
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/json"));
    if !is_json || res.status().as_u16() < 400 {
        return res;
    }
    let (req, res) = res.into_parts();
    let (res, body) = res.into_parts();
    let bytes = match actix_web::body::to_bytes(body).await {
        Ok(b) => b,
        Err(e) => {
            let detail = format!("the error body could not be read: {e}");
            let body = serde_json::json!({"detail": detail, "request_id": id});
            let out = actix_web::HttpResponse::build(res.status()).json(body);
            return ServiceResponse::new(req, out);
        }
    };
    let body = match serde_json::from_slice::<serde_json::Value>(&bytes) {
        Ok(serde_json::Value::Object(mut map)) => {
            map.entry("request_id").or_insert_with(|| id.into());
            serde_json::Value::Object(map).to_string().into_bytes()
        }
        _ => bytes.to_vec(),
    };
    ServiceResponse::new(req, res.set_body(BoxBody::new(body)))
}

/// The shared middleware body. `upstream`: the gateway's routed application (its forwarded
/// requests are counted by upstream; everything else by route pattern).
pub async fn handle(
    mut req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
    upstream: Option<String>,
) -> Result<ServiceResponse<BoxBody>, actix_web::Error> {
    let sent = req.headers().get(HEADER).and_then(|v| v.to_str().ok());
    let id = accept_or_new(sent);
    if sent != Some(id.as_str())
        && let Ok(v) = HeaderValue::from_str(&id)
    {
        // A proxied request carries the id on to its application.
        req.headers_mut().insert(HEADER, v);
    }
    let method = method_label(req.method());
    let started = Instant::now();
    let res = scope(id.clone(), next.call(req)).instrument(span(&id)).await?;
    let elapsed = started.elapsed().as_secs_f64();
    let status = res.status().as_u16().to_string();
    let m = super::global();
    match upstream {
        Some(upstream) => {
            let l = UpstreamLabels { upstream, status };
            m.gateway_requests.get_or_create(&l).inc();
            m.gateway_duration.get_or_create(&l).observe(elapsed);
        }
        None => {
            let route = res.request().match_pattern().unwrap_or_else(|| "other".to_string());
            let rl = RouteLabels { route: route.clone(), method: method.to_string() };
            m.http_duration.get_or_create(&rl).observe(elapsed);
            m.http_requests
                .get_or_create(&HttpLabels { route, method: method.to_string(), status })
                .inc();
        }
    }
    let mut res = with_id_in_error(res.map_into_boxed_body(), &id).await;
    if let Ok(v) = HeaderValue::from_str(&id) {
        res.headers_mut().insert(HEADER, v);
    }
    Ok(res)
}

/// The middleware of an application child (`App::wrap(from_fn(middleware))`).
pub async fn middleware(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<BoxBody>, actix_web::Error> {
    handle(req, next, None).await
}

#[cfg(test)]
mod tests {
    use actix_web::middleware::from_fn;
    use actix_web::{App, HttpResponse, test, web};

    use super::*;

    async fn fails() -> HttpResponse {
        let id = current().unwrap_or_default();
        HttpResponse::BadRequest().json(serde_json::json!({"detail": "no", "seen": id}))
    }

    #[actix_web::test]
    async fn ids_are_kept_or_made_and_reach_error_bodies_and_counters() {
        let app = test::init_service(
            App::new().wrap(from_fn(middleware)).route("/x/{id}", web::get().to(fails)),
        )
        .await;
        let req =
            test::TestRequest::get().uri("/x/1").insert_header((HEADER, "abc-1")).to_request();
        let res = test::call_service(&app, req).await;
        assert_eq!(res.headers().get(HEADER).and_then(|v| v.to_str().ok()), Some("abc-1"));
        let v: serde_json::Value = test::read_body_json(res).await;
        assert_eq!(v["request_id"], "abc-1");
        assert_eq!(v["seen"], "abc-1");
        let req =
            test::TestRequest::get().uri("/x/2").insert_header((HEADER, "bad id!")).to_request();
        let v: serde_json::Value = test::call_and_read_body_json(&app, req).await;
        let made = v["request_id"].as_str().unwrap_or_default();
        assert!(made.starts_with("req-") && made != "bad id!", "{v}");
        let text = super::super::global().encode().expect("encodes");
        assert!(
            text.contains(
                "twinkle_http_requests_total{route=\"/x/{id}\",method=\"GET\",status=\"400\"}"
            ),
            "{text}"
        );
    }

    #[actix_web::test]
    async fn methods_are_bounded() {
        assert_eq!(method_label(&Method::POST), "POST");
        assert_eq!(method_label(&Method::from_bytes(b"BREW").expect("method")), "other");
    }
}
