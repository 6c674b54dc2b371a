//! Futures and their execution: a submission is recorded in the store, queued on its model's
//! FIFO (one task per model id, so a model's requests run in arrival order), executed against the
//! model/sampler application, and its result (or failure) stored; long-polls are woken through an
//! in-memory `Notify` per request id.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use actix_web::web;
use serde::Deserialize;
use serde_json::Value;
use tokio::sync::{Notify, mpsc};

use super::error::{ApiError, JobError};
use super::limits::SamplingPermit;
use super::upstream::Upstreams;
use crate::protocol::tinker::codec::{
    DatumOutput, FloatArray, SampledSequenceOut, encode_forward_backward_output,
    encode_sample_response,
};
use crate::protocol::tinker::proto::StopReason;
use crate::state::{
    FailureCategory, FutureRecord, NewCheckpoint, NewFuture, NewRun, NewSamplingSession, Store,
};

pub const JSON: &str = "application/json";
pub const PROTOBUF: &str = "application/x-protobuf";

/// What to do with the application's answer once the call succeeded.
#[derive(Debug)]
pub enum Finish {
    /// A fixed result.
    Json(Value),
    /// The application's answer is the result (optim_step metrics).
    Passthrough,
    ForwardBackward,
    Sample,
    /// Record the run (create_model / create-via-load), then answer `result`.
    CreateRun {
        run: Box<NewRun>,
        result: Value,
    },
    /// Record the checkpoint with the size the application reports, then answer `result`.
    Checkpoint {
        owner: String,
        ckpt: Box<NewCheckpoint>,
        overwrite: bool,
        result: Value,
    },
    /// Record the sampling session (ephemeral sampler save), then answer `result`.
    SamplingSession {
        session: Box<NewSamplingSession>,
        result: Value,
    },
}

/// One unit of work for an application.
#[derive(Debug)]
pub struct Job {
    pub request_id: String,
    /// `model` or `sampler`.
    pub app_kind: &'static str,
    pub base_model: String,
    /// Internal route, e.g. `forward_backward`.
    pub route: &'static str,
    pub body: Value,
    pub finish: Finish,
}

impl Job {
    /// A job for the model application hosting `base_model`.
    pub fn on_model(
        request_id: String,
        base_model: String,
        route: &'static str,
        body: Value,
        finish: Finish,
    ) -> Job {
        Job { request_id, app_kind: "model", base_model, route, body, finish }
    }
}

/// A job on a model's FIFO, with the slot it holds until it is done.
type Queued = (Job, Option<SamplingPermit>);

/// Shared by every handler (cheap clone).
#[derive(Clone)]
pub struct Dispatcher {
    pub store: Arc<Store>,
    pub up: Upstreams,
    queues: Arc<Mutex<HashMap<String, mpsc::UnboundedSender<Queued>>>>,
    waiters: Arc<Mutex<HashMap<String, Arc<Notify>>>>,
}

impl Dispatcher {
    pub fn new(store: Arc<Store>, up: Upstreams) -> Self {
        Dispatcher {
            store,
            up,
            queues: Arc::new(Mutex::new(HashMap::new())),
            waiters: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// Runs a store operation off the async threads.
    pub async fn db<T, F>(&self, f: F) -> Result<T, ApiError>
    where
        T: Send + 'static,
        F: FnOnce(&Store) -> Result<T, crate::state::StateError> + Send + 'static,
    {
        let store = self.store.clone();
        Ok(web::block(move || f(&store)).await??)
    }

    /// Runs a short single-row store operation on the calling thread. The per-request hot path
    /// (run lookup, future insert / status updates / read) uses it: each is a few microseconds
    /// of SQLite (memory, or WAL with synchronous=NORMAL: no fsync per commit), far less than
    /// the thread hand-off of [`Self::db`], which on a loaded machine costs milliseconds.
    pub fn db_now<T>(
        &self,
        f: impl FnOnce(&Store) -> Result<T, crate::state::StateError>,
    ) -> Result<T, ApiError> {
        Ok(f(&self.store)?)
    }

    /// Records a future (deduplicated on model id + seq id). Returns the record and whether it is
    /// new (a duplicate must not be executed again).
    pub async fn create_future(&self, f: NewFuture) -> Result<(FutureRecord, bool), ApiError> {
        self.db_now(move |s| s.create_or_get_by_seq(&f))
    }

    /// Queues `job` on the FIFO of `queue` (a model id), or runs it right away when `queue` is
    /// `None` (sampling, which has no ordering constraint). `permit` (a sample request's slot,
    /// see `limits::SamplingSlots`) is held until the job is done.
    pub fn enqueue(&self, queue: Option<&str>, job: Job, permit: Option<SamplingPermit>) {
        let Some(key) = queue else {
            let me = self.clone();
            actix_web::rt::spawn(async move {
                me.execute(job).await;
                drop(permit);
            });
            return;
        };
        let mut queues = match self.queues.lock() {
            Ok(q) => q,
            Err(p) => p.into_inner(),
        };
        let item = match queues.get(key) {
            Some(tx) => match tx.send((job, permit)) {
                Ok(()) => return,
                // The consumer is gone (its worker thread stopped): start a new one.
                Err(mpsc::error::SendError(item)) => item,
            },
            None => (job, permit),
        };
        let (tx, mut rx) = mpsc::unbounded_channel::<Queued>();
        // A fresh channel with its receiver alive accepts the send.
        let _ = tx.send(item);
        queues.insert(key.to_string(), tx);
        let me = self.clone();
        actix_web::rt::spawn(async move {
            while let Some((job, permit)) = rx.recv().await {
                me.execute(job).await;
                drop(permit);
            }
        });
    }

    /// Fails a just-created future without running anything (an error found at submission that
    /// the protocol reports through the future).
    pub async fn fail_now(&self, request_id: &str, message: String, category: FailureCategory) {
        let id = request_id.to_string();
        if let Err(e) = self.db(move |s| s.fail(&id, &message, category)).await {
            tracing::error!(request_id, error = %e, "cannot record a failed future");
        }
        self.wake(request_id);
    }

    async fn execute(&self, job: Job) {
        let id = job.request_id.clone();
        let route = job.route;
        let started = std::time::Instant::now();
        let _ = self.db_now(|s| s.set_running(&id));
        let outcome = self.run(job).await;
        if route == "load" && outcome.is_ok() {
            // A checkpoint loaded onto the run re-attaches a lost adapter.
            self.set_corrupted(&id, false);
        }
        tracing::debug!(request_id = %id, route, ms = started.elapsed().as_secs_f64() * 1e3, ok = outcome.is_ok(), "job done");
        let stored = match outcome {
            Ok((bytes, ct)) => self.db_now(|s| s.complete(&id, &bytes, ct)),
            Err(e) => {
                let (msg, cat) = match e {
                    JobError::User(m) => (m, FailureCategory::User),
                    JobError::Server(m) => (m, FailureCategory::Server),
                    JobError::LostAdapter(m) => {
                        self.set_corrupted(&id, true);
                        let hint = "the model application lost this run's adapter (it restarted \
                            before the adapter's first snapshot); the run is marked corrupted: \
                            load a checkpoint onto it (load_state) to continue";
                        (format!("{m}: {hint}"), FailureCategory::Server)
                    }
                };
                self.db_now(|s| s.fail(&id, &msg, cat))
            }
        };
        if let Err(e) = stored {
            tracing::error!(request_id = %id, error = %e, "cannot record a future's outcome");
        }
        self.wake(&id);
    }

    /// Sets the `corrupted` flag of the run that future `request_id` was submitted for.
    fn set_corrupted(&self, request_id: &str, corrupted: bool) {
        let r = self.db_now(|s| {
            let f = s.get_future(request_id)?;
            match &f.model_id {
                Some(run) => s.set_run_corrupted(&f.owner, run, corrupted),
                None => Ok(()),
            }
        });
        if let Err(e) = r {
            tracing::debug!(request_id, error = %e, "cannot update the run's corrupted flag");
        }
    }

    async fn run(&self, job: Job) -> Result<(Vec<u8>, &'static str), JobError> {
        let answer = self.up.call(job.app_kind, &job.base_model, job.route, &job.body).await?;
        let json = |v: &Value| (v.to_string().into_bytes(), JSON);
        let store = self.store.clone();
        let blocking = |e: actix_web::error::BlockingError| JobError::Server(e.to_string());
        match job.finish {
            Finish::Json(v) => Ok(json(&v)),
            Finish::Passthrough => Ok(json(&answer)),
            Finish::ForwardBackward => Ok((forward_backward_result(answer)?, PROTOBUF)),
            Finish::Sample => Ok((sample_result(answer)?, PROTOBUF)),
            Finish::CreateRun { run, result } => {
                web::block(move || store.insert_run(&run)).await.map_err(blocking)??;
                Ok(json(&result))
            }
            Finish::Checkpoint { owner, mut ckpt, overwrite, result } => {
                ckpt.size_bytes = answer.get("size_bytes").and_then(Value::as_u64);
                web::block(move || store.insert_checkpoint(&owner, &ckpt, overwrite))
                    .await
                    .map_err(blocking)??;
                Ok(json(&result))
            }
            Finish::SamplingSession { session, result } => {
                web::block(move || store.create_or_get_sampling_session(&session))
                    .await
                    .map_err(blocking)??;
                Ok(json(&result))
            }
        }
    }

    /// The notifier of `request_id` (created on first use).
    pub fn waiter(&self, request_id: &str) -> Arc<Notify> {
        let mut w = match self.waiters.lock() {
            Ok(w) => w,
            Err(p) => p.into_inner(),
        };
        w.entry(request_id.to_string()).or_insert_with(|| Arc::new(Notify::new())).clone()
    }

    /// Drops the notifier of a finished future (waiters re-read the store).
    pub fn forget(&self, request_id: &str) {
        if let Ok(mut w) = self.waiters.lock() {
            w.remove(request_id);
        }
    }

    fn wake(&self, request_id: &str) {
        let n = self.waiters.lock().ok().and_then(|mut w| w.remove(request_id));
        if let Some(n) = n {
            n.notify_waiters();
        }
    }
}

/// JSON has no inf/NaN: serde_json writes them as `null`. The model application refuses
/// non-finite outputs itself (a user error), so a `null` here is a number that overflowed on
/// the way; it is decoded as NaN (protobuf floats carry it) rather than failing the answer.
fn floats_or_nan<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<f32>, D::Error> {
    let v: Vec<Option<f32>> = Deserialize::deserialize(d)?;
    Ok(v.into_iter().map(|x| x.unwrap_or(f32::NAN)).collect())
}

/// Metrics with `null` values decoded as NaN (see [`floats_or_nan`]).
fn metrics_or_nan<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<BTreeMap<String, f64>, D::Error> {
    let m: BTreeMap<String, Option<f64>> = Deserialize::deserialize(d)?;
    Ok(m.into_iter().map(|(k, v)| (k, v.unwrap_or(f64::NAN))).collect())
}

#[derive(Deserialize)]
struct FbOutput {
    #[serde(deserialize_with = "floats_or_nan")]
    logprobs: Vec<f32>,
    #[serde(default, deserialize_with = "floats_or_nan")]
    elementwise_loss: Vec<f32>,
    #[serde(default)]
    shape: Vec<usize>,
}

#[derive(Deserialize)]
struct FbAnswer {
    outputs: Vec<FbOutput>,
    #[serde(default, deserialize_with = "metrics_or_nan")]
    metrics: BTreeMap<String, f64>,
}

fn bad_answer(what: &str, e: impl std::fmt::Display) -> JobError {
    JobError::Server(format!("the model application sent an invalid {what} answer: {e}"))
}

/// Encodes the model app's forward_backward answer as the SDK's `ForwardBackwardOutput`.
fn forward_backward_result(answer: Value) -> Result<Vec<u8>, JobError> {
    let a: FbAnswer =
        serde_json::from_value(answer).map_err(|e| bad_answer("forward_backward", e))?;
    let outputs: Vec<DatumOutput> = a
        .outputs
        .into_iter()
        .map(|o| {
            let n = o.logprobs.len();
            let shape = if o.shape.is_empty() { vec![n] } else { o.shape };
            let rows = shape.first().copied().unwrap_or(n);
            let loss =
                if o.elementwise_loss.is_empty() { vec![0.0; rows] } else { o.elementwise_loss };
            DatumOutput {
                logprobs: FloatArray { values: o.logprobs, shape },
                elementwise_loss: FloatArray::vector(loss),
            }
        })
        .collect();
    // The SDK splits metric keys on `:`; anything else would crash it, so drop such keys.
    let mut metrics: BTreeMap<String, f64> =
        a.metrics.into_iter().filter(|(k, _)| k.split(':').count() == 2).collect();
    if !metrics.contains_key("loss:sum") {
        let total: f64 =
            outputs.iter().flat_map(|o| o.elementwise_loss.values.iter()).map(|&v| v as f64).sum();
        metrics.insert("loss:sum".into(), total);
    }
    encode_forward_backward_output(&outputs, &metrics, "ArrayRecord")
        .map_err(|e| bad_answer("forward_backward", e))
}

#[derive(Deserialize)]
struct SeqAnswer {
    tokens: Vec<i32>,
    #[serde(default)]
    logprobs: Vec<f32>,
    #[serde(default)]
    stop_reason: String,
}

#[derive(Deserialize)]
struct SampleAnswer {
    sequences: Vec<SeqAnswer>,
    #[serde(default)]
    prompt_logprobs: Option<Vec<Option<f32>>>,
}

/// Encodes the sample answer as the SDK's `SampleResponse`.
fn sample_result(answer: Value) -> Result<Vec<u8>, JobError> {
    let a: SampleAnswer = serde_json::from_value(answer).map_err(|e| bad_answer("sample", e))?;
    let seqs: Vec<SampledSequenceOut> = a
        .sequences
        .into_iter()
        .map(|s| SampledSequenceOut {
            stop_reason: if s.stop_reason == "length" {
                StopReason::Length
            } else {
                StopReason::Stop
            },
            tokens: s.tokens,
            logprobs: s.logprobs,
        })
        .collect();
    encode_sample_response(&seqs, a.prompt_logprobs.as_deref()).map_err(|e| bad_answer("sample", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn null_floats_in_an_answer_are_decoded_as_nan() {
        let answer = serde_json::json!({
            "outputs": [{"logprobs": [-1.0, null], "elementwise_loss": [null, 0.5], "shape": [2]}],
            "metrics": {"loss:sum": null}
        });
        assert!(forward_backward_result(answer).is_ok());
        let bad = serde_json::json!({"outputs": [{"logprobs": ["x"]}]});
        assert!(matches!(forward_backward_result(bad), Err(JobError::Server(_))));
    }
}
