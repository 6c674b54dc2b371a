//! RestClient endpoints: training runs, their checkpoints (list, delete), the user's checkpoints,
//! weights_info. A key sees only its own runs and checkpoints; another key's read as 404.

use actix_web::{HttpResponse, web};

use super::super::error::Reply;
use super::super::{Owner, Shared, parse_json};
use crate::protocol::tinker::paths::{TinkerPath, checkpoint_dir};
use crate::protocol::tinker::rest::{
    CheckpointsListResponse, Cursor, ListQuery, TrainingRunsResponse, WeightsInfoRequest,
    WeightsInfoResponse,
};
use crate::protocol::tinker::types::OptimizerConfig;
use crate::protocol::tinker::views::{checkpoint_view, training_run_view};
use crate::state::{RunRecord, Store};

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/training_runs", web::get().to(list_runs))
        .route("/training_runs/{run}", web::get().to(get_run))
        .route("/training_runs/{run}/checkpoints", web::get().to(list_checkpoints))
        .route(
            "/training_runs/{run}/checkpoints/{kind}/{name}",
            web::delete().to(delete_checkpoint),
        )
        .route("/checkpoints", web::get().to(user_checkpoints))
        .route("/weights_info", web::post().to(weights_info));
}

fn run_view(s: &Store, owner: &str, run: &RunRecord) -> crate::protocol::tinker::rest::TrainingRun {
    let last = run.last_checkpoint.as_ref().and_then(|c| s.get_checkpoint(owner, &run.id, c).ok());
    let last_s =
        run.last_sampler_checkpoint.as_ref().and_then(|c| s.get_checkpoint(owner, &run.id, c).ok());
    training_run_view(run, last.as_ref(), last_s.as_ref())
}

async fn list_runs(app: Shared, Owner(owner): Owner, q: web::Query<ListQuery>) -> Reply {
    let (offset, limit) = q.page(20, 1000);
    let out = app
        .disp
        .db(move |s| {
            let (runs, total) = s.list_runs(&owner, offset, limit)?;
            let views = runs.iter().map(|r| run_view(s, &owner, r)).collect();
            Ok(TrainingRunsResponse {
                training_runs: views,
                cursor: Cursor { offset, limit, total_count: total },
            })
        })
        .await?;
    Ok(HttpResponse::Ok().json(out))
}

async fn get_run(app: Shared, Owner(owner): Owner, path: web::Path<String>) -> Reply {
    let id = path.into_inner();
    let view = app
        .disp
        .db(move |s| {
            let run = s.get_run(&owner, &id)?;
            Ok(run_view(s, &owner, &run))
        })
        .await?;
    Ok(HttpResponse::Ok().json(view))
}

async fn list_checkpoints(app: Shared, Owner(owner): Owner, path: web::Path<String>) -> Reply {
    let id = path.into_inner();
    let list = app.disp.db(move |s| s.list_checkpoints(&owner, &id)).await?;
    let n = list.len() as u64;
    Ok(HttpResponse::Ok().json(CheckpointsListResponse {
        checkpoints: list.iter().map(checkpoint_view).collect(),
        cursor: Some(Cursor { offset: 0, limit: n, total_count: n }),
    }))
}

async fn user_checkpoints(app: Shared, Owner(owner): Owner, q: web::Query<ListQuery>) -> Reply {
    let (offset, limit) = q.page(100, 1000);
    let (list, total) =
        app.disp.db(move |s| s.list_user_checkpoints(&owner, offset, limit)).await?;
    Ok(HttpResponse::Ok().json(CheckpointsListResponse {
        checkpoints: list.iter().map(checkpoint_view).collect(),
        cursor: Some(Cursor { offset, limit, total_count: total }),
    }))
}

async fn delete_checkpoint(
    app: Shared,
    Owner(owner): Owner,
    path: web::Path<(String, String, String)>,
) -> Reply {
    let (run, kind, name) = path.into_inner();
    let tp = TinkerPath::from_checkpoint_id(&run, &format!("{kind}/{name}"))?;
    let dir = checkpoint_dir(&app.save_root, &owner, &tp)?;
    let cid = tp.checkpoint_id();
    app.disp.db(move |s| s.delete_checkpoint(&owner, &run, &cid)).await?;
    // The record is gone; the files are best-effort (a failure leaves an orphan, not a bad state).
    if let Err(e) = web::block(move || std::fs::remove_dir_all(&dir))
        .await
        .map(|r| r.map_err(|e| e.to_string()))
        .map_err(|e| e.to_string())
        .and_then(|r| r)
    {
        tracing::warn!(error = %e, "could not remove checkpoint files");
    }
    Ok(HttpResponse::Ok().json(serde_json::json!({})))
}

async fn weights_info(app: Shared, Owner(owner): Owner, body: web::Bytes) -> Reply {
    let r: WeightsInfoRequest = parse_json(&body)?;
    let tp = TinkerPath::parse(&r.tinker_path)?;
    let (run_id, cid) = (tp.run_id.clone(), tp.checkpoint_id());
    let run = app
        .disp
        .db(move |s| {
            s.get_checkpoint(&owner, &run_id, &cid)?;
            s.get_run(&owner, &run_id)
        })
        .await?;
    let opt: Option<OptimizerConfig> = serde_json::from_value(run.optimizer_config.clone()).ok();
    Ok(HttpResponse::Ok().json(WeightsInfoResponse::lora(&run.base_model, &run.lora, opt)))
}
