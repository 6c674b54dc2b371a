//! A model or sampler child whose model is not in any cache fetches it before it loads: the
//! download runs on a blocking thread while the child reports its progress to the head
//! (`POST /v1/progress`), which shows the application `downloading` (and answers 503 +
//! Retry-After for it) and keeps waiting for it as long as the reports come.

use std::sync::Arc;
use std::time::Duration;

use crate::contract::{PROGRESS_PERIOD, ProgressRequest};
use crate::hub::progress::DownloadProgress;
use crate::hub::{self, BarMode, FetchOptions, HubEnv};
use crate::worker::{AppContext, WorkerError};

/// Makes `model_id` local: nothing to do when a cache has it, else a download with progress
/// reports to the head. A network failure is [`WorkerError::Unavailable`] (restarted with
/// backoff); a wrong id, a refused token or a file that fails verification is a startup error.
pub async fn ensure_model(ctx: &AppContext, model_id: &str) -> Result<(), WorkerError> {
    let env = HubEnv::from_process();
    if !hub::needs_download(model_id, &env) {
        return Ok(());
    }
    tracing::info!(app = %ctx.opts.app, model = model_id, "model not cached: downloading");
    let progress = Arc::new(DownloadProgress::new());
    let opts = FetchOptions {
        progress: Some(progress.clone()),
        bar: BarMode::Lines,
        ..FetchOptions::default()
    };
    let id = model_id.to_string();
    let mut job = tokio::task::spawn_blocking(move || hub::resolve_or_download(&id, &env, &opts));
    let client = awc::Client::builder().timeout(Duration::from_secs(2)).finish();
    let url = format!("http://{}/v1/progress", ctx.opts.head);
    let mut tick = tokio::time::interval(PROGRESS_PERIOD);
    loop {
        tokio::select! {
            done = &mut job => {
                let app = &ctx.opts.app;
                let done = done.map_err(|e| WorkerError::Unavailable(format!("download thread: {e}")))?;
                let dir = done.map_err(|e| {
                    let why = format!("application `{app}`: cannot download `{model_id}`: {e}");
                    tracing::error!(%app, error = %e, "model download failed");
                    if e.is_transient() { WorkerError::Unavailable(why) } else { WorkerError::Startup(why) }
                })?;
                tracing::info!(app = %ctx.opts.app, model = %dir.display(), "model downloaded");
                return Ok(());
            }
            _ = tick.tick() => {
                let s = progress.snapshot();
                let body = ProgressRequest {
                    app: ctx.opts.app.clone(),
                    pid: std::process::id(),
                    token: ctx.token.clone(),
                    bytes_done: s.bytes_done,
                    bytes_total: s.bytes_total,
                };
                // Best effort: a missed report only shortens the head's patience by a period.
                if let Err(e) = client.post(&url).send_json(&body).await {
                    tracing::debug!(error = %e, "progress report not delivered");
                }
            }
        }
    }
}
