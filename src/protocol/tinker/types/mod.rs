//! JSON request and response bodies of the Tinker endpoints (`specs/tinker-protocol.md` §4–§6, §11).
//! Requests ignore unknown keys (the SDK adds `type` discriminators and newer fields); responses
//! carry exactly the fields the SDK validates, with `None` fields omitted unless `null` is required.
//! Bootstrap and session bodies are here; training in `training.rs`; sampling sessions and
//! futures in `futures.rs`.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::error::ProtocolError;

pub use super::rest::*;
pub use super::sample::*;

mod futures;
mod training;
pub use futures::*;
pub use training::*;

/// Free-form `user_metadata` object.
pub type Metadata = Map<String, Value>;

// ---------------------------------------------------------------- bootstrap and session

/// Body of `client/config` and `client/dynamic_config`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct SdkVersionRequest {
    #[serde(default)]
    pub sdk_version: Option<String>,
}

/// `POST /client/config` answer; every field is optional for the SDK.
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClientConfigResponse {
    pub pjwt_auth_enabled: bool,
    pub parallel_fwdbwd_chunks: Option<bool>,
    pub fwdbwd_max_chunk_len: Option<u32>,
    pub fwdbwd_max_chunk_bytes_count: Option<u64>,
    pub proto_compress_fwdbwd: Option<bool>,
}

impl Default for ClientConfigResponse {
    fn default() -> Self {
        ClientConfigResponse {
            pjwt_auth_enabled: false,
            parallel_fwdbwd_chunks: None,
            fwdbwd_max_chunk_len: None,
            fwdbwd_max_chunk_bytes_count: None,
            proto_compress_fwdbwd: Some(false),
        }
    }
}

/// `POST /client/dynamic_config` answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DynamicConfigResponse {
    pub refresh_interval_sec: u64,
    pub sample_cancel_enabled: bool,
    pub sample_cancel_max_batch_size: u32,
}

impl Default for DynamicConfigResponse {
    fn default() -> Self {
        DynamicConfigResponse {
            refresh_interval_sec: 300,
            sample_cancel_enabled: false,
            sample_cancel_max_batch_size: 64,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct CreateSessionRequest {
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub user_metadata: Metadata,
    #[serde(default)]
    pub sdk_version: Option<String>,
    #[serde(default)]
    pub project_id: Option<String>,
    #[serde(default)]
    pub display_name: Option<String>,
}

#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CreateSessionResponse {
    pub session_id: String,
    pub info_message: Option<String>,
    pub warning_message: Option<String>,
    pub error_message: Option<String>,
}

impl CreateSessionResponse {
    pub fn new(session_id: impl Into<String>) -> Self {
        CreateSessionResponse {
            session_id: session_id.into(),
            info_message: None,
            warning_message: None,
            error_message: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct SessionHeartbeatRequest {
    pub session_id: String,
}

/// `{}`: answer of heartbeats, finish, dynamic endpoints with no payload.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Empty {}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct FinishReason {
    #[serde(rename = "type")]
    pub kind: String,
}

/// The `reason.type` values the SDK sends on `sessions/{id}/finish`.
pub const FINISH_REASONS: [&str; 3] = ["success", "errored", "interrupted"];

impl FinishSessionRequest {
    /// Refuses a reason the SDK never sends (it would be stored as the session's end reason).
    pub fn validate(&self) -> Result<(), ProtocolError> {
        match &self.reason {
            Some(r) if !FINISH_REASONS.contains(&r.kind.as_str()) => Err(ProtocolError::invalid(
                "reason.type",
                format!("{:?} is not one of {}", r.kind, FINISH_REASONS.join(", ")),
            )),
            _ => Ok(()),
        }
    }
}

/// `POST /sessions/{id}/finish`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct FinishSessionRequest {
    #[serde(default)]
    pub reason: Option<FinishReason>,
    #[serde(default)]
    pub detail: Option<String>,
}

/// `POST /telemetry`: accepted and dropped.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct TelemetryRequest {
    #[serde(default)]
    pub events: Vec<Value>,
    #[serde(default)]
    pub platform: Option<String>,
    #[serde(default)]
    pub sdk_version: Option<String>,
    #[serde(default)]
    pub session_id: Option<String>,
    #[serde(default)]
    pub process_uuid: Option<String>,
}

/// Literal `"accepted"`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Accepted {
    #[default]
    #[serde(rename = "accepted")]
    Accepted,
}

/// `{"status": "accepted"}` exactly.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TelemetryResponse {
    pub status: Accepted,
}

#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SupportedModel {
    pub model_name: Option<String>,
    pub max_context_length: Option<u64>,
    pub trainable: Option<bool>,
    pub sampleable: Option<bool>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ServerCapabilitiesResponse {
    pub supported_models: Vec<SupportedModel>,
}

/// `null` reads as the default (the SDK sends `null` for some absent lists).
fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}
