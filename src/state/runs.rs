//! Training runs (one per model id) and their checkpoints.

use rusqlite::{Row, Transaction, params};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{FromRow, StateError, Store, json_text, parse_json, select, select_first, to_i64};
use crate::engine::LoraTargets;

/// LoRA settings of a run, as Tinker's `create_model` sends them in `lora_config` (the
/// protocol's `LoraConfig` is this type); what is left out takes the SDK's defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoraSettings {
    #[serde(default = "default_rank")]
    pub rank: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<i64>,
    #[serde(flatten)]
    pub targets: LoraTargets,
}

fn default_rank() -> u32 {
    LoraSettings::default().rank
}

impl Default for LoraSettings {
    fn default() -> Self {
        LoraSettings { rank: 32, seed: None, targets: LoraTargets::ALL }
    }
}

/// A training run to create.
#[derive(Debug, Clone, PartialEq)]
pub struct NewRun {
    /// The model id `{session}:train:{n}`.
    pub id: String,
    pub owner: String,
    pub session_id: String,
    pub base_model: String,
    pub lora: LoraSettings,
    /// JSON `{"type": "adamw"}` or null.
    pub optimizer_config: Value,
    pub user_metadata: Value,
}

/// A stored training run: what was created (read through `Deref`: `rec.id`) and what the
/// store keeps. Times are Unix milliseconds; checkpoint fields hold checkpoint ids.
#[derive(Debug, Clone, PartialEq)]
pub struct RunRecord {
    pub spec: NewRun,
    pub created_at: i64,
    pub last_request_time: i64,
    pub last_checkpoint: Option<String>,
    pub last_sampler_checkpoint: Option<String>,
    pub corrupted: bool,
}

/// `checkpoint_type` of a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CheckpointType {
    Training,
    Sampler,
    External,
}

impl CheckpointType {
    pub fn as_str(self) -> &'static str {
        match self {
            CheckpointType::Training => "training",
            CheckpointType::Sampler => "sampler",
            CheckpointType::External => "external",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [CheckpointType::Training, CheckpointType::Sampler, CheckpointType::External]
            .into_iter()
            .find(|t| t.as_str() == s)
    }
}

/// A checkpoint to record (after its files are written).
#[derive(Debug, Clone, PartialEq)]
pub struct NewCheckpoint {
    pub run_id: String,
    /// `weights/{name}`, `sampler_weights/{name}` or `external_weights/{name}`.
    pub checkpoint_id: String,
    pub checkpoint_type: CheckpointType,
    pub tinker_path: String,
    pub size_bytes: Option<u64>,
    pub user_metadata: Value,
    pub expires_at: Option<i64>,
    pub public: bool,
}

/// A stored checkpoint: what was recorded (read through `Deref`), its owner and time.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckpointRecord {
    pub spec: NewCheckpoint,
    pub owner: String,
    pub created_at: i64,
}

super::record_deref!(RunRecord => NewRun);

super::record_deref!(CheckpointRecord => NewCheckpoint);

impl FromRow for RunRecord {
    const TABLE: &'static str = "runs";
    const COLUMNS: &'static str = "id, owner, session_id, base_model, lora_rank, seed, \
        train_unembed, train_mlp, train_attn, optimizer_config, user_metadata, created_at, \
        last_request_time, last_checkpoint, last_sampler_checkpoint, corrupted";

    fn from_row(r: &Row<'_>) -> Result<Self, StateError> {
        Ok(RunRecord {
            spec: NewRun {
                id: r.get(0)?,
                owner: r.get(1)?,
                session_id: r.get(2)?,
                base_model: r.get(3)?,
                lora: LoraSettings {
                    rank: r.get(4)?,
                    seed: r.get(5)?,
                    targets: LoraTargets {
                        train_unembed: r.get(6)?,
                        train_mlp: r.get(7)?,
                        train_attn: r.get(8)?,
                    },
                },
                optimizer_config: parse_json("run optimizer_config", r.get(9)?)?,
                user_metadata: parse_json("run user_metadata", r.get(10)?)?,
            },
            created_at: r.get(11)?,
            last_request_time: r.get(12)?,
            last_checkpoint: r.get(13)?,
            last_sampler_checkpoint: r.get(14)?,
            corrupted: r.get(15)?,
        })
    }
}

impl FromRow for CheckpointRecord {
    const TABLE: &'static str = "checkpoints";
    const COLUMNS: &'static str = "run_id, checkpoint_id, owner, checkpoint_type, tinker_path, \
        created_at, size_bytes, user_metadata, expires_at, public";

    fn from_row(r: &Row<'_>) -> Result<Self, StateError> {
        let kind: String = r.get(3)?;
        let checkpoint_type = CheckpointType::parse(&kind).ok_or_else(|| StateError::Corrupt {
            what: "checkpoint type",
            reason: format!("unknown type `{kind}`"),
        })?;
        Ok(CheckpointRecord {
            spec: NewCheckpoint {
                run_id: r.get(0)?,
                checkpoint_id: r.get(1)?,
                checkpoint_type,
                tinker_path: r.get(4)?,
                size_bytes: r.get::<_, Option<i64>>(6)?.map(|v| v.max(0) as u64),
                user_metadata: parse_json("checkpoint user_metadata", r.get(7)?)?,
                expires_at: r.get(8)?,
                public: r.get(9)?,
            },
            owner: r.get(2)?,
            created_at: r.get(5)?,
        })
    }
}

/// The filter of one checkpoint of its owner: `run_id = ?1`, `checkpoint_id = ?2`, `owner = ?3`.
const ONE_CKPT: &str = "WHERE run_id = ?1 AND checkpoint_id = ?2 AND owner = ?3";

fn ckpt_not_found(run_id: &str, checkpoint_id: &str) -> StateError {
    StateError::not_found("checkpoint", &format!("{run_id}/{checkpoint_id}"))
}

fn owns_run(tx: &Transaction<'_>, owner: &str, run_id: &str) -> Result<(), StateError> {
    let ok: bool = tx.query_row(
        "SELECT EXISTS(SELECT 1 FROM runs WHERE id = ?1 AND owner = ?2)",
        params![run_id, owner],
        |r| r.get(0),
    )?;
    if ok { Ok(()) } else { Err(StateError::not_found("training run", run_id)) }
}

/// Points the run's `last_checkpoint` / `last_sampler_checkpoint` at its newest checkpoint of that type.
fn refresh_last(
    tx: &Transaction<'_>,
    run_id: &str,
    kind: CheckpointType,
) -> Result<(), StateError> {
    let column = match kind {
        CheckpointType::Training => "last_checkpoint",
        CheckpointType::Sampler => "last_sampler_checkpoint",
        CheckpointType::External => return Ok(()),
    };
    tx.execute(
        &format!(
            "UPDATE runs SET {column} = (SELECT checkpoint_id FROM checkpoints WHERE run_id = ?1 \
             AND checkpoint_type = ?2 ORDER BY created_at DESC, rowid DESC LIMIT 1) WHERE id = ?1"
        ),
        params![run_id, kind.as_str()],
    )?;
    Ok(())
}

impl Store {
    /// Creates a training run; a duplicate id is `AlreadyExists`.
    pub fn insert_run(&self, run: &NewRun) -> Result<RunRecord, StateError> {
        let now = self.now();
        self.execute_one(
            "INSERT OR IGNORE INTO runs (id, owner, session_id, base_model, lora_rank, seed, train_unembed, \
             train_mlp, train_attn, optimizer_config, user_metadata, created_at, last_request_time) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?12)",
            params![
                run.id,
                run.owner,
                run.session_id,
                run.base_model,
                run.lora.rank,
                run.lora.seed,
                run.lora.targets.train_unembed,
                run.lora.targets.train_mlp,
                run.lora.targets.train_attn,
                json_text(&run.optimizer_config),
                json_text(&run.user_metadata),
                now
            ],
            StateError::AlreadyExists { what: "training run", id: run.id.clone() },
        )?;
        Ok(RunRecord {
            spec: run.clone(),
            created_at: now,
            last_request_time: now,
            last_checkpoint: None,
            last_sampler_checkpoint: None,
            corrupted: false,
        })
    }

    /// The run `id` if `owner` owns it (another owner's run is NotFound too).
    pub fn get_run(&self, owner: &str, id: &str) -> Result<RunRecord, StateError> {
        self.owned_by("training run", owner, id)
    }

    /// Runs of `owner`, newest first, and the total count.
    pub fn list_runs(
        &self,
        owner: &str,
        offset: u64,
        limit: u64,
    ) -> Result<(Vec<RunRecord>, u64), StateError> {
        self.owned_page(owner, offset, limit)
    }

    /// Sets `last_request_time` to now.
    pub fn touch_run(&self, owner: &str, id: &str) -> Result<(), StateError> {
        self.execute_one(
            "UPDATE runs SET last_request_time = ?1 WHERE id = ?2 AND owner = ?3",
            params![self.now(), id, owner],
            StateError::not_found("training run", id),
        )
    }

    /// Flags a run whose in-memory state was lost or damaged.
    pub fn set_run_corrupted(
        &self,
        owner: &str,
        id: &str,
        corrupted: bool,
    ) -> Result<(), StateError> {
        self.execute_one(
            "UPDATE runs SET corrupted = ?1 WHERE id = ?2 AND owner = ?3",
            params![corrupted, id, owner],
            StateError::not_found("training run", id),
        )
    }

    /// Records a checkpoint of a run owned by `owner`. An existing checkpoint id is replaced when
    /// `overwrite`, else `AlreadyExists`. Updates the run's last (sampler) checkpoint.
    pub fn insert_checkpoint(
        &self,
        owner: &str,
        c: &NewCheckpoint,
        overwrite: bool,
    ) -> Result<CheckpointRecord, StateError> {
        let now = self.now();
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        owns_run(&tx, owner, &c.run_id)?;
        let exists: bool = tx.query_row(
            "SELECT EXISTS(SELECT 1 FROM checkpoints WHERE run_id = ?1 AND checkpoint_id = ?2)",
            params![c.run_id, c.checkpoint_id],
            |r| r.get(0),
        )?;
        if exists && !overwrite {
            return Err(StateError::AlreadyExists {
                what: "checkpoint",
                id: format!("{}/{}", c.run_id, c.checkpoint_id),
            });
        }
        tx.execute(
            "DELETE FROM checkpoints WHERE run_id = ?1 AND checkpoint_id = ?2",
            params![c.run_id, c.checkpoint_id],
        )?;
        tx.execute(
            &format!(
                "INSERT INTO checkpoints ({}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                CheckpointRecord::COLUMNS
            ),
            params![
                c.run_id,
                c.checkpoint_id,
                owner,
                c.checkpoint_type.as_str(),
                c.tinker_path,
                now,
                c.size_bytes.map(to_i64),
                json_text(&c.user_metadata),
                c.expires_at,
                c.public
            ],
        )?;
        refresh_last(&tx, &c.run_id, c.checkpoint_type)?;
        tx.execute("UPDATE runs SET last_request_time = ?1 WHERE id = ?2", params![now, c.run_id])?;
        tx.commit()?;
        Ok(CheckpointRecord { spec: c.clone(), owner: owner.to_string(), created_at: now })
    }

    pub fn get_checkpoint(
        &self,
        owner: &str,
        run_id: &str,
        checkpoint_id: &str,
    ) -> Result<CheckpointRecord, StateError> {
        select_first(&self.conn(), ONE_CKPT, params![run_id, checkpoint_id, owner])?
            .ok_or_else(|| ckpt_not_found(run_id, checkpoint_id))
    }

    /// Checkpoints of one run, newest first; NotFound when `owner` does not own the run.
    pub fn list_checkpoints(
        &self,
        owner: &str,
        run_id: &str,
    ) -> Result<Vec<CheckpointRecord>, StateError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        owns_run(&tx, owner, run_id)?;
        let out = select(&tx, "WHERE run_id = ?1 ORDER BY created_at DESC, rowid DESC", [run_id])?;
        tx.commit()?;
        Ok(out)
    }

    /// Every checkpoint of `owner`, newest first, and the total count.
    pub fn list_user_checkpoints(
        &self,
        owner: &str,
        offset: u64,
        limit: u64,
    ) -> Result<(Vec<CheckpointRecord>, u64), StateError> {
        self.owned_page(owner, offset, limit)
    }

    /// Deletes a checkpoint record and returns it (the caller removes its files).
    pub fn delete_checkpoint(
        &self,
        owner: &str,
        run_id: &str,
        checkpoint_id: &str,
    ) -> Result<CheckpointRecord, StateError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let rec: CheckpointRecord =
            select_first(&tx, ONE_CKPT, params![run_id, checkpoint_id, owner])?
                .ok_or_else(|| ckpt_not_found(run_id, checkpoint_id))?;
        tx.execute(
            "DELETE FROM checkpoints WHERE run_id = ?1 AND checkpoint_id = ?2",
            params![run_id, checkpoint_id],
        )?;
        refresh_last(&tx, run_id, rec.checkpoint_type)?;
        tx.commit()?;
        Ok(rec)
    }

    /// Publishes or unpublishes; returns false when it already had that visibility.
    pub fn set_checkpoint_public(
        &self,
        owner: &str,
        run_id: &str,
        checkpoint_id: &str,
        public: bool,
    ) -> Result<bool, StateError> {
        self.get_checkpoint(owner, run_id, checkpoint_id)?;
        let n = self.conn().execute(
            "UPDATE checkpoints SET public = ?1 WHERE run_id = ?2 AND checkpoint_id = ?3 AND owner = ?4 AND public != ?1",
            params![public, run_id, checkpoint_id, owner],
        )?;
        Ok(n > 0)
    }

    /// Sets or clears (`None`) the expiry time (Unix ms).
    pub fn set_checkpoint_expiry(
        &self,
        owner: &str,
        run_id: &str,
        checkpoint_id: &str,
        expires_at: Option<i64>,
    ) -> Result<(), StateError> {
        self.execute_one(
            "UPDATE checkpoints SET expires_at = ?1 WHERE run_id = ?2 AND checkpoint_id = ?3 AND owner = ?4",
            params![expires_at, run_id, checkpoint_id, owner],
            ckpt_not_found(run_id, checkpoint_id),
        )
    }

    /// Checkpoints whose expiry time is at or before `now_ms` (for the sweeper).
    pub fn expired_checkpoints(&self, now_ms: i64) -> Result<Vec<CheckpointRecord>, StateError> {
        select(
            &self.conn(),
            "WHERE expires_at IS NOT NULL AND expires_at <= ?1 ORDER BY expires_at",
            [now_ms],
        )
    }
}
