//! Loopback client of the model / sampler applications (`apps::model::http`): finds their addresses
//! through the head's `/v1/status`, caches each one's `/_internal/v1/info`, and maps their
//! answers onto [`JobError`] categories (4xx → user, 5xx and connection errors → server).
//!
//! It also knows the model/sampler applications the config declares ([`Configured`]), so a
//! model that is configured but not running yet is told apart from one that is not served at
//! all: the first is a retryable 503 (or a non-retryable error once its application failed),
//! only the second is a 404.
//!
//! Restarts: a call to an application that is starting or restarting waits for it (up to
//! [`restart_wait`]) instead of failing at once; a request the application died while running
//! fails as a server error that says to retry (its adapters come back at their last step).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::Value;

use super::error::{ApiError, JobError};
use crate::apps::model::error::UNKNOWN_ADAPTER;
use crate::config::MAX_RESTART_WAIT_S;
use crate::protocol::internal::{Call, Encoding, UnloadRequest};

/// Env var with the shared secret every internal request carries.
pub use crate::contract::INTERNAL_TOKEN_ENV;
/// Header carrying that secret.
pub use crate::protocol::internal::TOKEN_HEADER as INTERNAL_HEADER;
/// Longest a compute request may take (a big forward_backward on CPU is slow).
const CALL_TIMEOUT: Duration = Duration::from_secs(600);
/// Largest answer read from an application (sample results with many sequences).
const MAX_ANSWER: usize = 512 << 20;

/// Env var overriding `server_config.restart_wait_s` (seconds a call waits for a (re)starting
/// application). Kept so that deployments which set it before the config key existed, and an
/// operator debugging a slow restart, need no config edit; a value that is not a number in
/// `0..=MAX_RESTART_WAIT_S` is ignored (with a warning).
pub const RESTART_WAIT_ENV: &str = "TWINKLE_RESTART_WAIT";
/// Default of `server_config.restart_wait_s`: a model child restarts in seconds (backoff +
/// loading a small model); a big model may take longer, and then the call fails as a retryable
/// server error.
pub const DEFAULT_RESTART_WAIT: Duration = Duration::from_secs(60);
/// How often the head's status is re-read while waiting.
const RESTART_POLL: Duration = Duration::from_millis(250);

/// The wait bound: [`RESTART_WAIT_ENV`] when set to a valid number, else `configured`
/// (`server_config.restart_wait_s`, validated with the config), else the default.
pub fn restart_wait(configured: Option<f64>) -> Duration {
    let env = std::env::var(RESTART_WAIT_ENV).ok().filter(|v| !v.trim().is_empty());
    let from_env = env.as_deref().and_then(|v| {
        let s = v.trim().parse::<f64>().ok().filter(|s| (0.0..=MAX_RESTART_WAIT_S).contains(s));
        if s.is_none() {
            tracing::warn!(
                value = v,
                "{RESTART_WAIT_ENV} is not a number of seconds in 0..={MAX_RESTART_WAIT_S}; ignored"
            );
        }
        s
    });
    from_env
        .or(configured.filter(|s| s.is_finite() && (0.0..=MAX_RESTART_WAIT_S).contains(s)))
        .map(Duration::from_secs_f64)
        .unwrap_or(DEFAULT_RESTART_WAIT)
}

/// `/_internal/v1/info` of a model or sampler application: the applications' own type.
pub use crate::protocol::internal::InfoResponse as ModelInfo;

/// One running application of kind model or sampler.
#[derive(Debug, Clone)]
pub struct Upstream {
    pub app: String,
    pub kind: String,
    pub address: String,
    pub info: ModelInfo,
}

/// A model or sampler application the config declares, known before its child runs.
#[derive(Debug, Clone)]
pub struct Configured {
    pub app: String,
    /// `model` or `sampler`.
    pub kind: String,
    /// Built from `args.model_id` the way the application reports it once up.
    pub info: ModelInfo,
}

impl Configured {
    /// Every model/sampler application of `cfg` that names its `model_id`.
    pub fn from_config(cfg: &crate::config::ServerConfig) -> Vec<Configured> {
        use crate::config::ImportPath;
        cfg.applications
            .iter()
            .filter(|a| matches!(a.import_path, ImportPath::Model | ImportPath::Sampler))
            .filter_map(|a| {
                let id = a.args.model_id.clone()?;
                Some(Configured {
                    app: a.name.clone(),
                    kind: a.import_path.as_str().to_string(),
                    // Only the names are known before the application reports its info; the
                    // public one is what its route says (`config::naming`), as the app reports.
                    info: ModelInfo {
                        model_name: a.served_name()?,
                        base_model: id,
                        ..ModelInfo::default()
                    },
                })
            })
            .collect()
    }
}

/// The head's last word on one application: its state and, when failed, why.
#[derive(Debug, Clone)]
struct Seen {
    state: String,
    last_exit: Option<String>,
    /// While `downloading`: percent of the model fetched.
    percent: Option<f64>,
}

#[derive(Deserialize)]
struct StatusReport {
    applications: Vec<AppEntry>,
}

#[derive(Deserialize)]
struct AppEntry {
    name: String,
    import_path: String,
    #[serde(default)]
    address: Option<String>,
    #[serde(default)]
    state: String,
    #[serde(default)]
    last_exit: Option<String>,
    #[serde(default)]
    download: Option<crate::head::registry::DownloadStatus>,
}

/// Whether an application in `state` is expected to (re)appear (the node agent restarts it).
fn coming_back(state: &str) -> bool {
    matches!(state, "starting" | "downloading" | "restarting" | "pending")
}

/// Discovery and calls. Clone-cheap; the awc client is created per call site because it is not
/// `Send` (one per actix worker thread is fine).
#[derive(Clone)]
pub struct Upstreams {
    head: String,
    token: String,
    cache: Arc<Mutex<HashMap<String, Upstream>>>,
    configured: Arc<Vec<Configured>>,
    /// State of every model/sampler application at the last refresh, by name.
    seen: Arc<Mutex<HashMap<String, Seen>>>,
    /// Kinds with an application starting or restarting at the last refresh.
    pending: Arc<Mutex<HashSet<String>>>,
    wait: Duration,
    /// How many server applications the head listed at the last refresh.
    servers: Arc<std::sync::atomic::AtomicUsize>,
}

thread_local! {
    /// One client per server worker thread (awc clients are not `Send`): its connection pool
    /// keeps the loopback connections to the applications alive, so a call does not pay a TCP
    /// connect and the application's accept hand-off every time. Idle connections go before the
    /// application closes them ([`POOL_IDLE`](crate::contract::POOL_IDLE)): reusing one it is
    /// closing would fail a request that never ran as "interrupted".
    static CLIENT: awc::Client = awc::Client::builder()
        .connector(awc::Connector::new().conn_keep_alive(crate::contract::POOL_IDLE))
        .timeout(CALL_TIMEOUT)
        .finish();
}

fn client() -> awc::Client {
    CLIENT.with(awc::Client::clone)
}

impl Upstreams {
    pub fn new(head: String) -> Self {
        let token = std::env::var(INTERNAL_TOKEN_ENV).unwrap_or_default();
        Upstreams {
            head,
            token,
            cache: Arc::new(Mutex::new(HashMap::new())),
            configured: Arc::new(Vec::new()),
            seen: Arc::new(Mutex::new(HashMap::new())),
            pending: Arc::new(Mutex::new(HashSet::new())),
            wait: restart_wait(None),
            servers: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
        }
    }

    /// The same, waiting at most `wait` for a (re)starting application.
    pub fn with_restart_wait(mut self, wait: Duration) -> Self {
        self.wait = wait;
        self
    }

    /// How long a call waits for a (re)starting application.
    pub fn restart_wait(&self) -> Duration {
        self.wait
    }

    /// Whether an application of `kind` was starting or restarting at the last refresh.
    pub fn is_pending(&self, kind: &str) -> bool {
        self.pending.lock().map(|p| p.contains(kind)).unwrap_or(false)
    }

    /// The applications the config declares (see [`Upstreams::not_ready`]).
    pub fn with_configured(mut self, configured: Vec<Configured>) -> Self {
        self.configured = Arc::new(configured);
        self
    }

    fn cached(&self) -> Vec<Upstream> {
        self.cache.lock().map(|c| c.values().cloned().collect()).unwrap_or_default()
    }

    /// Re-reads the head's status and each new address's info.
    pub async fn refresh(&self) -> Result<Vec<Upstream>, JobError> {
        let c = client();
        let url = format!("http://{}/v1/status", self.head);
        let req =
            c.get(&url).insert_header((crate::head::cluster::TOKEN_HEADER, self.token.as_str()));
        let mut resp = req.timeout(Duration::from_secs(5)).send().await.map_err(|e| {
            JobError::Server(format!("cannot reach the head at {}: {e}", self.head))
        })?;
        let body = resp
            .body()
            .limit(16 << 20)
            .await
            .map_err(|e| JobError::Server(format!("head status: {e}")))?;
        let report: StatusReport = serde_json::from_slice(&body)
            .map_err(|e| JobError::Server(format!("head status is not valid: {e}")))?;
        let known: HashMap<String, Upstream> =
            self.cached().into_iter().map(|u| (u.app.clone(), u)).collect();
        let mut fresh = HashMap::new();
        let mut seen = HashMap::new();
        let mut pending = HashSet::new();
        let servers = report.applications.iter().filter(|a| a.import_path == "server").count();
        self.servers.store(servers, std::sync::atomic::Ordering::Relaxed);
        for a in report.applications {
            if a.import_path != "model" && a.import_path != "sampler" {
                continue;
            }
            let percent = a.download.map(|d| d.percent);
            let entry = Seen { state: a.state.clone(), last_exit: a.last_exit, percent };
            seen.insert(a.name.clone(), entry);
            if coming_back(&a.state) {
                pending.insert(a.import_path.clone());
                continue;
            }
            let Some(address) = a.address else { continue };
            let info = match known.get(&a.name) {
                Some(u) if u.address == address => u.info.clone(),
                _ => match self.info_at(&address).await {
                    Ok(i) => i,
                    Err(JobError::User(e)) => {
                        tracing::warn!(app = %a.name, error = %e, "bad info answer");
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!(app = %a.name, error = %e, "info request failed");
                        pending.insert(a.import_path.clone());
                        continue;
                    }
                },
            };
            fresh.insert(
                a.name.clone(),
                Upstream { app: a.name, kind: a.import_path, address, info },
            );
        }
        let list: Vec<Upstream> = fresh.values().cloned().collect();
        if let Ok(mut c) = self.cache.lock() {
            *c = fresh;
        }
        if let Ok(mut s) = self.seen.lock() {
            *s = seen;
        }
        if let Ok(mut p) = self.pending.lock() {
            *p = pending;
        }
        Ok(list)
    }

    /// Every known model/sampler app (refreshing when none is cached).
    pub async fn all(&self) -> Vec<Upstream> {
        let cached = self.cached();
        if !cached.is_empty() {
            return cached;
        }
        self.refresh().await.unwrap_or_default()
    }

    /// The application of `kind` serving `base_model` (refreshing once on a miss).
    pub async fn find(&self, kind: &str, base_model: &str) -> Option<Upstream> {
        let pick = |list: Vec<Upstream>| {
            list.into_iter().find(|u| u.kind == kind && u.info.answers_to(base_model))
        };
        if let Some(u) = pick(self.cached()) {
            return Some(u);
        }
        pick(self.refresh().await.ok()?)
    }

    /// Why a configured application is not serving, as the error to answer: `NotReady` (503 +
    /// Retry-After) while it starts, restarts or downloads its model, or is running but not
    /// yet known here; `AppFailed` once the head reports it failed. Reads the last refresh.
    fn not_serving(&self, c: &Configured, name: &str) -> ApiError {
        let seen = self.seen.lock().ok().and_then(|s| s.get(&c.app).cloned());
        let (state, why) = match seen {
            Some(s) if s.state == "downloading" => {
                let pct = s.percent.map(|p| format!(" ({p:.0}% done)")).unwrap_or_default();
                (format!("downloading its model{pct}"), None)
            }
            Some(s) if !s.state.is_empty() => (s.state, s.last_exit),
            _ => ("starting".to_string(), None),
        };
        if state == "failed" {
            let why = why.unwrap_or_else(|| "unknown reason".into());
            return ApiError::AppFailed(format!(
                "base model `{name}` is configured, but its {} application `{}` failed: {why} \
                 (see `twinkle status`)",
                c.kind, c.app
            ));
        }
        ApiError::NotReady(format!(
            "base model `{name}` is configured, but its {} application `{}` is {state}; retry shortly",
            c.kind, c.app
        ))
    }

    /// For a `base_model` no running application of `kind` answers to: the error of the
    /// configured application that will serve it, if any (else the caller answers 404).
    pub fn not_ready(&self, kind: &str, base_model: &str) -> Option<ApiError> {
        let c = self.configured.iter().find(|c| c.kind == kind && c.info.answers_to(base_model))?;
        Some(self.not_serving(c, base_model))
    }

    /// The running model/sampler applications, refreshed when a configured model application is
    /// missing; `NotReady` while one is still coming up (a failed one is left out, logged).
    pub async fn ready_models(&self) -> Result<Vec<Upstream>, ApiError> {
        let missing = |ups: &[Upstream]| -> Vec<Configured> {
            self.configured
                .iter()
                .filter(|c| c.kind == "model" && !ups.iter().any(|u| u.app == c.app))
                .cloned()
                .collect()
        };
        let mut ups = self.all().await;
        if !missing(&ups).is_empty() {
            ups = self.refresh().await.unwrap_or_default();
        }
        for c in missing(&ups) {
            match self.not_serving(&c, c.info.public_name()) {
                ApiError::AppFailed(why) => tracing::warn!(app = %c.app, %why, "not advertised"),
                e => return Err(e),
            }
        }
        Ok(ups)
    }

    /// The model app for `base_model`; for a configured one that is not up, `NotReady` or
    /// `AppFailed`; else a 404 naming the models that are served.
    pub async fn model_for(&self, base_model: &str) -> Result<Upstream, ApiError> {
        if let Some(u) = self.find("model", base_model).await {
            return Ok(u);
        }
        if let Some(e) = self.not_ready("model", base_model) {
            return Err(e);
        }
        let names: Vec<String> = self
            .all()
            .await
            .into_iter()
            .filter(|u| u.kind == "model")
            .map(|u| u.info.public_name().to_string())
            .collect();
        Err(ApiError::NotFound(format!(
            "base model `{base_model}` is not served here (trainable models: {names:?})"
        )))
    }

    /// A fresh `/_internal/v1/info` of the application at `address` (not the cached one: its
    /// `adapters` list changes with every create and unload).
    /// An answer that is not an info (a stand-in, another program on the port) is a `User`
    /// error, so discovery can skip that application instead of waiting for it.
    pub async fn info_at(&self, address: &str) -> Result<ModelInfo, JobError> {
        let (encoding, bytes) = self.call_at(address, "info", None).await?;
        encoding.decode(&bytes).map_err(|e| JobError::User(format!("{address} info: {e}")))
    }

    /// Sends call `body` to the app serving `kind`/`base_model` (MessagePack both ways) and
    /// decodes its answer. While that application is (re)starting — it is missing from the
    /// head's status or cannot be connected to — the call waits for it, up to the restart wait;
    /// a request that never reached it is safe to send again.
    pub async fn call<C: Call>(
        &self,
        kind: &str,
        base_model: &str,
        body: &C,
    ) -> Result<C::Answer, JobError> {
        // Encoded once: a call that waits for a restarting application is sent again as is.
        let bytes = Encoding::MsgPack.encode(body).map_err(|e| JobError::Server(e.to_string()))?;
        let bytes = actix_web::web::Bytes::from(bytes);
        let deadline = Instant::now() + self.wait;
        let mut target = self.find(kind, base_model).await;
        loop {
            let last = match &target {
                Some(u) => match self.call_at(&u.address, C::ROUTE, Some(bytes.clone())).await {
                    Err(Unreachable(msg)) => msg,
                    Err(e) => return Err(e.into()),
                    Ok((encoding, bytes)) => {
                        return encoding.decode(&bytes).map_err(|e| {
                            JobError::Server(format!(
                                "the {kind} application sent an invalid {} answer: {e}",
                                C::ROUTE
                            ))
                        });
                    }
                },
                None if self.is_pending(kind) => {
                    format!("the {kind} application serving `{base_model}` is restarting")
                }
                None => {
                    return Err(JobError::Server(format!(
                        "no running {kind} application serves `{base_model}`"
                    )));
                }
            };
            if Instant::now() >= deadline {
                return Err(JobError::Server(format!(
                    "{last}; still unavailable after {:.0} s, retry later",
                    self.wait.as_secs_f64()
                )));
            }
            actix_web::rt::time::sleep(RESTART_POLL).await;
            let _ = self.refresh().await;
            target =
                self.cached().into_iter().find(|u| u.kind == kind && u.info.answers_to(base_model));
        }
    }

    /// How many server applications the head listed at the last refresh.
    pub fn server_count(&self) -> usize {
        self.servers.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Unloads adapter `model_id` on the application at `address` (housekeeping).
    pub async fn unload_at(&self, address: &str, model_id: &str) -> Result<(), JobError> {
        let body = UnloadRequest { model_id: model_id.to_string() };
        let bytes = Encoding::MsgPack.encode(&body).map_err(|e| JobError::Server(e.to_string()))?;
        self.call_at(address, UnloadRequest::ROUTE, Some(bytes.into()))
            .await
            .map(|_| ())
            .map_err(Into::into)
    }

    /// POSTs the MessagePack `body` (GETs when `None`) to `/_internal/v1/{route}` at `address`;
    /// a success is the answer's bytes with the encoding its `Content-Type` names.
    async fn call_at(
        &self,
        address: &str,
        route: &str,
        body: Option<actix_web::web::Bytes>,
    ) -> Result<(Encoding, actix_web::web::Bytes), CallError> {
        let url = format!("http://{address}/_internal/v1/{route}");
        let c = client();
        let req = if body.is_none() { c.get(&url) } else { c.post(&url) };
        let mut req = req
            .insert_header((INTERNAL_HEADER, self.token.as_str()))
            .insert_header(("Accept", Encoding::MsgPack.content_type()));
        // The model application logs the job under the request that caused it.
        if let Some(id) = crate::metrics::request::current() {
            req = req.insert_header((crate::metrics::request::HEADER, id));
        }
        let sent = match body {
            Some(b) => req.content_type(Encoding::MsgPack.content_type()).send_body(b).await,
            None => req.send().await,
        };
        let mut resp = match sent {
            Ok(r) => r,
            // The pool hands out a connection that then closes before any answer: the
            // application read the request and died (a refused connect is `Connect(Io)`).
            Err(
                e @ awc::error::SendRequestError::Connect(awc::error::ConnectError::Disconnected),
            ) => {
                return Err(CallError::Server(lost(route, address, e)));
            }
            Err(awc::error::SendRequestError::Connect(e)) => {
                return Err(Unreachable(format!("cannot connect to {address}: {e}")));
            }
            Err(e @ awc::error::SendRequestError::Timeout) => {
                return Err(CallError::Server(format!("{route} request failed: {e}")));
            }
            Err(e) if never_read(&e) => {
                return Err(Unreachable(format!("{address} reset the connection: {e}")));
            }
            Err(e) => return Err(CallError::Server(lost(route, address, e))),
        };
        let status = resp.status();
        let encoding =
            Encoding::of(resp.headers().get("content-type").and_then(|v| v.to_str().ok()));
        let bytes = resp
            .body()
            .limit(MAX_ANSWER)
            .await
            .map_err(|e| CallError::Server(lost(route, address, e)))?;
        if status.is_success() {
            return Ok((encoding, bytes));
        }
        // Errors are JSON (`AppError`'s body), whatever the request's encoding.
        let value: Value = serde_json::from_slice(&bytes).unwrap_or_else(|_| {
            serde_json::json!({"detail": String::from_utf8_lossy(&bytes[..bytes.len().min(2000)])})
        });
        let detail = value
            .get("detail")
            .and_then(Value::as_str)
            .map(str::to_string)
            .unwrap_or_else(|| value.to_string());
        if value.get("reason").and_then(Value::as_str) == Some(UNKNOWN_ADAPTER) {
            return Err(CallError::LostAdapter(detail));
        }
        let user = status.is_client_error()
            || value.get("category").and_then(Value::as_str) == Some("user");
        if user && status.as_u16() != 403 {
            Err(CallError::User(detail))
        } else {
            Err(CallError::Server(format!("{route} failed ({status}): {detail}")))
        }
    }
}

/// Whether a send failed because the peer reset the connection. A killed application's kernel
/// resets a connection that still holds unread data — a request sent on a pooled keep-alive
/// connection after the process died, or one it never read — so the request never ran and may be
/// sent again. A request the application read before dying ends with end-of-stream instead.
fn never_read(e: &awc::error::SendRequestError) -> bool {
    use actix_web::error::ParseError;
    use awc::error::SendRequestError;
    let reset = |io: &std::io::Error| io.kind() == std::io::ErrorKind::ConnectionReset;
    match e {
        SendRequestError::Send(io) => reset(io),
        SendRequestError::Response(ParseError::Io(io)) => reset(io),
        _ => false,
    }
}

/// The failure of a request whose application went away while running it (it crashed or was
/// killed; the node agent restarts it and its adapters come back at their last optim_step).
fn lost(route: &str, address: &str, e: impl std::fmt::Display) -> String {
    format!(
        "{route} was interrupted: the application at {address} stopped while running it ({e}); \
         it restarts with every adapter at its last completed optim_step, so repeat the \
         forward_backward calls made since that step, then retry"
    )
}

/// Outcome of one call; `Unreachable` is retried after a refresh.
#[derive(Debug)]
enum CallError {
    Unreachable(String),
    User(String),
    Server(String),
    LostAdapter(String),
}
use CallError::Unreachable;

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Unreachable(m)
            | CallError::User(m)
            | CallError::Server(m)
            | CallError::LostAdapter(m) => f.write_str(m),
        }
    }
}

impl From<CallError> for JobError {
    fn from(e: CallError) -> Self {
        match e {
            CallError::User(m) => JobError::User(m),
            CallError::LostAdapter(m) => JobError::LostAdapter(m),
            CallError::Unreachable(m) | CallError::Server(m) => JobError::Server(m),
        }
    }
}
