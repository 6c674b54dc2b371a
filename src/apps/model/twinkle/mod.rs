//! The model application's Twinkle-native API (both client generations): per-adapter training
//! state on top of the internal model service — template, loss, optimizer, lr schedule, gradient
//! accumulation, clip-then-step, metrics, save/load/resume — with run and checkpoint metadata
//! written next to the PEFT directories (`protocol::twinkle::runs`), so the app works with no
//! server app. Adapter ids are `{scope}-{adapter_name}` (the training run id), scoped by the
//! caller's session or request id and owned by the caller's token hash.

mod ckpt;
mod inputs;
mod journal;
mod ops;
mod steps;

pub use journal::JOURNAL_DIR;
pub use ops::TEMPLATES;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::{Map, Value};

use super::http::ModelApp;
use crate::apps::twinkle_http::{Call, Ops, Reply};
use crate::engine::AdamParams;
use crate::protocol::twinkle::sched::Schedule;
use crate::protocol::twinkle::wire::LoraRequest;
use crate::protocol::twinkle::{Auth, Caller, TwinkleError};
use inputs::{Encoded, Loss, TemplateCfg};

/// Default number of adapters one token may hold on a model application.
pub const DEFAULT_PER_OWNER: usize = 8;

/// Training state of one adapter (Python's `OptimizerGroup`).
#[derive(Debug)]
struct TrainState {
    owner: String,
    /// The training run id the client sees (`{scope}-{adapter_name}`).
    run_id: String,
    /// The model service's id: owner and run id, so two tenants reusing a scope never collide.
    engine_id: String,
    lora: LoraRequest,
    ga_steps: u64,
    template: Option<TemplateCfg>,
    loss: Loss,
    optim: AdamParams,
    optimizer_cls: String,
    schedule: Schedule,
    scheduler_cls: Option<String>,
    /// Scheduler steps taken (`lr_step`).
    sched_steps: u64,
    /// forward_backward calls since the last optimizer step.
    micro: u64,
    /// Optimizer steps taken.
    cur_step: u64,
    /// Set by `clip_grad_norm`, used by the next `step`.
    clip: Option<f64>,
    /// Whether a step happened since the last `lr_step` (the scheduler follows the optimizer).
    stepped: bool,
    consumed_train_samples: u64,
    /// Split-phase `forward` → `calculate_loss` → `backward`.
    staged: Option<(Vec<Encoded>, Map<String, Value>, f64)>,
    metrics: Metrics,
    last_seen: Instant,
    /// When the adapter was created (`adapter_max_lifetime` counts from here, across restarts).
    created: std::time::SystemTime,
    /// The configuring calls' bodies (`journal::CONFIG_OPS`), for a restart.
    config_ops: Vec<(String, Map<String, Value>)>,
}

/// Running metrics reported (and reset) by `calculate_metric`.
#[derive(Debug, Default, Clone)]
struct Metrics {
    loss_sum: f64,
    batches: u64,
    tokens: u64,
    grad_norm: Option<f64>,
    lr: Option<f64>,
}

/// The Twinkle layer of one model application.
pub struct TwinkleModel {
    app: Arc<dyn ModelApp>,
    auth: Auth,
    adapters: Mutex<HashMap<String, Arc<Mutex<TrainState>>>>,
    timeout: Duration,
    per_owner: usize,
    /// Directory of the adapters' journals (`journal.rs`); none in some in-process tests.
    journal: Option<std::path::PathBuf>,
    /// `adapter_max_lifetime`: an adapter this old expires whatever its activity.
    max_lifetime: Option<Duration>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl TwinkleModel {
    pub fn new(app: Arc<dyn ModelApp>, auth: Auth, timeout: Duration, per_owner: usize) -> Self {
        TwinkleModel {
            app,
            auth,
            adapters: Mutex::new(HashMap::new()),
            timeout,
            per_owner: per_owner.max(1),
            journal: None,
            max_lifetime: None,
        }
    }

    /// The caller's adapter `adapter_name` of the call's body (404 when it does not exist or is
    /// someone else's); the call counts as activity.
    fn state(&self, c: Call) -> Result<Arc<Mutex<TrainState>>, TwinkleError> {
        let name = adapter_name(c.body)?;
        let id = engine_id(c.caller, &c.caller.adapter_id(&name)?);
        let st = lock(&self.adapters).get(&id).cloned();
        match st {
            Some(s) if lock(&s).owner == c.caller.owner => {
                lock(&s).last_seen = Instant::now();
                Ok(s)
            }
            _ => Err(TwinkleError::NotFound(format!(
                "adapter `{name}` does not exist in this session; call add_adapter_to_model first"
            ))),
        }
    }

    /// Runs `f` on the call's adapter's training state ([`state`](Self::state)), locked for
    /// the whole op so two calls of one adapter never interleave.
    fn with_state<T>(
        &self,
        c: Call,
        f: impl FnOnce(&mut TrainState) -> Result<T, TwinkleError>,
    ) -> Result<T, TwinkleError> {
        let s = self.state(c)?;
        let mut st = lock(&s);
        f(&mut st)
    }

    /// Expires adapters older than `max_lifetime` (as the Python server's
    /// `adapter_max_lifetime`, whatever their activity).
    pub fn with_max_lifetime(mut self, max_lifetime: Option<Duration>) -> Self {
        self.max_lifetime = max_lifetime;
        self
    }

    /// Removes adapters without any call or heartbeat for the adapter timeout, or older than
    /// the maximum lifetime (their checkpoints stay on disk). Returns how many were removed.
    pub fn sweep(&self) -> usize {
        let too_old = |s: &TrainState| {
            self.max_lifetime.is_some_and(|m| s.created.elapsed().is_ok_and(|age| age >= m))
        };
        let expired: Vec<String> = lock(&self.adapters)
            .iter()
            .filter(|(_, s)| {
                super::try_lock(s)
                    .is_some_and(|s| s.last_seen.elapsed() >= self.timeout || too_old(&s))
            })
            .map(|(k, _)| k.clone())
            .collect();
        for id in &expired {
            lock(&self.adapters).remove(id);
            self.journal_forget(id);
            let req = crate::protocol::internal::UnloadRequest { model_id: id.clone() };
            if let Err(e) = self.app.unload(&req) {
                tracing::warn!(adapter = %id, error = %e, "cannot unload an expired adapter");
            }
            tracing::info!(adapter = %id, "twinkle adapter expired (no call or heartbeat for adapter_timeout, or past adapter_max_lifetime)");
        }
        expired.len()
    }

    /// Runs one op, then journals what it changed (`journal.rs`).
    fn dispatch(&self, c: Call) -> Result<Value, TwinkleError> {
        let out = self.apply(c)?;
        if self.journaled(c.op) {
            self.journal_after(c);
        }
        Ok(out)
    }

    /// Runs one op.
    fn apply(&self, c: Call) -> Result<Value, TwinkleError> {
        match c.op {
            "create" => Ok(serde_json::json!({"status": "ok"})),
            "add_adapter_to_model" => self.add_adapter(c),
            "heartbeat" => {
                self.state(c)?;
                Ok(serde_json::json!({"status": "ok"}))
            }
            "set_template" => self.set_template(c),
            "set_processor" => self.set_processor(c),
            "set_loss" => self.set_loss(c),
            "set_optimizer" => self.set_optimizer(c),
            "set_lr_scheduler" => self.set_lr_scheduler(c),
            "forward" | "forward_only" => self.forward(c),
            "calculate_loss" => self.calculate_loss(c),
            "backward" => self.backward(c),
            "forward_backward" => self.forward_backward(c),
            "clip_grad_norm" => self.clip_grad_norm(c),
            "step" => self.step(c),
            "zero_grad" => self.zero_grad(c),
            "lr_step" => self.lr_step(c),
            "clip_grad_and_step" => self.clip_grad_and_step(c),
            "calculate_metric" => self.calculate_metric(c),
            "get_train_configs" => self.train_configs(c),
            "get_state_dict" => self.state_dict(c),
            "save" => self.save(c),
            "load" => self.load(c),
            "resume_from_checkpoint" => self.resume(c),
            "add_metric" => self.add_metric(c),
            "apply_patch" => Err(TwinkleError::bad(
                "apply_patch: patches are Python code and are not executed by this server",
            )),
            "upload_to_hub" | "upload_status" => Err(TwinkleError::NotImplemented(
                "upload_to_hub: this server has no model-hub access; download the checkpoint \
                 (weights/<name> under your run) and upload it from a machine with network"
                    .into(),
            )),
            other => {
                Err(TwinkleError::NotFound(format!("the model application has no op `{other}`")))
            }
        }
    }
}

/// The model service's id of run `run_id` of `caller`.
fn engine_id(caller: &Caller, run_id: &str) -> String {
    format!("{}/{run_id}", caller.owner)
}

/// `adapter_name` of a request body (the client always sends it; `''` is the default adapter).
fn adapter_name(body: &Map<String, Value>) -> Result<String, TwinkleError> {
    match body.get("adapter_name") {
        None | Some(Value::Null) => Ok("default".into()),
        Some(Value::String(s)) if s.is_empty() => Ok("default".into()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(other) => {
            Err(TwinkleError::bad(format!("adapter_name must be a string, got {other}")))
        }
    }
}

/// Mounted by `apps::twinkle_http::routes`: `{prefix}/twinkle/{op}` always (Gen-2, POST and
/// GET), `{prefix}/{op}` with `server_type: twinkle` (Gen-1).
impl Ops for TwinkleModel {
    const GET_TOO: bool = true;

    fn auth(&self) -> &Auth {
        &self.auth
    }

    fn call(&self, c: Call<'_>) -> Result<Reply, TwinkleError> {
        self.dispatch(c).map(Reply::Json)
    }
}
