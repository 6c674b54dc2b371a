//! `retrieve_future`: long-polls a future for up to [`LONG_POLL`], then answers 408 `try_again`;
//! failures are 200 `{"error", "category"}`; protobuf results carry their content type.
//!
//! An unknown request id answers 410 Gone, never 404: the future was lost with a restarted
//! in-memory server application, or pruned after its retention period. The SDK fatally raises
//! on 404 but treats 410 as retryable (a sample is resubmitted; a training call surfaces a
//! retryable error) — and another key's future is indistinguishable from a missing one. A
//! future that a restart cut short (failed with [`UNFINISHED_AT_STARTUP`]) answers 410 too:
//! its result is lost exactly like an unknown one's, and a failure would not be retried.

use std::time::Duration;

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, web};

use super::super::error::{ApiError, Reply};
use super::super::{Owner, Shared, parse_json};
use crate::protocol::tinker::types::{
    ErrorCategory, FailedFutureResponse, QueueState, RetrieveFutureRequest, TryAgainResponse,
};
use crate::state::{FutureRecord, FutureStatus, UNFINISHED_AT_STARTUP};

/// Longest a poll is held (the SDK's read timeout is 45 s).
const LONG_POLL: Duration = Duration::from_secs(25);

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/retrieve_future", web::post().to(retrieve_future));
}

fn answer(rec: FutureRecord) -> HttpResponse {
    if rec.status == FutureStatus::Failed && rec.error.as_deref() == Some(UNFINISHED_AT_STARTUP) {
        return gone(&rec.request_id);
    }
    match rec.status {
        FutureStatus::Complete => HttpResponse::Ok()
            .content_type(rec.content_type.unwrap_or_else(|| "application/json".into()))
            .body(rec.result.unwrap_or_default()),
        _ => HttpResponse::Ok().json(FailedFutureResponse {
            error: rec.error.unwrap_or_else(|| "the request failed".into()),
            category: rec.category.map(ErrorCategory::from).unwrap_or(ErrorCategory::Unknown),
        }),
    }
}

/// 410 for a request id this server does not (or no longer) know.
pub fn gone(request_id: &str) -> HttpResponse {
    HttpResponse::build(StatusCode::GONE).json(serde_json::json!({
        "detail": format!(
            "future {request_id:?} is unknown here: it was lost when the server application \
             restarted, or it finished longer ago than the retention period; submit the request \
             again"
        ),
        "request_id": request_id,
    }))
}

async fn retrieve_future(app: Shared, Owner(owner): Owner, body: web::Bytes) -> Reply {
    let r: RetrieveFutureRequest = parse_json(&body)?;
    let deadline = tokio::time::Instant::now() + LONG_POLL;
    loop {
        // Register interest before reading the store so a completion in between is not missed.
        let notify = app.disp.waiter(&r.request_id);
        let notified = notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let rec = app.disp.db_now(|s| s.get_future_owned(&owner, &r.request_id));
        let rec = match rec {
            Ok(rec) => rec,
            Err(ApiError::NotFound(_)) => {
                app.disp.forget(&r.request_id);
                return Ok(gone(&r.request_id));
            }
            Err(e) => {
                app.disp.forget(&r.request_id);
                return Err(e);
            }
        };
        if rec.status.is_terminal() {
            tracing::debug!(request_id = %r.request_id, "future answered");
            return Ok(answer(rec));
        }
        let now = tokio::time::Instant::now();
        if now >= deadline {
            return Ok(HttpResponse::build(StatusCode::REQUEST_TIMEOUT)
                .json(TryAgainResponse::new(r.request_id, QueueState::Active)));
        }
        // Re-read at least every second in case a wake-up was lost (e.g. a restarted consumer).
        let wait = (deadline - now).min(Duration::from_secs(1));
        let _ = tokio::time::timeout(wait, notified).await;
    }
}
