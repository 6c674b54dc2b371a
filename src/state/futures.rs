//! Futures: the status and result of every submitted request, deduplicated on (model_id, seq_id).
//! Status moves pending → running → complete | failed and never leaves a terminal state.

use rusqlite::{Row, ToSql, params};

use super::{FromRow, StateError, Store, select_first};

/// Error text of futures left unfinished by a crash or restart.
pub const UNFINISHED_AT_STARTUP: &str = "the server restarted before this request finished; its result is lost, submit the request again";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FutureStatus {
    Pending,
    Running,
    Complete,
    Failed,
}

impl FutureStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            FutureStatus::Pending => "pending",
            FutureStatus::Running => "running",
            FutureStatus::Complete => "complete",
            FutureStatus::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [FutureStatus::Pending, FutureStatus::Running, FutureStatus::Complete, FutureStatus::Failed]
            .into_iter()
            .find(|v| v.as_str() == s)
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, FutureStatus::Complete | FutureStatus::Failed)
    }
}

/// Category of a failed future, as the SDK reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureCategory {
    User,
    Server,
    Unknown,
}

impl FailureCategory {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureCategory::User => "user",
            FailureCategory::Server => "server",
            FailureCategory::Unknown => "unknown",
        }
    }

    /// Anything unrecognised reads as `Unknown`, as in the SDK.
    pub fn parse(s: &str) -> Self {
        match s {
            "user" => FailureCategory::User,
            "server" => FailureCategory::Server,
            _ => FailureCategory::Unknown,
        }
    }
}

/// A future to create.
#[derive(Debug, Clone, PartialEq)]
pub struct NewFuture {
    /// Opaque id returned to the client (see `ids::hex_id`).
    pub request_id: String,
    pub owner: String,
    /// Dedupe scope: the model id (training) or sampling session id (sampling).
    pub model_id: Option<String>,
    pub seq_id: Option<i64>,
    /// Request type, e.g. `forward_backward`, `optim_step`, `sample`.
    pub kind: String,
    /// For `asample`: the ids promised in the submission answer.
    pub sample_sequence_ids: Option<Vec<String>>,
}

/// A stored future: what was submitted (read through `Deref`: `rec.request_id`) and how it
/// stands. Times are Unix milliseconds.
#[derive(Debug, Clone, PartialEq)]
pub struct FutureRecord {
    pub spec: NewFuture,
    pub status: FutureStatus,
    pub result: Option<Vec<u8>>,
    pub content_type: Option<String>,
    pub error: Option<String>,
    pub category: Option<FailureCategory>,
    pub created_at: i64,
    pub updated_at: i64,
}

super::record_deref!(FutureRecord => NewFuture);

impl FromRow for FutureRecord {
    const TABLE: &'static str = "futures";
    const COLUMNS: &'static str = "request_id, owner, model_id, seq_id, kind, status, \
        sample_sequence_ids, result, content_type, error, category, created_at, updated_at";

    fn from_row(r: &Row<'_>) -> Result<Self, StateError> {
        let status: String = r.get(5)?;
        let status = FutureStatus::parse(&status).ok_or_else(|| StateError::Corrupt {
            what: "future status",
            reason: format!("unknown status `{status}`"),
        })?;
        let ids: Option<String> = r.get(6)?;
        let sample_sequence_ids =
            ids.map(|s| serde_json::from_str(&s)).transpose().map_err(|e| ids_corrupt(&e))?;
        let category: Option<String> = r.get(10)?;
        Ok(FutureRecord {
            spec: NewFuture {
                request_id: r.get(0)?,
                owner: r.get(1)?,
                model_id: r.get(2)?,
                seq_id: r.get(3)?,
                kind: r.get(4)?,
                sample_sequence_ids,
            },
            status,
            result: r.get(7)?,
            content_type: r.get(8)?,
            error: r.get(9)?,
            category: category.as_deref().map(FailureCategory::parse),
            created_at: r.get(11)?,
            updated_at: r.get(12)?,
        })
    }
}

fn ids_corrupt(e: &serde_json::Error) -> StateError {
    StateError::Corrupt { what: "future sample_sequence_ids", reason: e.to_string() }
}

fn ids_text(ids: &Option<Vec<String>>) -> Result<Option<String>, StateError> {
    ids.as_ref().map(serde_json::to_string).transpose().map_err(|e| ids_corrupt(&e))
}

impl Store {
    /// Creates a pending future without dedupe; a duplicate request id or (model_id, seq_id) is
    /// `AlreadyExists`.
    pub fn create_future(&self, f: &NewFuture) -> Result<FutureRecord, StateError> {
        let now = self.now();
        self.execute_one(
            &format!(
                "INSERT OR IGNORE INTO futures ({}) VALUES (?1, ?2, ?3, ?4, ?5, 'pending', ?6, NULL, NULL, NULL, NULL, ?7, ?7)",
                FutureRecord::COLUMNS
            ),
            params![f.request_id, f.owner, f.model_id, f.seq_id, f.kind, ids_text(&f.sample_sequence_ids)?, now],
            StateError::AlreadyExists { what: "future", id: f.request_id.clone() },
        )?;
        Ok(FutureRecord {
            spec: f.clone(),
            status: FutureStatus::Pending,
            result: None,
            content_type: None,
            error: None,
            category: None,
            created_at: now,
            updated_at: now,
        })
    }

    /// How many futures of `owner` are pending or running (the per-key bound on queued work).
    pub fn count_unfinished(&self, owner: &str) -> Result<usize, StateError> {
        let n: i64 = self.conn().query_row(
            "SELECT count(*) FROM futures WHERE owner = ?1 AND status IN ('pending', 'running')",
            params![owner],
            |r| r.get(0),
        )?;
        Ok(n as usize)
    }

    /// How many futures of every owner are pending or running (the pending-futures gauge).
    pub fn count_all_unfinished(&self) -> Result<usize, StateError> {
        let n: i64 = self.conn().query_row(
            "SELECT count(*) FROM futures WHERE status IN ('pending', 'running')",
            [],
            |r| r.get(0),
        )?;
        Ok(n as usize)
    }

    /// Dedupe for retried submissions: when `f` has both `model_id` and `seq_id` and a future with
    /// that pair exists, returns it as `(existing, false)` (its own request id, status and result);
    /// otherwise creates `f` and returns `(new, true)`. A pair already used by another owner or by a
    /// different kind of request is a `Conflict`.
    pub fn create_or_get_by_seq(&self, f: &NewFuture) -> Result<(FutureRecord, bool), StateError> {
        if let Some(rec) = self.existing_by_seq(f)? {
            return Ok((rec, false));
        }
        // Two threads can race between the lookup and the insert; the UNIQUE constraint makes the
        // loser's insert a no-op, and it then reads the winner's row.
        match self.create_future(f) {
            Ok(rec) => Ok((rec, true)),
            Err(StateError::AlreadyExists { .. }) if f.model_id.is_some() && f.seq_id.is_some() => {
                match self.existing_by_seq(f)? {
                    Some(rec) => Ok((rec, false)),
                    None => {
                        Err(StateError::AlreadyExists { what: "future", id: f.request_id.clone() })
                    }
                }
            }
            Err(e) => Err(e),
        }
    }

    /// The future holding `f`'s (model_id, seq_id) when it has both; one of another owner or
    /// another kind of request is a `Conflict`.
    fn existing_by_seq(&self, f: &NewFuture) -> Result<Option<FutureRecord>, StateError> {
        let (Some(model_id), Some(seq_id)) = (&f.model_id, f.seq_id) else {
            return Ok(None);
        };
        let found: Option<FutureRecord> = select_first(
            &self.conn(),
            "WHERE model_id = ?1 AND seq_id = ?2",
            params![model_id, seq_id],
        )?;
        match found {
            Some(rec) if rec.owner != f.owner || rec.kind != f.kind => {
                Err(StateError::Conflict(format!(
                    "seq_id {seq_id} of `{model_id}` was already used by another {} request",
                    rec.kind
                )))
            }
            found => Ok(found),
        }
    }

    /// Any owner's future (for workers that complete it).
    pub fn get_future(&self, request_id: &str) -> Result<FutureRecord, StateError> {
        select_first(&self.conn(), "WHERE request_id = ?1", [request_id])?
            .ok_or_else(|| StateError::not_found("future", request_id))
    }

    /// The future if `owner` created it (for `retrieve_future`).
    pub fn get_future_owned(
        &self,
        owner: &str,
        request_id: &str,
    ) -> Result<FutureRecord, StateError> {
        let rec = self.get_future(request_id)?;
        if rec.owner != owner {
            return Err(StateError::not_found("future", request_id));
        }
        Ok(rec)
    }

    /// Applies a transition allowed only from the given statuses. Returns whether it applied;
    /// false means the future was already past that point (never regressed).
    fn transition(
        &self,
        request_id: &str,
        sql: &str,
        args: &[&dyn rusqlite::ToSql],
    ) -> Result<bool, StateError> {
        let conn = self.conn();
        let n = conn.execute(sql, args)?;
        if n > 0 {
            return Ok(true);
        }
        let exists: bool = conn.query_row(
            "SELECT EXISTS(SELECT 1 FROM futures WHERE request_id = ?1)",
            [request_id],
            |r| r.get(0),
        )?;
        if exists { Ok(false) } else { Err(StateError::not_found("future", request_id)) }
    }

    /// pending → running.
    pub fn set_running(&self, request_id: &str) -> Result<bool, StateError> {
        let now = self.now();
        self.transition(
            request_id,
            "UPDATE futures SET status = 'running', updated_at = ?1 WHERE request_id = ?2 AND status = 'pending'",
            &[&now, &request_id],
        )
    }

    /// pending | running → complete, with the result payload and its content type.
    pub fn complete(
        &self,
        request_id: &str,
        result: &[u8],
        content_type: &str,
    ) -> Result<bool, StateError> {
        let set = [("result", &result as &dyn ToSql), ("content_type", &content_type)];
        self.finish_future(request_id, FutureStatus::Complete, set)
    }

    /// pending | running → failed.
    pub fn fail(
        &self,
        request_id: &str,
        message: &str,
        category: FailureCategory,
    ) -> Result<bool, StateError> {
        let set = [("error", &message as &dyn ToSql), ("category", &category.as_str())];
        self.finish_future(request_id, FutureStatus::Failed, set)
    }

    /// pending | running → the terminal `status`, setting the two `(column, value)`s with it.
    fn finish_future(
        &self,
        request_id: &str,
        status: FutureStatus,
        [(a, va), (b, vb)]: [(&str, &dyn ToSql); 2],
    ) -> Result<bool, StateError> {
        let sql = format!(
            "UPDATE futures SET status = '{}', {a} = ?1, {b} = ?2, updated_at = ?3 \
             WHERE request_id = ?4 AND status IN ('pending', 'running')",
            status.as_str()
        );
        self.transition(request_id, &sql, &[va, vb, &self.now(), &request_id])
    }

    /// Fails (category `server`, [`UNFINISHED_AT_STARTUP`]) every future a previous process left
    /// pending or running. Call once at startup, before accepting requests. Returns the count.
    pub fn fail_unfinished_on_startup(&self) -> Result<usize, StateError> {
        let now = self.now();
        let n = self.conn().execute(
            "UPDATE futures SET status = 'failed', error = ?1, category = 'server', updated_at = ?2 \
             WHERE status IN ('pending', 'running')",
            params![UNFINISHED_AT_STARTUP, now],
        )?;
        Ok(n)
    }

    /// Deletes finished futures last updated before `cutoff_ms`; returns the count.
    pub fn delete_finished_futures_before(&self, cutoff_ms: i64) -> Result<usize, StateError> {
        let n = self.conn().execute(
            "DELETE FROM futures WHERE status IN ('complete', 'failed') AND updated_at < ?1",
            [cutoff_ms],
        )?;
        Ok(n)
    }
}
