//! Conversions from state-store records to the REST objects the SDK validates, and between the
//! store's failure category and the wire's.

use serde_json::{Map, Value};

use super::rest::{Checkpoint, CheckpointType, TrainingRun, iso8601_utc};
use super::types::ErrorCategory;
use crate::state::{self, CheckpointRecord, FailureCategory, RunRecord};

fn metadata(v: &Value) -> Option<Map<String, Value>> {
    v.as_object().cloned()
}

/// The REST `Checkpoint` of a stored checkpoint.
pub fn checkpoint_view(c: &CheckpointRecord) -> Checkpoint {
    Checkpoint {
        checkpoint_id: c.checkpoint_id.clone(),
        checkpoint_type: match c.checkpoint_type {
            state::CheckpointType::Training => CheckpointType::Training,
            state::CheckpointType::Sampler => CheckpointType::Sampler,
            state::CheckpointType::External => CheckpointType::External,
        },
        time: iso8601_utc(c.created_at),
        tinker_path: c.tinker_path.clone(),
        size_bytes: c.size_bytes,
        public: c.public,
        user_metadata: metadata(&c.user_metadata),
        expires_at: c.expires_at.map(iso8601_utc),
    }
}

/// The REST `TrainingRun` of a stored run. `model_owner` is the owner hash (never the raw key);
/// the caller looks up the last checkpoints (ids in `run.last_checkpoint`, ...) if it wants them.
pub fn training_run_view(
    run: &RunRecord,
    last_checkpoint: Option<&CheckpointRecord>,
    last_sampler_checkpoint: Option<&CheckpointRecord>,
) -> TrainingRun {
    TrainingRun {
        training_run_id: run.id.clone(),
        base_model: run.base_model.clone(),
        model_owner: run.owner.clone(),
        is_lora: true,
        corrupted: run.corrupted,
        lora_rank: Some(run.lora.rank),
        last_request_time: iso8601_utc(run.last_request_time),
        last_checkpoint: last_checkpoint.map(checkpoint_view),
        last_sampler_checkpoint: last_sampler_checkpoint.map(checkpoint_view),
        user_metadata: metadata(&run.user_metadata),
    }
}

impl From<FailureCategory> for ErrorCategory {
    fn from(c: FailureCategory) -> Self {
        match c {
            FailureCategory::User => ErrorCategory::User,
            FailureCategory::Server => ErrorCategory::Server,
            FailureCategory::Unknown => ErrorCategory::Unknown,
        }
    }
}

impl From<ErrorCategory> for FailureCategory {
    fn from(c: ErrorCategory) -> Self {
        match c {
            ErrorCategory::User => FailureCategory::User,
            ErrorCategory::Server => FailureCategory::Server,
            ErrorCategory::Unknown => FailureCategory::Unknown,
        }
    }
}
