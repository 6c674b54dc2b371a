//! Errors of the server application and their HTTP answers: every error is JSON
//! `{"detail": ...}` (never an empty body), bad input is 4xx, only our own faults are 5xx.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};

use crate::protocol::tinker::ProtocolError;
use crate::protocol::tinker::paths::PathError;
use crate::state::StateError;

/// An error answered directly on a request path.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    PayloadTooLarge(String),
    #[error("{0}")]
    Unavailable(String),
    /// A per-key bound on queued work (429: the SDK backs off and retries).
    #[error("{0}")]
    TooManyRequests(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            // Not 409: the SDK retries 409 for minutes; a conflict here is a permanent refusal.
            ApiError::Conflict(_) => StatusCode::BAD_REQUEST,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::TooManyRequests(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        HttpResponse::build(self.status_code())
            .json(serde_json::json!({"detail": self.to_string()}))
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
