//! Training endpoints: create_model, get_info, forward_backward (protobuf), optim_step,
//! save_weights, save_weights_for_sampler, load_weights. Each work request becomes a future run
//! on its model's FIFO.

use std::path::PathBuf;

use actix_web::{HttpRequest, HttpResponse, web};
use serde_json::{Value, json};

use super::super::dispatch::{Finish, JSON, Job};
use super::super::error::ApiError;
use super::super::{ServerApp, Shared, limits, parse_json};
use crate::protocol::tinker::codec::{ConfigValue, decode_forward_backward};
use crate::protocol::tinker::paths::{
    CheckpointKind, TinkerPath, checkpoint_dir, format_model_id, format_sampling_session_id,
};
use crate::protocol::tinker::tensor::{DecodeLimits, TensorValues};
use crate::protocol::tinker::types::{
    CreateModelRequest, GetInfoRequest, GetInfoResponse, LoadForm, LoadWeightsRequest, LoraConfig,
    ModelData, OptimStepRequest, OptimizerConfig, SamplerSaveForm, SaveWeightsForSamplerRequest,
    SaveWeightsRequest, UntypedFuture,
};
use crate::state::{
    CheckpointType, FailureCategory, LoraSettings, NewCheckpoint, NewFuture, NewRun,
    NewSamplingSession, RunRecord,
};

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/create_model", web::post().to(create_model))
        .route("/get_info", web::post().to(get_info))
        .route("/forward_backward", web::post().to(forward_backward))
        .route("/optim_step", web::post().to(optim_step))
        .route("/save_weights", web::post().to(save_weights))
        .route("/save_weights_for_sampler", web::post().to(save_weights_for_sampler))
        .route("/load_weights", web::post().to(load_weights));
}

/// Losses the engine implements (`specs/tinker-protocol.md` §6.4).
const LOSSES: &[&str] = &["cross_entropy", "importance_sampling", "ppo", "cispo", "dro"];
/// Tinker's default `lora_alpha`.
const LORA_ALPHA: f64 = 32.0;

/// What a submission needs besides its job.
pub(crate) struct Submission {
    pub owner: String,
    pub model_id: Option<String>,
    pub seq_id: Option<i64>,
    pub kind: &'static str,
    pub queue: Option<String>,
    pub sample_sequence_ids: Option<Vec<String>>,
}

impl Submission {
    /// A request queued behind the earlier ones of `model_id` (every training-client call).
    fn on_model(owner: String, model_id: &str, seq_id: Option<i64>, kind: &'static str) -> Self {
        Submission {
            owner,
            model_id: Some(model_id.to_string()),
            seq_id,
            kind,
            queue: Some(model_id.to_string()),
            sample_sequence_ids: None,
        }
    }
}

/// Outcome of building a job at submission time.
pub(crate) enum Plan {
    Run(Job),
    /// Known failure reported through the future (category user).
    Fail(String),
    /// Already done (an idempotent retry): the fixed JSON result.
    Done(Value),
}

/// Records the future (deduplicated on model id + seq id), starts the job when it is new, and
/// answers the untyped future.
pub(crate) async fn submit(
    app: &ServerApp,
    s: Submission,
    build: impl FnOnce(String) -> Plan,
) -> Result<HttpResponse, ApiError> {
    let owner = s.owner.clone();
    limits::check_pending(app.disp.db_now(move |st| st.count_unfinished(&owner))?)?;
    let request_id = crate::state::new_id("req-");
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
            Plan::Run(job) => app.disp.enqueue(s.queue.as_deref(), job),
            Plan::Fail(msg) => app.disp.fail_now(&rec.request_id, msg, FailureCategory::User).await,
            Plan::Done(v) => {
                let id = rec.request_id.clone();
                let bytes = v.to_string().into_bytes();
                app.disp.db(move |st| st.complete(&id, &bytes, JSON)).await?;
            }
        }
    }
    Ok(HttpResponse::Ok().json(UntypedFuture {
        request_id: rec.request_id,
        model_id: s.model_id,
        sample_sequence_ids: rec.sample_sequence_ids,
    }))
}

pub(crate) async fn owned_run(
    app: &ServerApp,
    owner: &str,
    id: &str,
) -> Result<RunRecord, ApiError> {
    app.disp.db_now(|s| s.get_run(owner, id))
}

async fn owned_session(app: &ServerApp, owner: &str, id: &str) -> Result<(), ApiError> {
    let (o, i) = (owner.to_string(), id.to_string());
    app.disp.db(move |s| s.get_session(&o, &i)).await.map(|_| ())
}

/// Refuses a new model when the key already holds `per_token_model_limit` live models (runs whose
/// session has not finished): `Some(message)` for the failed future (an HTTP 409 would be retried
/// by the SDK for minutes).
async fn model_limit_error(app: &ServerApp, owner: &str) -> Result<Option<String>, ApiError> {
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

fn lora_settings(l: &LoraConfig) -> LoraSettings {
    LoraSettings {
        rank: l.rank,
        seed: l.seed,
        train_unembed: l.train_unembed,
        train_mlp: l.train_mlp,
        train_attn: l.train_attn,
    }
}

fn adapter_spec(l: &LoraSettings) -> Value {
    let mut v = json!({"rank": l.rank, "alpha": LORA_ALPHA, "train_attn": l.train_attn,
        "train_mlp": l.train_mlp, "train_unembed": l.train_unembed});
    if let Some(seed) = l.seed {
        v["seed"] = json!(seed);
    }
    v
}

fn metadata(m: Option<serde_json::Map<String, Value>>) -> Value {
    m.map(Value::Object).unwrap_or(Value::Null)
}

async fn create_model(
    app: Shared,
    req: HttpRequest,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    let owner = app.owner(&req)?;
    let r: CreateModelRequest = parse_json(&body)?;
    owned_session(&app, &owner, &r.session_id).await?;
    let up = app.disp.up.model_for(&r.base_model).await?;
    let lora = r.lora_config.clone().unwrap_or_default();
    lora.validate(up.info.max_rank.unwrap_or(128))?;
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
    let settings = lora_settings(&lora);
    let mut body = adapter_spec(&settings);
    body["model_id"] = json!(model_id);
    let run = NewRun {
        id: model_id.clone(),
        owner: owner.clone(),
        session_id: r.session_id.clone(),
        base_model: r.base_model.clone(),
        lora: settings,
        optimizer_config: serde_json::to_value(&opt).unwrap_or(Value::Null),
        user_metadata: metadata(r.user_metadata),
    };
    let result = json!({"model_id": model_id});
    let sub = Submission::on_model(owner, &model_id, None, "create_model");
    submit(&app, sub, |request_id| match (existing, over_limit) {
        (Some(_), _) => Plan::Done(result),
        (None, Some(msg)) => Plan::Fail(msg),
        (None, None) => Plan::Run(Job::on_model(
            request_id,
            r.base_model,
            "create_adapter",
            body,
            Finish::CreateRun { run: Box::new(run), result },
        )),
    })
    .await
}

async fn get_info(
    app: Shared,
    req: HttpRequest,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    let owner = app.owner(&req)?;
    let r: GetInfoRequest = parse_json(&body)?;
    let run = owned_run(&app, &owner, &r.model_id).await?;
    let info = app.disp.up.find("model", &run.base_model).await.map(|u| u.info);
    let tokenizer = info
        .as_ref()
        .and_then(|i| i.tokenizer_id.clone())
        .unwrap_or_else(|| run.base_model.clone());
    let optimizer: Option<OptimizerConfig> =
        serde_json::from_value(run.optimizer_config.clone()).ok();
    Ok(HttpResponse::Ok().json(GetInfoResponse {
        model_id: run.id.clone(),
        model_data: ModelData {
            arch: info.as_ref().and_then(|i| i.arch.clone()),
            model_name: Some(run.base_model.clone()),
            tokenizer_id: Some(tokenizer),
        },
        is_lora: Some(true),
        lora_rank: Some(run.lora.rank),
        model_name: Some(run.base_model.clone()),
        optimizer_config: optimizer,
    }))
}

fn bad(msg: String) -> ApiError {
    ApiError::BadRequest(msg)
}

async fn forward_backward(
    app: Shared,
    req: HttpRequest,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    let owner = app.owner(&req)?;
    let fb = decode_forward_backward(&body, &DecodeLimits::default())?;
    let run = owned_run(&app, &owner, &fb.model_id).await?;
    if !LOSSES.contains(&fb.loss_fn.as_str()) {
        return Err(bad(format!(
            "loss_fn `{}` is not supported (use one of {LOSSES:?})",
            fb.loss_fn
        )));
    }
    // The same check as the model application's, up front: the SDK gets the 400 on its
    // request instead of a failed future (the engine's message names the field).
    let numeric = fb
        .loss_config
        .iter()
        .map(|(k, v)| match v {
            ConfigValue::Number(x) => Ok((k.clone(), *x)),
            ConfigValue::Text(t) => Err(bad(format!("loss_fn_config.{k}: {t:?} is not a number"))),
        })
        .collect::<Result<std::collections::BTreeMap<String, f64>, ApiError>>()?;
    crate::engine::LossFn::from_name(&fb.loss_fn, &numeric).map_err(|e| bad(e.to_string()))?;
    if fb.data.is_empty() {
        return Err(bad("data: the batch is empty (send at least one datum)".into()));
    }
    let info = app.disp.up.find("model", &run.base_model).await.map(|u| u.info);
    let vocab = info.as_ref().and_then(|i| i.vocab_size);
    let tokens: u64 = fb.data.iter().map(|d| d.tokens.len() as u64).sum();
    let cap = limits::token_cap(app.max_tokens_per_request, info.and_then(|i| i.max_length));
    limits::check_tokens(tokens, cap)?;
    let rl = fb.loss_fn != "cross_entropy";
    let mut data = Vec::with_capacity(fb.data.len());
    for (i, d) in fb.data.iter().enumerate() {
        let n = d.tokens.len();
        if n == 0 {
            return Err(bad(format!("data[{i}].model_input: no tokens")));
        }
        if let Some(v) = vocab
            && let Some(t) = d.tokens.iter().find(|&&t| t as u64 >= v)
        {
            return Err(bad(format!(
                "data[{i}].model_input: token id {t} is out of range (vocab size {v})"
            )));
        }
        let tt = d
            .loss_fn_inputs
            .get("target_tokens")
            .ok_or_else(|| bad(format!("data[{i}].loss_fn_inputs.target_tokens: required")))?;
        let TensorValues::I64(targets) = &tt.values else {
            return Err(bad(format!("data[{i}].loss_fn_inputs.target_tokens: must be int64")));
        };
        let k = match tt.shape.as_slice() {
            [rows] if *rows == n => 1,
            [rows, k] if *rows == n && *k >= 1 => *k,
            other => {
                return Err(bad(format!(
                    "data[{i}].loss_fn_inputs.target_tokens: shape {other:?} does not match the {n} input tokens (expected [{n}] or [{n}, K])"
                )));
            }
        };
        if let Some(t) = targets.iter().find(|&&t| t < 0 || vocab.is_some_and(|v| t as u64 >= v)) {
            return Err(bad(format!(
                "data[{i}].loss_fn_inputs.target_tokens: token id {t} is out of range"
            )));
        }
        let mut datum = json!({"tokens": d.tokens, "target_tokens": targets, "k": k});
        for (key, per_token) in [("weights", targets.len()), ("logprobs", n), ("advantages", n)] {
            match d.loss_fn_inputs.get(key) {
                Some(t) => {
                    let TensorValues::F32(v) = &t.values else {
                        return Err(bad(format!(
                            "data[{i}].loss_fn_inputs.{key}: must be float32"
                        )));
                    };
                    if v.len() != per_token {
                        return Err(bad(format!(
                            "data[{i}].loss_fn_inputs.{key}: has {} values, expected {per_token}",
                            v.len()
                        )));
                    }
                    if v.iter().any(|x| !x.is_finite()) {
                        return Err(bad(format!(
                            "data[{i}].loss_fn_inputs.{key}: contains NaN or infinity"
                        )));
                    }
                    datum[key] = json!(v);
                }
                None if rl && key != "weights" => {
                    return Err(bad(format!(
                        "data[{i}].loss_fn_inputs.{key}: required by loss `{}`",
                        fb.loss_fn
                    )));
                }
                None => {}
            }
        }
        data.push(datum);
    }
    let loss_config: serde_json::Map<String, Value> = fb
        .loss_config
        .iter()
        .map(|(k, v)| {
            let v = match v {
                ConfigValue::Number(x) => json!(x),
                ConfigValue::Text(s) => json!(s),
            };
            (k.clone(), v)
        })
        .collect();
    let job_body = json!({"model_id": fb.model_id, "forward_only": fb.forward_only,
        "loss_fn": fb.loss_fn, "loss_config": loss_config, "data": data});
    let sub = Submission::on_model(
        owner,
        &fb.model_id,
        Some(fb.seq_id as i64),
        if fb.forward_only { "forward" } else { "forward_backward" },
    );
    submit(&app, sub, |request_id| {
        Plan::Run(Job::on_model(
            request_id,
            run.base_model,
            "forward_backward",
            job_body,
            Finish::ForwardBackward,
        ))
    })
    .await
}

async fn optim_step(
    app: Shared,
    req: HttpRequest,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    let owner = app.owner(&req)?;
    let r: OptimStepRequest = parse_json(&body)?;
    let run = owned_run(&app, &owner, &r.model_id).await?;
    let adam = match (r.adam_params, &r.optimizer_params) {
        (Some(a), _) => a,
        (None, Some(_)) => {
            return Err(bad("optimizer_params: only adam_params (AdamW) is supported".into()));
        }
        (None, None) => Default::default(),
    };
    adam.validate()?;
    let job_body = json!({"model_id": r.model_id, "adam_params": adam});
    let sub = Submission::on_model(owner, &r.model_id, r.seq_id, "optim_step");
    submit(&app, sub, |request_id| {
        Plan::Run(Job::on_model(
            request_id,
            run.base_model,
            "optim_step",
            job_body,
            Finish::Passthrough,
        ))
    })
    .await
}

fn expiry(ttl: Option<i64>) -> Result<Option<i64>, ApiError> {
    match ttl {
        None => Ok(None),
        Some(t) if t > 0 => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as i64)
                .unwrap_or(0);
            Ok(Some(now.saturating_add(t.saturating_mul(1000))))
        }
        Some(t) => Err(bad(format!("ttl_seconds: {t} must be positive"))),
    }
}

/// Directory of an ephemeral sampler snapshot (not a listed checkpoint).
pub(crate) fn ephemeral_dir(app: &ServerApp, owner: &str, sampling_id: &str) -> PathBuf {
    app.save_root.join(owner).join("ephemeral").join(sampling_id)
}

/// A named checkpoint save of `run` (state or sampler weights).
#[allow(clippy::too_many_arguments)]
async fn save_named(
    app: &ServerApp,
    owner: String,
    run: RunRecord,
    kind: CheckpointKind,
    name: &str,
    seq_id: Option<i64>,
    overwrite: bool,
    ttl: Option<i64>,
    user_metadata: Option<serde_json::Map<String, Value>>,
) -> Result<HttpResponse, ApiError> {
    let tp = TinkerPath::new(&run.id, kind, name)?;
    let dir = checkpoint_dir(&app.save_root, &owner, &tp)?;
    let expires_at = expiry(ttl)?;
    let ckpt_id = tp.checkpoint_id();
    let (o, r, c) = (owner.clone(), run.id.clone(), ckpt_id.clone());
    let exists = app.disp.db(move |s| Ok(s.get_checkpoint(&o, &r, &c).is_ok())).await?;
    let path = tp.to_string();
    let (ctype, app_kind_word, sub_kind) = match kind {
        CheckpointKind::Weights => (CheckpointType::Training, "state", "save_weights"),
        _ => (CheckpointType::Sampler, "sampler", "save_weights_for_sampler"),
    };
    let result = match kind {
        CheckpointKind::Weights => json!({"path": path, "type": "save_weights"}),
        _ => json!({"path": path}),
    };
    let ckpt = NewCheckpoint {
        run_id: run.id.clone(),
        checkpoint_id: ckpt_id.clone(),
        checkpoint_type: ctype,
        tinker_path: path.clone(),
        size_bytes: None,
        user_metadata: metadata(user_metadata),
        expires_at,
        public: false,
    };
    let job_body = json!({"model_id": run.id, "dir": dir, "kind": app_kind_word});
    let sub = Submission::on_model(owner.clone(), &run.id, seq_id, sub_kind);
    submit(app, sub, |request_id| {
        if exists && !overwrite {
            return Plan::Fail(format!(
                "checkpoint {path} already exists; pass overwrite=True or choose another name"
            ));
        }
        Plan::Run(Job::on_model(
            request_id,
            run.base_model,
            "save",
            job_body,
            Finish::Checkpoint { owner, ckpt: Box::new(ckpt), overwrite, result },
        ))
    })
    .await
}

async fn save_weights(
    app: Shared,
    req: HttpRequest,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    let owner = app.owner(&req)?;
    let r: SaveWeightsRequest = parse_json(&body)?;
    let run = owned_run(&app, &owner, &r.model_id).await?;
    let name = r.path.clone().ok_or_else(|| bad("path: the checkpoint name is required".into()))?;
    save_named(
        &app,
        owner,
        run,
        CheckpointKind::Weights,
        &name,
        r.seq_id,
        r.overwrite,
        r.ttl_seconds,
        r.user_metadata,
    )
    .await
}

async fn save_weights_for_sampler(
    app: Shared,
    req: HttpRequest,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    let owner = app.owner(&req)?;
    let r: SaveWeightsForSamplerRequest = parse_json(&body)?;
    let form = r.form()?;
    let run = owned_run(&app, &owner, &r.model_id).await?;
    match form {
        SamplerSaveForm::Named { name } => {
            save_named(
                &app,
                owner,
                run,
                CheckpointKind::SamplerWeights,
                &name,
                r.seq_id,
                true,
                r.ttl_seconds,
                r.user_metadata,
            )
            .await
        }
        SamplerSaveForm::Ephemeral { sampling_session_seq_id } => {
            let sid = format_sampling_session_id(&run.session_id, sampling_session_seq_id);
            let dir = ephemeral_dir(&app, &owner, &sid);
            let session = NewSamplingSession {
                id: sid.clone(),
                session_id: run.session_id.clone(),
                owner: owner.clone(),
                seq: sampling_session_seq_id,
                base_model: run.base_model.clone(),
                model_path: None,
            };
            let job_body = json!({"model_id": run.id, "dir": dir, "kind": "sampler"});
            let sub = Submission::on_model(owner, &run.id, r.seq_id, "save_weights_for_sampler");
            submit(&app, sub, |request_id| {
                let finish = Finish::SamplingSession {
                    session: Box::new(session),
                    result: json!({"path": null, "sampling_session_id": sid}),
                };
                Plan::Run(Job::on_model(request_id, run.base_model, "save", job_body, finish))
            })
            .await
        }
    }
}

async fn load_weights(
    app: Shared,
    req: HttpRequest,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    let owner = app.owner(&req)?;
    let r: LoadWeightsRequest = parse_json(&body)?;
    let form = r.form()?;
    let tp = TinkerPath::parse(&r.path)?;
    let (o, run_id, cid) = (owner.clone(), tp.run_id.clone(), tp.checkpoint_id());
    let ckpt = app.disp.db(move |s| s.get_checkpoint(&o, &run_id, &cid)).await?;
    if r.optimizer && ckpt.checkpoint_type != CheckpointType::Training {
        return Err(bad(format!(
            "{}: optimizer state is only in training checkpoints (tinker://RUN/weights/NAME)",
            r.path
        )));
    }
    let dir = checkpoint_dir(&app.save_root, &owner, &tp)?;
    let src = owned_run(&app, &owner, &tp.run_id).await?;
    match form {
        LoadForm::Legacy { model_id } => {
            let run = owned_run(&app, &owner, &model_id).await?;
            let job_body = json!({"model_id": model_id, "dir": dir, "with_optimizer": r.optimizer});
            let result = json!({"path": r.path, "model_id": model_id});
            let sub = Submission::on_model(owner, &model_id, r.seq_id, "load_weights");
            submit(&app, sub, |request_id| {
                Plan::Run(Job::on_model(
                    request_id,
                    run.base_model,
                    "load",
                    job_body,
                    Finish::Json(result),
                ))
            })
            .await
        }
        LoadForm::CreateViaLoad { session_id, model_seq_id } => {
            owned_session(&app, &owner, &session_id).await?;
            let base_model = match &r.base_model {
                Some(b) if b != &src.base_model => {
                    let up = app.disp.up.model_for(&src.base_model).await?;
                    if !up.info.answers_to(b) {
                        return Err(bad(format!(
                            "base_model `{b}` does not match the checkpoint's base model `{}`",
                            src.base_model
                        )));
                    }
                    src.base_model.clone()
                }
                _ => src.base_model.clone(),
            };
            app.disp.up.model_for(&base_model).await?;
            let model_id = format_model_id(&session_id, model_seq_id);
            let existing = owned_run(&app, &owner, &model_id).await.ok();
            let over_limit =
                if existing.is_none() { model_limit_error(&app, &owner).await? } else { None };
            let mut job_body =
                json!({"model_id": model_id, "dir": dir, "with_optimizer": r.optimizer});
            job_body["create"] = adapter_spec(&src.lora);
            let run = NewRun {
                id: model_id.clone(),
                owner: owner.clone(),
                session_id: session_id.clone(),
                base_model: base_model.clone(),
                lora: src.lora,
                optimizer_config: src.optimizer_config.clone(),
                user_metadata: metadata(r.user_metadata.clone()),
            };
            let result = json!({"path": r.path, "model_id": model_id});
            let sub = Submission::on_model(owner, &model_id, None, "load_weights");
            submit(&app, sub, |request_id| match (existing, over_limit) {
                (Some(_), _) => Plan::Fail(format!("model {model_id} already exists")),
                (None, Some(msg)) => Plan::Fail(msg),
                (None, None) => Plan::Run(Job::on_model(
                    request_id,
                    base_model,
                    "load",
                    job_body,
                    Finish::CreateRun { run: Box::new(run), result },
                )),
            })
            .await
        }
    }
}
