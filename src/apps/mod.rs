//! The applications a `twinkle worker` child runs (chosen by `import_path`).

pub mod model;
pub mod sampler;
pub mod server;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::config::{Application, ImportPath};
use crate::worker::identity::{self, Identity};
use crate::worker::{AppContext, WorkerError, serve_and_register};
use model::http::InternalToken;
use model::{AppError, BaseModel, DEFAULT_ADAPTER_TIMEOUT, ModelService, ServiceOptions};
use sampler::SamplerService;

/// Env var with the per-serve token that `/_internal/` routes require.
pub const INTERNAL_TOKEN_ENV: &str = crate::node::serve::INTERNAL_TOKEN_ENV;

/// This application's config entry: the spec serve passed, else its entry in the config file.
fn app_spec(ctx: &AppContext) -> Result<Application, AppError> {
    if let Some(s) = &ctx.spec {
        return Ok(s.clone());
    }
    let path = ctx.opts.config.as_ref().ok_or_else(|| {
        AppError::Startup("no application spec and no --config to read it from".into())
    })?;
    let config = crate::config::load_file(path).map_err(|e| AppError::Startup(format!("{e}")))?;
    config.applications.into_iter().find(|a| a.name == ctx.opts.app).ok_or_else(|| {
        AppError::Startup(format!("{} has no application `{}`", path.display(), ctx.opts.app))
    })
}

fn model_id(spec: &Application) -> Result<String, AppError> {
    spec.args.model_id.clone().ok_or_else(|| {
        AppError::Startup(format!(
            "application `{}` needs args.model_id (a path, ms://Org/Name, hf://Org/Name or generate://qwen3-tiny)",
            spec.name
        ))
    })
}

/// Options of a model service from its config entry; idle adapters spill under
/// `$TWINKLE_SAVE_DIR/.spill/<app>` (else `$TWINKLE_HOME/spill/<app>`).
pub fn model_options(spec: &Application) -> Result<ServiceOptions, AppError> {
    let base_model = model_id(spec)?;
    let model_dir = crate::hub::resolve(&base_model)?;
    let timeout = spec
        .args
        .adapter_config
        .as_ref()
        .and_then(|a| a.adapter_timeout)
        .filter(|t| t.is_finite() && *t > 0.0)
        .map(Duration::from_secs_f64)
        .unwrap_or(DEFAULT_ADAPTER_TIMEOUT);
    let spill_root = std::env::var_os("TWINKLE_SAVE_DIR")
        .filter(|v| !v.is_empty())
        .map(|d| PathBuf::from(d).join(".spill"))
        .unwrap_or_else(|| crate::head::state_file::twinkle_home().join("spill"));
    Ok(ServiceOptions {
        base_model,
        model_dir,
        max_length: spec.args.max_length.map(|m| m as usize),
        adapter_timeout: timeout,
        spill_dir: spill_root.join(&spec.name),
        max_loras: spec.args.max_loras.map(|m| m as usize),
    })
}

fn internal_token() -> InternalToken {
    let token = std::env::var(INTERNAL_TOKEN_ENV).unwrap_or_default();
    if token.is_empty() {
        tracing::warn!("{INTERNAL_TOKEN_ENV} is not set: every internal request will get 403");
    }
    InternalToken(token.into())
}

enum Loaded {
    Model(Arc<ModelService>),
    Sampler(Arc<SamplerService>),
}

fn load(ctx: &AppContext) -> Result<Loaded, AppError> {
    let spec = app_spec(ctx)?;
    if ctx.opts.import_path == ImportPath::Sampler {
        let base_model = model_id(&spec)?;
        let dir = crate::hub::resolve(&base_model)?;
        let max_length = spec
            .args
            .engine_args
            .as_ref()
            .and_then(|e| e.max_model_len)
            .or(spec.args.max_length)
            .map(|m| m as usize);
        let base = BaseModel::load(&base_model, &dir, max_length)?;
        tracing::info!(model = %dir.display(), "sampler model loaded");
        return Ok(Loaded::Sampler(Arc::new(SamplerService::new(base))));
    }
    let opts = model_options(&spec)?;
    let svc = Arc::new(ModelService::new(&opts)?);
    tracing::info!(model = %opts.model_dir.display(), "model loaded");
    svc.spawn_sweeper(svc.sweep_interval());
    Ok(Loaded::Model(svc))
}

/// Runs the `model` or `sampler` application of `ctx`: loads the model, then serves. When the
/// model cannot be found or loaded this is a startup error ([`WorkerError::Startup`]): the
/// worker exits with its message (naming every place it looked) and the supervisor shows the
/// application `failed` instead of restarting it, since a restart would fail the same way.
pub async fn run(ctx: &AppContext) -> Result<(), WorkerError> {
    let id = Identity::from_context(ctx);
    let token = internal_token();
    match load(ctx) {
        Ok(Loaded::Sampler(svc)) => {
            serve_and_register(ctx, move |cfg| {
                identity::routes(cfg, id.clone());
                sampler::routes(cfg, svc.clone(), token.clone());
            })
            .await
        }
        Ok(Loaded::Model(svc)) => {
            serve_and_register(ctx, move |cfg| {
                identity::routes(cfg, id.clone());
                model::http::routes(cfg, svc.clone(), token.clone());
            })
            .await
        }
        Err(e) => {
            tracing::error!(app = %ctx.opts.app, error = %e, "the application cannot start");
            Err(WorkerError::Startup(format!("application `{}`: {e}", ctx.opts.app)))
        }
    }
}
