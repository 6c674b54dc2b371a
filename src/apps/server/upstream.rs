//! Loopback client of the model / sampler applications (`INTERNAL_API.md`): finds their addresses
//! through the head's `/v1/status`, caches each one's `/_internal/v1/info`, and maps their
//! answers onto [`JobError`] categories (4xx → user, 5xx and connection errors → server).
//!
//! It also knows the model/sampler applications the config declares ([`Configured`]), so a
//! model that is configured but not running yet is told apart from one that is not served at
//! all: the first is a retryable 503 (or a non-retryable error once its application failed),
//! only the second is a 404.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

use super::error::{ApiError, JobError};

/// Env var with the shared secret every internal request carries.
pub use crate::node::serve::INTERNAL_TOKEN_ENV;
/// Header carrying that secret.
pub const INTERNAL_HEADER: &str = "X-Twinkle-Internal";
/// Longest a compute request may take (a big forward_backward on CPU is slow).
const CALL_TIMEOUT: Duration = Duration::from_secs(600);
/// Largest answer read from an application (sample results with many sequences).
const MAX_ANSWER: usize = 512 << 20;

/// `/_internal/v1/info` of a model or sampler application.
#[derive(Debug, Clone, Deserialize)]
pub struct ModelInfo {
    pub base_model: String,
    #[serde(default)]
    pub model_name: Option<String>,
    #[serde(default)]
    pub arch: Option<String>,
    #[serde(default)]
    pub vocab_size: Option<u64>,
    #[serde(default)]
    pub max_length: Option<u64>,
    #[serde(default)]
    pub tokenizer_id: Option<String>,
    #[serde(default)]
    pub max_rank: Option<u32>,
}

impl ModelInfo {
    /// The name clients use: `model_name` when the app reports one, else its `base_model`.
    pub fn public_name(&self) -> &str {
        self.model_name.as_deref().unwrap_or(&self.base_model)
    }

    /// Whether `name` designates this model (its public name, its configured id, or that id
    /// without an `ms://` / `hf://` scheme).
    pub fn answers_to(&self, name: &str) -> bool {
        let strip = |s: &str| {
            s.strip_prefix("ms://").or_else(|| s.strip_prefix("hf://")).unwrap_or(s).to_string()
        };
        name == self.public_name()
            || name == self.base_model
            || strip(name) == strip(&self.base_model)
    }
}

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
                    info: ModelInfo {
                        model_name: Some(crate::hub::display_name(&id)),
                        base_model: id,
                        arch: None,
                        vocab_size: None,
                        max_length: None,
                        tokenizer_id: None,
                        max_rank: None,
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
}

thread_local! {
    /// One client per server worker thread (awc clients are not `Send`): its connection pool
    /// keeps the loopback connections to the applications alive, so a call does not pay a TCP
    /// connect and the application's accept hand-off every time.
    static CLIENT: awc::Client = awc::Client::builder().timeout(CALL_TIMEOUT).finish();
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
        }
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
        for a in report.applications {
            if a.import_path != "model" && a.import_path != "sampler" {
                continue;
            }
            seen.insert(a.name.clone(), Seen { state: a.state.clone(), last_exit: a.last_exit });
            let Some(address) = a.address else { continue };
            let info = match known.get(&a.name) {
                Some(u) if u.address == address => u.info.clone(),
                _ => match self.call_at(&address, "GET", "info", None).await {
                    Ok(v) => match serde_json::from_value::<ModelInfo>(v) {
                        Ok(i) => i,
                        Err(e) => {
                            tracing::warn!(app = %a.name, error = %e, "bad info answer");
                            continue;
                        }
                    },
                    Err(e) => {
                        tracing::warn!(app = %a.name, error = %e, "info request failed");
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
    pub async fn info_at(&self, address: &str) -> Result<Value, JobError> {
        self.call_at(address, "GET", "info", None).await.map_err(Into::into)
    }

    /// POSTs `body` to `/_internal/v1/{route}` of the app serving `kind`/`base_model`; a
    /// connection failure refreshes the addresses and retries once (the child may have restarted).
    pub async fn call(
        &self,
        kind: &str,
        base_model: &str,
        route: &str,
        body: &Value,
    ) -> Result<Value, JobError> {
        let first = self.find(kind, base_model).await.ok_or_else(|| {
            JobError::Server(format!("no running {kind} application serves `{base_model}`"))
        })?;
        match self.call_at(&first.address, "POST", route, Some(body)).await {
            Err(Unreachable(msg)) => {
                let _ = self.refresh().await;
                let again = self.find(kind, base_model).await.ok_or_else(|| {
                    JobError::Server(format!("{kind} application for `{base_model}`: {msg}"))
                })?;
                self.call_at(&again.address, "POST", route, Some(body)).await.map_err(Into::into)
            }
            other => other.map_err(Into::into),
        }
    }

    async fn call_at(
        &self,
        address: &str,
        method: &str,
        route: &str,
        body: Option<&Value>,
    ) -> Result<Value, CallError> {
        let url = format!("http://{address}/_internal/v1/{route}");
        let c = client();
        let req = if method == "GET" { c.get(&url) } else { c.post(&url) };
        let req = req.insert_header((INTERNAL_HEADER, self.token.as_str()));
        let sent = match body {
            Some(b) => req.send_json(b).await,
            None => req.send().await,
        };
        let mut resp = match sent {
            Ok(r) => r,
            Err(awc::error::SendRequestError::Connect(e)) => {
                return Err(Unreachable(format!("cannot connect to {address}: {e}")));
            }
            Err(e) => return Err(CallError::Server(format!("{route} request failed: {e}"))),
        };
        let status = resp.status();
        let bytes = resp
            .body()
            .limit(MAX_ANSWER)
            .await
            .map_err(|e| CallError::Server(format!("{route} answer unreadable: {e}")))?;
        let value: Value = serde_json::from_slice(&bytes).unwrap_or_else(|_| {
            serde_json::json!({"detail": String::from_utf8_lossy(&bytes[..bytes.len().min(2000)])})
        });
        if status.is_success() {
            return Ok(value);
        }
        let detail = value
            .get("detail")
            .and_then(Value::as_str)
            .map(str::to_string)
            .unwrap_or_else(|| value.to_string());
        let user = status.is_client_error()
            || value.get("category").and_then(Value::as_str) == Some("user");
        if user && status.as_u16() != 403 {
            Err(CallError::User(detail))
        } else {
            Err(CallError::Server(format!("{route} failed ({status}): {detail}")))
        }
    }
}

/// Outcome of one call; `Unreachable` is retried after a refresh.
#[derive(Debug)]
enum CallError {
    Unreachable(String),
    User(String),
    Server(String),
}
use CallError::Unreachable;

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Unreachable(m) | CallError::User(m) | CallError::Server(m) => f.write_str(m),
        }
    }
}

impl From<CallError> for JobError {
    fn from(e: CallError) -> Self {
        match e {
            CallError::User(m) => JobError::User(m),
            CallError::Unreachable(m) | CallError::Server(m) => JobError::Server(m),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CFG: &str = r#"
server_type: tinker
http_options: {host: 127.0.0.1, port: 8000}
applications:
  - name: server
    route_prefix: /api/v1
    import_path: server
  - name: model
    route_prefix: /api/v1/model/tiny
    import_path: model
    args:
      model_id: "ms://Qwen/Qwen3-0.6B"
      device_group: {name: model, ranks: 1, device_type: cpu}
"#;

    fn ups() -> Upstreams {
        let cfg = crate::config::load_str(CFG).expect("config parses");
        Upstreams::new("127.0.0.1:1".into()).with_configured(Configured::from_config(&cfg))
    }

    fn see(u: &Upstreams, state: &str, last_exit: Option<&str>) {
        let seen = Seen { state: state.into(), last_exit: last_exit.map(str::to_string) };
        u.seen.lock().expect("lock").insert("model".into(), seen);
    }

    #[test]
    fn configured_models_are_not_ready_or_failed_others_are_not_served() {
        let u = ups();
        assert_eq!(u.configured.len(), 1, "only model/sampler applications");
        // Never seen (the head has not answered yet): starting.
        for name in ["Qwen/Qwen3-0.6B", "ms://Qwen/Qwen3-0.6B"] {
            let e = u.not_ready("model", name).expect("configured");
            assert!(matches!(&e, ApiError::NotReady(m) if m.contains("is starting")), "{e}");
        }
        see(&u, "restarting", None);
        let e = u.not_ready("model", "Qwen/Qwen3-0.6B").expect("configured");
        assert!(matches!(&e, ApiError::NotReady(m) if m.contains("restarting")), "{e}");
        see(&u, "failed", Some("cannot download"));
        let e = u.not_ready("model", "Qwen/Qwen3-0.6B").expect("configured");
        assert!(matches!(&e, ApiError::AppFailed(m) if m.contains("cannot download")), "{e}");
        assert!(u.not_ready("model", "Other/Model").is_none());
        assert!(u.not_ready("sampler", "Qwen/Qwen3-0.6B").is_none());
    }
}
