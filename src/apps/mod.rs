//! The applications a `twinkle worker` child runs (chosen by `import_path`).

mod fetch;
pub mod model;
pub mod processor;
pub mod sampler;
pub mod server;
pub mod twinkle_http;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::config::{Application, DeviceType, ImportPath, ServerType};
use crate::engine::ModelRuntime;
use crate::engine::cuda::{CudaDevice, CudaRuntime, bf16};
use crate::engine::parallel::DataParallel;
use crate::worker::identity::{self, Identity};
use crate::worker::{AppContext, WorkerError, serve_and_register};
use model::decode::DEFAULT_MAX_SEQS;
use model::http::{InternalToken, ModelApp};
use model::{
    AdapterPolicy, AppError, BaseModel, CPU_WORKERS_ENV, ModelService, ServiceOptions,
    parse_cpu_workers,
};
use sampler::{SamplerApp, SamplerService};

/// Env var: storage type of the base weights on a GPU (`bf16` or `f32`); by default bf16
/// checkpoints stay bf16 and every other dtype is held in f32 (exact).
pub const CUDA_DTYPE_ENV: &str = "TWINKLE_CUDA_DTYPE";

/// Env var with the per-serve token that `/_internal/` routes require.
pub use crate::contract::INTERNAL_TOKEN_ENV;

/// Blocking entry point of `twinkle worker`: the child's runtime ([`crate::worker`]) around the
/// application its `import_path` names. The choice lives here, above the runtime, so the
/// runtime does not depend on the applications it hosts.
pub fn run_worker(opts: crate::worker::WorkerOptions) -> Result<(), WorkerError> {
    let ctx = AppContext::from_env(opts)?;
    actix_web::rt::System::new().block_on(run_app(ctx))
}

/// Runs the application named by `import_path`; `identity` (for tests) is
/// [`identity::identity_app`].
pub async fn run_app(ctx: AppContext) -> Result<(), WorkerError> {
    match ctx.opts.import_path {
        ImportPath::Identity => {
            let id = Identity::from_context(&ctx);
            serve_and_register(&ctx, move |cfg| identity::identity_app(cfg, id.clone())).await
        }
        ImportPath::Server => server::run(ctx).await,
        ImportPath::Model | ImportPath::Sampler => run(&ctx).await,
        ImportPath::Processor => processor::run(&ctx).await,
    }
}

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

/// The application's `args.model_id` and the local directory it resolves to (downloaded or
/// generated on first use).
fn resolve_model(spec: &Application) -> Result<(String, PathBuf), AppError> {
    let id = model_id(spec)?;
    let dir = crate::hub::resolve(&id)?;
    Ok((id, dir))
}

/// Options of a model service from its config entry; idle adapters spill under
/// `$TWINKLE_SAVE_DIR/.spill/<app>` (else `$TWINKLE_HOME/spill/<app>`).
pub fn model_options(spec: &Application) -> Result<ServiceOptions, AppError> {
    let (base_model, model_dir) = resolve_model(spec)?;
    let adapter = spec.args.adapter_config.as_ref();
    // Positive seconds only: a config that skipped validation gets the defaults.
    let seconds =
        |s: Option<f64>| s.filter(|t| t.is_finite() && *t > 0.0).map(Duration::from_secs_f64);
    let default = AdapterPolicy::default();
    let policy = AdapterPolicy {
        idle_timeout: seconds(adapter.and_then(|a| a.adapter_timeout))
            .unwrap_or(default.idle_timeout),
        max_lifetime: seconds(adapter.and_then(|a| a.adapter_max_lifetime)),
        max_loras: spec.args.max_loras.map(|m| m as usize),
        durable_steps: adapter.and_then(|a| a.durable_steps).unwrap_or(default.durable_steps),
    };
    let spill_root = std::env::var_os("TWINKLE_SAVE_DIR")
        .filter(|v| !v.is_empty())
        .map(|d| PathBuf::from(d).join(".spill"))
        .unwrap_or_else(|| crate::head::state_file::twinkle_home().join("spill"));
    Ok(ServiceOptions {
        base_model,
        model_dir,
        max_length: spec.args.max_length.map(|m| m as usize),
        spill_dir: spill_root.join(&spec.name),
        adapters: policy,
        batch_window: batch_window(spec.args.batch_window_ms),
    })
}

/// The combining queue's window from `batch_window_ms` (validated at load; clamped here too so
/// a config that skipped validation cannot make jobs wait for ever).
pub fn batch_window(ms: Option<f64>) -> Duration {
    ms.filter(|w| w.is_finite() && *w >= 0.0)
        .map_or(crate::apps::model::DEFAULT_BATCH_WINDOW, |w| {
            Duration::from_secs_f64(w.min(crate::config::MAX_BATCH_WINDOW_MS) / 1e3)
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
    /// The model service and its options (the Twinkle layer expires idle and too old adapters
    /// and keeps its journals beside the snapshots in the spill directory).
    Model(Arc<dyn ModelApp>, Box<ServiceOptions>),
    Sampler(Arc<dyn SamplerApp>),
}

/// Where an application computes: its device type and data-parallel size from the config.
#[derive(Debug, Clone, Copy)]
struct Placement {
    device: DeviceType,
    dp: usize,
}

fn placement(spec: &Application) -> Placement {
    let device = spec.demand_inputs().device_type;
    let dp = spec.args.device_mesh.as_ref().map_or(1, |m| m.dp_size.max(1) as usize);
    Placement { device, dp }
}

/// One CUDA runtime per visible card (the head set `CUDA_VISIBLE_DEVICES` to this
/// application's physical cards), weights uploaded in `T`. Any failure — no driver, fewer
/// visible cards than `dp_size`, out of memory — is a start-up error naming the cause: an
/// application that asked for GPUs never falls back to the CPU.
fn cuda_engine<T>(
    model: &crate::engine::Model,
    dp: usize,
) -> Result<DataParallel<CudaRuntime<T>>, AppError>
where
    T: crate::engine::cuda::Act + Send + Sync + 'static,
{
    crate::engine::cuda::driver_available()
        .map_err(|e| AppError::Startup(format!("device_type is cuda but {e}")))?;
    let visible = CudaDevice::count();
    if visible < dp {
        return Err(AppError::Startup(format!(
            "device_type is cuda with dp_size {dp}, but the CUDA driver sees {visible} device(s) \
             (CUDA_VISIBLE_DEVICES={:?})",
            std::env::var("CUDA_VISIBLE_DEVICES").unwrap_or_default()
        )));
    }
    let mut workers = Vec::with_capacity(dp);
    for i in 0..dp {
        let rt = CudaRuntime::<T>::new(i, model)
            .map_err(|e| AppError::Startup(format!("cannot place the model on cuda:{i}: {e}")))?;
        tracing::info!(device = %rt.device_name(), "base model uploaded");
        workers.push(rt);
    }
    DataParallel::new(workers).map_err(|e| AppError::Startup(e.to_string()))
}

/// Whether GPU weights are kept in bf16 (else f32) for a checkpoint of `dtype`.
fn cuda_bf16(dtype: &str) -> Result<bool, AppError> {
    match std::env::var(CUDA_DTYPE_ENV).ok().as_deref().map(str::trim) {
        None | Some("") => Ok(matches!(dtype, "bfloat16" | "bf16")),
        Some("bf16") | Some("bfloat16") => Ok(true),
        Some("f32") | Some("float32") => Ok(false),
        Some(other) => {
            Err(AppError::Startup(format!("{CUDA_DTYPE_ENV}={other:?}: expected bf16 or f32")))
        }
    }
}

fn load(ctx: &AppContext, spec: Application) -> Result<Loaded, AppError> {
    let place = placement(&spec);
    if ctx.opts.import_path == ImportPath::Sampler {
        let (base_model, dir) = resolve_model(&spec)?;
        let max_length = spec
            .args
            .engine_args
            .as_ref()
            .and_then(|e| e.max_model_len)
            .or(spec.args.max_length)
            .map(|m| m as usize);
        let mut base = BaseModel::load(&base_model, &dir, max_length)?;
        name_as_configured(&mut base, &spec);
        tracing::info!(model = %dir.display(), ?place, "sampler model loaded");
        let max_seqs = spec.args.engine_args.as_ref().and_then(|e| e.max_num_seqs);
        let max_seqs = max_seqs.map_or(DEFAULT_MAX_SEQS, |n| n as usize);
        let svc: Arc<dyn SamplerApp> = match place.device {
            DeviceType::Cpu => {
                let n = cpu_workers(place)?;
                let engine = DataParallel::cpu(base.model.clone(), n, rayon::current_num_threads())
                    .map_err(|e| AppError::Startup(e.to_string()))?;
                Arc::new(SamplerService::with_engine(base.served, engine).with_max_seqs(max_seqs))
            }
            DeviceType::Cuda if cuda_bf16(&base.served.config.dtype)? => {
                let engine = cuda_engine::<bf16>(&base.model, place.dp)?;
                Arc::new(SamplerService::with_engine(base.served, engine).with_max_seqs(max_seqs))
            }
            DeviceType::Cuda => {
                let engine = cuda_engine::<f32>(&base.model, place.dp)?;
                Arc::new(SamplerService::with_engine(base.served, engine).with_max_seqs(max_seqs))
            }
        };
        return Ok(Loaded::Sampler(svc));
    }
    let opts = model_options(&spec)?;
    let mut base = BaseModel::load(&opts.base_model, &opts.model_dir, opts.max_length)?;
    name_as_configured(&mut base, &spec);
    tracing::info!(model = %opts.model_dir.display(), ?place, "model loaded");
    let svc: Arc<dyn ModelApp> = match place.device {
        DeviceType::Cpu => {
            let n = cpu_workers(place)?;
            let engine = DataParallel::cpu(base.model.clone(), n, rayon::current_num_threads())
                .map_err(|e| AppError::Startup(e.to_string()))?;
            start_model(&opts, base, engine)
        }
        DeviceType::Cuda if cuda_bf16(&base.served.config.dtype)? => {
            let engine = cuda_engine::<bf16>(&base.model, place.dp)?;
            start_model(&opts, base, engine)
        }
        DeviceType::Cuda => {
            let engine = cuda_engine::<f32>(&base.model, place.dp)?;
            start_model(&opts, base, engine)
        }
    };
    Ok(Loaded::Model(svc, Box::new(opts)))
}

/// Reports the model under the name its route gives it (`/api/v1/model/acme/llama-tiny` serves
/// `acme/llama-tiny`, see [`crate::config::naming`]), not the one its weights' location implies:
/// that is the name `supported_models` and clients use.
fn name_as_configured(base: &mut BaseModel, spec: &Application) {
    if let Some(name) = spec.served_name() {
        base.served.info.model_name = name;
    }
}

/// CPU data-parallel workers: `TWINKLE_CPU_WORKERS` when set, else `dp_size`.
fn cpu_workers(p: Placement) -> Result<usize, AppError> {
    match std::env::var(CPU_WORKERS_ENV).ok().filter(|v| !v.trim().is_empty()) {
        Some(v) => parse_cpu_workers(Some(&v)),
        None => Ok(p.dp),
    }
}

/// The model service over `engine` (the host weights in `base` are dropped here when the
/// engine holds its own copy on the devices), with its idle-adapter sweeper and its snapshot
/// writer, and the adapters snapshotted by its previous run registered.
fn start_model<R: ModelRuntime>(
    opts: &ServiceOptions,
    base: BaseModel,
    engine: DataParallel<R>,
) -> Arc<dyn ModelApp> {
    let svc = Arc::new(ModelService::with_engine(opts, base.served, engine));
    // Runs of a previous life of this application come back before the first request.
    svc.restore_live();
    svc.spawn_snapshotter();
    svc.spawn_sweeper(svc.sweep_interval());
    svc
}

/// Tenants of the Twinkle-native routes: the whole config's `api_keys`, the shared save root.
fn twinkle_auth(ctx: &AppContext) -> Result<crate::protocol::twinkle::Auth, WorkerError> {
    let root = server::default_save_root();
    crate::protocol::twinkle::Auth::load(ctx.opts.config.as_deref(), &root)
        .map_err(|e| WorkerError::Startup(format!("application `{}`: {e}", ctx.opts.app)))
}

/// The seed's 3-node example mounts its sampler at `/sampler/…` while the 0.1.x client calls
/// `/samplers/…`: a sampler under either answers under both.
fn sampler_prefixes(prefix: &str) -> Vec<String> {
    let p = prefix.trim_end_matches('/').to_string();
    let twin = if let Some(rest) = p.strip_prefix("/samplers/") {
        Some(format!("/sampler/{rest}"))
    } else {
        p.strip_prefix("/sampler/").map(|rest| format!("/samplers/{rest}"))
    };
    std::iter::once(p).chain(twin).collect()
}

/// The Twinkle-native layer of a model application: tenants authenticated like the server app's
/// (the whole config's `api_keys`), runs under the shared save root, idle adapters expired.
fn twinkle_layer(
    ctx: &AppContext,
    svc: Arc<dyn ModelApp>,
    opts: &ServiceOptions,
) -> Result<Arc<model::twinkle::TwinkleModel>, WorkerError> {
    let timeout = opts.adapters.idle_timeout;
    let auth = twinkle_auth(ctx)?;
    let per_owner = ctx
        .opts
        .config
        .as_deref()
        .and_then(|p| crate::config::load_file(p).ok())
        .and_then(|c| {
            c.applications
                .iter()
                .find_map(|a| a.args.server_config.as_ref().and_then(|s| s.per_token_model_limit))
        })
        .map_or(model::twinkle::DEFAULT_PER_OWNER, |n| n as usize);
    let tw = model::twinkle::TwinkleModel::new(svc, auth, timeout, per_owner)
        .with_journal(opts.spill_dir.join(model::twinkle::JOURNAL_DIR))
        .with_max_lifetime(opts.adapters.max_lifetime);
    // Adapters of a previous life of this application come back before the first request.
    tw.restore();
    let tw = Arc::new(tw);
    let every = (timeout / 4).clamp(Duration::from_millis(100), Duration::from_secs(5));
    every_while_alive(&tw, every, |tw| {
        tw.sweep();
    });
    Ok(tw)
}

/// Runs the `model` or `sampler` application of `ctx`: fetches the model when no cache has it
/// ([`fetch`]), loads it, then serves. When the
/// model cannot be found or loaded this is a startup error ([`WorkerError::Startup`]): the
/// worker exits with its message (naming every place it looked) and the supervisor shows the
/// application `failed` instead of restarting it, since a restart would fail the same way.
pub async fn run(ctx: &AppContext) -> Result<(), WorkerError> {
    let id = Identity::from_context(ctx);
    let token = internal_token();
    // The spec is read once (it may come from the config file); its model is made local first.
    let loaded = match app_spec(ctx) {
        Ok(spec) => {
            if let Ok(model) = model_id(&spec) {
                fetch::ensure_model(ctx, &model).await?;
            }
            load(ctx, spec)
        }
        Err(e) => Err(e),
    };
    match loaded {
        Ok(Loaded::Sampler(svc)) => {
            let auth = twinkle_auth(ctx)?;
            let tw = Arc::new(sampler::twinkle::TwinkleSampler::new(svc.clone(), auth));
            let prefixes = sampler_prefixes(&ctx.opts.route_prefix);
            let gen1 = ctx.opts.server_type == ServerType::Twinkle;
            serve_and_register(ctx, move |cfg| {
                identity::routes(cfg, id.clone());
                sampler::routes(cfg, svc.clone(), token.clone());
                for p in &prefixes {
                    twinkle_http::routes(cfg, tw.clone(), p, gen1);
                }
            })
            .await
        }
        Ok(Loaded::Model(svc, opts)) => {
            let tw = twinkle_layer(ctx, svc.clone(), &opts)?;
            let prefix = ctx.opts.route_prefix.clone();
            let gen1 = ctx.opts.server_type == ServerType::Twinkle;
            serve_and_register(ctx, move |cfg| {
                identity::routes(cfg, id.clone());
                model::http::routes(cfg, svc.clone(), token.clone());
                twinkle_http::routes(cfg, tw.clone(), &prefix, gen1);
            })
            .await
        }
        Err(e) => {
            tracing::error!(app = %ctx.opts.app, error = %e, "the application cannot start");
            Err(WorkerError::Startup(format!("application `{}`: {e}", ctx.opts.app)))
        }
    }
}

/// Calls `tick` on `target` every `every` on a thread of its own until `target` is dropped (the
/// thread holds only a weak reference, so it never keeps the value alive): the idle sweepers.
pub fn every_while_alive<T: Send + Sync + 'static>(
    target: &Arc<T>,
    every: Duration,
    tick: impl Fn(&T) + Send + 'static,
) -> std::thread::JoinHandle<()> {
    let weak = Arc::downgrade(target);
    std::thread::spawn(move || {
        loop {
            std::thread::sleep(every);
            match weak.upgrade() {
                Some(t) => tick(&t),
                None => return,
            }
        }
    })
}
