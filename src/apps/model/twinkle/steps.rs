//! Compute ops of the Twinkle layer: inputs to datums through the engine (forward, split-phase
//! calculate_loss/backward, forward_backward scaled for gradient accumulation), and the
//! clip-then-step sequence that only acts on accumulation boundaries.

use serde_json::{Map, Value, json};

use super::inputs::{self, Loss};
use super::ops::f64_of;
use super::{TrainState, TwinkleModel};
use crate::apps::twinkle_http::Call;
use crate::engine::AdamParams;
use crate::protocol::internal::{ForwardBackwardRequest, OptimStepRequest};
use crate::protocol::twinkle::{Gen, TwinkleError, wire};

impl TwinkleModel {
    /// The call's `inputs`, encoded, and its other keyword arguments (the loss's extras).
    fn encode(
        &self,
        st: &TrainState,
        body: &Map<String, Value>,
    ) -> Result<(Vec<inputs::Encoded>, Map<String, Value>), TwinkleError> {
        let served = self.app.served();
        let enc = inputs::encode(
            body.get("inputs").unwrap_or(&Value::Null),
            served.tokenizer.as_deref(),
            st.template.as_ref(),
            served.config.vocab_size,
            served.max_length,
        )?;
        Ok((enc, wire::kwargs(body, &["inputs", "adapter_name"])))
    }

    /// Runs the engine on `enc`; returns (loss in the user's units, per-input logprobs).
    fn run(
        &self,
        st: &TrainState,
        loss: &Loss,
        enc: &[inputs::Encoded],
        extras: &Map<String, Value>,
        train: bool,
        disable_lora: bool,
    ) -> Result<(f64, Vec<Vec<f32>>, usize), TwinkleError> {
        let scale = if train { 1.0 / st.ga_steps as f64 } else { 1.0 };
        let (mut data, tokens) = inputs::datums(enc, loss, extras, scale)?;
        if matches!(loss, Loss::Grpo { .. }) && data.iter().any(|d| d.inputs.logprobs.is_none()) {
            // No old_logps: on-policy, the ratio is 1 at the current weights.
            let (_, lps, _) = self.run(
                st,
                &Loss::CrossEntropy { mean: false },
                enc,
                &Map::new(),
                false,
                disable_lora,
            )?;
            for (d, lp) in data.iter_mut().zip(lps) {
                if d.inputs.logprobs.is_none() {
                    d.inputs.logprobs = Some(lp);
                }
            }
        }
        let (loss_fn, loss_config) = loss.engine();
        let out = self.app.forward_backward(&ForwardBackwardRequest {
            model_id: st.engine_id.clone(),
            forward_only: !train,
            disable_lora,
            loss_fn,
            loss_config,
            data,
        })?;
        let loss = out.metrics.get("loss:sum").copied().unwrap_or(0.0) / scale;
        let lps: Vec<Vec<f32>> = out.outputs.into_iter().map(|o| o.logprobs).collect();
        Ok((loss, lps, tokens))
    }

    /// After a training micro-batch: counts it and adds it to the metrics.
    fn record(st: &mut TrainState, loss: f64, tokens: usize) {
        st.micro += 1;
        st.metrics.loss_sum += loss;
        st.metrics.batches += 1;
        st.metrics.tokens += tokens as u64;
    }

    /// `forward` (keeps what `calculate_loss` and `backward` need) and `forward_only`.
    pub(super) fn forward(&self, c: Call) -> Result<Value, TwinkleError> {
        self.with_state(c, |st| {
            let (enc, extras) = self.encode(st, c.body)?;
            let (loss, lps, _) =
                self.run(st, &st.loss, &enc, &extras, false, c.flag("disable_lora"))?;
            let logps = inputs::logps(&enc, &lps);
            if c.op == "forward" {
                st.staged = Some((enc, extras, loss));
            }
            Ok(json!({"result": {"loss": loss, "logps": logps, "logits": null}}))
        })
    }

    pub(super) fn calculate_loss(&self, c: Call) -> Result<Value, TwinkleError> {
        self.with_state(c, |st| {
            let (_, _, loss) = st
                .staged
                .as_ref()
                .ok_or_else(|| TwinkleError::bad("calculate_loss: call forward(inputs) first"))?;
            Ok(c.g.result(json!(loss)))
        })
    }

    pub(super) fn backward(&self, c: Call) -> Result<Value, TwinkleError> {
        self.with_state(c, |st| {
            let (enc, extras, _) = st.staged.take().ok_or_else(|| {
                TwinkleError::bad("backward: call forward(inputs) and calculate_loss first")
            })?;
            let (loss, _, tokens) = self.run(st, &st.loss, &enc, &extras, true, false)?;
            Self::record(st, loss, tokens);
            Ok(Self::unit(c.g))
        })
    }

    pub(super) fn forward_backward(&self, c: Call) -> Result<Value, TwinkleError> {
        self.with_state(c, |st| {
            let (enc, extras) = self.encode(st, c.body)?;
            let (loss, lps, tokens) = self.run(st, &st.loss, &enc, &extras, true, false)?;
            st.consumed_train_samples += enc.len() as u64;
            Self::record(st, loss, tokens);
            Ok(json!({"result": {"loss": loss, "logps": inputs::logps(&enc, &lps),
                                 "num_tokens": tokens, "logits": null}}))
        })
    }

    fn boundary(st: &TrainState) -> bool {
        st.micro > 0 && st.micro.is_multiple_of(st.ga_steps)
    }

    pub(super) fn clip_grad_norm(&self, c: Call) -> Result<Value, TwinkleError> {
        self.with_state(c, |st| {
            let max = Self::clip_args(c.body)?;
            let norm = self.app.grad_norm(&st.engine_id)?;
            st.clip = Some(max);
            st.metrics.grad_norm = Some(norm);
            Ok(json!({"result": format!("{norm}")}))
        })
    }

    /// `max_grad_norm` of a clip request (only the L2 norm is supported).
    fn clip_args(body: &Map<String, Value>) -> Result<f64, TwinkleError> {
        let max = f64_of(body, "max_grad_norm")?.unwrap_or(1.0);
        let norm_type = f64_of(body, "norm_type")?.unwrap_or(2.0);
        if norm_type != 2.0 {
            return Err(TwinkleError::bad(format!(
                "norm_type {norm_type} is not supported; only the L2 norm (2)"
            )));
        }
        if max <= 0.0 {
            return Err(TwinkleError::bad(format!("max_grad_norm must be > 0, got {max}")));
        }
        Ok(max)
    }

    /// One optimizer step on an accumulation boundary (else nothing).
    fn do_step(&self, st: &mut TrainState) -> Result<(), TwinkleError> {
        if !Self::boundary(st) {
            return Ok(());
        }
        let lr = st.schedule.lr(st.optim.learning_rate, st.sched_steps);
        let p = AdamParams {
            learning_rate: lr,
            grad_clip_norm: st.clip.take().unwrap_or(0.0),
            ..st.optim
        };
        let m = self
            .app
            .optim_step(&OptimStepRequest { model_id: st.engine_id.clone(), adam_params: p })?;
        st.metrics.grad_norm = m.metrics.get("grad_norm:mean").copied().or(st.metrics.grad_norm);
        st.metrics.lr = Some(lr);
        st.micro = 0;
        st.cur_step += 1;
        st.stepped = true;
        Ok(())
    }

    /// One scheduler step when the optimizer stepped since the last one (the scheduler
    /// follows the optimizer).
    fn sched_step(st: &mut TrainState) {
        if std::mem::take(&mut st.stepped) {
            st.sched_steps += 1;
        }
    }

    /// The answer of an op with no result.
    pub(super) fn unit(g: Gen) -> Value {
        g.result(Value::Null)
    }

    pub(super) fn step(&self, c: Call) -> Result<Value, TwinkleError> {
        self.with_state(c, |st| self.do_step(st))?;
        Ok(Self::unit(c.g))
    }

    pub(super) fn zero_grad(&self, c: Call) -> Result<Value, TwinkleError> {
        self.with_state(c, |st| {
            // Off a boundary the gradient keeps accumulating; after a step it is already zero.
            if Self::boundary(st) {
                self.app.zero_grad(&st.engine_id)?;
                st.micro = 0;
            }
            Ok(Self::unit(c.g))
        })
    }

    pub(super) fn lr_step(&self, c: Call) -> Result<Value, TwinkleError> {
        self.with_state(c, |st| {
            Self::sched_step(st);
            Ok(Self::unit(c.g))
        })
    }

    pub(super) fn clip_grad_and_step(&self, c: Call) -> Result<Value, TwinkleError> {
        self.with_state(c, |st| {
            let max = Self::clip_args(c.body)?;
            if Self::boundary(st) {
                st.clip = Some(max);
                self.do_step(st)?;
                Self::sched_step(st);
            }
            Ok(Self::unit(c.g))
        })
    }
}
