//! Run and checkpoint metadata on disk next to the PEFT directories, the source of truth of the
//! Twinkle-native API (as in Python Twinkle, so the model app works with no server app and the
//! server app lists what any model app wrote): `{owner}/{run}/twinkle_metadata.json` and
//! `{owner}/{run}/{weights|sampler_weights}/{name}/checkpoint_metadata.json`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::error::TwinkleError;
use super::paths::TwinklePath;
use crate::protocol::tinker::paths::CheckpointKind;

pub const RUN_META: &str = "twinkle_metadata.json";
pub const CHECKPOINT_META: &str = "checkpoint_metadata.json";
/// `trainer_state.json` of a training checkpoint (`cur_step`, `consumed_train_samples`, …).
pub const TRAINER_STATE: &str = "trainer_state.json";

/// `TrainingRun` of the client's types.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunMeta {
    pub training_run_id: String,
    pub base_model: String,
    /// The owner hash (never the token).
    pub model_owner: String,
    #[serde(default = "yes")]
    pub is_lora: bool,
    #[serde(default)]
    pub corrupted: bool,
    #[serde(default)]
    pub lora_rank: Option<usize>,
    #[serde(default)]
    pub last_request_time: Option<String>,
    #[serde(default)]
    pub last_checkpoint: Option<CheckpointMeta>,
    #[serde(default)]
    pub last_sampler_checkpoint: Option<CheckpointMeta>,
    #[serde(default)]
    pub user_metadata: Option<serde_json::Value>,
}

impl RunMeta {
    /// A new LoRA run of `owner`: not corrupted, no checkpoints yet, last requested now.
    pub fn new_lora(training_run_id: &str, base_model: &str, owner: &str, rank: usize) -> Self {
        RunMeta {
            training_run_id: training_run_id.to_string(),
            base_model: base_model.to_string(),
            model_owner: owner.to_string(),
            is_lora: true,
            corrupted: false,
            lora_rank: Some(rank),
            last_request_time: Some(now_iso()),
            last_checkpoint: None,
            last_sampler_checkpoint: None,
            user_metadata: None,
        }
    }
}

fn yes() -> bool {
    true
}

/// `Checkpoint` of the client's types.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointMeta {
    /// `weights/NAME` or `sampler_weights/NAME`.
    pub checkpoint_id: String,
    /// `training` or `sampler`.
    pub checkpoint_type: String,
    /// ISO 8601, UTC.
    pub time: String,
    pub size_bytes: u64,
    #[serde(default)]
    pub public: bool,
    pub twinkle_path: String,
    #[serde(default)]
    pub base_model: Option<String>,
    #[serde(default = "yes")]
    pub is_lora: bool,
    #[serde(default)]
    pub lora_rank: Option<usize>,
    #[serde(default)]
    pub user_metadata: Option<serde_json::Value>,
}

/// Now as ISO 8601 UTC with milliseconds.
pub fn now_iso() -> String {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    crate::protocol::tinker::rest::iso8601_utc(ms)
}

fn io(path: &Path, e: impl std::fmt::Display) -> TwinkleError {
    TwinkleError::Internal(format!("{}: {e}", path.display()))
}

/// Writes `value` as JSON atomically (temp file + rename), so readers never see half a file.
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), TwinkleError> {
    let dir = path.parent().ok_or_else(|| io(path, "no parent directory"))?;
    // Run and checkpoint metadata sit beside the weights: owner-only, like them.
    crate::private_fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let text = serde_json::to_vec_pretty(value).map_err(|e| io(path, e))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("meta"),
        std::process::id()
    ));
    crate::private_fs::write(&tmp, text).map_err(|e| io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| io(path, e))
}

/// Reads a JSON file; `Ok(None)` when it does not exist.
pub fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Option<T>, TwinkleError> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| io(path, e)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io(path, e)),
    }
}

/// The run's metadata, `None` when the run directory has none.
pub fn read_run(run_dir: &Path) -> Result<Option<RunMeta>, TwinkleError> {
    read_json(&run_dir.join(RUN_META))
}

pub fn write_run(run_dir: &Path, run: &RunMeta) -> Result<(), TwinkleError> {
    write_json(&run_dir.join(RUN_META), run)
}

/// Every run of an owner directory, most recently used first (directories without metadata,
/// such as Tinker-API runs, are skipped).
pub fn list_runs(owner_dir: &Path) -> Result<Vec<RunMeta>, TwinkleError> {
    let entries = match std::fs::read_dir(owner_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(owner_dir, e)),
    };
    let mut runs = Vec::new();
    for entry in entries.flatten() {
        let dir = entry.path();
        if dir.is_dir()
            && let Ok(Some(run)) = read_run(&dir)
        {
            runs.push(run);
        }
    }
    runs.sort_by(|a, b| {
        b.last_request_time
            .cmp(&a.last_request_time)
            .then(a.training_run_id.cmp(&b.training_run_id))
    });
    Ok(runs)
}

/// Every checkpoint of a run, oldest first.
pub fn list_checkpoints(run_dir: &Path) -> Result<Vec<CheckpointMeta>, TwinkleError> {
    let mut out = Vec::new();
    for kind in [CheckpointKind::Weights, CheckpointKind::SamplerWeights] {
        let dir = run_dir.join(kind.dir());
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for entry in entries.flatten() {
            let path = entry.path();
            // Symlinks (`latest` aliases) would list a checkpoint twice.
            if entry.file_type().is_ok_and(|t| t.is_dir())
                && let Ok(Some(meta)) = read_json::<CheckpointMeta>(&path.join(CHECKPOINT_META))
            {
                out.push(meta);
            }
        }
    }
    out.sort_by(|a, b| a.time.cmp(&b.time).then(a.checkpoint_id.cmp(&b.checkpoint_id)));
    Ok(out)
}

/// Total size of the regular files under `dir`.
pub fn dir_size(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_size(&e.path()),
            Ok(t) if t.is_file() => e.metadata().map(|m| m.len()).unwrap_or(0),
            _ => 0,
        })
        .sum()
}

/// Records a checkpoint just written at `dir` and makes it the run's last one.
pub fn record_checkpoint(
    run_dir: &Path,
    path: &TwinklePath,
    dir: &Path,
    run: &mut RunMeta,
) -> Result<CheckpointMeta, TwinkleError> {
    let meta = CheckpointMeta {
        checkpoint_id: path.checkpoint_id(),
        checkpoint_type: path.kind().checkpoint_type().to_string(),
        time: now_iso(),
        size_bytes: dir_size(dir),
        public: false,
        twinkle_path: path.to_string(),
        base_model: Some(run.base_model.clone()),
        is_lora: true,
        lora_rank: run.lora_rank,
        user_metadata: None,
    };
    write_json(&dir.join(CHECKPOINT_META), &meta)?;
    match path.kind() {
        CheckpointKind::SamplerWeights => run.last_sampler_checkpoint = Some(meta.clone()),
        _ => run.last_checkpoint = Some(meta.clone()),
    }
    run.last_request_time = Some(meta.time.clone());
    write_run(run_dir, run)?;
    Ok(meta)
}

/// Deletes one checkpoint directory (404 when absent) and clears it from the run's "last".
pub fn delete_checkpoint(
    run_dir: &Path,
    path: &TwinklePath,
    dir: &PathBuf,
) -> Result<(), TwinkleError> {
    if !dir.join(CHECKPOINT_META).is_file() {
        return Err(TwinkleError::NotFound(format!("checkpoint {path} does not exist")));
    }
    std::fs::remove_dir_all(dir).map_err(|e| io(dir, e))?;
    if let Some(mut run) = read_run(run_dir)? {
        let id = path.checkpoint_id();
        if run.last_checkpoint.as_ref().is_some_and(|c| c.checkpoint_id == id) {
            run.last_checkpoint = None;
        }
        if run.last_sampler_checkpoint.as_ref().is_some_and(|c| c.checkpoint_id == id) {
            run.last_sampler_checkpoint = None;
        }
        write_run(run_dir, &run)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_and_checkpoints_round_trip_on_disk() {
        let tmp = tempfile::tempdir().unwrap();
        let run_dir = tmp.path().join("owner").join("s-default");
        let mut run = RunMeta::new_lora("s-default", "qwen3-tiny", "owner", 8);
        write_run(&run_dir, &run).unwrap();
        let p = TwinklePath::new("s-default", CheckpointKind::Weights, "ep0").unwrap();
        let ck = run_dir.join("weights/ep0");
        std::fs::create_dir_all(&ck).unwrap();
        std::fs::write(ck.join("adapter_model.safetensors"), [0u8; 100]).unwrap();
        let meta = record_checkpoint(&run_dir, &p, &ck, &mut run).unwrap();
        assert_eq!(meta.size_bytes, 100);
        assert_eq!(meta.twinkle_path, "twinkle://s-default/weights/ep0");
        let runs = list_runs(&tmp.path().join("owner")).unwrap();
        assert_eq!(runs.len(), 1);
        assert_eq!(runs[0].last_checkpoint.as_ref().unwrap().checkpoint_id, "weights/ep0");
        assert_eq!(list_checkpoints(&run_dir).unwrap().len(), 1);
        delete_checkpoint(&run_dir, &p, &ck).unwrap();
        assert!(list_checkpoints(&run_dir).unwrap().is_empty());
        assert!(read_run(&run_dir).unwrap().unwrap().last_checkpoint.is_none());
        assert!(delete_checkpoint(&run_dir, &p, &ck).is_err());
    }
}
