//! Settings ops of the Twinkle layer: adapter creation, template/processor/loss/optimizer/lr
//! settings (unknown class names and arguments are 400 naming what is supported), metrics and
//! the train-config report. The compute ops live in `steps`.

use std::time::Instant;

use serde_json::{Map, Value, json};

use super::inputs::{Loss, TemplateCfg};
use super::{Metrics, TrainState, TwinkleModel, adapter_name, lock};
use crate::apps::twinkle_http::Call;
use crate::engine::AdamParams;
use crate::protocol::internal::{CreateAdapterRequest, LoraSettings};
use crate::protocol::twinkle::runs::{self, RunMeta};
use crate::protocol::twinkle::sched::Schedule;
use crate::protocol::twinkle::{TwinkleError, paths, wire};

/// Template class names `set_template` accepts: all mean "the served model's own chat template".
pub const TEMPLATES: &[&str] = &[
    "Template",
    "Qwen3Template",
    "Qwen3_5Template",
    "Qwen2_5Template",
    "QwenTemplate",
    "Llama3Template",
    "ChatmlTemplate",
];

/// The class name `k` of a `set_*` / `add_*` call (required).
fn class<'a>(body: &'a Map<String, Value>, k: &str) -> Result<&'a str, TwinkleError> {
    body.get(k)
        .and_then(Value::as_str)
        .ok_or_else(|| TwinkleError::bad(format!("{k} is missing (a class name)")))
}

/// A `set_*` call that names a class: its name `k` and the rest of the body as the class's
/// keyword arguments.
fn class_args<'a>(
    body: &'a Map<String, Value>,
    k: &str,
) -> Result<(&'a str, Map<String, Value>), TwinkleError> {
    Ok((class(body, k)?, wire::kwargs(body, &[k, "adapter_name"])))
}

/// An optional finite number `k` (`null` = absent).
pub(super) fn f64_of(body: &Map<String, Value>, k: &str) -> Result<Option<f64>, TwinkleError> {
    match body.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_f64()
            .filter(|x| x.is_finite())
            .map(Some)
            .ok_or_else(|| TwinkleError::bad(format!("{k} must be a number, got {v}"))),
    }
}

impl TwinkleModel {
    /// `add_adapter_to_model`: a new engine adapter, its run metadata, and its training state.
    pub(super) fn add_adapter(&self, c: Call) -> Result<Value, TwinkleError> {
        let caller = c.caller;
        let st = self.new_state(c)?;
        let (id, eid, lora) = (st.run_id.clone(), st.engine_id.clone(), st.lora.clone());
        let run_dir = paths::caller_run_dir(&self.auth, caller, &id)?;
        self.app.create_adapter(&CreateAdapterRequest {
            model_id: eid.clone(),
            lora: LoraSettings {
                rank: lora.rank,
                alpha: lora.alpha,
                targets: lora.targets,
                seed: None,
            },
        })?;
        let base_model = &self.app.served().info.base_model;
        let run = RunMeta::new_lora(&id, base_model, &caller.owner, lora.rank);
        if let Err(e) = runs::write_run(&run_dir, &run) {
            let _ = self.app.unload(&crate::protocol::internal::UnloadRequest { model_id: eid });
            return Err(e);
        }
        self.insert_state(st);
        Ok(json!({"status": "ok", "adapter_name": id}))
    }

    /// The training state `add_adapter_to_model` with `body` starts from, for an engine adapter
    /// that exists already (restored after a restart).
    pub(super) fn add_adapter_state(&self, c: Call) -> Result<(), TwinkleError> {
        let st = self.new_state(c)?;
        self.insert_state(st);
        Ok(())
    }

    /// Checks an `add_adapter_to_model` body against the caller's adapters and the served model
    /// and builds the fresh training state.
    fn new_state(&self, c: Call) -> Result<TrainState, TwinkleError> {
        let (caller, body) = (c.caller, c.body);
        let name = adapter_name(body)?;
        let id = caller.adapter_id(&name)?;
        let eid = super::engine_id(caller, &id);
        if body.get("save_dir").is_some_and(|v| !v.is_null()) {
            return Err(TwinkleError::bad(
                "save_dir is not supported: checkpoints go under your run (save(name=...))",
            ));
        }
        let lora = wire::lora_config(body.get("config").unwrap_or(&Value::Null))?;
        let ga = match body.get("gradient_accumulation_steps") {
            None | Some(Value::Null) => 1,
            Some(v) => v.as_u64().filter(|&n| n >= 1).ok_or_else(|| {
                TwinkleError::bad(format!(
                    "gradient_accumulation_steps must be a whole number >= 1, got {v}"
                ))
            })?,
        };
        {
            let map = lock(&self.adapters);
            if map.contains_key(&eid) {
                return Err(TwinkleError::Conflict(format!(
                    "adapter `{name}` already exists in this session"
                )));
            }
            let owned = map.values().filter(|s| lock(s).owner == caller.owner).count();
            if owned >= self.per_owner {
                return Err(TwinkleError::Conflict(format!(
                    "this token already holds {owned} adapters on this model (limit {}); let idle ones expire or use another session",
                    self.per_owner
                )));
            }
        }
        let max_rank = self.app.served().info.max_rank;
        if lora.rank > max_rank {
            return Err(TwinkleError::bad(format!(
                "config.r = {} exceeds the largest rank {max_rank}",
                lora.rank
            )));
        }
        Ok(TrainState {
            owner: caller.owner.clone(),
            run_id: id.clone(),
            engine_id: eid.clone(),
            lora,
            ga_steps: ga,
            template: None,
            loss: Loss::default(),
            optim: AdamParams {
                learning_rate: 1e-4,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 0.0,
                grad_clip_norm: 0.0,
            },
            optimizer_cls: "AdamW".into(),
            schedule: Schedule::Constant,
            scheduler_cls: None,
            sched_steps: 0,
            micro: 0,
            cur_step: 0,
            clip: None,
            stepped: false,
            consumed_train_samples: 0,
            staged: None,
            metrics: Metrics::default(),
            last_seen: Instant::now(),
            created: std::time::SystemTime::now(),
            config_ops: Vec::new(),
        })
    }

    pub(super) fn set_template(&self, c: Call) -> Result<Value, TwinkleError> {
        let body = c.body;
        self.with_state(c, |st| {
        let cls = body
            .get("template_cls")
            .or_else(|| body.get("template_func"))
            .and_then(Value::as_str)
            .unwrap_or("Template");
        if !TEMPLATES.contains(&cls) {
            return Err(TwinkleError::bad(format!(
                "set_template: template_cls `{cls}` is not available (hub plugins and custom classes are not executed); \
                 use one of {TEMPLATES:?}, all of which apply the served model's own chat template"
            )));
        }
        match self.app.served().tokenizer.as_deref() {
            Some(t) if t.has_chat_template() => {}
            _ => {
                return Err(TwinkleError::bad(
                    "set_template: the served model has no tokenizer with a chat template",
                ));
            }
        }
        let max_length = wire::positive(body, "set_template", "max_length")?;
        let enable_thinking = body.get("enable_thinking").and_then(Value::as_bool);
        st.template = Some(TemplateCfg { max_length, enable_thinking });
        Ok(Self::unit(c.g))
        })
    }

    pub(super) fn set_processor(&self, c: Call) -> Result<Value, TwinkleError> {
        self.state(c)?;
        let cls = c.body.get("processor_cls").and_then(Value::as_str).unwrap_or("InputProcessor");
        if cls != "InputProcessor" {
            return Err(TwinkleError::bad(format!(
                "set_processor: processor_cls `{cls}` is not available; only InputProcessor"
            )));
        }
        // Sequences are packed without padding, so padding_side / padding_free change nothing.
        Ok(Self::unit(c.g))
    }

    pub(super) fn set_loss(&self, c: Call) -> Result<Value, TwinkleError> {
        self.with_state(c, |st| {
            let (cls, kw) = class_args(c.body, "loss_cls")?;
            st.loss = Loss::from_request(cls, &kw)?;
            Ok(Self::unit(c.g))
        })
    }

    pub(super) fn set_optimizer(&self, c: Call) -> Result<Value, TwinkleError> {
        self.with_state(c, |st| {
        let (cls, kw) = class_args(c.body, "optimizer_cls")?;
        if let Some(k) = kw.keys().find(|k| {
            !["lr", "betas", "eps", "weight_decay", "amsgrad", "foreach", "fused"]
                .contains(&k.as_str())
        }) {
            return Err(TwinkleError::bad(format!(
                "set_optimizer: {cls} has no supported argument `{k}` (lr, betas, eps, weight_decay)"
            )));
        }
        if kw.get("amsgrad").and_then(Value::as_bool) == Some(true) {
            return Err(TwinkleError::bad("set_optimizer: amsgrad is not supported"));
        }
        // torch defaults: lr 1e-3, betas (0.9, 0.999), eps 1e-8; weight decay 0 (Adam), 0.01 (AdamW).
        let wd_default = match cls {
            "AdamW" => 0.01,
            "Adam" => 0.0,
            other => {
                return Err(TwinkleError::bad(format!(
                    "set_optimizer: optimizer_cls `{other}` is not available; supported: Adam, AdamW"
                )));
            }
        };
        let wd = f64_of(&kw, "weight_decay")?.unwrap_or(wd_default);
        if cls == "Adam" && wd != 0.0 {
            return Err(TwinkleError::bad(
                "set_optimizer: Adam with weight_decay (L2 in the gradient) is not supported; use AdamW (decoupled)",
            ));
        }
        let (b1, b2) = match kw.get("betas") {
            None | Some(Value::Null) => (0.9, 0.999),
            Some(Value::Array(b)) if b.len() == 2 && b.iter().all(|x| x.as_f64().is_some()) => {
                (b[0].as_f64().unwrap_or(0.9), b[1].as_f64().unwrap_or(0.999))
            }
            Some(v) => {
                return Err(TwinkleError::bad(format!(
                    "set_optimizer: betas must be two numbers, got {v}"
                )));
            }
        };
        let p = AdamParams {
            learning_rate: f64_of(&kw, "lr")?.unwrap_or(1e-3),
            beta1: b1,
            beta2: b2,
            eps: f64_of(&kw, "eps")?.unwrap_or(1e-8),
            weight_decay: wd,
            grad_clip_norm: 0.0,
        };
        if !(p.learning_rate >= 0.0
            && (0.0..1.0).contains(&p.beta1)
            && (0.0..1.0).contains(&p.beta2)
            && p.eps >= 0.0
            && p.weight_decay >= 0.0)
        {
            return Err(TwinkleError::bad(
                "set_optimizer: lr, eps and weight_decay must be >= 0 and betas in [0, 1)",
            ));
        }
        st.optim = p;
        st.optimizer_cls = cls.to_string();
        Ok(Self::unit(c.g))
        })
    }

    pub(super) fn set_lr_scheduler(&self, c: Call) -> Result<Value, TwinkleError> {
        self.with_state(c, |st| {
            let (cls, kw) = class_args(c.body, "scheduler_cls")?;
            st.schedule = Schedule::from_request(cls, &kw)?;
            st.scheduler_cls = Some(cls.to_string());
            st.sched_steps = 0;
            Ok(Self::unit(c.g))
        })
    }

    pub(super) fn calculate_metric(&self, c: Call) -> Result<Value, TwinkleError> {
        self.with_state(c, |st| {
            let m = std::mem::take(&mut st.metrics);
            let mut out = Map::new();
            if m.batches > 0 {
                out.insert("loss".into(), json!(format!("{:.6}", m.loss_sum / m.batches as f64)));
            }
            if let Some(gn) = m.grad_norm {
                out.insert("grad_norm".into(), json!(format!("{gn:.6}")));
            }
            let lr = m.lr.unwrap_or_else(|| st.schedule.lr(st.optim.learning_rate, st.sched_steps));
            out.insert("learning rate".into(), json!(format!("{lr:.6e}")));
            out.insert("iters".into(), json!(format!("{}", st.cur_step)));
            out.insert("num_tokens".into(), json!(format!("{}", m.tokens)));
            Ok(json!({"result": out}))
        })
    }

    pub(super) fn train_configs(&self, c: Call) -> Result<Value, TwinkleError> {
        self.with_state(c, |st| {
        let cfg = json!({
            "adapter_name": st.run_id,
            "lora": {"r": st.lora.rank, "lora_alpha": st.lora.alpha, "attention": st.lora.targets.train_attn, "mlp": st.lora.targets.train_mlp,
                     "lora_dropout": st.lora.dropout, "note": "dropout is not applied by this engine"},
            "gradient_accumulation_steps": st.ga_steps,
            "loss": st.loss.name(),
            "optimizer": {"cls": st.optimizer_cls, "lr": st.optim.learning_rate, "betas": [st.optim.beta1, st.optim.beta2], "eps": st.optim.eps, "weight_decay": st.optim.weight_decay},
            "lr_scheduler": st.scheduler_cls,
            "cur_step": st.cur_step,
        });
        Ok(json!({"result": cfg.to_string()}))
        })
    }

    pub(super) fn add_metric(&self, c: Call) -> Result<Value, TwinkleError> {
        self.state(c)?;
        match class(c.body, "metric_cls")? {
            "LossMetric" | "Accuracy" | "GradNormMetric" => Ok(Self::unit(c.g)),
            other => Err(TwinkleError::bad(format!(
                "add_metric: metric_cls `{other}` is not available; loss, grad_norm and learning rate are always reported"
            ))),
        }
    }
}
