//! Checkpoint endpoints of the Tinker API: save_weights, save_weights_for_sampler and
//! load_weights, each a future on its model's FIFO, with checkpoint TTLs.

use std::path::PathBuf;

use actix_web::web;
use serde_json::json;

use super::super::dispatch::{Finish, Job, Request};
use super::super::error::{ApiError, Reply};
use super::super::{Owner, ServerApp, Shared, parse_json};
use super::training::{
    Plan, Submission, adapter_spec, bad, metadata, model_limit_error, owned_run, owned_session,
    submit, submit_to_model,
};
use crate::protocol::internal::{LoadRequest, SaveKind, SaveRequest};
use crate::protocol::tinker::paths::{
    CheckpointKind, TinkerPath, checkpoint_dir, format_model_id, format_sampling_session_id,
};
use crate::protocol::tinker::types::{
    LoadForm, LoadWeightsRequest, SamplerSaveForm, SaveOptions, SaveWeightsForSamplerRequest,
    SaveWeightsRequest,
};
use crate::state::{CheckpointType, NewCheckpoint, NewRun, NewSamplingSession, RunRecord};

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
async fn save_named(
    app: &ServerApp,
    owner: String,
    run: RunRecord,
    kind: CheckpointKind,
    name: &str,
    overwrite: bool,
    options: SaveOptions,
) -> Reply {
    let SaveOptions { seq_id, ttl_seconds, user_metadata } = options;
    let tp = TinkerPath::new(&run.id, kind, name)?;
    let dir = checkpoint_dir(&app.save_root, &owner, &tp)?;
    let expires_at = expiry(ttl_seconds)?;
    let ckpt_id = tp.checkpoint_id();
    let (o, r, c) = (owner.clone(), run.id.clone(), ckpt_id.clone());
    let exists = app.disp.db(move |s| Ok(s.get_checkpoint(&o, &r, &c).is_ok())).await?;
    let path = tp.to_string();
    let (ctype, save_kind, sub_kind) = match kind {
        CheckpointKind::Weights => (CheckpointType::Training, SaveKind::State, "save_weights"),
        _ => (CheckpointType::Sampler, SaveKind::Sampler, "save_weights_for_sampler"),
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
    let call = SaveRequest { model_id: run.id.clone(), dir, kind: save_kind };
    let sub = Submission::on_model(owner.clone(), &run.id, seq_id, sub_kind);
    submit(app, sub, |request_id| {
        if exists && !overwrite {
            return Plan::Fail(format!(
                "checkpoint {path} already exists; pass overwrite=True or choose another name"
            ));
        }
        Plan::run(Job::on_model(
            request_id,
            run.spec.base_model,
            Request::Save(call),
            Finish::Checkpoint { owner, ckpt: Box::new(ckpt), overwrite, result },
        ))
    })
    .await
}

pub(super) async fn save_weights(app: Shared, Owner(owner): Owner, body: web::Bytes) -> Reply {
    let r: SaveWeightsRequest = parse_json(&body)?;
    let run = owned_run(&app, &owner, &r.model_id).await?;
    let name = r.path.clone().ok_or_else(|| bad("path: the checkpoint name is required".into()))?;
    save_named(&app, owner, run, CheckpointKind::Weights, &name, r.overwrite, r.options).await
}

pub(super) async fn save_weights_for_sampler(
    app: Shared,
    Owner(owner): Owner,
    body: web::Bytes,
) -> Reply {
    let r: SaveWeightsForSamplerRequest = parse_json(&body)?;
    let form = r.form()?;
    let run = owned_run(&app, &owner, &r.model_id).await?;
    match form {
        SamplerSaveForm::Named { name } => {
            let kind = CheckpointKind::SamplerWeights;
            save_named(&app, owner, run, kind, &name, true, r.options).await
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
            let call = SaveRequest { model_id: run.id.clone(), dir, kind: SaveKind::Sampler };
            let sub =
                Submission::on_model(owner, &run.id, r.options.seq_id, "save_weights_for_sampler");
            let finish = Finish::SamplingSession {
                session: Box::new(session),
                result: json!({"path": null, "sampling_session_id": sid}),
            };
            submit_to_model(&app, sub, run.spec.base_model, Request::Save(call), finish).await
        }
    }
}

pub(super) async fn load_weights(app: Shared, Owner(owner): Owner, body: web::Bytes) -> Reply {
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
            let call = LoadRequest {
                model_id: model_id.clone(),
                dir,
                with_optimizer: r.optimizer,
                create: None,
            };
            let result = json!({"path": r.path, "model_id": model_id});
            let sub = Submission::on_model(owner, &model_id, r.seq_id, "load_weights");
            let finish = Finish::Json(result);
            submit_to_model(&app, sub, run.spec.base_model, Request::Load(call), finish).await
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
            let call = LoadRequest {
                model_id: model_id.clone(),
                dir,
                with_optimizer: r.optimizer,
                create: Some(adapter_spec(&src.lora)),
            };
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
                (None, None) => Plan::run(Job::on_model(
                    request_id,
                    base_model,
                    Request::Load(call),
                    Finish::CreateRun { run: Box::new(run), result },
                )),
            })
            .await
        }
    }
}
