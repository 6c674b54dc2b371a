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

use actix_web::web;
use serde_json::{Map, Value};

use super::http::ModelApp;
use crate::engine::AdamParams;
use crate::protocol::twinkle::sched::Schedule;
use crate::protocol::twinkle::wire::LoraRequest;
use crate::protocol::twinkle::{Auth, Caller, Gen, TwinkleError};
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

    /// The caller's adapter `adapter_name` (404 when it does not exist or is someone else's).
    fn state(
        &self,
        caller: &Caller,
        body: &Map<String, Value>,
    ) -> Result<Arc<Mutex<TrainState>>, TwinkleError> {
        let name = adapter_name(body)?;
        let id = engine_id(caller, &caller.adapter_id(&name)?);
        let st = lock(&self.adapters).get(&id).cloned();
        match st {
            Some(s) if lock(&s).owner == caller.owner => {
                lock(&s).last_seen = Instant::now();
                Ok(s)
            }
            _ => Err(TwinkleError::NotFound(format!(
                "adapter `{name}` does not exist in this session; call add_adapter_to_model first"
            ))),
        }
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
            let req = super::types::UnloadRequest { model_id: id.clone() };
            if let Err(e) = self.app.unload(&req) {
                tracing::warn!(adapter = %id, error = %e, "cannot unload an expired adapter");
            }
            tracing::info!(adapter = %id, "twinkle adapter expired (no call or heartbeat for adapter_timeout, or past adapter_max_lifetime)");
        }
        expired.len()
    }

    /// Runs one op for `caller`, then journals what it changed (`journal.rs`).
    fn dispatch(
        &self,
        g: Gen,
        op: &str,
        caller: &Caller,
        body: Map<String, Value>,
    ) -> Result<Value, TwinkleError> {
        // Only the few configuring calls keep their body (a forward_backward's is large).
        let keep = self.journaled(op).then(|| body.clone());
        let out = self.apply(g, op, caller, body)?;
        if let Some(body) = keep {
            self.journal_after(g, op, caller, &body);
        }
        Ok(out)
    }

    /// Runs one op for `caller`.
    fn apply(
        &self,
        g: Gen,
        op: &str,
        caller: &Caller,
        body: Map<String, Value>,
    ) -> Result<Value, TwinkleError> {
        match op {
            "create" => Ok(serde_json::json!({"status": "ok"})),
            "add_adapter_to_model" => self.add_adapter(caller, &body),
            "heartbeat" => {
                self.state(caller, &body)?;
                Ok(serde_json::json!({"status": "ok"}))
            }
            "set_template" => self.set_template(g, caller, &body),
            "set_processor" => self.set_processor(g, caller, &body),
            "set_loss" => self.set_loss(g, caller, &body),
            "set_optimizer" => self.set_optimizer(g, caller, &body),
            "set_lr_scheduler" => self.set_lr_scheduler(g, caller, &body),
            "forward" | "forward_only" => self.forward(g, caller, &body, op == "forward"),
            "calculate_loss" => self.calculate_loss(g, caller, &body),
            "backward" => self.backward(g, caller, &body),
            "forward_backward" => self.forward_backward(g, caller, &body),
            "clip_grad_norm" => self.clip_grad_norm(g, caller, &body),
            "step" => self.step(g, caller, &body),
            "zero_grad" => self.zero_grad(g, caller, &body),
            "lr_step" => self.lr_step(g, caller, &body),
            "clip_grad_and_step" => self.clip_grad_and_step(g, caller, &body),
            "calculate_metric" => self.calculate_metric(g, caller, &body),
            "get_train_configs" => self.train_configs(g, caller, &body),
            "get_state_dict" => self.state_dict(g, caller, &body),
            "save" => self.save(g, caller, &body),
            "load" => self.load(g, caller, &body),
            "resume_from_checkpoint" => self.resume(g, caller, &body),
            "add_metric" => self.add_metric(g, caller, &body),
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

/// Routes: `{prefix}/twinkle/{op}` always (Gen-2, POST and GET), `{prefix}/{op}` with
/// `server_type: twinkle` (Gen-1); see `apps::twinkle_http`.
pub fn routes(cfg: &mut web::ServiceConfig, tw: Arc<TwinkleModel>, prefix: &str, gen1: bool) {
    crate::apps::twinkle_http::routes(cfg, tw, prefix, gen1, true);
}

impl crate::apps::twinkle_http::Ops for TwinkleModel {
    fn auth(&self) -> &Auth {
        &self.auth
    }

    fn call(
        &self,
        g: Gen,
        op: &str,
        caller: &Caller,
        body: Map<String, Value>,
    ) -> Result<crate::apps::twinkle_http::Reply, TwinkleError> {
        self.dispatch(g, op, caller, body).map(crate::apps::twinkle_http::Reply::Json)
    }
}
