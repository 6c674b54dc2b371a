//! Bodies of the training endpoints: create_model, get_info, forward_backward's JSON parts,
//! optim_step, save_weights, save_weights_for_sampler, load_weights.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::super::error::ProtocolError;
use super::Metadata;

/// LoRA settings of `create_model` (also echoed by `weights_info`): the run record's own
/// type, so the server stores what the client sent without a copy.
pub use crate::state::LoraSettings as LoraConfig;

/// Tinker's `lora_alpha` (the SDK does not send one).
pub const LORA_ALPHA: f32 = 32.0;

impl LoraConfig {
    /// The engine's check of these settings ([`crate::engine::LoraConfig::check`], the one
    /// the model application runs too), at Tinker's alpha.
    pub fn validate(&self, max_rank: u32) -> Result<(), ProtocolError> {
        let cfg =
            crate::engine::LoraConfig::from_tinker(self.rank as usize, LORA_ALPHA, self.targets, 0);
        cfg.check(max_rank as usize).map_err(|e| match e {
            crate::engine::EngineError::InvalidInput(m) => ProtocolError::Engine(m),
            other => ProtocolError::Engine(other.to_string()),
        })
    }
}

fn d_adamw() -> String {
    "adamw".into()
}

/// `{"type": "adamw"}` or `{"type": "dimuon", "version": 1}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OptimizerConfig {
    #[serde(rename = "type", default = "d_adamw")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<i64>,
}

impl Default for OptimizerConfig {
    fn default() -> Self {
        OptimizerConfig { kind: d_adamw(), version: None }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct CreateModelRequest {
    pub session_id: String,
    pub model_seq_id: u64,
    pub base_model: String,
    #[serde(default)]
    pub lora_config: Option<LoraConfig>,
    #[serde(default)]
    pub user_metadata: Option<Metadata>,
    #[serde(default)]
    pub optimizer_config: Option<OptimizerConfig>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct GetInfoRequest {
    pub model_id: String,
}

#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ModelData {
    pub arch: Option<String>,
    pub model_name: Option<String>,
    pub tokenizer_id: Option<String>,
}

#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GetInfoResponse {
    pub model_id: String,
    pub model_data: ModelData,
    pub is_lora: Option<bool>,
    pub lora_rank: Option<u32>,
    pub model_name: Option<String>,
    pub optimizer_config: Option<OptimizerConfig>,
}

/// AdamW hyper-parameters with the SDK defaults (§6.5): the engine's own type, so its one
/// validation ([`AdamParams::validate`]) is what the server checks before queueing a step.
pub use crate::engine::AdamParams;

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct OptimStepRequest {
    pub model_id: String,
    #[serde(default)]
    pub seq_id: Option<i64>,
    #[serde(default, alias = "optim_params")]
    pub adam_params: Option<AdamParams>,
    /// Non-Adam optimizers (`{"type": "dimuon", ...}`); kept raw.
    #[serde(default)]
    pub optimizer_params: Option<Value>,
}

/// Result of `optim_step`; metric keys are free-form.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct OptimStepResponse {
    pub metrics: BTreeMap<String, f64>,
}

/// What both checkpoint saves carry beside the name: the request's place in the model's order,
/// the checkpoint's lifetime and its metadata; each may be absent.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct SaveOptions {
    pub seq_id: Option<i64>,
    pub ttl_seconds: Option<i64>,
    pub user_metadata: Option<Metadata>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct SaveWeightsRequest {
    pub model_id: String,
    /// The checkpoint name (not a path).
    #[serde(default)]
    pub path: Option<String>,
    #[serde(default)]
    pub overwrite: bool,
    #[serde(flatten)]
    pub options: SaveOptions,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct SaveWeightsForSamplerRequest {
    pub model_id: String,
    #[serde(default)]
    pub path: Option<String>,
    #[serde(default)]
    pub sampling_session_seq_id: Option<u64>,
    /// `snapshot` (default) or `inflight`.
    #[serde(default)]
    pub kind: Option<String>,
    #[serde(flatten)]
    pub options: SaveOptions,
}

/// The two forms of `save_weights_for_sampler`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SamplerSaveForm {
    /// `save_weights_for_sampler(name)`: a listed checkpoint `sampler_weights/{name}`.
    Named { name: String },
    /// `save_weights_and_get_sampling_client()`: a new sampling session, no checkpoint.
    Ephemeral { sampling_session_seq_id: u64 },
}

impl SaveWeightsForSamplerRequest {
    pub fn form(&self) -> Result<SamplerSaveForm, ProtocolError> {
        // `inflight` is served as a snapshot (allowed by the protocol); anything else is a typo
        // the caller should hear about rather than get a silent snapshot.
        if let Some(k) = self.kind.as_deref()
            && k != "snapshot"
            && k != "inflight"
        {
            return Err(ProtocolError::invalid(
                "kind",
                format!("{k:?} is not a save kind (expected \"snapshot\" or \"inflight\")"),
            ));
        }
        match (&self.path, self.sampling_session_seq_id) {
            (Some(name), _) => Ok(SamplerSaveForm::Named { name: name.clone() }),
            (None, Some(seq)) => Ok(SamplerSaveForm::Ephemeral { sampling_session_seq_id: seq }),
            (None, None) => Err(ProtocolError::missing("path or sampling_session_seq_id")),
        }
    }
}

/// Result of `save_weights_for_sampler`. Named: `{"path": ...}`; ephemeral:
/// `{"path": null, "sampling_session_id": ...}` (`path` is always present).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SaveWeightsForSamplerResponse {
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sampling_session_id: Option<String>,
}

impl SaveWeightsForSamplerResponse {
    pub fn named(path: impl Into<String>) -> Self {
        SaveWeightsForSamplerResponse { path: Some(path.into()), sampling_session_id: None }
    }
    pub fn ephemeral(sampling_session_id: impl Into<String>) -> Self {
        SaveWeightsForSamplerResponse {
            path: None,
            sampling_session_id: Some(sampling_session_id.into()),
        }
    }
}

/// `load_weights` in either form; see [`LoadWeightsRequest::form`].
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct LoadWeightsRequest {
    pub path: String,
    #[serde(default)]
    pub optimizer: bool,
    #[serde(default)]
    pub model_id: Option<String>,
    #[serde(default)]
    pub seq_id: Option<i64>,
    #[serde(default)]
    pub session_id: Option<String>,
    #[serde(default)]
    pub model_seq_id: Option<u64>,
    #[serde(default)]
    pub base_model: Option<String>,
    #[serde(default)]
    pub user_metadata: Option<Metadata>,
    #[serde(default)]
    pub optimizer_config: Option<OptimizerConfig>,
    #[serde(default)]
    pub weights_access_token: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoadForm {
    /// `TrainingClient.load_state*`: load onto an existing model.
    Legacy { model_id: String },
    /// `create_training_client_from_state*`: create `{session_id}:train:{model_seq_id}` and load.
    CreateViaLoad { session_id: String, model_seq_id: u64 },
}

impl LoadWeightsRequest {
    pub fn form(&self) -> Result<LoadForm, ProtocolError> {
        match (&self.model_id, &self.session_id, self.model_seq_id) {
            (Some(m), _, _) => Ok(LoadForm::Legacy { model_id: m.clone() }),
            (None, Some(s), Some(n)) => {
                Ok(LoadForm::CreateViaLoad { session_id: s.clone(), model_seq_id: n })
            }
            (None, Some(_), None) => Err(ProtocolError::missing("model_seq_id")),
            (None, None, _) => Err(ProtocolError::missing("model_id or session_id")),
        }
    }
}
