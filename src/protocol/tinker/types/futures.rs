//! Bodies of sampling sessions and of futures: the answer of every submission, and the pending,
//! failed and finished forms of `retrieve_future`.

use serde::{Deserialize, Serialize};

// ---------------------------------------------------------------- sampling

/// What a sampler samples: a base model, or the weights at a `tinker://` path (each optional
/// on the wire; which one is needed depends on the endpoint).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct SamplerSource {
    pub base_model: Option<String>,
    pub model_path: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct CreateSamplingSessionRequest {
    pub session_id: String,
    pub sampling_session_seq_id: u64,
    #[serde(flatten)]
    pub source: SamplerSource,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CreateSamplingSessionResponse {
    pub sampling_session_id: String,
}

/// `GET /samplers/{id}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GetSamplerResponse {
    pub sampler_id: String,
    pub base_model: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_path: Option<String>,
}

// ---------------------------------------------------------------- futures

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct RetrieveFutureRequest {
    pub request_id: String,
    #[serde(default)]
    pub allow_metadata_only: bool,
}

/// Answer of every submission endpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UntypedFuture {
    pub request_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_id: Option<String>,
    /// Required for `asample`: exactly `num_samples` ids, in result order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sample_sequence_ids: Option<Vec<String>>,
}

/// Literal `"try_again"`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum TryAgainTag {
    #[default]
    #[serde(rename = "try_again")]
    TryAgain,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QueueState {
    #[default]
    Active,
    PausedCapacity,
    PausedRateLimit,
}

/// Pending answer of `retrieve_future` (send with HTTP 408).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TryAgainResponse {
    #[serde(rename = "type")]
    pub kind: TryAgainTag,
    pub request_id: String,
    pub queue_state: QueueState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_state_reason: Option<String>,
}

impl TryAgainResponse {
    pub fn new(request_id: impl Into<String>, queue_state: QueueState) -> Self {
        TryAgainResponse {
            kind: TryAgainTag::TryAgain,
            request_id: request_id.into(),
            queue_state,
            queue_state_reason: None,
        }
    }
}

/// Failure category of a failed future.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ErrorCategory {
    User,
    Server,
    Unknown,
}

/// Failed future (HTTP 200): `{"error": ..., "category": "user"}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FailedFutureResponse {
    pub error: String,
    pub category: ErrorCategory,
}
