//! HTTP gateway: routes each request by longest matching `route_prefix` to its application's child.
//!
//! The request is forwarded unchanged (method, full path and query, headers minus hop-by-hop
//! ones, body streamed both ways): applications see the same path the client sent and know
//! their own prefix. `GET /healthz` (liveness: the gateway answers) and `GET /readyz`
//! (readiness: every application is running) are answered by the gateway itself, even when an
//! application is mounted at `/` (that application never sees them; it can serve
//! `{prefix}/healthz` style routes under any other prefix). `GET /metrics` is the node's
//! whole Prometheus scrape ([`metrics`]).

pub mod metrics;
pub mod proxy;
pub mod routes;
pub mod upstreams;

pub use routes::{RouteTable, normalize_prefix};
pub use upstreams::{
    Lookup, ReadyQuery, ReadyReport, Upstream, UpstreamPublisher, UpstreamView, Upstreams,
    upstream_channel,
};

use std::net::{SocketAddr, TcpListener};

use actix_web::dev::Server;
use actix_web::{App, HttpServer, web};

/// Errors of the gateway layer.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("route_prefix {prefix:?} of application {app:?} must start with '/'")]
    BadPrefix { app: String, prefix: String },
    #[error("applications {first:?} and {second:?} both use route_prefix {prefix:?}")]
    DuplicatePrefix { first: String, second: String, prefix: String },
    #[error("cannot listen on {addr} (http_options): {source}")]
    Bind { addr: String, source: std::io::Error },
}

/// Everything a gateway worker thread needs.
pub struct GatewayState {
    pub routes: RouteTable,
    /// Where applications are: the owner's latest published view, read per request, so a
    /// restarted child's new address is used at once.
    pub upstreams: Upstreams,
    /// The head's own families (application states, restarts, GPUs), when a head runs here.
    pub status_metrics: Option<metrics::StatusSource>,
}

/// Binds `host:port` and builds the gateway server (not yet awaited). Signals are left to the
/// caller, which stops it through its handle. `status_metrics`: the head's families for
/// `GET /metrics`, where a head runs beside this gateway.
pub fn start(
    host: &str,
    port: u16,
    routes: RouteTable,
    upstreams: Upstreams,
    status_metrics: Option<metrics::StatusSource>,
) -> Result<(Server, SocketAddr), GatewayError> {
    let addr =
        if host.contains(':') { format!("[{host}]:{port}") } else { format!("{host}:{port}") };
    let bind_err = |source| GatewayError::Bind { addr: addr.clone(), source };
    let listener = TcpListener::bind(&addr).map_err(bind_err)?;
    let local = listener.local_addr().map_err(bind_err)?;
    let state = web::Data::new(GatewayState { routes, upstreams, status_metrics });
    let server = HttpServer::new(move || {
        App::new()
            .wrap(actix_web::middleware::from_fn(metrics::middleware))
            .app_data(state.clone())
            .app_data(web::Data::new(proxy::client()))
            .route("/healthz", web::get().to(proxy::healthz))
            .route("/readyz", web::get().to(proxy::readyz))
            .route("/metrics", web::get().to(metrics::scrape))
            .default_service(web::to(proxy::forward))
    })
    .disable_signals()
    .shutdown_timeout(2)
    .listen(listener)
    .map_err(bind_err)?
    .run();
    Ok((server, local))
}
