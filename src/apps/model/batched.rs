//! forward / forward_backward of the model service through the combining queue ([`queue`]):
//! compatible jobs of different adapters that arrive within `batch_window_ms` run as one
//! engine call ([`DataParallel::forward_backward_many`] / [`DataParallel::forward_many`]): one
//! pass over the base weights for all their tokens, each adapter's LoRA on its own rows, each
//! job's loss (its own parameters) and gradient as if it ran alone. A job is validated before it
//! queues, so a bad one fails alone with its 4xx; one adapter's jobs never share a batch and run
//! in arrival order.
//!
//! [`DataParallel::forward_backward_many`]: crate::engine::parallel::DataParallel::forward_backward_many
//! [`DataParallel::forward_many`]: crate::engine::parallel::DataParallel::forward_many

use std::sync::atomic::Ordering;
use std::sync::{Arc, MutexGuard};
use std::time::Instant;

use super::queue::{self, Combiner};
use super::{AppError, ModelService, Slot, SlotState, lock};
use crate::engine::{
    Datum, DatumOutput, EvalGroup, FwdBwdOutput, LossFn, ModelRuntime, TrainGroup,
};
use crate::protocol::internal::{DatumOutputJson, ForwardBackwardRequest, ForwardBackwardResponse};

/// A queued job: owned copies of what the leader needs (it runs on another thread).
pub(super) struct Job {
    id: String,
    data: Vec<Datum>,
    loss: LossFn,
    forward_only: bool,
    disable_lora: bool,
}

pub(super) type JobOut = Result<FwdBwdOutput, AppError>;
pub(super) type Queue = Combiner<Job, JobOut>;

/// What the combining queue did so far (see [`queue::QueueStats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchStats {
    /// Engine runs: batches taken from the queue plus jobs run at once.
    pub runs: u64,
    /// Jobs that ran in a batch of two or more.
    pub combined_jobs: u64,
    /// The largest batch.
    pub largest: u64,
}

impl<R: ModelRuntime> ModelService<R> {
    /// `POST /_internal/v1/forward_backward` (and forward with `forward_only`). Validated here
    /// (loss, batch, adapter), so a bad job fails alone before it can join a batch.
    pub fn forward_backward(
        &self,
        req: &ForwardBackwardRequest,
    ) -> Result<ForwardBackwardResponse, AppError> {
        let loss = LossFn::from_name(&req.loss_fn, &req.loss_config)?;
        // The served length may be below the model's positions (`max_length` in the config).
        crate::engine::check_batch(&self.base.limits(), &req.data, &loss)?;
        let out = match &self.queue {
            None => self.run_alone(req, &loss)?,
            Some(q) => {
                self.slot(&req.model_id)?;
                let kind = if req.forward_only { "forward" } else { "forward_backward" };
                let class = format!("{kind}/{}", loss.name());
                let job = || Job {
                    id: req.model_id.clone(),
                    data: req.data.clone(),
                    loss,
                    forward_only: req.forward_only,
                    disable_lora: req.disable_lora,
                };
                let lost =
                    |m: String| -> JobOut { Err(AppError::Internal(format!("{kind}: {m}"))) };
                q.submit(
                    &req.model_id,
                    &class,
                    job,
                    || self.run_alone(req, &loss),
                    &|jobs| self.run_batch(jobs),
                    &lost,
                )?
            }
        };
        Ok(respond(&out, &req.data))
    }

    /// What the combining queue did so far (zeros when batching is off).
    pub fn batch_stats(&self) -> BatchStats {
        let Some(q) = &self.queue else { return BatchStats::default() };
        let s: &queue::QueueStats = q.stats();
        BatchStats {
            runs: s.runs.load(Ordering::Relaxed),
            combined_jobs: s.combined_jobs.load(Ordering::Relaxed),
            largest: s.largest.load(Ordering::Relaxed),
        }
    }

    /// forward / forward_backward jobs waiting in the combining queue now.
    pub fn queued_jobs(&self) -> usize {
        self.queue.as_ref().map_or(0, |q| q.queued())
    }

    /// One job on its own (the caller's data, no copy).
    fn run_alone(&self, req: &ForwardBackwardRequest, loss: &LossFn) -> JobOut {
        let (engine, data) = (&self.engine, &req.data);
        self.with_adapter(&req.model_id, |adapter, pending| {
            if req.forward_only {
                let with = (!req.disable_lora).then_some(&*adapter);
                return Ok(engine.forward(with, data, loss)?);
            }
            let out = engine.forward_backward(adapter, data, loss)?;
            *pending = true;
            Ok(out)
        })
    }

    /// One batch of distinct adapters' jobs of one class: their slots locked in id order (so a
    /// batch never deadlocks with another request locking slots), spilled ones reloaded, then
    /// one engine call; each job gets its own result and each adapter that trained has pending
    /// gradients.
    fn run_batch(&self, jobs: Vec<Job>) -> Vec<JobOut> {
        let mut results: Vec<Option<JobOut>> = jobs.iter().map(|_| None).collect();
        let mut order: Vec<usize> = (0..jobs.len()).collect();
        order.sort_by(|&a, &b| jobs[a].id.cmp(&jobs[b].id));
        let mut slots: Vec<(usize, Arc<Slot<R>>)> = Vec::with_capacity(jobs.len());
        for i in order {
            match self.slot(&jobs[i].id) {
                Ok(s) => slots.push((i, s)),
                Err(e) => results[i] = Some(Err(e)),
            }
        }
        let mut held: Vec<(usize, MutexGuard<SlotState<R>>)> = Vec::with_capacity(slots.len());
        for (i, slot) in &slots {
            let mut state = lock(&slot.state);
            match self.ensure_loaded(&jobs[*i].id, &mut state) {
                Ok(()) => {
                    *lock(&slot.last_used) = Instant::now();
                    held.push((*i, state));
                }
                Err(e) => results[*i] = Some(Err(e)),
            }
        }
        let forward_only = jobs.first().is_some_and(|j| j.forward_only);
        let mut ran = Vec::with_capacity(held.len());
        if forward_only {
            let mut groups = Vec::with_capacity(held.len());
            for (i, state) in &held {
                let j = &jobs[*i];
                match &**state {
                    SlotState::Loaded { adapter, .. } => {
                        let adapter = (!j.disable_lora).then_some(&**adapter);
                        groups.push(EvalGroup { adapter, data: &j.data, loss: &j.loss });
                        ran.push(*i);
                    }
                    _ => results[*i] = Some(Err(unloaded(&j.id))),
                }
            }
            for (i, out) in ran.iter().zip(self.engine.forward_many(&groups)) {
                results[*i] = Some(out.map_err(AppError::from));
            }
        } else {
            let mut groups = Vec::with_capacity(held.len());
            let mut pending = Vec::with_capacity(held.len());
            for (i, state) in held.iter_mut() {
                let j = &jobs[*i];
                match &mut **state {
                    SlotState::Loaded { adapter, pending_grads } => {
                        groups.push(TrainGroup {
                            adapter: &mut **adapter,
                            data: &j.data,
                            loss: &j.loss,
                        });
                        pending.push(pending_grads);
                        ran.push(*i);
                    }
                    _ => results[*i] = Some(Err(unloaded(&j.id))),
                }
            }
            let outs = self.engine.forward_backward_many(&mut groups);
            drop(groups);
            for ((i, out), pending) in ran.iter().zip(outs).zip(pending) {
                *pending |= out.is_ok();
                results[*i] = Some(out.map_err(AppError::from));
            }
        }
        drop(held);
        for (_, slot) in &slots {
            *lock(&slot.last_used) = Instant::now();
        }
        results
            .into_iter()
            .map(|r| {
                r.unwrap_or_else(|| {
                    Err(AppError::Internal("the batch gave this job no result".into()))
                })
            })
            .collect()
    }
}

fn unloaded(id: &str) -> AppError {
    AppError::NotFound(format!("model_id `{id}` was unloaded"))
}

/// The wire answer of one job: its outputs shaped like its datums' targets.
fn respond(out: &FwdBwdOutput, data: &[Datum]) -> ForwardBackwardResponse {
    let outputs = out
        .per_datum
        .iter()
        .zip(data)
        .map(|(o, d): (&DatumOutput, &Datum)| {
            let (n, k) = (d.input_tokens.len(), d.inputs.k.max(1));
            DatumOutputJson {
                logprobs: o.logprobs.clone(),
                elementwise_loss: o.elementwise_loss.clone(),
                shape: if k == 1 { vec![n] } else { vec![n, k] },
            }
        })
        .collect();
    ForwardBackwardResponse { outputs, metrics: out.metrics() }
}
