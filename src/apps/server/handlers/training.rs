//! Training endpoints: create_model, get_info, forward_backward (protobuf), optim_step (the
//! checkpoint endpoints are in `checkpoints`). Each work request becomes a future run on its
//! model's FIFO.

use actix_web::{HttpResponse, web};
use serde_json::{Value, json};

use super::super::dispatch::{Finish, JSON, Job, Request};
use super::super::error::{ApiError, Reply};
use super::super::{Owner, ServerApp, Shared, limits, parse_json};
use crate::engine::{BatchLimits, Datum, LossInputs, check_batch};
use crate::protocol::internal;
use crate::protocol::tinker::codec::{ConfigValue, decode_forward_backward};
use crate::protocol::tinker::paths::format_model_id;
use crate::protocol::tinker::tensor::{DecodeLimits, TensorValues};
use crate::protocol::tinker::types::{
    CreateModelRequest, GetInfoRequest, GetInfoResponse, ModelData, OptimStepRequest,
    OptimizerConfig, UntypedFuture,
};
use crate::state::{FailureCategory, LoraSettings, NewFuture, NewRun, RunRecord};

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/create_model", web::post().to(create_model))
        .route("/get_info", web::post().to(get_info))
        .route("/forward_backward", web::post().to(forward_backward))
        .route("/optim_step", web::post().to(optim_step))
        .route("/save_weights", web::post().to(super::checkpoints::save_weights))
        .route(
            "/save_weights_for_sampler",
            web::post().to(super::checkpoints::save_weights_for_sampler),
        )
        .route("/load_weights", web::post().to(super::checkpoints::load_weights));
}

/// Losses the engine implements (`specs/tinker-protocol.md` §6.4).
const LOSSES: &[&str] = &["cross_entropy", "importance_sampling", "ppo", "cispo", "dro"];

/// What a submission needs besides its job.
pub(crate) struct Submission {
    pub owner: String,
    pub model_id: Option<String>,
    pub seq_id: Option<i64>,
    pub kind: &'static str,
    pub queue: Option<String>,
    pub sample_sequence_ids: Option<Vec<String>>,
    /// A sample request's in-flight slot: held by the job, or given back when none runs.
    pub permit: Option<limits::SamplingPermit>,
}

impl Submission {
    /// A request queued behind the earlier ones of `model_id` (every training-client call).
    pub(super) fn on_model(
        owner: String,
        model_id: &str,
        seq_id: Option<i64>,
        kind: &'static str,
    ) -> Self {
        Submission {
            owner,
            model_id: Some(model_id.to_string()),
            seq_id,
            kind,
            queue: Some(model_id.to_string()),
            sample_sequence_ids: None,
            permit: None,
        }
    }
}

/// Outcome of building a job at submission time.
pub(crate) enum Plan {
    Run(Box<Job>),
    /// Known failure reported through the future (category user).
    Fail(String),
    /// Already done (an idempotent retry): the fixed JSON result.
    Done(Value),
}

impl Plan {
    pub(crate) fn run(job: Job) -> Plan {
        Plan::Run(Box::new(job))
    }
}

/// [`submit`] of one call to the model application of `base_model`, which always runs.
pub(crate) async fn submit_to_model(
    app: &ServerApp,
    s: Submission,
    base_model: String,
    call: Request,
    finish: Finish,
) -> Reply {
    submit(app, s, |request_id| Plan::run(Job::on_model(request_id, base_model, call, finish)))
        .await
}

/// Records the future (deduplicated on model id + seq id), starts the job when it is new, and
/// answers the untyped future.
pub(crate) async fn submit(
    app: &ServerApp,
    s: Submission,
    build: impl FnOnce(String) -> Plan,
) -> Reply {
    let owner = s.owner.clone();
    limits::check_pending(app.disp.db_now(move |st| st.count_unfinished(&owner))?)?;
    let request_id = crate::ids::hex_id("req-");
    let (rec, is_new) = app
        .disp
        .create_future(NewFuture {
            request_id: request_id.clone(),
            owner: s.owner,
            model_id: s.model_id.clone(),
            seq_id: s.seq_id,
            kind: s.kind.to_string(),
            sample_sequence_ids: s.sample_sequence_ids,
        })
        .await?;
    if is_new {
        match build(rec.request_id.clone()) {
            Plan::Run(job) => app.disp.enqueue(s.queue.as_deref(), *job, s.permit),
            Plan::Fail(msg) => app.disp.fail_now(&rec.request_id, msg, FailureCategory::User).await,
            Plan::Done(v) => {
                let id = rec.request_id.clone();
                let bytes = v.to_string().into_bytes();
                app.disp.db(move |st| st.complete(&id, &bytes, JSON)).await?;
            }
        }
    }
    Ok(HttpResponse::Ok().json(UntypedFuture {
        request_id: rec.spec.request_id,
        model_id: s.model_id,
        sample_sequence_ids: rec.spec.sample_sequence_ids,
    }))
}

pub(crate) async fn owned_run(
    app: &ServerApp,
    owner: &str,
    id: &str,
) -> Result<RunRecord, ApiError> {
    app.disp.db_now(|s| s.get_run(owner, id))
}

pub(super) async fn owned_session(app: &ServerApp, owner: &str, id: &str) -> Result<(), ApiError> {
    let (o, i) = (owner.to_string(), id.to_string());
    app.disp.db(move |s| s.get_session(&o, &i)).await.map(|_| ())
}

/// Refuses a new model when the key already holds `per_token_model_limit` live models (runs whose
/// session has not finished): `Some(message)` for the failed future (an HTTP 409 would be retried
/// by the SDK for minutes).
pub(super) async fn model_limit_error(
    app: &ServerApp,
    owner: &str,
) -> Result<Option<String>, ApiError> {
    let Some(limit) = app.per_token_model_limit else { return Ok(None) };
    let o = owner.to_string();
    let live = app
        .disp
        .db(move |s| {
            let (runs, _) = s.list_runs(&o, 0, u32::MAX as u64)?;
            let mut live = 0u64;
            let mut finished = std::collections::HashMap::new();
            for r in runs {
                let done = match finished.get(&r.session_id) {
                    Some(d) => *d,
                    None => {
                        let d = s
                            .get_session(&o, &r.session_id)
                            .map(|x| x.finished_at.is_some())
                            .unwrap_or(true);
                        finished.insert(r.session_id.clone(), d);
                        d
                    }
                };
                if !done {
                    live += 1;
                }
            }
            Ok(live)
        })
        .await?;
    Ok((live >= limit as u64).then(|| {
        format!(
            "model limit exceeded: this API key already holds {live} live models (per_token_model_limit = {limit}); finish a session (ServiceClient.close) first"
        )
    }))
}

/// The adapter a run's LoRA settings ask the model application for.
pub(super) fn adapter_spec(l: &LoraSettings) -> internal::LoraSettings {
    internal::LoraSettings {
        rank: l.rank as usize,
        alpha: crate::protocol::tinker::types::LORA_ALPHA,
        targets: l.targets,
        // Any 64-bit seed is a seed: a negative one keeps its bits.
        seed: l.seed.map(|s| s as u64),
    }
}

pub(super) fn metadata(m: Option<serde_json::Map<String, Value>>) -> Value {
    m.map(Value::Object).unwrap_or(Value::Null)
}

async fn create_model(app: Shared, Owner(owner): Owner, body: web::Bytes) -> Reply {
    let r: CreateModelRequest = parse_json(&body)?;
    owned_session(&app, &owner, &r.session_id).await?;
    let up = app.disp.up.model_for(&r.base_model).await?;
    let lora = r.lora_config.unwrap_or_default();
    lora.validate(up.info.max_rank as u32)?;
    let opt = r.optimizer_config.clone().unwrap_or_default();
    if opt.kind != "adamw" {
        return Err(ApiError::BadRequest(format!(
            "optimizer_config.type `{}` is not supported (use adamw)",
            opt.kind
        )));
    }
    let model_id = format_model_id(&r.session_id, r.model_seq_id);
    crate::protocol::tinker::paths::validate_run_id(&model_id)?;
    let existing = owned_run(&app, &owner, &model_id).await.ok();
    let over_limit = if existing.is_none() { model_limit_error(&app, &owner).await? } else { None };
    let call =
        internal::CreateAdapterRequest { model_id: model_id.clone(), lora: adapter_spec(&lora) };
    let run = NewRun {
        id: model_id.clone(),
        owner: owner.clone(),
        session_id: r.session_id.clone(),
        base_model: r.base_model.clone(),
        lora,
        optimizer_config: serde_json::to_value(&opt).unwrap_or(Value::Null),
        user_metadata: metadata(r.user_metadata),
    };
    let result = json!({"model_id": model_id});
    let sub = Submission::on_model(owner, &model_id, None, "create_model");
    submit(&app, sub, |request_id| match (existing, over_limit) {
        (Some(_), _) => Plan::Done(result),
        (None, Some(msg)) => Plan::Fail(msg),
        (None, None) => Plan::run(Job::on_model(
            request_id,
            r.base_model,
            Request::CreateAdapter(call),
            Finish::CreateRun { run: Box::new(run), result },
        )),
    })
    .await
}

async fn get_info(app: Shared, Owner(owner): Owner, body: web::Bytes) -> Reply {
    let r: GetInfoRequest = parse_json(&body)?;
    let run = owned_run(&app, &owner, &r.model_id).await?;
    let info = app.disp.up.find("model", &run.base_model).await.map(|u| u.info);
    let tokenizer = info
        .as_ref()
        .map(|i| i.tokenizer_id.clone())
        .filter(|t| !t.is_empty())
        .unwrap_or_else(|| run.base_model.clone());
    let optimizer: Option<OptimizerConfig> =
        serde_json::from_value(run.optimizer_config.clone()).ok();
    Ok(HttpResponse::Ok().json(GetInfoResponse {
        model_id: run.id.clone(),
        model_data: ModelData {
            arch: info.as_ref().map(|i| i.arch.clone()).filter(|a| !a.is_empty()),
            model_name: Some(run.base_model.clone()),
            tokenizer_id: Some(tokenizer),
        },
        is_lora: Some(true),
        lora_rank: Some(run.lora.rank),
        model_name: Some(run.base_model.clone()),
        optimizer_config: optimizer,
    }))
}

pub(super) fn bad(msg: String) -> ApiError {
    ApiError::BadRequest(msg)
}

async fn forward_backward(app: Shared, Owner(owner): Owner, body: web::Bytes) -> Reply {
    let mut fb = decode_forward_backward(&body, &DecodeLimits::default())?;
    let run = owned_run(&app, &owner, &fb.model_id).await?;
    if !LOSSES.contains(&fb.loss_fn.as_str()) {
        return Err(bad(format!(
            "loss_fn `{}` is not supported (use one of {LOSSES:?})",
            fb.loss_fn
        )));
    }
    // The loss and the batch are checked here with the engine's own checks (the model
    // application runs the same ones), so the SDK gets the 400 on its request instead of a
    // failed future; what is left here is the protocol's part: dtypes and shapes of tensors.
    let loss_config = fb
        .loss_config
        .iter()
        .map(|(k, v)| match v {
            ConfigValue::Number(x) => Ok((k.clone(), *x)),
            ConfigValue::Text(t) => Err(bad(format!("loss_fn_config.{k}: {t:?} is not a number"))),
        })
        .collect::<Result<std::collections::BTreeMap<String, f64>, ApiError>>()?;
    let loss = crate::engine::LossFn::from_name(&fb.loss_fn, &loss_config)
        .map_err(|e| bad(e.to_string()))?;
    let info = app.disp.up.find("model", &run.base_model).await.map(|u| u.info);
    let tokens: u64 = fb.data.iter().map(|d| d.tokens.len() as u64).sum();
    let cap =
        limits::token_cap(app.max_tokens_per_request, info.as_ref().map(|i| i.max_length as u64));
    limits::check_tokens(tokens, cap)?;
    let data = std::mem::take(&mut fb.data)
        .into_iter()
        .enumerate()
        .map(|(i, d)| tinker_datum(i, d))
        .collect::<Result<Vec<Datum>, ApiError>>()?;
    let limits = match &info {
        Some(i) => BatchLimits { vocab_size: i.vocab_size, max_tokens: i.max_length },
        // Not known yet (the application is restarting): the model application checks them.
        None => BatchLimits { vocab_size: usize::MAX, max_tokens: usize::MAX },
    };
    check_batch(&limits, &data, &loss).map_err(|e| bad(e.to_string()))?;
    let call = internal::ForwardBackwardRequest {
        model_id: fb.model_id.clone(),
        forward_only: fb.forward_only,
        disable_lora: false,
        loss_fn: fb.loss_fn.clone(),
        loss_config,
        data,
    };
    let sub = Submission::on_model(
        owner,
        &fb.model_id,
        Some(fb.seq_id as i64),
        if fb.forward_only { "forward" } else { "forward_backward" },
    );
    submit_to_model(&app, sub, run.spec.base_model, Request::ForwardBackward(call), Finish::Answer)
        .await
}

async fn optim_step(app: Shared, Owner(owner): Owner, body: web::Bytes) -> Reply {
    let r: OptimStepRequest = parse_json(&body)?;
    let run = owned_run(&app, &owner, &r.model_id).await?;
    let adam = match (r.adam_params, &r.optimizer_params) {
        (Some(a), _) => a,
        (None, Some(_)) => {
            return Err(bad("optimizer_params: only adam_params (AdamW) is supported".into()));
        }
        (None, None) => Default::default(),
    };
    adam.validate().map_err(|e| bad(e.to_string()))?;
    let call = internal::OptimStepRequest { model_id: r.model_id.clone(), adam_params: adam };
    let sub = Submission::on_model(owner, &r.model_id, r.seq_id, "optim_step");
    submit_to_model(&app, sub, run.spec.base_model, Request::OptimStep(call), Finish::Answer).await
}

/// The engine datum of the SDK's datum `i`: `target_tokens` int64 of shape `[N]` or `[N, K]`,
/// the float inputs float32. Lengths, ranges and finiteness are the batch check's.
/// Takes the datum by value so the float tensors move into the engine datum uncopied.
fn tinker_datum(
    i: usize,
    mut d: crate::protocol::tinker::codec::DatumInput,
) -> Result<Datum, ApiError> {
    let n = d.tokens.len();
    let field = |key: &str| format!("data[{i}].loss_fn_inputs.{key}");
    let tt = d
        .loss_fn_inputs
        .get("target_tokens")
        .ok_or_else(|| bad(format!("{}: required", field("target_tokens"))))?;
    let TensorValues::I64(targets) = &tt.values else {
        return Err(bad(format!("{}: must be int64", field("target_tokens"))));
    };
    let k = match tt.shape.as_slice() {
        [rows] if *rows == n => 1,
        [rows, k] if *rows == n && *k >= 1 => *k,
        other => {
            return Err(bad(format!(
                "{}: shape {other:?} does not match the {n} input tokens (expected [{n}] or [{n}, K])",
                field("target_tokens")
            )));
        }
    };
    let target_tokens = token_ids(targets, || field("target_tokens"))?;
    let input_tokens = token_ids(&d.tokens, || format!("data[{i}].model_input"))?;
    let mut float = |key: &str| -> Result<Option<Vec<f32>>, ApiError> {
        match d.loss_fn_inputs.remove(key) {
            None => Ok(None),
            Some(t) => match t.values {
                TensorValues::F32(v) => Ok(Some(v)),
                _ => Err(bad(format!("{}: must be float32", field(key)))),
            },
        }
    };
    Ok(Datum {
        input_tokens,
        inputs: LossInputs {
            target_tokens,
            k,
            weights: float("weights")?,
            logprobs: float("logprobs")?,
            advantages: float("advantages")?,
        },
    })
}

/// Ids as u32: a negative (or too large) one is a 400 naming `field`.
fn token_ids<T>(ids: &[T], field: impl Fn() -> String) -> Result<Vec<u32>, ApiError>
where
    T: Copy + std::fmt::Display + TryInto<u32>,
{
    ids.iter()
        .map(|&t| {
            t.try_into().map_err(|_| bad(format!("{}: token id {t} is out of range", field())))
        })
        .collect()
}
