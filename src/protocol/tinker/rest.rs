//! JSON types of the RestClient endpoints (§5.4): training runs, checkpoints, cursors, weights
//! info, session listings, and the ISO-8601 timestamps they carry.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::types::{LoraConfig, OptimizerConfig};
use crate::engine::LoraTargets;

/// `{offset, limit, total_count}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    pub offset: u64,
    pub limit: u64,
    pub total_count: u64,
}

/// `checkpoint_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckpointType {
    Training,
    Sampler,
    External,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// `weights/{name}`, `sampler_weights/{name}` or `external_weights/{name}`.
    pub checkpoint_id: String,
    pub checkpoint_type: CheckpointType,
    /// ISO-8601.
    pub time: String,
    pub tinker_path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_bytes: Option<u64>,
    #[serde(default)]
    pub public: bool,
    #[serde(default)]
    pub user_metadata: Option<Map<String, Value>>,
    #[serde(default)]
    pub expires_at: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainingRun {
    pub training_run_id: String,
    pub base_model: String,
    pub model_owner: String,
    pub is_lora: bool,
    #[serde(default)]
    pub corrupted: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora_rank: Option<u32>,
    /// ISO-8601.
    pub last_request_time: String,
    #[serde(default)]
    pub last_checkpoint: Option<Checkpoint>,
    #[serde(default)]
    pub last_sampler_checkpoint: Option<Checkpoint>,
    #[serde(default)]
    pub user_metadata: Option<Map<String, Value>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainingRunsResponse {
    pub training_runs: Vec<TrainingRun>,
    pub cursor: Cursor,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointsListResponse {
    pub checkpoints: Vec<Checkpoint>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cursor: Option<Cursor>,
}

/// Query string of the list endpoints (`limit`, `offset`, `access_scope`).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct ListQuery {
    #[serde(default)]
    pub limit: Option<u64>,
    #[serde(default)]
    pub offset: Option<u64>,
    #[serde(default)]
    pub access_scope: Option<String>,
}

impl ListQuery {
    /// `(offset, limit)` with the endpoint's default limit, the limit capped at `max_limit`.
    pub fn page(&self, default_limit: u64, max_limit: u64) -> (u64, u64) {
        (self.offset.unwrap_or(0), self.limit.unwrap_or(default_limit).min(max_limit))
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct WeightsInfoRequest {
    pub tinker_path: String,
}

/// Serialize only: the flattened `targets` would read back as all-true from a body without them.
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WeightsInfoResponse {
    pub base_model: String,
    pub is_lora: bool,
    pub lora_rank: Option<u32>,
    /// `train_unembed`, `train_mlp`, `train_attn` (left out when not a LoRA).
    #[serde(flatten)]
    pub targets: Option<LoraTargets>,
    pub optimizer_config: Option<OptimizerConfig>,
}

impl WeightsInfoResponse {
    pub fn lora(
        base_model: impl Into<String>,
        lora: &LoraConfig,
        optimizer: Option<OptimizerConfig>,
    ) -> Self {
        WeightsInfoResponse {
            base_model: base_model.into(),
            is_lora: true,
            lora_rank: Some(lora.rank),
            targets: Some(lora.targets),
            optimizer_config: optimizer,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ListSessionsResponse {
    pub sessions: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GetSessionResponse {
    pub training_run_ids: Vec<String>,
    pub sampler_ids: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_metadata: Option<Map<String, Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display_name: Option<String>,
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar, by
/// splitting the day count into 400-year eras of 146 097 days.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468; // shift the epoch to 0000-03-01
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097); // day of era, 0..=146096
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // year of era, 0..=399
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // day of year starting in March
    let mp = (5 * doy + 2) / 153; // month index, March = 0
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Unix milliseconds to `YYYY-MM-DDTHH:MM:SS.mmmZ`.
pub fn iso8601_utc(unix_ms: i64) -> String {
    let days = unix_ms.div_euclid(86_400_000);
    let ms_of_day = unix_ms.rem_euclid(86_400_000);
    let (y, mo, d) = civil_from_days(days);
    let (h, mi, s, ms) =
        (ms_of_day / 3_600_000, ms_of_day / 60_000 % 60, ms_of_day / 1000 % 60, ms_of_day % 1000);
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{ms:03}Z")
}
