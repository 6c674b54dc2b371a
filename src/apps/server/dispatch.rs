//! Futures and their execution: a submission is recorded in the store, queued on its model's
//! FIFO (one task per model id, so a model's requests run in arrival order), executed against the
//! model/sampler application, and its result (or failure) stored; long-polls are woken through an
//! in-memory `Notify` per request id.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use actix_web::web;
use serde_json::Value;
use tokio::sync::{Notify, mpsc};

use super::error::{ApiError, JobError};
use super::limits::SamplingPermit;
use super::upstream::Upstreams;
use crate::metrics::request::Carried;
use crate::protocol::internal::{
    Call, CreateAdapterRequest, ForwardBackwardRequest, ForwardBackwardResponse, LoadRequest,
    OptimStepRequest, SampleRequest, SampleResponse, SaveRequest, StopReasonJson,
};
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

/// The call a job makes to its application (the typed requests of the internal API).
#[derive(Debug)]
pub enum Request {
    CreateAdapter(CreateAdapterRequest),
    ForwardBackward(ForwardBackwardRequest),
    OptimStep(OptimStepRequest),
    Save(SaveRequest),
    Load(LoadRequest),
    Sample(SampleRequest),
}

impl Request {
    /// The internal route, for logs.
    pub fn route(&self) -> &'static str {
        match self {
            Request::CreateAdapter(_) => CreateAdapterRequest::ROUTE,
            Request::ForwardBackward(_) => ForwardBackwardRequest::ROUTE,
            Request::OptimStep(_) => OptimStepRequest::ROUTE,
            Request::Save(_) => SaveRequest::ROUTE,
            Request::Load(_) => LoadRequest::ROUTE,
            Request::Sample(_) => SampleRequest::ROUTE,
        }
    }
}

/// What to do once the call succeeded.
#[derive(Debug)]
pub enum Finish {
    /// The answer is the result: forward_backward and sample as the SDK's protobuf messages,
    /// optim_step's metrics as JSON.
    Answer,
    /// A fixed result.
    Json(Value),
    /// Record the run (create_model / create-via-load), then answer `result`.
    CreateRun { run: Box<NewRun>, result: Value },
    /// Record the checkpoint with the size the application reports, then answer `result`.
    Checkpoint { owner: String, ckpt: Box<NewCheckpoint>, overwrite: bool, result: Value },
    /// Record the sampling session (ephemeral sampler save), then answer `result`.
    SamplingSession { session: Box<NewSamplingSession>, result: Value },
}

/// One unit of work for an application.
#[derive(Debug)]
pub struct Job {
    pub request_id: String,
    /// `model` or `sampler`.
    pub app_kind: &'static str,
    pub base_model: String,
    pub call: Request,
    pub finish: Finish,
}

impl Job {
    /// A job for the model application hosting `base_model`.
    pub fn on_model(request_id: String, base_model: String, call: Request, finish: Finish) -> Job {
        Job { request_id, app_kind: "model", base_model, call, finish }
    }
}

/// A job on a model's FIFO, with the slot it holds until it is done and its request's span
/// and id (so its log lines and its internal call name the request that queued it).
type Queued = (Job, Option<SamplingPermit>, Carried);

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
        let carried = Carried::here();
        let Some(key) = queue else {
            let me = self.clone();
            actix_web::rt::spawn(carried.run(async move {
                me.execute(job).await;
                drop(permit);
            }));
            return;
        };
        let queued = &crate::metrics::global().server_jobs_queued;
        queued.inc();
        let mut queues = match self.queues.lock() {
            Ok(q) => q,
            Err(p) => p.into_inner(),
        };
        let item = match queues.get(key) {
            Some(tx) => match tx.send((job, permit, carried)) {
                Ok(()) => return,
                // The consumer is gone (its worker thread stopped): start a new one.
                Err(mpsc::error::SendError(item)) => item,
            },
            None => (job, permit, carried),
        };
        let (tx, mut rx) = mpsc::unbounded_channel::<Queued>();
        // A fresh channel with its receiver alive accepts the send.
        let _ = tx.send(item);
        queues.insert(key.to_string(), tx);
        let me = self.clone();
        actix_web::rt::spawn(async move {
            while let Some((job, permit, carried)) = rx.recv().await {
                queued.dec();
                carried.run(me.execute(job)).await;
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
        let route = job.call.route();
        let is_load = matches!(job.call, Request::Load(_));
        let started = std::time::Instant::now();
        let _ = self.db_now(|s| s.set_running(&id));
        let outcome = self.run(job).await;
        if is_load && outcome.is_ok() {
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
        let (kind, base, up) = (job.app_kind, job.base_model.as_str(), &self.up);
        let json = |v: &Value| (v.to_string().into_bytes(), JSON);
        // The answer when it is the result itself, and the size a save reports.
        let (answer, size) = match job.call {
            Request::CreateAdapter(r) => (up.call(kind, base, &r).await.map(|_| None)?, None),
            Request::Load(r) => (up.call(kind, base, &r).await.map(|_| None)?, None),
            Request::Save(r) => (None, Some(up.call(kind, base, &r).await?.size_bytes)),
            Request::ForwardBackward(r) => {
                let a = up.call(kind, base, &r).await?;
                (Some((forward_backward_result(a)?, PROTOBUF)), None)
            }
            Request::Sample(r) => {
                (Some((sample_result(up.call(kind, base, &r).await?)?, PROTOBUF)), None)
            }
            Request::OptimStep(r) => {
                let metrics = up.call(kind, base, &r).await?;
                let v = serde_json::to_value(metrics).map_err(|e| bad_answer("optim_step", e))?;
                (Some(json(&v)), None)
            }
        };
        let store = self.store.clone();
        let blocking = |e: actix_web::error::BlockingError| JobError::Server(e.to_string());
        match job.finish {
            Finish::Json(v) => Ok(json(&v)),
            // Only forward_backward, sample and optim_step are queued with `Answer`.
            Finish::Answer => answer.ok_or_else(|| {
                JobError::Server("internal: this call's answer is no result".into())
            }),
            Finish::CreateRun { run, result } => {
                web::block(move || store.insert_run(&run)).await.map_err(blocking)??;
                Ok(json(&result))
            }
            Finish::Checkpoint { owner, mut ckpt, overwrite, result } => {
                ckpt.size_bytes = size;
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

fn bad_answer(what: &str, e: impl std::fmt::Display) -> JobError {
    JobError::Server(format!("the model application sent an invalid {what} answer: {e}"))
}

/// Encodes the model app's forward_backward answer as the SDK's `ForwardBackwardOutput`.
fn forward_backward_result(a: ForwardBackwardResponse) -> Result<Vec<u8>, JobError> {
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

/// Encodes the sample answer as the SDK's `SampleResponse`.
fn sample_result(a: SampleResponse) -> Result<Vec<u8>, JobError> {
    let seqs: Vec<SampledSequenceOut> = a
        .sequences
        .into_iter()
        .map(|s| SampledSequenceOut {
            stop_reason: match s.stop_reason {
                StopReasonJson::Length => StopReason::Length,
                StopReasonJson::Stop => StopReason::Stop,
            },
            // Token ids are below the vocabulary size, far under i32::MAX.
            tokens: s.tokens.into_iter().map(|t| t as i32).collect(),
            logprobs: s.logprobs,
        })
        .collect();
    encode_sample_response(&seqs, a.prompt_logprobs.as_deref()).map_err(|e| bad_answer("sample", e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::internal::DatumOutputJson;
    use crate::protocol::tinker::proto;
    use prost::Message;

    /// A NaN loss (which the binary hop now carries as is) reaches the SDK as NaN, not as an
    /// error; an answer without `loss:sum` gets it summed from the per-token losses.
    #[test]
    fn forward_backward_answers_become_the_sdk_message() {
        let out = |loss: Vec<f32>| DatumOutputJson {
            logprobs: vec![-1.0, -2.0],
            elementwise_loss: loss,
            shape: vec![2],
        };
        let a = ForwardBackwardResponse {
            outputs: vec![out(vec![1.0, 2.0])],
            metrics: [("loss:sum".to_string(), f64::NAN), ("bad".to_string(), 1.0)].into(),
        };
        let bytes = forward_backward_result(a).unwrap();
        let m = proto::ForwardBackwardOutput::decode(bytes.as_slice()).unwrap();
        assert!(m.metrics["loss:sum"].is_nan());
        assert!(!m.metrics.contains_key("bad"), "keys without `name:reduction` are dropped");
        let a = ForwardBackwardResponse { outputs: vec![out(vec![0.5, 0.25])], metrics: [].into() };
        let m =
            proto::ForwardBackwardOutput::decode(forward_backward_result(a).unwrap().as_slice())
                .unwrap();
        assert_eq!(m.metrics["loss:sum"], 0.75);
    }
}
