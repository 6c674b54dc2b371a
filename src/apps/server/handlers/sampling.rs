//! Sampling endpoints: create_sampling_session, samplers/{id}, asample (a future whose result is
//! a protobuf `SampleResponse`). Samples run on a sampler application for the base model when
//! one exists, else on the model application. Each key has a bounded number of sample requests
//! in flight (`server_config.max_sampling_requests_per_key`, 429 beyond it).

use actix_web::{HttpResponse, web};
use serde_json::json;

use super::super::dispatch::{Finish, Job, Request};
use super::super::error::{ApiError, Reply};
use super::super::{Owner, Shared, parse_json};
use super::checkpoints::ephemeral_dir;
use super::training::{Plan, Submission, owned_run, submit};
use crate::protocol::internal;
use crate::protocol::tinker::paths::{TinkerPath, checkpoint_dir, format_sampling_session_id};
use crate::protocol::tinker::types::{
    CreateSamplingSessionRequest, CreateSamplingSessionResponse, GetSamplerResponse, SampleRequest,
    StopCondition,
};
use crate::state::NewSamplingSession;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/create_sampling_session", web::post().to(create_sampling_session))
        .route("/samplers/{id}", web::get().to(get_sampler))
        .route("/asample", web::post().to(asample));
}

/// Most sequences one `asample` may ask for.
const MAX_SAMPLES: u32 = 128;
/// `max_tokens` when the client leaves it out.
const DEFAULT_MAX_TOKENS: u32 = 256;

async fn create_sampling_session(app: Shared, Owner(owner): Owner, body: web::Bytes) -> Reply {
    let r: CreateSamplingSessionRequest = parse_json(&body)?;
    let (o, sid) = (owner.clone(), r.session_id.clone());
    app.disp.db(move |s| s.get_session(&o, &sid)).await?;
    let base_model = match (&r.source.model_path, &r.source.base_model) {
        (Some(p), _) => {
            let tp = TinkerPath::parse(p)?;
            let (o, run, cid) = (owner.clone(), tp.run_id.clone(), tp.checkpoint_id());
            app.disp.db(move |s| s.get_checkpoint(&o, &run, &cid)).await?;
            owned_run(&app, &owner, &tp.run_id).await?.spec.base_model
        }
        (None, Some(b)) => {
            app.disp.up.model_for(b).await?;
            b.clone()
        }
        (None, None) => {
            return Err(ApiError::BadRequest("give base_model or model_path".into()));
        }
    };
    let id = format_sampling_session_id(&r.session_id, r.sampling_session_seq_id);
    let rec = NewSamplingSession {
        id: id.clone(),
        session_id: r.session_id,
        owner,
        seq: r.sampling_session_seq_id,
        base_model,
        model_path: r.source.model_path,
    };
    app.disp.db(move |s| s.create_or_get_sampling_session(&rec)).await?;
    Ok(HttpResponse::Ok().json(CreateSamplingSessionResponse { sampling_session_id: id }))
}

async fn get_sampler(app: Shared, Owner(owner): Owner, path: web::Path<String>) -> Reply {
    let id = path.into_inner();
    let rec = app.disp.db(move |s| s.get_sampling_session(&owner, &id)).await?;
    Ok(HttpResponse::Ok().json(GetSamplerResponse {
        sampler_id: rec.spec.id,
        base_model: rec.spec.base_model,
        model_path: rec.spec.model_path,
    }))
}

async fn asample(app: Shared, Owner(owner): Owner, body: web::Bytes) -> Reply {
    let r: SampleRequest = parse_json(&body)?;
    r.validate(MAX_SAMPLES)?;
    // Taken before any lookup, so a key over its bound is refused cheaply; given back when this
    // request ends without a job, else when its job is done.
    let permit = app.sampling.acquire(&owner)?;
    let sid = r.sampling_session_id.clone().ok_or_else(|| {
        ApiError::BadRequest(
            "sampling_session_id is required (create a sampling session first)".into(),
        )
    })?;
    let (o, s2) = (owner.clone(), sid.clone());
    let session = app.disp.db(move |s| s.get_sampling_session(&o, &s2)).await?;
    let prompt = r.prompt.text_tokens("prompt")?;
    if prompt.is_empty() {
        return Err(ApiError::BadRequest("prompt: no tokens".into()));
    }
    let model_app = app.disp.up.model_for(&session.base_model).await?;
    let (v, max) = (model_app.info.vocab_size, model_app.info.max_length);
    if let Some(t) = prompt.iter().find(|&&t| t as u64 >= v as u64) {
        return Err(ApiError::BadRequest(format!(
            "prompt: token id {t} is out of range (vocab size {v})"
        )));
    }
    if prompt.len() >= max {
        return Err(ApiError::BadRequest(format!(
            "prompt: {} tokens do not fit the model's maximum length {max}",
            prompt.len()
        )));
    }
    let adapter_dir: Option<String> = match &session.model_path {
        Some(p) => Some(
            checkpoint_dir(&app.save_root, &owner, &TinkerPath::parse(p)?)?.display().to_string(),
        ),
        None => {
            let d = ephemeral_dir(&app, &owner, &session.id);
            d.exists().then(|| d.display().to_string())
        }
    };
    let p = &r.sampling_params;
    let stop = match &p.stop {
        None => None,
        Some(StopCondition::Strings(s)) => Some(json!(s)),
        Some(StopCondition::Tokens(t)) => Some(json!(t)),
    };
    let call = internal::SampleRequest {
        model_id: None,
        adapter_dir: adapter_dir.map(Into::into),
        // `text_tokens` refused negative ids.
        prompt: prompt.iter().map(|&t| t as u32).collect(),
        num_samples: r.num_samples as usize,
        max_tokens: p.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS) as usize,
        temperature: p.temperature as f32,
        top_k: p.top_k,
        top_p: p.top_p as f32,
        seed: p.seed,
        stop,
        prompt_logprobs: r.prompt_logprobs,
    };
    let app_kind = if app.disp.up.find("sampler", &session.base_model).await.is_some() {
        "sampler"
    } else {
        "model"
    };
    let ids: Vec<String> = (0..r.num_samples).map(|_| crate::ids::hex_id("seq-")).collect();
    let sub = Submission {
        owner,
        model_id: None,
        seq_id: None,
        kind: "sample",
        queue: None,
        sample_sequence_ids: Some(ids),
        permit: Some(permit),
    };
    submit(&app, sub, |request_id| {
        Plan::run(Job {
            request_id,
            app_kind,
            base_model: session.spec.base_model,
            call: Request::Sample(call),
            finish: Finish::Answer,
        })
    })
    .await
}
