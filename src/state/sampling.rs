//! Sampling sessions (`{session}:sample:{seq}`): one per `create_sampling_session`, from the base
//! model or from saved weights.

use rusqlite::{Row, params};

use super::{FromRow, StateError, Store, select_first, strings, to_i64};

/// A sampling session to create.
#[derive(Debug, Clone, PartialEq)]
pub struct NewSamplingSession {
    /// `{session}:sample:{seq}`.
    pub id: String,
    pub session_id: String,
    pub owner: String,
    pub seq: u64,
    pub base_model: String,
    /// `tinker://...` when sampling from saved weights.
    pub model_path: Option<String>,
}

/// A stored sampling session: what was created (read through `Deref`) and when.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingSessionRecord {
    pub spec: NewSamplingSession,
    pub created_at: i64,
}

super::record_deref!(SamplingSessionRecord => NewSamplingSession);

impl Store {
    /// Creates a sampling session, or returns the existing one for the same (session, seq) — a
    /// retried `create_sampling_session` — as `(record, false)`. A different id or owner for an
    /// existing (session, seq), or a reused id, is a `Conflict`.
    pub fn create_or_get_sampling_session(
        &self,
        s: &NewSamplingSession,
    ) -> Result<(SamplingSessionRecord, bool), StateError> {
        let now = self.now();
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let existing: Option<SamplingSessionRecord> = select_first(
            &tx,
            "WHERE (session_id = ?1 AND seq = ?2) OR id = ?3",
            params![s.session_id, to_i64(s.seq), s.id],
        )?;
        if let Some(rec) = existing {
            if rec.id != s.id
                || rec.owner != s.owner
                || rec.session_id != s.session_id
                || rec.seq != s.seq
            {
                return Err(StateError::Conflict(format!(
                    "sampling session seq {} of session `{}` is already used by `{}`",
                    s.seq, s.session_id, rec.id
                )));
            }
            return Ok((rec, false));
        }
        tx.execute(
            &format!(
                "INSERT INTO sampling_sessions ({}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                SamplingSessionRecord::COLUMNS
            ),
            params![s.id, s.session_id, s.owner, to_i64(s.seq), s.base_model, s.model_path, now],
        )?;
        tx.commit()?;
        Ok((SamplingSessionRecord { spec: s.clone(), created_at: now }, true))
    }

    pub fn get_sampling_session(
        &self,
        owner: &str,
        id: &str,
    ) -> Result<SamplingSessionRecord, StateError> {
        self.owned_by("sampling session", owner, id)
    }

    /// Sampling session ids of a session (for `GET /sessions/{id}`).
    pub fn list_sampling_session_ids(
        &self,
        owner: &str,
        session_id: &str,
    ) -> Result<Vec<String>, StateError> {
        strings(
            &self.conn(),
            "SELECT id FROM sampling_sessions WHERE owner = ?1 AND session_id = ?2 ORDER BY seq",
            params![owner, session_id],
        )
    }
}

impl FromRow for SamplingSessionRecord {
    const TABLE: &'static str = "sampling_sessions";
    const COLUMNS: &'static str = "id, session_id, owner, seq, base_model, model_path, created_at";

    fn from_row(r: &Row<'_>) -> Result<Self, StateError> {
        Ok(SamplingSessionRecord {
            spec: NewSamplingSession {
                id: r.get(0)?,
                session_id: r.get(1)?,
                owner: r.get(2)?,
                seq: r.get::<_, i64>(3)?.max(0) as u64,
                base_model: r.get(4)?,
                model_path: r.get(5)?,
            },
            created_at: r.get(6)?,
        })
    }
}
