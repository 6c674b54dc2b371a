//! Errors of the Twinkle-native routes and their HTTP mapping: `{detail}` (what both clients
//! surface) with a typed 4xx for the caller's mistakes, 410 for an exhausted iterator (the
//! clients turn it into `StopIteration`), 501 for what this server deliberately does not do.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};

use crate::protocol::tinker::paths::PathError;

/// What a Twinkle-native route handler answers: its JSON, or a [`TwinkleError`].
pub type TwinkleReply = Result<HttpResponse, TwinkleError>;

/// What went wrong in a Twinkle-native call.
#[derive(Debug, thiserror::Error)]
pub enum TwinkleError {
    /// Malformed or unsupported input (400); the message names the field.
    #[error("{0}")]
    BadRequest(String),
    /// No or unaccepted token (401).
    #[error("{0}")]
    Unauthorized(String),
    /// Unknown adapter, run, checkpoint, session or processor (404).
    #[error("{0}")]
    NotFound(String),
    /// The name is taken, or a limit is reached (409).
    #[error("{0}")]
    Conflict(String),
    /// An iterator is exhausted (410 → `StopIteration` in the clients).
    #[error("{0}")]
    Gone(String),
    /// Deliberately not provided by this server (501).
    #[error("{0}")]
    NotImplemented(String),
    /// Our fault (500).
    #[error("{0}")]
    Internal(String),
}

impl TwinkleError {
    pub fn bad(msg: impl Into<String>) -> Self {
        TwinkleError::BadRequest(msg.into())
    }
}

impl From<PathError> for TwinkleError {
    fn from(e: PathError) -> Self {
        TwinkleError::BadRequest(e.to_string())
    }
}

impl ResponseError for TwinkleError {
    fn status_code(&self) -> StatusCode {
        match self {
            TwinkleError::BadRequest(_) => StatusCode::BAD_REQUEST,
            TwinkleError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            TwinkleError::NotFound(_) => StatusCode::NOT_FOUND,
            TwinkleError::Conflict(_) => StatusCode::CONFLICT,
            TwinkleError::Gone(_) => StatusCode::GONE,
            TwinkleError::NotImplemented(_) => StatusCode::NOT_IMPLEMENTED,
            TwinkleError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        HttpResponse::build(self.status_code())
            .json(serde_json::json!({"detail": self.to_string()}))
    }
}
