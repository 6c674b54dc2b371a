//! `twinkle worker`: the entry point of one application child process.
//!
//! A child binds an HTTP server on `127.0.0.1:0`, registers its port with the head (retrying
//! until a deadline), then serves until SIGTERM. Which application it runs is chosen by
//! `import_path` in [`crate::apps::run_app`] (this runtime knows no application); every
//! application also serves the identity routes of [`identity`], and `import_path: identity`
//! serves only those (a dry run that loads nothing). Every child also answers `GET /metrics`
//! (its own Prometheus families, see [`crate::metrics`]) and runs each request in a span with
//! its request id.

pub mod identity;
pub mod json_errors;

use std::net::TcpListener;
use std::path::PathBuf;
use std::time::Duration;

use actix_web::{App, HttpServer, web};

use crate::config::{Application, ImportPath, ServerType};
use crate::contract::{
    APP_SPEC_ENV, BIND_HOST_ENV, KEEP_ALIVE, START_DELAY_ENV, STARTUP_ERROR_FILE_ENV,
};
use crate::contract::{RegisterRequest, WORKER_TOKEN_ENV as TOKEN_ENV};

/// Errors of the worker layer.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("cannot listen on loopback: {0}")]
    Bind(std::io::Error),
    #[error("{TOKEN_ENV} is not set: `twinkle worker` is started by `twinkle serve`, not by hand")]
    MissingToken,
    #[error("{APP_SPEC_ENV} is not a valid application spec: {0}")]
    Spec(serde_json::Error),
    #[error("could not register with the head at {head} within {deadline:?}: {detail}")]
    RegisterTimeout { head: String, deadline: Duration, detail: String },
    #[error("the head at {head} refused the registration: {detail}")]
    Refused { head: String, detail: String },
    #[error("HTTP server failed: {0}")]
    Server(std::io::Error),
    /// The application can never start with this config (e.g. its model is missing): the
    /// process exits with [`STARTUP_ERROR_EXIT`](crate::contract::STARTUP_ERROR_EXIT) and the supervisor does not restart it.
    #[error("{0}")]
    Startup(String),
    /// Something the application needs is out of reach for now (a model hub's network error):
    /// the process exits non-zero and the supervisor restarts it with backoff.
    #[error("{0}")]
    Unavailable(String),
}

/// Records a permanent startup error for the supervisor (best effort: the log has it too).
pub fn report_startup_error(message: &str) {
    if let Some(path) = std::env::var_os(STARTUP_ERROR_FILE_ENV).filter(|p| !p.is_empty())
        && let Err(e) = std::fs::write(&path, message)
    {
        tracing::warn!(path = %std::path::Path::new(&path).display(), error = %e, "cannot write the startup error file");
    }
}

/// What `twinkle worker` is told on its command line.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    pub app: String,
    pub import_path: ImportPath,
    pub route_prefix: String,
    pub server_type: ServerType,
    /// The head's control address (`127.0.0.1:PORT`).
    pub head: String,
    /// The whole deployment's config file (applications that dispatch to others read it).
    pub config: Option<PathBuf>,
    pub register_deadline: Duration,
}

/// Everything an application needs to start inside its child.
#[derive(Debug, Clone)]
pub struct AppContext {
    pub opts: WorkerOptions,
    pub token: String,
    /// This application's config entry, when serve passed it.
    pub spec: Option<Application>,
}

impl AppContext {
    /// Reads the token and spec that `twinkle serve` put in the environment.
    pub fn from_env(opts: WorkerOptions) -> Result<Self, WorkerError> {
        let token = std::env::var(TOKEN_ENV).map_err(|_| WorkerError::MissingToken)?;
        let spec = match std::env::var(APP_SPEC_ENV) {
            Ok(text) if !text.is_empty() => {
                Some(serde_json::from_str(&text).map_err(WorkerError::Spec)?)
            }
            _ => None,
        };
        Ok(Self { opts, token, spec })
    }
}

/// Binds `127.0.0.1:0`, serves `configure`'s routes, registers with the head, then serves until
/// SIGTERM/SIGINT (actix's own signal handling stops the server gracefully).
pub async fn serve_and_register<F>(ctx: &AppContext, configure: F) -> Result<(), WorkerError>
where
    F: Fn(&mut web::ServiceConfig) + Send + Clone + 'static,
{
    // Cluster mode: the node agent sets the node's address so other nodes' gateways reach us.
    let host = std::env::var(BIND_HOST_ENV).ok().filter(|h| !h.is_empty());
    let host = host.unwrap_or_else(|| "127.0.0.1".to_string());
    let listener = TcpListener::bind((host.as_str(), 0)).map_err(WorkerError::Bind)?;
    let port = listener.local_addr().map_err(WorkerError::Bind)?.port();
    let server = HttpServer::new(move || {
        // The request-id middleware wraps outermost, so it sees the final JSON error bodies.
        App::new()
            .wrap(json_errors::middleware())
            .wrap(actix_web::middleware::from_fn(crate::metrics::request::middleware))
            .route("/metrics", web::get().to(crate::metrics::child_metrics))
            .configure(configure.clone())
    })
    .workers(2)
    .keep_alive(KEEP_ALIVE)
    .shutdown_timeout(5)
    .listen(listener)
    .map_err(WorkerError::Bind)?
    .run();
    let handle = server.handle();
    let running = actix_web::rt::spawn(server);
    tracing::info!(app = %ctx.opts.app, port, "worker listening");

    if let Some(ms) = std::env::var(START_DELAY_ENV).ok().and_then(|v| v.trim().parse().ok()) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    if let Err(e) = register(ctx, port).await {
        handle.stop(false).await;
        return Err(e);
    }
    match running.await {
        Ok(r) => r.map_err(WorkerError::Server),
        Err(join) => Err(WorkerError::Server(std::io::Error::other(join.to_string()))),
    }
}

/// POSTs the registration until the head accepts it (2xx), refuses it (4xx: permanent), or the
/// deadline passes.
async fn register(ctx: &AppContext, port: u16) -> Result<(), WorkerError> {
    let head = ctx.opts.head.clone();
    let client = awc::Client::builder().timeout(Duration::from_secs(2)).finish();
    let url = format!("http://{head}/v1/register");
    let body = RegisterRequest {
        app: ctx.opts.app.clone(),
        pid: std::process::id(),
        port,
        token: ctx.token.clone(),
    };
    let deadline = tokio::time::Instant::now() + ctx.opts.register_deadline;
    loop {
        let last = match client.post(&url).send_json(&body).await {
            Ok(resp) if resp.status().is_success() => {
                tracing::info!(app = %ctx.opts.app, %head, "registered with the head");
                return Ok(());
            }
            Ok(mut resp) if resp.status().is_client_error() => {
                let text = resp.body().limit(64 << 10).await.unwrap_or_default();
                return Err(WorkerError::Refused {
                    head,
                    detail: String::from_utf8_lossy(&text).into_owned(),
                });
            }
            Ok(resp) => format!("answered {}", resp.status()),
            Err(e) => e.to_string(),
        };
        if tokio::time::Instant::now() >= deadline {
            return Err(WorkerError::RegisterTimeout {
                head,
                deadline: ctx.opts.register_deadline,
                detail: last,
            });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
