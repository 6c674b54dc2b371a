//! Training runs and checkpoints of the caller, read from the on-disk metadata the model
//! applications write under `{save_root}/{owner}` ([`crate::protocol::twinkle::runs`]):
//! `training_runs` (paginated, with a cursor), `training_runs/{run}`,
//! `training_runs/{run}/checkpoints`, `DELETE training_runs/{run}/checkpoints/{ckpt}`,
//! `weights_info` and `checkpoint_path/{run}/{ckpt}`.
//!
//! Isolation: every run id and checkpoint id is resolved inside the caller's owner directory
//! only, so another tenant's run is simply "not found" (404). Ids that could leave it (`..`, `/`
//! in a run id, a checkpoint id that is not `weights/NAME` or `sampler_weights/NAME`) are 400, and
//! so are hub ids (`ms://…`) and raw server paths in `weights_info`.
//!
//! `checkpoint_path` answers `path` with the `twinkle://` path, not the server directory: the
//! clients hand `path` (`get_latest_checkpoint_path`) straight to `resume_from_checkpoint` /
//! `load`, and the model applications accept only `twinkle://` paths of the caller's own runs.
//! The server's directory layout is thereby not disclosed either.

use std::path::PathBuf;

use actix_web::{HttpRequest, HttpResponse, web};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::super::Shared;
use super::{caller, parse_body};
use crate::protocol::twinkle::paths::{TwinklePath, caller_run_dir};
use crate::protocol::twinkle::runs::{
    CHECKPOINT_META, CheckpointMeta, RunMeta, delete_checkpoint, list_checkpoints, list_runs,
    read_json, read_run,
};
use crate::protocol::twinkle::{Auth, Caller, TwinkleError, TwinkleReply};

/// `limit` when the query has none (the clients' default too).
pub const DEFAULT_LIMIT: u64 = 20;
/// Largest page served; bigger limits are clamped.
pub const MAX_LIMIT: u64 = 1000;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/training_runs", web::get().to(training_runs))
        .route("/training_runs/{run}", web::get().to(training_run))
        .route("/training_runs/{run}/checkpoints", web::get().to(checkpoints))
        .route("/training_runs/{run}/checkpoints/{ckpt:.*}", web::delete().to(delete))
        .route("/weights_info", web::post().to(weights_info))
        .route("/checkpoint_path/{run}/{ckpt:.*}", web::get().to(checkpoint_path));
}

/// `?limit&offset` (`all_users` and anything else is ignored: a caller sees its own runs only).
#[derive(Debug, Default, Deserialize)]
pub struct PageQuery {
    #[serde(default)]
    pub limit: Option<u64>,
    #[serde(default)]
    pub offset: Option<u64>,
}

/// The listing cursor of `training_runs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Cursor {
    pub limit: u64,
    pub offset: u64,
    pub total_count: u64,
}

/// The page `offset..offset+limit` of `items` (limit defaulted and clamped) and its cursor.
pub fn paginate<T>(items: Vec<T>, q: &PageQuery) -> (Vec<T>, Cursor) {
    let limit = q.limit.unwrap_or(DEFAULT_LIMIT).min(MAX_LIMIT);
    let offset = q.offset.unwrap_or(0);
    let total_count = items.len() as u64;
    let skip = usize::try_from(offset).unwrap_or(usize::MAX);
    let take = usize::try_from(limit).unwrap_or(usize::MAX);
    let page = items.into_iter().skip(skip).take(take).collect();
    (page, Cursor { limit, offset, total_count })
}

/// Authenticates `req` (401 first, before anything else is looked at), then runs `f` with the
/// tenants and the caller off the async workers (it reads and writes files).
async fn as_caller<T: Send + 'static>(
    app: &Shared,
    req: &HttpRequest,
    f: impl FnOnce(&Auth, &Caller) -> Result<T, TwinkleError> + Send + 'static,
) -> Result<T, TwinkleError> {
    let who = caller(app, req)?;
    let auth = app.auth.clone();
    web::block(move || f(&auth, &who))
        .await
        .map_err(|e| TwinkleError::Internal(format!("file task failed: {e}")))?
}

/// The caller's run `run_id` and its directory; 404 when the caller has no such run.
pub fn own_run(
    auth: &Auth,
    who: &Caller,
    run_id: &str,
) -> Result<(RunMeta, PathBuf), TwinkleError> {
    let dir = caller_run_dir(auth, who, run_id)?;
    match read_run(&dir)? {
        Some(run) => Ok((run, dir)),
        None => {
            let shown: String = run_id.chars().take(100).collect();
            Err(TwinkleError::NotFound(format!("training run `{shown}` not found")))
        }
    }
}

/// The caller's checkpoint `ckpt_id` (`weights/NAME` or `sampler_weights/NAME`) of `run_id`:
/// its path, its directory and its metadata; 400 for a malformed id, 404 when absent.
pub fn own_checkpoint(
    auth: &Auth,
    who: &Caller,
    run_id: &str,
    ckpt_id: &str,
) -> Result<(TwinklePath, PathBuf, CheckpointMeta), TwinkleError> {
    let path = TwinklePath::parse("checkpoint_id", &format!("twinkle://{run_id}/{ckpt_id}"))?;
    own_run(auth, who, run_id)?;
    let dir = path.dir(auth, who)?;
    match read_json::<CheckpointMeta>(&dir.join(CHECKPOINT_META))? {
        Some(meta) => Ok((path, dir, meta)),
        None => Err(TwinkleError::NotFound(format!("checkpoint {path} not found"))),
    }
}

async fn training_runs(app: Shared, req: HttpRequest) -> TwinkleReply {
    let query = req.query_string().to_owned();
    let (page, cursor) = as_caller(&app, &req, move |auth, who| {
        let q = web::Query::<PageQuery>::from_query(&query)
            .map_err(|e| TwinkleError::bad(format!("query: {e}")))?
            .into_inner();
        Ok(paginate(list_runs(&auth.owner_dir(who))?, &q))
    })
    .await?;
    Ok(HttpResponse::Ok().json(json!({ "training_runs": page, "cursor": cursor })))
}

async fn training_run(app: Shared, req: HttpRequest, path: web::Path<String>) -> TwinkleReply {
    let run_id = path.into_inner();
    let (run, _) = as_caller(&app, &req, move |auth, who| own_run(auth, who, &run_id)).await?;
    Ok(HttpResponse::Ok().json(run))
}

async fn checkpoints(app: Shared, req: HttpRequest, path: web::Path<String>) -> TwinkleReply {
    let run_id = path.into_inner();
    let list =
        as_caller(&app, &req, move |auth, who| list_checkpoints(&own_run(auth, who, &run_id)?.1))
            .await?;
    Ok(HttpResponse::Ok().json(json!({ "checkpoints": list, "cursor": null })))
}

async fn delete(app: Shared, req: HttpRequest, path: web::Path<(String, String)>) -> TwinkleReply {
    let (run_id, ckpt_id) = path.into_inner();
    let shown = ckpt_id.clone();
    as_caller(&app, &req, move |auth, who| {
        let (path, dir, _) = own_checkpoint(auth, who, &run_id, &ckpt_id)?;
        delete_checkpoint(&caller_run_dir(auth, who, &run_id)?, &path, &dir)
    })
    .await?;
    Ok(HttpResponse::Ok().json(json!({
        "success": true,
        "message": format!("Checkpoint {shown} deleted successfully"),
    })))
}

#[derive(Debug, Deserialize)]
struct WeightsInfoRequest {
    twinkle_path: String,
}

/// What `weights_info` answers about one of the caller's checkpoints.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WeightsInfo {
    pub training_run_id: String,
    pub base_model: String,
    /// The owner hash, never the token.
    pub model_owner: String,
    pub is_lora: bool,
    pub lora_rank: Option<usize>,
}

/// `weights_info` of `twinkle_path` for `who`.
pub fn weights_info_of(
    auth: &Auth,
    who: &Caller,
    twinkle_path: &str,
) -> Result<WeightsInfo, TwinkleError> {
    let path = TwinklePath::parse("twinkle_path", twinkle_path)?;
    let (run, _) = own_run(auth, who, path.run_id())?;
    let (_, _, ckpt) = own_checkpoint(auth, who, path.run_id(), &path.checkpoint_id())?;
    Ok(WeightsInfo {
        training_run_id: run.training_run_id,
        base_model: ckpt.base_model.unwrap_or(run.base_model),
        model_owner: who.owner.clone(),
        is_lora: ckpt.is_lora && run.is_lora,
        lora_rank: ckpt.lora_rank.or(run.lora_rank),
    })
}

async fn weights_info(app: Shared, req: HttpRequest, body: web::Bytes) -> TwinkleReply {
    let info = as_caller(&app, &req, move |auth, who| {
        let r: WeightsInfoRequest = parse_body(&body)?;
        weights_info_of(auth, who, &r.twinkle_path)
    })
    .await?;
    Ok(HttpResponse::Ok().json(info))
}

async fn checkpoint_path(
    app: Shared,
    req: HttpRequest,
    path: web::Path<(String, String)>,
) -> TwinkleReply {
    let (run_id, ckpt_id) = path.into_inner();
    let (path, _, _) =
        as_caller(&app, &req, move |auth, who| own_checkpoint(auth, who, &run_id, &ckpt_id))
            .await?;
    let twinkle_path = path.to_string();
    Ok(HttpResponse::Ok().json(json!({ "path": twinkle_path, "twinkle_path": twinkle_path })))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::tinker::paths::{CheckpointKind, owner_hash};
    use crate::protocol::twinkle::runs::{record_checkpoint, write_run};

    fn auth(root: &std::path::Path) -> Auth {
        Auth { keys: None, salt: b"salt".to_vec(), save_root: root.to_path_buf() }
    }

    /// The caller whose token is `token`.
    fn who(token: &str) -> Caller {
        Caller { owner: owner_hash(b"salt", token), scope: None }
    }

    fn run(root: &std::path::Path, token: &str, id: &str, ckpt: Option<&str>) {
        let owner = who(token).owner;
        let dir = root.join(&owner).join(id);
        let mut meta = RunMeta::new_lora(id, "qwen3-tiny", &owner, 8);
        write_run(&dir, &meta).unwrap();
        if let Some(name) = ckpt {
            let p = TwinklePath::new(id, CheckpointKind::Weights, name).unwrap();
            let ck = dir.join("weights").join(name);
            std::fs::create_dir_all(&ck).unwrap();
            record_checkpoint(&dir, &p, &ck, &mut meta).unwrap();
        }
    }

    #[test]
    fn pagination_defaults_clamps_and_counts() {
        let items: Vec<u32> = (0..45).collect();
        let (p, c) = paginate(items.clone(), &PageQuery::default());
        assert_eq!((p.len(), c), (20, Cursor { limit: 20, offset: 0, total_count: 45 }));
        let (p, c) = paginate(items.clone(), &PageQuery { limit: Some(20), offset: Some(40) });
        assert_eq!((p, c.total_count), (vec![40, 41, 42, 43, 44], 45));
        let (p, _) = paginate(items.clone(), &PageQuery { limit: Some(5), offset: Some(u64::MAX) });
        assert!(p.is_empty());
        let (p, c) = paginate(items, &PageQuery { limit: Some(u64::MAX), offset: None });
        assert_eq!((p.len(), c.limit), (45, MAX_LIMIT));
    }

    #[test]
    fn runs_are_owner_scoped_and_ids_validated() {
        let tmp = tempfile::tempdir().unwrap();
        let a = auth(tmp.path());
        run(tmp.path(), "owner-a", "s1-default", Some("ep0"));
        assert_eq!(own_run(&a, &who("owner-a"), "s1-default").unwrap().0.lora_rank, Some(8));
        let e = own_run(&a, &who("owner-b"), "s1-default").unwrap_err();
        assert!(matches!(e, TwinkleError::NotFound(_)), "{e}");
        let e = own_run(&a, &who("owner-a"), "..").unwrap_err();
        assert!(matches!(e, TwinkleError::BadRequest(_)), "{e}");

        let ok = own_checkpoint(&a, &who("owner-a"), "s1-default", "weights/ep0").unwrap();
        assert_eq!(ok.0.to_string(), "twinkle://s1-default/weights/ep0");
        for (ck, bad) in [("weights/../x", true), ("weights", true), ("weights/nope", false)] {
            let e = own_checkpoint(&a, &who("owner-a"), "s1-default", ck).unwrap_err();
            assert_eq!(matches!(e, TwinkleError::BadRequest(_)), bad, "{ck}: {e}");
        }
        let e = own_checkpoint(&a, &who("owner-b"), "s1-default", "weights/ep0").unwrap_err();
        assert!(matches!(e, TwinkleError::NotFound(_)), "{e}");
    }

    #[test]
    fn weights_info_reports_the_owner_hash() {
        let tmp = tempfile::tempdir().unwrap();
        let a = auth(tmp.path());
        run(tmp.path(), "owner-a", "s1-default", Some("ep0"));
        let info =
            weights_info_of(&a, &who("owner-a"), "twinkle://s1-default/weights/ep0").unwrap();
        assert_eq!(info.training_run_id, "s1-default");
        assert_eq!(info.model_owner, who("owner-a").owner);
        assert_eq!((info.is_lora, info.lora_rank), (true, Some(8)));
        for p in ["ms://Qwen/Qwen3-0.6B", "twinkle://../x", "/tmp/x"] {
            let e = weights_info_of(&a, &who("owner-a"), p).unwrap_err();
            assert!(matches!(e, TwinkleError::BadRequest(_)), "{p}: {e}");
        }
        let e =
            weights_info_of(&a, &who("owner-b"), "twinkle://s1-default/weights/ep0").unwrap_err();
        assert!(matches!(e, TwinkleError::NotFound(_)), "{e}");
    }
}
