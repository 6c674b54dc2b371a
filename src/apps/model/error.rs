//! Errors of the model and sampler applications, with their HTTP mapping
//! (`{"detail", "category"}`: 4xx = `user`, 5xx = `server`).

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use serde_json::json;

use crate::engine::EngineError;
use crate::engine::sampling::SamplingError;
use crate::hub::HubError;
use crate::tokenize::TokenizeError;

/// The `reason` of an [`AppError::UnknownAdapter`] answer.
pub const UNKNOWN_ADAPTER: &str = "unknown_adapter";

/// What went wrong in a model/sampler operation.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// The request is wrong (HTTP 400).
    #[error("{0}")]
    BadRequest(String),
    /// An unknown adapter id (HTTP 404).
    #[error("{0}")]
    NotFound(String),
    /// The adapter id is not held here (HTTP 404, `"reason": "unknown_adapter"`): unknown, or
    /// lost by a restart that had no snapshot of it; the server marks its run corrupted.
    #[error("{0}")]
    UnknownAdapter(String),
    /// The adapter id is taken (HTTP 409).
    #[error("{0}")]
    Conflict(String),
    /// Missing or wrong internal token (HTTP 403).
    #[error("{0}")]
    Forbidden(String),
    /// Our fault (HTTP 500).
    #[error("{0}")]
    Internal(String),
    /// The model could not be found or loaded at startup.
    #[error("cannot start: {0}")]
    Startup(String),
}

impl AppError {
    /// `user` for the caller's mistakes, `server` for ours.
    pub fn category(&self) -> &'static str {
        match self {
            AppError::Internal(_) | AppError::Startup(_) => "server",
            _ => "user",
        }
    }
}

impl From<EngineError> for AppError {
    fn from(e: EngineError) -> Self {
        if e.is_user_error() {
            AppError::BadRequest(e.to_string())
        } else {
            AppError::Internal(e.to_string())
        }
    }
}

impl From<SamplingError> for AppError {
    fn from(e: SamplingError) -> Self {
        match e {
            SamplingError::BadLogit { .. } | SamplingError::AllMasked => {
                AppError::Internal(format!("sampling: {e}"))
            }
            _ => AppError::BadRequest(format!("sampling_params: {e}")),
        }
    }
}

impl From<TokenizeError> for AppError {
    fn from(e: TokenizeError) -> Self {
        AppError::Internal(format!("tokenizer: {e}"))
    }
}

impl From<HubError> for AppError {
    fn from(e: HubError) -> Self {
        AppError::Startup(e.to_string())
    }
}

impl ResponseError for AppError {
    fn status_code(&self) -> StatusCode {
        match self {
            AppError::BadRequest(_) => StatusCode::BAD_REQUEST,
            AppError::NotFound(_) | AppError::UnknownAdapter(_) => StatusCode::NOT_FOUND,
            AppError::Conflict(_) => StatusCode::CONFLICT,
            AppError::Forbidden(_) => StatusCode::FORBIDDEN,
            AppError::Internal(_) | AppError::Startup(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let mut body = json!({"detail": self.to_string(), "category": self.category()});
        if matches!(self, AppError::UnknownAdapter(_)) {
            body["reason"] = json!(UNKNOWN_ADAPTER);
        }
        HttpResponse::build(self.status_code()).json(body)
    }
}

/// The Twinkle protocol's view of an application error (here, beside the error, so the protocol
/// layer does not depend on the applications).
impl From<AppError> for crate::protocol::twinkle::TwinkleError {
    fn from(e: AppError) -> Self {
        use crate::protocol::twinkle::TwinkleError;
        use AppError as A;
        match e {
            A::BadRequest(m) => TwinkleError::BadRequest(m),
            A::NotFound(m) | A::UnknownAdapter(m) => TwinkleError::NotFound(m),
            A::Conflict(m) => TwinkleError::Conflict(m),
            A::Forbidden(m) => TwinkleError::Unauthorized(m),
            A::Internal(m) => TwinkleError::Internal(m),
            A::Startup(m) => TwinkleError::Internal(m),
        }
    }
}
