//! Errors of the model and sampler applications, with their HTTP mapping
//! (`{"detail", "category"}`: 4xx = `user`, 5xx = `server`).

use actix_web::{HttpResponse, HttpResponseBuilder};
use serde_json::json;

use crate::engine::EngineError;
use crate::engine::sampling::SamplingError;
use crate::hub::HubError;
use crate::protocol::http_error::{Answer, http_error};
use crate::tokenize::TokenizeError;

/// The `reason` of an [`AppError::UnknownAdapter`] answer.
pub const UNKNOWN_ADAPTER: &str = "unknown_adapter";

http_error! {
    /// What went wrong in a model/sampler operation.
    pub enum AppError {
        /// The request is wrong.
        BadRequest => BAD_REQUEST,
        /// An unknown adapter id.
        NotFound => NOT_FOUND,
        /// The adapter id is not held here (`"reason": "unknown_adapter"`): unknown, or lost by a
        /// restart that had no snapshot of it; the server marks its run corrupted.
        UnknownAdapter => NOT_FOUND,
        /// The adapter id is taken.
        Conflict => CONFLICT,
        /// Missing or wrong internal token.
        Forbidden => FORBIDDEN,
        /// Our fault.
        Internal => INTERNAL_SERVER_ERROR,
        /// The model could not be found or loaded at startup.
        #[display("cannot start: {0}")]
        Startup => INTERNAL_SERVER_ERROR,
    }
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

/// `{"detail", "category"}`, and `"reason"` for an adapter not held here.
impl Answer for AppError {
    fn answer(&self, mut out: HttpResponseBuilder) -> HttpResponse {
        let mut body = json!({"detail": self.to_string(), "category": self.category()});
        if matches!(self, AppError::UnknownAdapter(_)) {
            body["reason"] = json!(UNKNOWN_ADAPTER);
        }
        out.json(body)
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
