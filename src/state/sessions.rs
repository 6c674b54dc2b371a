//! Sessions (one per SDK `ServiceClient`), their heartbeats, and per-session counters.

use rusqlite::{OptionalExtension, Row, params};
use serde_json::Value;

use super::{FromRow, StateError, Store, json_text, parse_json};

/// A session to create.
#[derive(Debug, Clone, PartialEq)]
pub struct NewSession {
    pub id: String,
    /// Keyed hash of the API key.
    pub owner: String,
    pub tags: Vec<String>,
    /// A JSON object (or null).
    pub user_metadata: Value,
    pub sdk_version: Option<String>,
    pub project_id: Option<String>,
    pub display_name: Option<String>,
}

impl NewSession {
    /// Session `id` of `owner` with no tags, metadata or client details.
    pub fn new(id: &str, owner: &str) -> Self {
        NewSession {
            id: id.to_string(),
            owner: owner.to_string(),
            tags: Vec::new(),
            user_metadata: Value::Null,
            sdk_version: None,
            project_id: None,
            display_name: None,
        }
    }
}

/// A stored session: what was created (read through `Deref`) and what the store keeps. Times
/// are Unix milliseconds.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionRecord {
    pub spec: NewSession,
    pub created_at: i64,
    pub last_heartbeat: i64,
    pub finished_at: Option<i64>,
    pub finish_reason: Option<String>,
}

super::record_deref!(SessionRecord => NewSession);

impl FromRow for SessionRecord {
    const TABLE: &'static str = "sessions";
    const COLUMNS: &'static str = "id, owner, tags, user_metadata, sdk_version, project_id, \
        display_name, created_at, last_heartbeat, finished_at, finish_reason";

    fn from_row(r: &Row<'_>) -> Result<Self, StateError> {
        let tags: String = r.get(2)?;
        Ok(SessionRecord {
            spec: NewSession {
                id: r.get(0)?,
                owner: r.get(1)?,
                tags: serde_json::from_str(&tags).map_err(tags_corrupt)?,
                user_metadata: parse_json("session user_metadata", r.get(3)?)?,
                sdk_version: r.get(4)?,
                project_id: r.get(5)?,
                display_name: r.get(6)?,
            },
            created_at: r.get(7)?,
            last_heartbeat: r.get(8)?,
            finished_at: r.get(9)?,
            finish_reason: r.get(10)?,
        })
    }
}

/// Just the id of a session, for listing them.
struct SessionId(String);

impl FromRow for SessionId {
    const TABLE: &'static str = "sessions";
    const COLUMNS: &'static str = "id";

    fn from_row(r: &Row<'_>) -> Result<Self, StateError> {
        Ok(SessionId(r.get(0)?))
    }
}

fn tags_corrupt(e: serde_json::Error) -> StateError {
    StateError::Corrupt { what: "session tags", reason: e.to_string() }
}

impl Store {
    /// Creates a session; a duplicate id is `AlreadyExists`.
    pub fn create_session(&self, s: &NewSession) -> Result<SessionRecord, StateError> {
        let now = self.now();
        let tags = serde_json::to_string(&s.tags).map_err(tags_corrupt)?;
        self.execute_one(
            "INSERT OR IGNORE INTO sessions (id, owner, tags, user_metadata, sdk_version, project_id, \
             display_name, created_at, last_heartbeat) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?8)",
            params![s.id, s.owner, tags, json_text(&s.user_metadata), s.sdk_version, s.project_id, s.display_name, now],
            StateError::AlreadyExists { what: "session", id: s.id.clone() },
        )?;
        Ok(SessionRecord {
            spec: s.clone(),
            created_at: now,
            last_heartbeat: now,
            finished_at: None,
            finish_reason: None,
        })
    }

    /// The session `id` if `owner` owns it.
    pub fn get_session(&self, owner: &str, id: &str) -> Result<SessionRecord, StateError> {
        self.owned_by("session", owner, id)
    }

    /// Whether session `id` exists, whoever owns it (the housekeeping of adapters no run refers
    /// to: a session is recorded before any of its models is created).
    pub fn session_exists(&self, id: &str) -> Result<bool, StateError> {
        let row: Option<i64> = self
            .conn()
            .query_row("SELECT 1 FROM sessions WHERE id = ?1", params![id], |r| r.get(0))
            .optional()?;
        Ok(row.is_some())
    }

    /// Records a heartbeat.
    pub fn heartbeat(&self, owner: &str, id: &str) -> Result<(), StateError> {
        self.execute_one(
            "UPDATE sessions SET last_heartbeat = ?1 WHERE id = ?2 AND owner = ?3",
            params![self.now(), id, owner],
            StateError::not_found("session", id),
        )
    }

    /// Marks a session finished (`sessions/{id}/finish`); finishing twice keeps the first reason.
    pub fn finish_session(&self, owner: &str, id: &str, reason: &str) -> Result<(), StateError> {
        let now = self.now();
        let conn = self.conn();
        let n = conn.execute(
            "UPDATE sessions SET finished_at = ?1, finish_reason = ?2 \
             WHERE id = ?3 AND owner = ?4 AND finished_at IS NULL",
            params![now, reason, id, owner],
        )?;
        if n == 0 {
            let exists: bool = conn.query_row(
                "SELECT EXISTS(SELECT 1 FROM sessions WHERE id = ?1 AND owner = ?2)",
                params![id, owner],
                |r| r.get(0),
            )?;
            if !exists {
                return Err(StateError::not_found("session", id));
            }
        }
        Ok(())
    }

    /// Session ids of `owner`, newest first, and the total count.
    pub fn list_session_ids(
        &self,
        owner: &str,
        offset: u64,
        limit: u64,
    ) -> Result<(Vec<String>, u64), StateError> {
        let (ids, total) = self.owned_page::<SessionId>(owner, offset, limit)?;
        Ok((ids.into_iter().map(|s| s.0).collect(), total))
    }

    /// Returns the counter `name` of a session and increments it (first call: 0).
    pub fn next_counter(&self, session_id: &str, name: &str) -> Result<u64, StateError> {
        let conn = self.conn();
        let v: Option<i64> = conn
            .query_row(
                "INSERT INTO session_counters (session_id, name, value) VALUES (?1, ?2, 1) \
                 ON CONFLICT (session_id, name) DO UPDATE SET value = value + 1 RETURNING value - 1",
                params![session_id, name],
                |r| r.get(0),
            )
            .optional()?;
        Ok(v.unwrap_or(0).max(0) as u64)
    }
}
