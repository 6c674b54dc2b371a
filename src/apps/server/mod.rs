//! The `server` application: the Tinker API front (`specs/tinker-protocol.md`) and the Twinkle
//! gateway (`specs/twinkle-native-protocol.md`, [`twinkle`]). The Tinker API authenticates
//! `X-API-Key`, keeps durable state in the [`Store`], answers bootstrap/REST calls directly and
//! turns work requests into futures executed by the model/sampler applications over loopback.
//! The Twinkle routes authenticate bearer tokens ([`Auth`]) and list the runs and checkpoints the
//! model applications record on disk.

pub mod dispatch;
pub mod error;
pub mod handlers;
pub mod limits;
pub mod orphans;
pub mod sweeper;
pub mod twinkle;
pub mod upstream;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use actix_web::{HttpRequest, HttpResponse, web};
use serde::de::DeserializeOwned;

use crate::config::{self, ImportPath, ServerConfig, ServerType};
use crate::protocol::tinker::paths::owner_hash;
use crate::protocol::twinkle::Auth;
use crate::protocol::twinkle::caller::shared_salt;
use crate::state::Store;
use crate::worker::{AppContext, WorkerError, serve_and_register};
use dispatch::Dispatcher;
use error::ApiError;
use upstream::Upstreams;

/// Env var: comma-separated accepted API keys (added to `args.api_keys`).
pub use crate::config::keys::API_KEYS_ENV;
use crate::config::keys::{AcceptedKeys, KeysFileError};
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
    #[error("{0}")]
    KeysFile(#[from] KeysFileError),
    #[error("cannot set up Twinkle authentication: {0}")]
    Auth(String),
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
    /// `server_config.max_tokens_per_request` (else a default from the model's context).
    pub max_tokens_per_request: Option<u64>,
    /// In-flight sample requests per key (`server_config.max_sampling_requests_per_key`).
    pub sampling: limits::SamplingSlots,
    /// Bearer-token authentication of the Twinkle routes (same salt and save root as above).
    pub auth: Auth,
    pub twinkle: TwinkleSettings,
    /// Sweep period, finished-future retention ([`sweeper`]).
    pub housekeeping: sweeper::Housekeeping,
}

/// Settings of the Twinkle gateway routes.
#[derive(Debug, Clone)]
pub struct TwinkleSettings {
    /// A Twinkle session without a heartbeat for this long is gone (`server_config.expiration_timeout`).
    pub session_timeout: Duration,
    /// `max_loras` of each model application, by application name (from the config).
    pub max_loras: HashMap<String, u32>,
}

impl Default for TwinkleSettings {
    fn default() -> Self {
        TwinkleSettings {
            session_timeout: Duration::from_secs_f64(config::DEFAULT_ADAPTER_TIMEOUT),
            max_loras: HashMap::new(),
        }
    }
}

/// Shorthand for the handlers' shared state.
pub type Shared = web::Data<ServerApp>;

impl ServerApp {
    /// A server over `store` and `up` with Twinkle authentication `auth` (its salt and save root
    /// are used for the Tinker API too), development-mode Tinker keys and default settings.
    pub fn new(store: Store, up: Upstreams, auth: Auth) -> Self {
        ServerApp {
            disp: Dispatcher::new(Arc::new(store), up),
            keys: None,
            salt: auth.salt.clone(),
            save_root: auth.save_root.clone(),
            supported_models: Vec::new(),
            per_token_model_limit: None,
            max_tokens_per_request: None,
            sampling: limits::SamplingSlots::default(),
            auth,
            twinkle: TwinkleSettings::default(),
            housekeeping: sweeper::Housekeeping::default(),
        }
    }

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

/// The caller's owner id (the salted hash of its `X-API-Key`), as an extractor: a handler that
/// takes an `Owner` cannot run for a request without an accepted key (401 before the body is
/// read, when it comes before the body in the parameters).
pub struct Owner(pub String);

impl actix_web::FromRequest for Owner {
    type Error = ApiError;
    type Future = std::future::Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut actix_web::dev::Payload) -> Self::Future {
        let owner = match req.app_data::<Shared>() {
            Some(app) => app.owner(req).map(Owner),
            None => Err(ApiError::Internal("the server application state is missing".into())),
        };
        std::future::ready(owner)
    }
}

/// Parses a JSON body into `T`, answering 400 that names the offending field (serde's own
/// message only gives a line and column, which says nothing in a one-line body).
pub fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    json_with_path(body).map_err(ApiError::BadRequest)
}

/// `serde_json::from_slice` whose error message names the field path (`a.b[2].c`).
pub fn json_with_path<T: DeserializeOwned>(body: &[u8]) -> Result<T, String> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let value: T = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." {
            format!("request body is not valid: {inner}")
        } else {
            format!("request body is not valid: field `{path}`: {inner}")
        }
    })?;
    // Trailing garbage after the value is refused, as `serde_json::from_slice` does.
    de.end().map_err(|e| format!("request body is not valid: {e}"))?;
    Ok(value)
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

fn load_salt(root: &std::path::Path) -> Result<Vec<u8>, ServerError> {
    // The same salt the model applications use (`TWINKLE_TOKEN_SALT` or the shared salt file),
    // so an owner hash computed anywhere names the same directory.
    shared_salt(root).map_err(|e| ServerError::Auth(e.to_string()))
}

fn load_keys(ctx: &AppContext) -> Result<Option<HashSet<String>>, ServerError> {
    let mut keys = AcceptedKeys::default();
    if let Some(spec) = &ctx.spec {
        keys.add_args(&spec.args)?;
    }
    keys.add_env();
    Ok(keys.finish())
}

/// The client of the model / sampler applications through the head at `head`, for the server
/// application's `args` (its `server_config.restart_wait_s`) and the whole config (the
/// applications it declares).
pub fn upstreams(head: String, args: &config::AppArgs, cfg: Option<&ServerConfig>) -> Upstreams {
    // Known before the applications run, so "configured but starting" is not "not served".
    let configured = cfg.map(upstream::Configured::from_config).unwrap_or_default();
    let wait = upstream::restart_wait(args.server_config.as_ref().and_then(|s| s.restart_wait_s));
    Upstreams::new(head).with_configured(configured).with_restart_wait(wait)
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
    crate::private_fs::create_dir_all(&save_root)
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
    // Twinkle tokens: every application's keys (model apps accept the same tenants), plus ours.
    let mut auth = Auth::load(ctx.opts.config.as_deref(), &save_root)
        .map_err(|e| ServerError::Auth(e.to_string()))?;
    auth.salt = salt.clone();
    auth.save_root = save_root.clone();
    if let Some(k) = &keys {
        auth.keys.get_or_insert_with(HashSet::new).extend(k.iter().cloned());
    }
    let mut twinkle = TwinkleSettings::default();
    if let Some(t) = args.server_config.as_ref().and_then(|s| s.expiration_timeout)
        && t.is_finite()
        && t > 0.0
    {
        twinkle.session_timeout = Duration::from_secs_f64(t);
    }
    if let Some(c) = &cfg {
        for a in c.applications.iter().filter(|a| a.import_path == ImportPath::Model) {
            let max = a.args.max_loras.unwrap_or(config::DEFAULT_MAX_LORAS);
            twinkle.max_loras.insert(a.name.clone(), max);
        }
    }
    let up = upstreams(ctx.opts.head.clone(), &args, cfg.as_ref());
    let sampling = args.server_config.as_ref().and_then(|s| s.max_sampling_requests_per_key);
    let store = Arc::new(store);
    // Read on each scrape (a weak handle: the metrics never keep the store alive).
    let counted = Arc::downgrade(&store);
    crate::metrics::global().serves(crate::metrics::Role::Server);
    crate::metrics::on_scrape(Box::new(move |m| {
        if let Some(n) = counted.upgrade().and_then(|s| s.count_all_unfinished().ok()) {
            m.futures_pending.set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }));
    Ok(ServerApp {
        disp: Dispatcher::new(store, up),
        keys,
        salt,
        save_root,
        supported_models: args.supported_models.iter().map(|m| m.name().to_string()).collect(),
        per_token_model_limit: args.server_config.as_ref().and_then(|s| s.per_token_model_limit),
        max_tokens_per_request: args.server_config.as_ref().and_then(|s| s.max_tokens_per_request),
        sampling: limits::SamplingSlots::new(
            sampling.map_or(limits::DEFAULT_SAMPLING_PER_KEY, |n| n as usize),
        ),
        auth,
        twinkle,
        housekeeping: sweeper::Housekeeping::from_config(
            args.server_config.as_ref().and_then(|s| s.cleanup_interval),
            args.server_config.as_ref().and_then(|s| s.expiration_timeout),
        ),
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
    let server_type = ctx.opts.server_type;
    actix_web::rt::spawn(sweeper::run(app.clone()));
    serve_and_register(&ctx, move |cfg| {
        // Identity first: `{prefix}/healthz` (Tinker's healthz: status ok; who we are only with
        // the internal token) and the root `/healthz` the supervisor probes; then the API.
        crate::worker::identity::routes(cfg, id.clone());
        routes(cfg, app.clone(), &prefix, server_type);
    })
    .await
}

/// Mounts every endpoint under `prefix` (e.g. `/api/v1`); anything else is a JSON 404.
///
/// The Twinkle Gen-2 routes are always at `{prefix}/twinkle/…`. With `server_type: tinker` the
/// Tinker API is at `{prefix}/…`; with `server_type: twinkle` the Twinkle Gen-1 REST routes are
/// there instead (the two share names such as `/training_runs` and `/weights_info`).
pub fn routes(cfg: &mut web::ServiceConfig, app: Shared, prefix: &str, server_type: ServerType) {
    let scope =
        web::scope(prefix).app_data(app).app_data(web::PayloadConfig::new(MAX_BODY)).service(
            web::scope("/twinkle")
                .configure(twinkle::configure_gen2)
                .default_service(web::to(not_found)),
        );
    let scope = match server_type {
        ServerType::Tinker => scope.configure(handlers::configure),
        ServerType::Twinkle => scope.configure(twinkle::configure_gen1),
    };
    cfg.service(scope.default_service(web::to(not_found))).default_service(web::to(not_found));
}

async fn not_found(req: HttpRequest) -> HttpResponse {
    HttpResponse::NotFound()
        .json(serde_json::json!({"detail": format!("no endpoint {} {}", req.method(), req.path())}))
}
