//! The `model` application: one base model (loaded once) and many LoRA adapters keyed by the
//! server's opaque model ids; forward / forward_backward / optim_step / save / load / unload /
//! sample over the internal JSON API (`http.rs`, bodies in `types.rs`).
//!
//! Device: the service is generic over the engine's device seam ([`ModelRuntime`]) and computes
//! on a [`DataParallel`] pool of runtimes (one per visible GPU for `device_type: cuda`, CPU
//! workers otherwise), chosen once at start-up (`apps::load`). Adapters live on the devices
//! (replicated); a host copy is made only to write a checkpoint or to spill.
//!
//! Concurrency: every operation runs on a blocking thread (see [`http`]), so the HTTP workers
//! stay free for `/healthz`. Each adapter has its own lock: operations on one adapter run one at
//! a time, different adapters run concurrently (the engine parallelises inside a call).
//! forward / forward_backward go through a combining queue ([`queue`], [`batched`]): jobs of
//! different adapters arriving within `batch_window_ms` share one pass over the base weights.
//! Sampling goes through a continuous-batching decoder per runtime ([`decode`]): every running
//! request's sequences, whatever their adapter, share one pass per token.
//!
//! Idle unload: an adapter unused for `adapter_timeout` seconds is spilled (weights, Adam
//! moments, step and pending gradients) to `spill_dir` and freed; the next request for it reloads
//! it transparently, with identical numbers.
//!
//! Durability: an `optim_step` answers once a snapshot of its adapter at that step is written
//! ([`durable`]), so a restarted application serves the same model ids at their last
//! acknowledged step.

pub mod base;
mod batched;
pub mod checkpoint;
pub mod decode;
pub mod durable;
pub mod error;
pub mod http;
mod persist;
pub mod queue;
pub mod sample;
pub mod twinkle;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::engine::cpu::CpuRuntime;
use crate::engine::parallel::{DataParallel, Replicated};
use crate::engine::{Adapter, LoraConfig, ModelConfig, ModelRuntime};

use crate::protocol::internal::*;
pub use base::{BaseModel, Served};
pub use batched::BatchStats;
use checkpoint::AdapterCache;
pub use error::AppError;

/// Largest LoRA rank accepted.
pub use crate::engine::lora::MAX_RANK;
/// Default `adapter_config.adapter_timeout`.
pub const DEFAULT_ADAPTER_TIMEOUT: Duration = Duration::from_secs(1800);
/// Default `batch_window_ms`: how long queued forward / forward_backward jobs wait for
/// companions of other adapters before they run as one batch (a lone job never waits).
pub const DEFAULT_BATCH_WINDOW: Duration = Duration::from_millis(2);
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
    /// Where idle adapters are spilled (and their durable snapshots and journal kept).
    pub spill_dir: PathBuf,
    /// Config `max_length`; the model's `max_position_embeddings` when absent or larger.
    pub max_length: Option<usize>,
    /// When adapters leave memory and how their steps are kept.
    pub adapters: AdapterPolicy,
    /// Config `batch_window_ms` (default [`DEFAULT_BATCH_WINDOW`]): forward / forward_backward
    /// jobs of different adapters queued within it run as one batch; zero turns batching off
    /// (every job runs on its own thread, different adapters concurrently).
    pub batch_window: Duration,
}

/// An adapter's life in a model service: when it leaves memory and how its steps are kept
/// (config `adapter_config` and `max_loras`).
#[derive(Debug, Clone, Copy)]
pub struct AdapterPolicy {
    /// Config `adapter_config.adapter_timeout`: an adapter unused this long is spilled.
    pub idle_timeout: Duration,
    /// Config `adapter_config.adapter_max_lifetime`: the Twinkle-native layer expires an adapter
    /// this old whatever its activity (Tinker runs are durable and only spill when idle).
    pub max_lifetime: Option<Duration>,
    /// Most adapters kept in memory (config `max_loras`); beyond it the least recently used are
    /// spilled like idle ones. `None`: no limit.
    pub max_loras: Option<usize>,
    /// Config `adapter_config.durable_steps` (default true): `optim_step` answers once the
    /// adapter's snapshot is written; false leaves the write to the background writer (faster
    /// steps for large adapters; a crash may then lose the last answered step).
    pub durable_steps: bool,
}

/// What [`crate::apps::model_options`] uses for what the config leaves out: spill after
/// [`DEFAULT_ADAPTER_TIMEOUT`], no maximum lifetime, no residency limit, durable steps.
impl Default for AdapterPolicy {
    fn default() -> Self {
        AdapterPolicy {
            idle_timeout: DEFAULT_ADAPTER_TIMEOUT,
            max_lifetime: None,
            max_loras: None,
            durable_steps: true,
        }
    }
}

/// Where an adapter is.
enum SlotState<R: ModelRuntime> {
    Loaded {
        adapter: Box<Replicated<R>>,
        pending_grads: bool,
    },
    Spilled(PathBuf),
    /// Unloaded while a request waited for it.
    Removed,
}

struct Slot<R: ModelRuntime> {
    state: Mutex<SlotState<R>>,
    last_used: Mutex<Instant>,
    /// Held while this adapter's snapshot directory is written or removed, so two writers (the
    /// background writer and a request thread) never race on it; holds the generation of the
    /// state on disk, so an older copy never replaces a newer one (see [`durable`]).
    snap_written: Mutex<u64>,
}

impl<R: ModelRuntime> Slot<R> {
    fn new(state: SlotState<R>) -> Self {
        Slot {
            state: Mutex::new(state),
            last_used: Mutex::new(Instant::now()),
            snap_written: Mutex::new(0),
        }
    }
}

/// Locks that survive a panicked holder: the guarded data is replaced whole by each writer.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// `try_lock` with the same tolerance: `None` only while another thread holds the lock (a
/// poisoned slot must still be spillable and counted).
pub(crate) fn try_lock<T>(m: &Mutex<T>) -> Option<MutexGuard<'_, T>> {
    match m.try_lock() {
        Ok(g) => Some(g),
        Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
        Err(std::sync::TryLockError::WouldBlock) => None,
    }
}

/// The model application's state, computing on runtimes of type `R`.
pub struct ModelService<R: ModelRuntime = CpuRuntime> {
    base: Served,
    engine: DataParallel<R>,
    adapters: Mutex<HashMap<String, Arc<Slot<R>>>>,
    by_dir: AdapterCache<Replicated<R>>,
    timeout: Duration,
    spill_dir: PathBuf,
    max_resident: Option<usize>,
    /// Durable snapshots of the live adapters.
    snaps: durable::Snapshots,
    /// `optim_step` answers after its snapshot is written (else the background writer does it).
    durable_steps: bool,
    /// Round-robin over the runtimes for generation.
    next_worker: std::sync::atomic::AtomicUsize,
    /// Per runtime: the passes that decode every request's sequences together.
    decoders: Vec<decode::DecodeBatcher<R>>,
    /// The combining queue of forward / forward_backward (`None`: batching off).
    queue: Option<batched::Queue>,
}

impl ModelService<CpuRuntime> {
    /// Loads the base model and starts with no adapters; forward/backward runs on
    /// `TWINKLE_CPU_WORKERS` data-parallel CPU workers (default 1).
    pub fn new(opts: &ServiceOptions) -> Result<Self, AppError> {
        Self::with_workers(opts, parse_cpu_workers(std::env::var(CPU_WORKERS_ENV).ok().as_deref())?)
    }

    /// Like [`new`](Self::new) with `workers` data-parallel CPU workers sharing the process's
    /// threads (1: the engine runs on the process-wide pool).
    pub fn with_workers(opts: &ServiceOptions, workers: usize) -> Result<Self, AppError> {
        let base = BaseModel::load(&opts.base_model, &opts.model_dir, opts.max_length)?;
        let threads = rayon::current_num_threads();
        let engine = DataParallel::cpu(base.model.clone(), workers, threads)
            .map_err(|e| AppError::Startup(format!("data-parallel workers: {e}")))?;
        if workers > 1 {
            tracing::info!(workers, threads, "forward/backward runs on data-parallel CPU workers");
        }
        Ok(Self::with_engine(opts, base.served, engine))
    }
}

impl<R: ModelRuntime> ModelService<R> {
    /// A service over an engine built by the caller (one runtime per device).
    pub fn with_engine(opts: &ServiceOptions, mut base: Served, engine: DataParallel<R>) -> Self {
        base.info.devices =
            (0..engine.num_workers()).map(|i| engine.worker(i).device_name()).collect();
        let decoders = (0..engine.num_workers())
            .map(|_| decode::DecodeBatcher::new(decode::DEFAULT_MAX_SEQS))
            .collect();
        ModelService {
            base,
            engine,
            adapters: Mutex::new(HashMap::new()),
            by_dir: AdapterCache::new(4),
            timeout: opts.adapters.idle_timeout,
            durable_steps: opts.adapters.durable_steps,
            spill_dir: opts.spill_dir.clone(),
            max_resident: opts.adapters.max_loras.map(|m| m.max(1)),
            snaps: durable::Snapshots::new(&opts.spill_dir),
            next_worker: Default::default(),
            decoders,
            queue: (!opts.batch_window.is_zero()).then(|| queue::Combiner::new(opts.batch_window)),
        }
    }

    pub fn base(&self) -> &Served {
        &self.base
    }

    fn config(&self) -> &ModelConfig {
        &self.base.config
    }

    /// How many adapters are in memory and how many are spilled to disk (a slot busy with a
    /// request is in memory: only an idle one can be spilled).
    pub fn adapter_places(&self) -> (usize, usize) {
        let slots: Vec<Arc<Slot<R>>> = lock(&self.adapters).values().cloned().collect();
        let spilled = slots
            .iter()
            .filter(|s| try_lock(&s.state).is_some_and(|st| matches!(*st, SlotState::Spilled(_))))
            .count();
        (slots.len() - spilled, spilled)
    }

    /// `GET /_internal/v1/info`.
    pub fn info(&self) -> InfoResponse {
        let mut ids: Vec<String> = lock(&self.adapters).keys().cloned().collect();
        ids.sort();
        InfoResponse { adapters: ids, ..self.base.info.clone() }
    }

    fn slot(&self, id: &str) -> Result<Arc<Slot<R>>, AppError> {
        lock(&self.adapters)
            .get(id)
            .cloned()
            .ok_or_else(|| AppError::UnknownAdapter(format!("model_id `{id}` is not loaded here")))
    }

    fn spill_path(&self, id: &str) -> PathBuf {
        self.spill_dir.join(durable::key(id))
    }

    /// Deletes a spilled copy once it is back in memory (a durable snapshot stays).
    fn drop_spill(&self, dir: &Path) {
        if !self.snaps.owns(dir) {
            let _ = std::fs::remove_dir_all(dir);
        }
    }

    /// Runs `f` on adapter `id` (reloading it if spilled), holding its lock.
    fn with_adapter<T>(
        &self,
        id: &str,
        f: impl FnOnce(&mut Replicated<R>, &mut bool) -> Result<T, AppError>,
    ) -> Result<T, AppError> {
        self.with_slot(id, f).map(|(out, _)| out)
    }

    /// [`with_adapter`](Self::with_adapter), also returning the slot `f` ran on (a snapshot
    /// written after the lock is released must go to that slot, not to one created since).
    fn with_slot<T>(
        &self,
        id: &str,
        f: impl FnOnce(&mut Replicated<R>, &mut bool) -> Result<T, AppError>,
    ) -> Result<(T, Arc<Slot<R>>), AppError> {
        let slot = self.slot(id)?;
        let mut state = lock(&slot.state);
        self.ensure_loaded(id, &mut state)?;
        *lock(&slot.last_used) = Instant::now();
        // The engine rolls a failed forward_backward back itself; a panic that gets here comes
        // from around it and fails this job only (the slot's lock is not poisoned by it).
        let out = match &mut *state {
            SlotState::Loaded { adapter, pending_grads } => http::unwind_safe(
                || f(adapter, pending_grads),
                |m| AppError::Internal(format!("model_id `{id}`: the job panicked: {m}")),
            ),
            _ => Err(AppError::NotFound(format!("model_id `{id}` was unloaded"))),
        };
        *lock(&slot.last_used) = Instant::now();
        drop(state);
        out.map(|o| (o, slot))
    }

    /// Reloads a spilled adapter into its (locked) slot; a loaded or removed one is left as is.
    fn ensure_loaded(&self, id: &str, state: &mut SlotState<R>) -> Result<(), AppError> {
        if let SlotState::Spilled(dir) = &*state {
            let (host, pending_grads) = checkpoint::restore(dir, self.config())?;
            let adapter = self.engine.upload(&host)?;
            self.drop_spill(dir);
            tracing::info!(model_id = id, "reloaded idle adapter");
            *state = SlotState::Loaded { adapter: Box::new(adapter), pending_grads };
            self.evict_over_limit(id);
        }
        Ok(())
    }

    fn insert(&self, id: &str, host: Adapter) -> Result<(), AppError> {
        if lock(&self.adapters).contains_key(id) {
            return Err(AppError::Conflict(format!("model_id `{id}` already exists")));
        }
        let adapter = self.engine.upload(&host)?;
        let mut map = lock(&self.adapters);
        if map.contains_key(id) {
            return Err(AppError::Conflict(format!("model_id `{id}` already exists")));
        }
        let slot =
            Slot::new(SlotState::Loaded { adapter: Box::new(adapter), pending_grads: false });
        map.insert(id.to_string(), Arc::new(slot));
        drop(map);
        self.snaps.schedule(id);
        self.evict_over_limit(id);
        Ok(())
    }

    /// Spills the least recently used resident adapters (never `keep`, never a busy one) while
    /// more than `max_loras` are in memory.
    fn evict_over_limit(&self, keep: &str) {
        let Some(max) = self.max_resident else { return };
        let mut resident: Vec<(Instant, String, Arc<Slot<R>>)> = lock(&self.adapters)
            .iter()
            .filter(|(k, _)| k.as_str() != keep)
            .map(|(k, v)| (*lock(&v.last_used), k.clone(), v.clone()))
            .collect();
        resident.sort_by_key(|(t, _, _)| *t);
        // `keep` is resident; the others count when loaded (a busy one is assumed loaded).
        let loaded = |s: &Slot<R>| match try_lock(&s.state) {
            Some(st) => matches!(*st, SlotState::Loaded { .. }),
            None => true,
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
    fn spill_slot(&self, id: &str, slot: &Slot<R>) -> bool {
        let Some(mut state) = try_lock(&slot.state) else { return false };
        let SlotState::Loaded { adapter, pending_grads } = &*state else { return false };
        let dir = self.spill_path(id);
        let written = self
            .engine
            .download(adapter)
            .map_err(AppError::from)
            .and_then(|host| checkpoint::spill(&host, id, *pending_grads, &dir));
        match written {
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
        let seed = l.seed.unwrap_or_else(crate::ids::seed);
        let cfg = LoraConfig::from_tinker(l.rank, l.alpha, l.targets, seed);
        cfg.check(MAX_RANK)?;
        if lock(&self.adapters).contains_key(&req.model_id) {
            return Err(AppError::Conflict(format!("model_id `{}` already exists", req.model_id)));
        }
        let mut adapter = Adapter::for_config(self.config(), &cfg)?;
        adapter.set_base_model(&self.base.info.model_name);
        self.insert(&req.model_id, adapter)
    }

    /// `POST /_internal/v1/optim_step`. Without gradients accumulated since the last step it is
    /// a user error (nothing to apply; Adam's moments would otherwise decay for nothing).
    ///
    /// With snapshots active the answer waits until a snapshot of this step (or of a later
    /// state) is written: an acknowledged step survives a crash of the application. Only the
    /// host copy holds the adapter lock; the file write does not.
    pub fn optim_step(&self, req: &OptimStepRequest) -> Result<MetricsResponse, AppError> {
        let id = &req.model_id;
        let ((out, copy), slot) = self.with_slot(id, |adapter, pending| {
            if !*pending {
                return Err(AppError::BadRequest(format!(
                    "optim_step: model_id `{id}` has no gradients; call forward_backward first"
                )));
            }
            let m = self.engine.optim_step(adapter, &req.adam_params)?;
            *pending = false;
            let copy = if self.durable_steps { self.snapshot_copy(id, adapter) } else { None };
            Ok((MetricsResponse { metrics: m.to_map() }, copy))
        })?;
        if !self.durable_steps {
            // `durable_steps: false`: a burst of steps costs one background write of the latest.
            self.snaps.schedule(id);
        }
        // The step is applied: failing the request now would make the caller repeat it. A
        // snapshot that cannot be written is logged and left to the background writer.
        if let Some(copy) = copy
            && let Err(e) = self.write_snapshot(id, &slot, copy)
        {
            tracing::warn!(model_id = %id, error = %e, "cannot snapshot adapter after its step");
            self.snaps.schedule(id);
        }
        Ok(out)
    }

    /// Global gradient norm of adapter `id` (the accumulated, not yet applied gradient).
    pub fn grad_norm(&self, id: &str) -> Result<f64, AppError> {
        self.with_adapter(id, |adapter, _| Ok(self.engine.grad_norm(adapter)?))
    }

    /// Drops adapter `id`'s accumulated gradient.
    pub fn zero_grad(&self, id: &str) -> Result<(), AppError> {
        self.with_adapter(id, |adapter, pending| {
            self.engine.zero_grad(adapter)?;
            *pending = false;
            Ok(())
        })
    }

    /// A host copy of adapter `id` (weights, optimizer moments, step).
    pub fn download(&self, id: &str) -> Result<Adapter, AppError> {
        self.with_adapter(id, |adapter, _| Ok(self.engine.download(adapter)?))
    }

    /// `POST /_internal/v1/sample`: from adapter `model_id`, a PEFT `adapter_dir`, or the base.
    /// Requests go round-robin over the runtimes (each holds a replica of every adapter).
    pub fn sample(&self, req: &SampleRequest) -> Result<SampleResponse, AppError> {
        let b = &self.base;
        let tok = b.tokenizer.as_deref();
        let w = self.next_worker.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            % self.engine.num_workers();
        let (rt, decoder) = (self.engine.worker(w), &self.decoders[w]);
        match (&req.model_id, &req.adapter_dir) {
            (Some(_), Some(_)) => {
                Err(AppError::BadRequest("give model_id or adapter_dir, not both".into()))
            }
            (Some(id), None) => self.with_adapter(id, |adapter, _| {
                decoder.generate(rt, adapter.replica(w), tok, b.max_length, req)
            }),
            (None, Some(dir)) => {
                let adapter =
                    self.by_dir.get(dir, self.config(), |h| Ok(self.engine.upload(h)?))?;
                decoder.generate(rt, adapter.replica(w), tok, b.max_length, req)
            }
            (None, None) => decoder.generate(rt, None, tok, b.max_length, req),
        }
    }

    /// What the decode passes have done so far, summed over the runtimes.
    pub fn decode_stats(&self) -> decode::DecodeStats {
        self.decoders.iter().map(|d| d.stats()).sum()
    }

    /// Spills every adapter idle for at least the timeout (busy ones are skipped: they are in
    /// use). Returns how many were spilled.
    pub fn sweep_idle(&self) -> usize {
        let slots: Vec<(String, Arc<Slot<R>>)> =
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
}
