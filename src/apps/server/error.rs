//! Errors of the server application and their HTTP answers: every error is JSON
//! `{"detail": ...}` (never an empty body), bad input is 4xx, only our own faults are 5xx.

use actix_web::http::header;
use actix_web::{HttpResponse, HttpResponseBuilder};

use crate::protocol::http_error::{Answer, detail, http_error};
use crate::protocol::tinker::ProtocolError;
use crate::protocol::tinker::paths::PathError;
use crate::state::StateError;

/// Retry-After of [`ApiError::NotReady`]: the SDK makes up to 10 attempts honouring it (≤ 60 s),
/// so 5 s gives an application about 50 s to come up before the caller sees the 503.
pub const NOT_READY_RETRY_AFTER_S: &str = "5";
/// `Retry-After` of a 429 (a per-key bound on queued work).
pub const TOO_MANY_RETRY_AFTER_S: &str = "2";

/// What a Tinker route handler answers: its JSON, or an [`ApiError`].
pub type Reply = Result<HttpResponse, ApiError>;

http_error! {
    /// An error answered directly on a request path.
    pub enum ApiError {
        BadRequest => BAD_REQUEST,
        Unauthorized => UNAUTHORIZED,
        NotFound => NOT_FOUND,
        /// Not 409: the SDK retries 409 for minutes; a conflict here is a permanent refusal.
        Conflict => BAD_REQUEST,
        PayloadTooLarge => PAYLOAD_TOO_LARGE,
        Unavailable => SERVICE_UNAVAILABLE,
        /// A per-key bound on queued work (429: the SDK backs off and retries).
        TooManyRequests => TOO_MANY_REQUESTS,
        /// A configured application is starting, restarting or downloading its model: 503 with
        /// Retry-After, which the Tinker SDK retries.
        NotReady => SERVICE_UNAVAILABLE,
        /// A configured application failed: waiting will not help, so the SDK is told not to retry.
        AppFailed => INTERNAL_SERVER_ERROR,
        #[display("internal error: {0}")]
        Internal => INTERNAL_SERVER_ERROR,
    }
}

/// `{"detail": ...}`, with the headers that steer the SDK's retries.
impl Answer for ApiError {
    fn answer(&self, mut out: HttpResponseBuilder) -> HttpResponse {
        match self {
            ApiError::NotReady(_) => {
                out.insert_header((header::RETRY_AFTER, NOT_READY_RETRY_AFTER_S));
            }
            // Backpressure: tells the client's backoff when queued work has likely drained.
            ApiError::TooManyRequests(_) => {
                out.insert_header((header::RETRY_AFTER, TOO_MANY_RETRY_AFTER_S));
            }
            // Stainless clients retry every 5xx unless told otherwise.
            ApiError::AppFailed(_) => {
                out.insert_header(("x-should-retry", "false"));
            }
            _ => {}
        }
        detail(out, self)
    }
}

impl From<ProtocolError> for ApiError {
    fn from(e: ProtocolError) -> Self {
        match e {
            ProtocolError::TooLarge { .. } => ApiError::PayloadTooLarge(e.to_string()),
            other => ApiError::BadRequest(other.to_string()),
        }
    }
}

impl From<PathError> for ApiError {
    fn from(e: PathError) -> Self {
        ApiError::BadRequest(e.to_string())
    }
}

impl From<StateError> for ApiError {
    fn from(e: StateError) -> Self {
        match e {
            StateError::NotFound { .. } => ApiError::NotFound(e.to_string()),
            StateError::AlreadyExists { .. } | StateError::Conflict(_) => {
                ApiError::Conflict(e.to_string())
            }
            other => ApiError::Internal(other.to_string()),
        }
    }
}

impl From<actix_web::error::BlockingError> for ApiError {
    fn from(e: actix_web::error::BlockingError) -> Self {
        ApiError::Internal(format!("state worker pool: {e}"))
    }
}

/// Why a queued job failed; becomes a failed future with this category.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// The request was wrong (the model app answered 4xx, or a checkpoint conflict).
    #[error("{0}")]
    User(String),
    /// Our fault or an unreachable application.
    #[error("{0}")]
    Server(String),
    /// The model application does not hold the run's adapter (it restarted without a snapshot
    /// of it): a server error, and the run is marked corrupted.
    #[error("{0}")]
    LostAdapter(String),
}

impl From<StateError> for JobError {
    fn from(e: StateError) -> Self {
        match e {
            StateError::NotFound { .. }
            | StateError::AlreadyExists { .. }
            | StateError::Conflict(_) => JobError::User(e.to_string()),
            other => JobError::Server(other.to_string()),
        }
    }
}
