//! The server application's Twinkle-native gateway (`specs/twinkle-native-protocol.md` §1.3,
//! "Server / gateway app"): sessions, health, capabilities and capacity ([`sessions`]), and the
//! listing of training runs and checkpoints ([`runs`]).
//!
//! Route forms:
//! - Gen-2 (twinkle-kit 0.2–0.5.x) at `{prefix}/twinkle/<op>`, always mounted
//!   ([`configure_gen2`]);
//! - Gen-1 (twinkle-kit 0.1.x) at `{prefix}/<op>` ([`configure_gen1`]), mounted only with
//!   `server_type: twinkle`, in place of the Tinker API (both have `/training_runs`, …).
//!
//! Every route but `healthz` authenticates the bearer token with [`Auth`] (the same tenants and
//! owner hashes as the model applications). Runs and checkpoints are read from the on-disk
//! metadata under `{save_root}/{owner}` that the model applications write
//! ([`crate::protocol::twinkle::runs`]): a caller only ever sees its own owner directory.
//!
//! [`Auth`]: crate::protocol::twinkle::Auth

pub mod runs;
pub mod sessions;

use actix_web::{HttpRequest, web};
use serde::de::DeserializeOwned;

use super::Shared;
use super::error::{ApiError, JobError};
use crate::protocol::twinkle::{Caller, TwinkleError};

/// Registers the Gen-2 routes (relative to `{prefix}/twinkle`).
pub fn configure_gen2(cfg: &mut web::ServiceConfig) {
    sessions::configure(cfg);
    runs::configure(cfg);
}

/// Registers the Gen-1 REST routes (relative to `{prefix}`): health and runs; Gen-1 has no
/// sessions, capabilities or capacity routes.
pub fn configure_gen1(cfg: &mut web::ServiceConfig) {
    cfg.route("/healthz", web::get().to(sessions::healthz));
    runs::configure(cfg);
}

/// The authenticated caller of `req`, or 401.
fn caller(app: &Shared, req: &HttpRequest) -> Result<Caller, TwinkleError> {
    app.auth.caller(req)
}

/// Parses a JSON body (an empty body reads as `{}`), answering 400 that names the field.
fn parse_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, TwinkleError> {
    let body: &[u8] = if body.iter().all(u8::is_ascii_whitespace) { b"{}" } else { body };
    super::json_with_path(body).map_err(TwinkleError::bad)
}

impl From<ApiError> for TwinkleError {
    fn from(e: ApiError) -> Self {
        match e {
            ApiError::BadRequest(m)
            | ApiError::PayloadTooLarge(m)
            | ApiError::TooManyRequests(m) => TwinkleError::BadRequest(m),
            ApiError::Unauthorized(m) => TwinkleError::Unauthorized(m),
            ApiError::NotFound(m) => TwinkleError::NotFound(m),
            ApiError::Conflict(m) => TwinkleError::Conflict(m),
            ApiError::Unavailable(m)
            | ApiError::NotReady(m)
            | ApiError::AppFailed(m)
            | ApiError::Internal(m) => TwinkleError::Internal(m),
        }
    }
}

impl From<JobError> for TwinkleError {
    fn from(e: JobError) -> Self {
        match e {
            JobError::User(m) => TwinkleError::BadRequest(m),
            JobError::Server(m) | JobError::LostAdapter(m) => TwinkleError::Internal(m),
        }
    }
}
