//! The `model` application: one base model (loaded once) and many LoRA adapters keyed by the
//! server's opaque model ids; forward / forward_backward / optim_step / save / load / unload /
//! sample over the internal JSON API (INTERNAL_API.md).
//!
//! Concurrency: every operation runs on a blocking thread (see [`http`]), so the HTTP workers
//! stay free for `/healthz`. Each adapter has its own lock: operations on one adapter run one at
//! a time, different adapters run concurrently (the engine parallelises inside a call).
//!
//! Idle unload: an adapter unused for `adapter_timeout` seconds is spilled (weights, Adam
//! moments, step and pending gradients) to `spill_dir` and freed; the next request for it reloads
//! it transparently, with identical numbers.

pub mod checkpoint;
pub mod error;
pub mod http;
pub mod sample;
pub mod types;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use crate::engine::parallel::DataParallel;
use crate::engine::{
    Adapter, Datum, DatumOutput, LoraConfig, LossFn, LossInputs, Model, forward, forward_backward,
};
use crate::tokenize::Tokenizer;

use checkpoint::{AdapterCache, OPTIM_META, write_dir_atomic};
pub use error::AppError;
use types::*;

/// Largest LoRA rank accepted.
pub const MAX_RANK: usize = 128;
/// Default `adapter_config.adapter_timeout`.
pub const DEFAULT_ADAPTER_TIMEOUT: Duration = Duration::from_secs(1800);
/// Env var: how many CPU workers run forward/backward in data parallel (default 1). Set it per
/// application through `deployments[0].ray_actor_options.runtime_env.env_vars`.
pub const CPU_WORKERS_ENV: &str = "TWINKLE_CPU_WORKERS";

/// The worker count a `TWINKLE_CPU_WORKERS` value asks for (1 when unset or empty).
pub fn parse_cpu_workers(value: Option<&str>) -> Result<usize, AppError> {
    match value.map(str::trim).filter(|v| !v.is_empty()) {
        None => Ok(1),
        Some(v) => match v.parse::<usize>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(AppError::Startup(format!(
                "{CPU_WORKERS_ENV}={v:?}: expected a whole number of workers, at least 1"
            ))),
        },
    }
}

/// How a model service is set up (from the application's config entry).
#[derive(Debug, Clone)]
pub struct ServiceOptions {
    /// `model_id` as configured (reported as `base_model`).
    pub base_model: String,
    /// The resolved model directory.
    pub model_dir: PathBuf,
    /// Config `max_length`; the model's `max_position_embeddings` when absent or larger.
    pub max_length: Option<usize>,
    pub adapter_timeout: Duration,
    /// Where idle adapters are spilled.
    pub spill_dir: PathBuf,
    /// Most adapters kept in memory (config `max_loras`); beyond it the least recently used are
    /// spilled like idle ones. `None`: no limit.
    pub max_loras: Option<usize>,
}

/// A loaded base model and its tokenizer, shared by the model and sampler applications.
#[derive(Debug)]
pub struct BaseModel {
    pub model: Arc<Model>,
    pub tokenizer: Option<Arc<Tokenizer>>,
    pub max_length: usize,
    pub info: InfoResponse,
}

impl BaseModel {
    /// Loads the model (and `tokenizer.json` when the directory has one).
    pub fn load(base_model: &str, dir: &Path, max_length: Option<usize>) -> Result<Self, AppError> {
        let model = Model::load(dir).map_err(|e| {
            AppError::Startup(format!("cannot load the model in {}: {e}", dir.display()))
        })?;
        let tokenizer = if dir.join("tokenizer.json").is_file() {
            match Tokenizer::from_dir(dir) {
                Ok(t) => Some(Arc::new(t)),
                Err(e) => {
                    tracing::warn!(error = %e, "tokenizer not loaded; stop strings are unavailable");
                    None
                }
            }
        } else {
            None
        };
        let c = model.config();
        let max_pos = c.max_position_embeddings;
        let max_length = max_length.map_or(max_pos, |m| m.min(max_pos));
        let model_name = crate::hub::display_name(base_model);
        let tokenizer_id = if base_model.trim().starts_with("generate://qwen3") {
            "Qwen/Qwen3-0.6B".to_string()
        } else {
            model_name.clone()
        };
        let arch = c.arch.trim_end_matches("ForCausalLM").to_lowercase();
        let info = InfoResponse {
            base_model: base_model.to_string(),
            model_name,
            arch,
            vocab_size: c.vocab_size,
            max_length,
            eos_token_ids: c.eos_token_ids.clone(),
            tokenizer_id,
            max_rank: MAX_RANK,
            adapters: Vec::new(),
        };
        Ok(BaseModel { model, tokenizer, max_length, info })
    }
}

/// Where an adapter is.
enum SlotState {
    Loaded {
        adapter: Box<Adapter>,
        pending_grads: bool,
    },
    Spilled(PathBuf),
    /// Unloaded while a request waited for it.
    Removed,
}

struct Slot {
    state: Mutex<SlotState>,
    last_used: Mutex<Instant>,
}

/// Locks that survive a panicked holder: the guarded data is replaced whole by each writer.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The model application's state.
pub struct ModelService {
    base: BaseModel,
    adapters: Mutex<HashMap<String, Arc<Slot>>>,
    by_dir: AdapterCache,
    timeout: Duration,
    spill_dir: PathBuf,
    max_resident: Option<usize>,
    /// Data-parallel workers for forward/backward when more than one is configured; callers
    /// take this lock after an adapter's lock, never the other way round.
    parallel: Option<Mutex<DataParallel>>,
}

impl ModelService {
    /// Loads the base model and starts with no adapters; forward/backward runs on
    /// `TWINKLE_CPU_WORKERS` data-parallel CPU workers (default 1).
    pub fn new(opts: &ServiceOptions) -> Result<Self, AppError> {
        Self::with_workers(opts, parse_cpu_workers(std::env::var(CPU_WORKERS_ENV).ok().as_deref())?)
    }

    /// Like [`new`](Self::new) with `workers` data-parallel CPU workers sharing the process's
    /// threads (1: the engine is called directly).
    pub fn with_workers(opts: &ServiceOptions, workers: usize) -> Result<Self, AppError> {
        let base = BaseModel::load(&opts.base_model, &opts.model_dir, opts.max_length)?;
        let parallel = if workers > 1 {
            let threads = rayon::current_num_threads();
            let dp = DataParallel::cpu(base.model.clone(), workers, threads)
                .map_err(|e| AppError::Startup(format!("data-parallel workers: {e}")))?;
            tracing::info!(workers, threads, "forward/backward runs on data-parallel CPU workers");
            Some(Mutex::new(dp))
        } else {
            None
        };
        Ok(ModelService {
            parallel,
            base,
            adapters: Mutex::new(HashMap::new()),
            by_dir: AdapterCache::new(4),
            timeout: opts.adapter_timeout,
            spill_dir: opts.spill_dir.clone(),
            max_resident: opts.max_loras.map(|m| m.max(1)),
        })
    }

    pub fn base(&self) -> &BaseModel {
        &self.base
    }

    /// `GET /_internal/v1/info`.
    pub fn info(&self) -> InfoResponse {
        let mut ids: Vec<String> = lock(&self.adapters).keys().cloned().collect();
        ids.sort();
        InfoResponse { adapters: ids, ..self.base.info.clone() }
    }

    fn slot(&self, id: &str) -> Result<Arc<Slot>, AppError> {
        lock(&self.adapters)
            .get(id)
            .cloned()
            .ok_or_else(|| AppError::NotFound(format!("model_id `{id}` is not loaded here")))
    }

    fn spill_path(&self, id: &str) -> PathBuf {
        let hex: String = id.bytes().map(|b| format!("{b:02x}")).collect();
        self.spill_dir.join(hex)
    }

    /// Runs `f` on adapter `id` (reloading it if spilled), holding its lock.
    fn with_adapter<T>(
        &self,
        id: &str,
        f: impl FnOnce(&mut Adapter, &mut bool) -> Result<T, AppError>,
    ) -> Result<T, AppError> {
        let slot = self.slot(id)?;
        let mut state = lock(&slot.state);
        if let SlotState::Spilled(dir) = &*state {
            let (adapter, pending_grads) = checkpoint::restore(dir, &self.base.model)?;
            let _ = std::fs::remove_dir_all(dir);
            tracing::info!(model_id = id, "reloaded idle adapter");
            *state = SlotState::Loaded { adapter: Box::new(adapter), pending_grads };
            self.evict_over_limit(id);
        }
        *lock(&slot.last_used) = Instant::now();
        let out = match &mut *state {
            SlotState::Loaded { adapter, pending_grads } => f(adapter, pending_grads),
            _ => Err(AppError::NotFound(format!("model_id `{id}` was unloaded"))),
        };
        *lock(&slot.last_used) = Instant::now();
        out
    }

    fn insert(&self, id: &str, adapter: Adapter) -> Result<(), AppError> {
        let mut map = lock(&self.adapters);
        if map.contains_key(id) {
            return Err(AppError::Conflict(format!("model_id `{id}` already exists")));
        }
        let slot = Slot {
            state: Mutex::new(SlotState::Loaded {
                adapter: Box::new(adapter),
                pending_grads: false,
            }),
            last_used: Mutex::new(Instant::now()),
        };
        map.insert(id.to_string(), Arc::new(slot));
        drop(map);
        self.evict_over_limit(id);
        Ok(())
    }

    /// Spills the least recently used resident adapters (never `keep`, never a busy one) while
    /// more than `max_loras` are in memory.
    fn evict_over_limit(&self, keep: &str) {
        let Some(max) = self.max_resident else { return };
        let mut resident: Vec<(Instant, String, Arc<Slot>)> = lock(&self.adapters)
            .iter()
            .filter(|(k, _)| k.as_str() != keep)
            .map(|(k, v)| (*lock(&v.last_used), k.clone(), v.clone()))
            .collect();
        resident.sort_by_key(|(t, _, _)| *t);
        // `keep` is resident; the others count when loaded (a busy one is assumed loaded).
        let loaded = |s: &Slot| match s.state.try_lock() {
            Ok(st) => matches!(*st, SlotState::Loaded { .. }),
            Err(_) => true,
        };
        let mut count = 1 + resident.iter().filter(|(_, _, s)| loaded(s)).count();
        for (_, id, slot) in resident {
            if count <= max {
                break;
            }
            if self.spill_slot(&id, &slot) {
                count -= 1;
            }
        }
    }

    /// Spills one adapter if it is loaded and not busy; true when it was spilled.
    fn spill_slot(&self, id: &str, slot: &Slot) -> bool {
        let Ok(mut state) = slot.state.try_lock() else { return false };
        let SlotState::Loaded { adapter, pending_grads } = &*state else { return false };
        let dir = self.spill_path(id);
        match checkpoint::spill(adapter, *pending_grads, &dir) {
            Ok(()) => {
                tracing::info!(model_id = %id, dir = %dir.display(), "unloaded adapter to disk");
                *state = SlotState::Spilled(dir);
                true
            }
            Err(e) => {
                tracing::warn!(model_id = %id, error = %e, "cannot spill adapter");
                false
            }
        }
    }

    fn check_id(id: &str) -> Result<(), AppError> {
        if id.is_empty() {
            return Err(AppError::BadRequest("model_id must not be empty".into()));
        }
        Ok(())
    }

    /// `POST /_internal/v1/create_adapter`.
    pub fn create_adapter(&self, req: &CreateAdapterRequest) -> Result<(), AppError> {
        Self::check_id(&req.model_id)?;
        let l = &req.lora;
        if l.rank == 0 || l.rank > MAX_RANK {
            return Err(AppError::BadRequest(format!(
                "rank must be in 1..={MAX_RANK}, got {}",
                l.rank
            )));
        }
        if !(l.alpha.is_finite() && l.alpha > 0.0) {
            return Err(AppError::BadRequest(format!("alpha must be > 0, got {}", l.alpha)));
        }
        if !(l.train_attn || l.train_mlp || l.train_unembed) {
            return Err(AppError::BadRequest(
                "train_attn, train_mlp and train_unembed are all false: nothing to train".into(),
            ));
        }
        if lock(&self.adapters).contains_key(&req.model_id) {
            return Err(AppError::Conflict(format!("model_id `{}` already exists", req.model_id)));
        }
        let seed = l.seed.unwrap_or_else(crate::engine::rng::fresh_seed);
        let cfg = LoraConfig::from_tinker(
            l.rank,
            l.alpha,
            l.train_attn,
            l.train_mlp,
            l.train_unembed,
            seed,
        );
        let mut adapter = Adapter::new(&self.base.model, &cfg)?;
        adapter.set_base_model(&self.base.info.model_name);
        self.insert(&req.model_id, adapter)
    }

    fn to_datums(&self, data: &[DatumJson]) -> Result<Vec<Datum>, AppError> {
        if data.is_empty() {
            return Err(AppError::BadRequest("data: the batch has no datums".into()));
        }
        let max = self.base.max_length;
        data.iter()
            .enumerate()
            .map(|(i, d)| {
                if d.tokens.len() > max {
                    return Err(AppError::BadRequest(format!(
                        "data[{i}].tokens: {} tokens exceed max_length {max}",
                        d.tokens.len()
                    )));
                }
                let k = d.k.unwrap_or(1).max(1);
                if d.target_tokens.len() != d.tokens.len() * k {
                    return Err(AppError::BadRequest(format!(
                        "data[{i}].target_tokens has {} values, expected {} (tokens × k = {} × {k})",
                        d.target_tokens.len(),
                        d.tokens.len() * k,
                        d.tokens.len()
                    )));
                }
                let targets = d
                    .target_tokens
                    .iter()
                    .enumerate()
                    .map(|(p, &t)| {
                        u32::try_from(t).map_err(|_| {
                            AppError::BadRequest(format!(
                                "data[{i}].target_tokens[{p}] = {t} is not a token id"
                            ))
                        })
                    })
                    .collect::<Result<Vec<u32>, _>>()?;
                Ok(Datum {
                    input_tokens: d.tokens.clone(),
                    inputs: LossInputs {
                        target_tokens: targets,
                        k,
                        weights: d.weights.clone(),
                        logprobs: d.logprobs.clone(),
                        advantages: d.advantages.clone(),
                    },
                })
            })
            .collect()
    }

    /// `POST /_internal/v1/forward_backward` (and forward with `forward_only`).
    pub fn forward_backward(
        &self,
        req: &ForwardBackwardRequest,
    ) -> Result<ForwardBackwardResponse, AppError> {
        let config: std::collections::BTreeMap<String, f64> = req
            .loss_config
            .iter()
            .flatten()
            .filter_map(|(k, v)| v.as_f64().map(|x| (k.clone(), x)))
            .collect();
        let loss = LossFn::from_name(&req.loss_fn, &config)?;
        let data = self.to_datums(&req.data)?;
        let model = &self.base.model;
        let out = self.with_adapter(&req.model_id, |adapter, pending| {
            if let Some(dp) = &self.parallel {
                let out = lock(dp).forward_backward(adapter, &data, &loss, req.forward_only)?;
                *pending |= !req.forward_only;
                return Ok(out);
            }
            if req.forward_only {
                Ok(forward(model, Some(adapter), &data, &loss)?)
            } else {
                let out = forward_backward(model, Some(adapter), &data, &loss, false)?;
                *pending = true;
                Ok(out)
            }
        })?;
        let outputs = out
            .per_datum
            .iter()
            .zip(&data)
            .map(|(o, d): (&DatumOutput, &Datum)| {
                let (n, k) = (d.input_tokens.len(), d.inputs.k.max(1));
                DatumOutputJson {
                    logprobs: o.logprobs.clone(),
                    elementwise_loss: o.elementwise_loss.clone(),
                    shape: if k == 1 { vec![n] } else { vec![n, k] },
                }
            })
            .collect();
        Ok(ForwardBackwardResponse { outputs, metrics: out.metrics() })
    }

    /// `POST /_internal/v1/optim_step`. Without gradients accumulated since the last step it is
    /// a user error (nothing to apply; Adam's moments would otherwise decay for nothing).
    pub fn optim_step(&self, req: &OptimStepRequest) -> Result<MetricsResponse, AppError> {
        self.with_adapter(&req.model_id, |adapter, pending| {
            if !*pending {
                return Err(AppError::BadRequest(format!(
                    "optim_step: model_id `{}` has no gradients; call forward_backward first",
                    req.model_id
                )));
            }
            let m = adapter.optim_step(&req.adam_params)?;
            *pending = false;
            Ok(MetricsResponse { metrics: m.to_map() })
        })
    }

    /// `POST /_internal/v1/save`.
    pub fn save(&self, req: &SaveRequest) -> Result<SaveResponse, AppError> {
        if !req.dir.is_absolute() {
            return Err(AppError::BadRequest(format!(
                "dir must be an absolute path, got {}",
                req.dir.display()
            )));
        }
        let size_bytes = self.with_adapter(&req.model_id, |adapter, _| {
            write_dir_atomic(&req.dir, |tmp| {
                match req.kind {
                    SaveKind::State => adapter.save_state(tmp)?,
                    SaveKind::Sampler => adapter.save_peft(tmp)?,
                }
                Ok(())
            })
        })?;
        Ok(SaveResponse { size_bytes })
    }

    fn load_checkpoint(&self, dir: &Path, with_optimizer: bool) -> Result<Adapter, AppError> {
        if !dir.is_absolute() {
            return Err(AppError::BadRequest(format!(
                "dir must be an absolute path, got {}",
                dir.display()
            )));
        }
        if !dir.join("adapter_config.json").is_file() {
            return Err(AppError::NotFound(format!(
                "checkpoint {} holds no adapter_config.json",
                dir.display()
            )));
        }
        let model = &self.base.model;
        let bad = |e: crate::engine::EngineError| {
            AppError::BadRequest(format!("cannot load checkpoint {}: {e}", dir.display()))
        };
        let adapter = if with_optimizer {
            if !dir.join(OPTIM_META).is_file() {
                return Err(AppError::BadRequest(format!(
                    "checkpoint {} has no optimizer state (a sampler checkpoint?); load it without the optimizer",
                    dir.display()
                )));
            }
            Adapter::load_state(dir, model).map_err(bad)?
        } else {
            Adapter::load_peft(dir, model).map_err(bad)?
        };
        adapter.check_compatible(model).map_err(bad)?;
        Ok(adapter)
    }

    /// `POST /_internal/v1/load`: create-via-load (`create` present) or onto an existing id.
    pub fn load(&self, req: &LoadRequest) -> Result<(), AppError> {
        Self::check_id(&req.model_id)?;
        if req.create.is_some() {
            if lock(&self.adapters).contains_key(&req.model_id) {
                return Err(AppError::Conflict(format!(
                    "model_id `{}` already exists",
                    req.model_id
                )));
            }
            let adapter = self.load_checkpoint(&req.dir, req.with_optimizer)?;
            return self.insert(&req.model_id, adapter);
        }
        let slot = self.slot(&req.model_id)?;
        let adapter = self.load_checkpoint(&req.dir, req.with_optimizer)?;
        let mut state = lock(&slot.state);
        if matches!(*state, SlotState::Removed) {
            return Err(AppError::NotFound(format!("model_id `{}` was unloaded", req.model_id)));
        }
        if let SlotState::Spilled(dir) = &*state {
            let _ = std::fs::remove_dir_all(dir);
        }
        *state = SlotState::Loaded { adapter: Box::new(adapter), pending_grads: false };
        *lock(&slot.last_used) = Instant::now();
        Ok(())
    }

    /// `POST /_internal/v1/unload`: frees the adapter (and any spilled copy).
    pub fn unload(&self, req: &UnloadRequest) -> Result<(), AppError> {
        let slot = lock(&self.adapters).remove(&req.model_id).ok_or_else(|| {
            AppError::NotFound(format!("model_id `{}` is not loaded here", req.model_id))
        })?;
        let mut state = lock(&slot.state);
        if let SlotState::Spilled(dir) = &*state {
            let _ = std::fs::remove_dir_all(dir);
        }
        *state = SlotState::Removed;
        Ok(())
    }

    /// `POST /_internal/v1/sample`: from adapter `model_id`, a PEFT `adapter_dir`, or the base.
    pub fn sample(&self, req: &SampleRequest) -> Result<SampleResponse, AppError> {
        let b = &self.base;
        let tok = b.tokenizer.as_deref();
        match (&req.model_id, &req.adapter_dir) {
            (Some(_), Some(_)) => {
                Err(AppError::BadRequest("give model_id or adapter_dir, not both".into()))
            }
            (Some(id), None) => self.with_adapter(id, |adapter, _| {
                sample::generate(&b.model, Some(adapter), tok, b.max_length, req)
            }),
            (None, Some(dir)) => {
                let adapter = self.by_dir.get(dir, &b.model)?;
                sample::generate(&b.model, Some(&adapter), tok, b.max_length, req)
            }
            (None, None) => sample::generate(&b.model, None, tok, b.max_length, req),
        }
    }

    /// Spills every adapter idle for at least the timeout (busy ones are skipped: they are in
    /// use). Returns how many were spilled.
    pub fn sweep_idle(&self) -> usize {
        let slots: Vec<(String, Arc<Slot>)> =
            lock(&self.adapters).iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        let mut spilled = 0;
        for (id, slot) in slots {
            if lock(&slot.last_used).elapsed() >= self.timeout && self.spill_slot(&id, &slot) {
                spilled += 1;
            }
        }
        spilled
    }

    /// Whether adapter `id` is in memory (false when spilled or unknown).
    pub fn is_resident(&self, id: &str) -> bool {
        self.slot(id).map(|s| matches!(*lock(&s.state), SlotState::Loaded { .. })).unwrap_or(false)
    }

    /// A background thread that calls [`sweep_idle`](Self::sweep_idle) every `every` until the
    /// service is dropped.
    pub fn spawn_sweeper(self: &Arc<Self>, every: Duration) -> std::thread::JoinHandle<()> {
        let weak: Weak<Self> = Arc::downgrade(self);
        std::thread::spawn(move || {
            loop {
                std::thread::sleep(every);
                match weak.upgrade() {
                    Some(svc) => {
                        svc.sweep_idle();
                    }
                    None => return,
                }
            }
        })
    }

    /// How often the sweeper should look: a fraction of the timeout, between 0.1 s and 5 s.
    pub fn sweep_interval(&self) -> Duration {
        (self.timeout / 4).clamp(Duration::from_millis(100), Duration::from_secs(5))
    }
}
