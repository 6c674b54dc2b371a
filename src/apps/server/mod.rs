//! The `server` application: the Tinker API front (`specs/tinker-protocol.md`). It authenticates
//! `X-API-Key`, keeps durable state in the [`Store`], answers bootstrap/REST calls directly and
//! turns work requests into futures executed by the model/sampler applications over loopback.

pub mod dispatch;
pub mod error;
pub mod handlers;
pub mod upstream;

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;

use actix_web::{HttpRequest, HttpResponse, web};
use serde::de::DeserializeOwned;

use crate::config::{self, ServerConfig};
use crate::protocol::tinker::paths::owner_hash;
use crate::state::Store;
use crate::worker::{AppContext, WorkerError, serve_and_register};
use dispatch::Dispatcher;
use error::ApiError;
use upstream::Upstreams;

/// Env var: comma-separated accepted API keys (added to `args.api_keys`).
pub const API_KEYS_ENV: &str = "TWINKLE_API_KEYS";
/// Env var: the salt of owner hashes (else a random salt file in the save root).
pub const SALT_ENV: &str = "TWINKLE_TOKEN_SALT";
/// Env var: where checkpoints are written.
pub const SAVE_DIR_ENV: &str = "TWINKLE_SAVE_DIR";
/// Largest request body (a protobuf forward_backward batch or a JSON prompt).
pub const MAX_BODY: usize = 64 << 20;

/// Errors that stop the server application from starting.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot read the config: {0}")]
    Config(String),
    #[error("cannot open the state store: {0}")]
    State(#[from] crate::state::StateError),
    #[error("cannot prepare the save directory {path}: {source}")]
    SaveDir { path: String, source: std::io::Error },
    #[error("cannot read api_keys_file {path}: {source}")]
    KeysFile { path: String, source: std::io::Error },
}

/// Everything the handlers share.
pub struct ServerApp {
    pub disp: Dispatcher,
    /// `None`: any `tml-` key is accepted (development mode).
    pub keys: Option<HashSet<String>>,
    pub salt: Vec<u8>,
    pub save_root: PathBuf,
    pub supported_models: Vec<String>,
    pub per_token_model_limit: Option<u32>,
}

/// Shorthand for the handlers' shared state.
pub type Shared = web::Data<ServerApp>;

impl ServerApp {
    /// The caller's owner hash, or 401.
    pub fn owner(&self, req: &HttpRequest) -> Result<String, ApiError> {
        let key = req
            .headers()
            .get("x-api-key")
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .ok_or_else(|| ApiError::Unauthorized("missing X-API-Key header".into()))?;
        let ok = match &self.keys {
            Some(keys) => keys.contains(key),
            None => key.starts_with("tml-"),
        };
        if !ok {
            return Err(ApiError::Unauthorized(
                "the API key is not accepted by this server".into(),
            ));
        }
        Ok(owner_hash(&self.salt, key))
    }
}

/// Parses a JSON body into `T`, answering 400 with serde's message on failure.
pub fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::BadRequest(format!("request body is not valid: {e}")))
}

/// The default save root: `$TWINKLE_SAVE_DIR`, else `$XDG_DATA_HOME/twinkle/checkpoints`, else
/// `~/.local/share/twinkle/checkpoints`.
pub fn default_save_root() -> PathBuf {
    if let Some(d) = std::env::var_os(SAVE_DIR_ENV).filter(|v| !v.is_empty()) {
        return PathBuf::from(d);
    }
    let data = std::env::var_os("XDG_DATA_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .unwrap_or_else(|| PathBuf::from("."));
    data.join("twinkle/checkpoints")
}

fn random_hex(n: usize) -> String {
    use std::io::Read as _;
    let mut buf = vec![0u8; n];
    if std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut buf)).is_err() {
        let id = crate::state::new_id("");
        return id;
    }
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

fn load_salt(root: &std::path::Path) -> Result<Vec<u8>, ServerError> {
    if let Ok(s) = std::env::var(SALT_ENV)
        && !s.is_empty()
    {
        return Ok(s.into_bytes());
    }
    let file = root.join(".owner-salt");
    let io = |source| ServerError::SaveDir { path: file.display().to_string(), source };
    match std::fs::read_to_string(&file) {
        Ok(s) if !s.trim().is_empty() => Ok(s.trim().as_bytes().to_vec()),
        _ => {
            let salt = random_hex(32);
            std::fs::write(&file, &salt).map_err(io)?;
            Ok(salt.into_bytes())
        }
    }
}

fn load_keys(ctx: &AppContext) -> Result<Option<HashSet<String>>, ServerError> {
    let mut keys = HashSet::new();
    let mut configured = false;
    if let Some(spec) = &ctx.spec {
        if let Some(list) = &spec.args.api_keys {
            configured = true;
            keys.extend(list.iter().map(|k| k.trim().to_string()));
        }
        if let Some(path) = &spec.args.api_keys_file {
            configured = true;
            let text = std::fs::read_to_string(path)
                .map_err(|source| ServerError::KeysFile { path: path.clone(), source })?;
            keys.extend(
                text.lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty() && !l.starts_with('#'))
                    .map(String::from),
            );
        }
    }
    if let Ok(list) = std::env::var(API_KEYS_ENV) {
        let extra: Vec<String> =
            list.split(',').map(str::trim).filter(|k| !k.is_empty()).map(String::from).collect();
        if !extra.is_empty() {
            configured = true;
            keys.extend(extra);
        }
    }
    keys.retain(|k| !k.is_empty());
    Ok(configured.then_some(keys))
}

/// Builds the shared state from the worker context.
pub fn build(ctx: &AppContext) -> Result<ServerApp, ServerError> {
    let cfg: Option<ServerConfig> = match &ctx.opts.config {
        Some(p) => Some(config::load_file(p).map_err(|e| ServerError::Config(e.to_string()))?),
        None => None,
    };
    let persistence = cfg.as_ref().map(|c| c.persistence.clone()).unwrap_or_default();
    let store = Store::from_config(&persistence)?;
    let failed = store.fail_unfinished_on_startup()?;
    if failed > 0 {
        tracing::warn!(failed, "futures left unfinished by the previous run were marked failed");
    }
    let save_root = default_save_root();
    std::fs::create_dir_all(&save_root)
        .map_err(|source| ServerError::SaveDir { path: save_root.display().to_string(), source })?;
    let save_root = save_root.canonicalize().unwrap_or(save_root);
    let salt = load_salt(&save_root)?;
    let keys = load_keys(ctx)?;
    if keys.is_none() {
        tracing::warn!(
            "no API keys configured (args.api_keys, args.api_keys_file, {API_KEYS_ENV}): any key starting with `tml-` is accepted"
        );
    }
    let args = ctx.spec.as_ref().map(|s| s.args.clone()).unwrap_or_default();
    Ok(ServerApp {
        disp: Dispatcher::new(Arc::new(store), Upstreams::new(ctx.opts.head.clone())),
        keys,
        salt,
        save_root,
        supported_models: args.supported_models.iter().map(|m| m.name().to_string()).collect(),
        per_token_model_limit: args.server_config.and_then(|s| s.per_token_model_limit),
    })
}

/// Runs the server application inside its worker child.
pub async fn run(ctx: AppContext) -> Result<(), WorkerError> {
    let app = match build(&ctx) {
        Ok(a) => web::Data::new(a),
        Err(e) => {
            tracing::error!(error = %e, "server application cannot start");
            return Err(WorkerError::Server(std::io::Error::other(e.to_string())));
        }
    };
    let prefix = ctx.opts.route_prefix.trim_end_matches('/').to_string();
    let id = crate::worker::identity::Identity::from_context(&ctx);
    serve_and_register(&ctx, move |cfg| {
        // Identity first: `{prefix}/healthz` (Tinker's healthz: status ok plus who we are),
        // `{prefix}/echo` and the root `/healthz` the supervisor probes; then the API scope.
        crate::worker::identity::routes(cfg, id.clone());
        routes(cfg, app.clone(), &prefix);
    })
    .await
}

/// Mounts every endpoint under `prefix` (e.g. `/api/v1`); anything else is a JSON 404.
pub fn routes(cfg: &mut web::ServiceConfig, app: Shared, prefix: &str) {
    cfg.service(
        web::scope(prefix)
            .app_data(app)
            .app_data(web::PayloadConfig::new(MAX_BODY))
            .configure(handlers::configure)
            .default_service(web::to(not_found)),
    )
    .default_service(web::to(not_found));
}

async fn not_found(req: HttpRequest) -> HttpResponse {
    HttpResponse::NotFound()
        .json(serde_json::json!({"detail": format!("no endpoint {} {}", req.method(), req.path())}))
}
