//! Errors of the Twinkle-native routes and their HTTP mapping: `{detail}` (what both clients
//! surface) with a typed 4xx for the caller's mistakes, 410 for an exhausted iterator (the
//! clients turn it into `StopIteration`), 501 for what this server deliberately does not do.

use actix_web::HttpResponse;

use crate::protocol::http_error::{Answer, http_error};
use crate::protocol::tinker::paths::PathError;

/// What a Twinkle-native route handler answers: its JSON, or a [`TwinkleError`].
pub type TwinkleReply = Result<HttpResponse, TwinkleError>;

http_error! {
    /// What went wrong in a Twinkle-native call.
    pub enum TwinkleError {
        /// Malformed or unsupported input; the message names the field.
        BadRequest => BAD_REQUEST,
        /// No or unaccepted token.
        Unauthorized => UNAUTHORIZED,
        /// Unknown adapter, run, checkpoint, session or processor.
        NotFound => NOT_FOUND,
        /// The name is taken, or a limit is reached.
        Conflict => CONFLICT,
        /// An iterator is exhausted (410 → `StopIteration` in the clients).
        Gone => GONE,
        /// Deliberately not provided by this server.
        NotImplemented => NOT_IMPLEMENTED,
        /// Our fault.
        Internal => INTERNAL_SERVER_ERROR,
    }
}

/// The plain `{"detail": ...}` answer.
impl Answer for TwinkleError {}

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
