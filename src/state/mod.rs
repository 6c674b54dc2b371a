//! Durable state store: sessions, training runs, checkpoints, sampling sessions, futures and their
//! results, in SQLite (WAL for files, a private in-memory database for `persistence.mode: memory`).
//! One connection behind a mutex serves every thread; each method is one short transaction.
//! Owners are keyed hashes of API keys (`protocol::tinker::paths::owner_hash`), never raw keys, and
//! a row owned by another key reads as NotFound so existence does not leak.
//! Methods block (briefly) on SQLite: async handlers should call them through `spawn_blocking`
//! (or `web::block`), at least those that write or read result blobs. The store records futures
//! durably but does not wake long-polls; the dispatcher signals waiters in memory.

/// A stored record reads what it was created from through `Deref` (`rec.id` for
/// `rec.spec.id`), so callers see one flat record while the store keeps the two parts apart.
macro_rules! record_deref {
    ($record:ty => $spec:ty) => {
        impl std::ops::Deref for $record {
            type Target = $spec;
            fn deref(&self) -> &$spec {
                &self.spec
            }
        }
    };
}
use record_deref;

mod futures;
mod runs;
mod sampling;
mod sessions;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, Params, Row, params};

use crate::config::schema::{Persistence, PersistenceMode};

pub use futures::{FailureCategory, FutureRecord, FutureStatus, NewFuture, UNFINISHED_AT_STARTUP};
pub use runs::{CheckpointRecord, CheckpointType, LoraSettings, NewCheckpoint, NewRun, RunRecord};
pub use sampling::{NewSamplingSession, SamplingSessionRecord};
pub use sessions::{NewSession, SessionRecord};

/// Schema version stored in `PRAGMA user_version`.
pub const SCHEMA_VERSION: i64 = 1;

/// Errors of the state layer.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot open state database {path}: {source}")]
    Open { path: String, source: rusqlite::Error },
    #[error("cannot create the directory of state database {path}: {source}")]
    CreateDir { path: String, source: std::io::Error },
    #[error("state database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("state database has schema version {found}; this build supports version {supported}")]
    SchemaVersion { found: i64, supported: i64 },
    #[error("persistence mode `{0}` is not supported by this build (use memory or file)")]
    UnsupportedMode(String),
    #[error("persistence.file_path is required when persistence.mode is file")]
    MissingFilePath,
    #[error("{what} `{id}` not found")]
    NotFound { what: &'static str, id: String },
    #[error("{what} `{id}` already exists")]
    AlreadyExists { what: &'static str, id: String },
    #[error("{0}")]
    Conflict(String),
    #[error("stored {what} is corrupt: {reason}")]
    Corrupt { what: &'static str, reason: String },
}

impl StateError {
    pub(crate) fn not_found(what: &'static str, id: &str) -> Self {
        StateError::NotFound { what, id: id.to_string() }
    }
}

/// Milliseconds since the Unix epoch.
pub type Clock = Arc<dyn Fn() -> i64 + Send + Sync>;

fn system_clock() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// The state store. Cheap to share behind an `Arc`; all methods take `&self`.
pub struct Store {
    conn: Mutex<Connection>,
    clock: Clock,
    location: String,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("location", &self.location).finish()
    }
}

impl Store {
    /// A private in-memory database (lost when the process exits).
    pub fn open_memory() -> Result<Self, StateError> {
        let conn = Connection::open_in_memory()
            .map_err(|source| StateError::Open { path: ":memory:".into(), source })?;
        Self::init(conn, ":memory:".into())
    }

    /// A database file (created with its parent directories when missing), in WAL mode.
    pub fn open_file(path: &Path) -> Result<Self, StateError> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            crate::private_fs::create_dir_all(parent).map_err(|source| StateError::CreateDir {
                path: path.display().to_string(),
                source,
            })?;
        }
        // The database holds every caller's sessions and runs: 0600 whatever the umask. SQLite
        // creates `-wal`/`-shm` with the database file's mode; older ones are fixed here too.
        let create = |source| StateError::CreateDir { path: path.display().to_string(), source };
        if !path.exists() {
            match crate::private_fs::open_write(path, true) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(create(e)),
            }
        }
        for suffix in ["", "-wal", "-shm"] {
            let mut p = path.as_os_str().to_owned();
            p.push(suffix);
            crate::private_fs::restrict_file(Path::new(&p)).map_err(create)?;
        }
        let open_err = |source| StateError::Open { path: path.display().to_string(), source };
        let conn = Connection::open(path).map_err(open_err)?;
        conn.busy_timeout(std::time::Duration::from_secs(5)).map_err(open_err)?;
        let mode: String =
            conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0)).map_err(open_err)?;
        if !mode.eq_ignore_ascii_case("wal") {
            tracing::warn!(path = %path.display(), mode, "state database is not in WAL mode");
        }
        // NORMAL is durable across process crashes in WAL mode; only an OS crash or power loss
        // can drop the last transactions.
        conn.pragma_update(None, "synchronous", "NORMAL").map_err(open_err)?;
        Self::init(conn, path.display().to_string())
    }

    /// Opens the store described by the `persistence` section of the server config.
    pub fn from_config(p: &Persistence) -> Result<Self, StateError> {
        match p.mode {
            PersistenceMode::Memory => Self::open_memory(),
            PersistenceMode::File => match &p.file_path {
                Some(f) => Self::open_file(&PathBuf::from(f)),
                None => Err(StateError::MissingFilePath),
            },
            PersistenceMode::Redis => Err(StateError::UnsupportedMode("redis".into())),
        }
    }

    /// Replaces the clock (tests use a fixed or stepping clock).
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    fn init(conn: Connection, location: String) -> Result<Self, StateError> {
        let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        match version {
            0 => {
                conn.execute_batch(SCHEMA)?;
                conn.pragma_update(None, "user_version", SCHEMA_VERSION)?;
            }
            SCHEMA_VERSION => {}
            found => return Err(StateError::SchemaVersion { found, supported: SCHEMA_VERSION }),
        }
        Ok(Store { conn: Mutex::new(conn), clock: Arc::new(system_clock), location })
    }

    /// Where the database lives (`:memory:` or the file path).
    pub fn location(&self) -> &str {
        &self.location
    }

    pub(crate) fn now(&self) -> i64 {
        (self.clock)()
    }

    pub(crate) fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite half-written (an open transaction is
        // rolled back when dropped), so a poisoned lock is safe to reuse.
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs a statement that must change a row; when none changed, `unchanged`: an
    /// `INSERT OR IGNORE` whose key exists (`AlreadyExists`), an `UPDATE … AND owner = ?` of a
    /// row that is absent or someone else's (`NotFound`: the two read the same).
    pub(crate) fn execute_one(
        &self,
        sql: &str,
        params: impl Params,
        unchanged: StateError,
    ) -> Result<(), StateError> {
        match self.conn().execute(sql, params)? {
            0 => Err(unchanged),
            _ => Ok(()),
        }
    }
}

/// The one text column of every row `sql` selects, in its order.
pub(crate) fn strings(
    conn: &Connection,
    sql: &str,
    params: impl Params,
) -> Result<Vec<String>, StateError> {
    let mut stmt = conn.prepare(sql)?;
    let rows = stmt.query_map(params, |r| r.get(0))?.collect::<Result<Vec<String>, _>>()?;
    Ok(rows)
}

/// A record kept as one row of `TABLE`; `from_row` reads the columns `COLUMNS` names, in that
/// order, and decodes the JSON and enum columns (a bad one is `Corrupt`, not a SQLite error).
pub(crate) trait FromRow: Sized {
    const TABLE: &'static str;
    const COLUMNS: &'static str;
    fn from_row(r: &Row<'_>) -> Result<Self, StateError>;
}

/// The records of `T::TABLE` that `filter` (`WHERE …`, `ORDER BY …`) selects, in its order.
/// Takes a `Connection` so that a transaction (which derefs to one) can use it too.
pub(crate) fn select<T: FromRow>(
    conn: &Connection,
    filter: &str,
    params: impl Params,
) -> Result<Vec<T>, StateError> {
    let mut stmt = conn.prepare(&format!("SELECT {} FROM {} {filter}", T::COLUMNS, T::TABLE))?;
    let mut rows = stmt.query(params)?;
    let mut out = Vec::new();
    while let Some(r) = rows.next()? {
        out.push(T::from_row(r)?);
    }
    Ok(out)
}

/// The first record `filter` (which must not have its own `LIMIT`) selects, if any.
pub(crate) fn select_first<T: FromRow>(
    conn: &Connection,
    filter: &str,
    params: impl Params,
) -> Result<Option<T>, StateError> {
    Ok(select(conn, &format!("{filter} LIMIT 1"), params)?.into_iter().next())
}

/// The filter of a paged list: `owner`'s rows (`?1`), newest first, `LIMIT ?2 OFFSET ?3`.
const NEWEST_PAGE: &str =
    "WHERE owner = ?1 ORDER BY created_at DESC, rowid DESC LIMIT ?2 OFFSET ?3";

impl Store {
    /// The record `id` of `owner`; absent or another owner's is NotFound (`what` names it).
    pub(crate) fn owned_by<T: FromRow>(
        &self,
        what: &'static str,
        owner: &str,
        id: &str,
    ) -> Result<T, StateError> {
        select_first(&self.conn(), "WHERE id = ?1 AND owner = ?2", params![id, owner])?
            .ok_or_else(|| StateError::not_found(what, id))
    }

    /// One page of `owner`'s records (see [`NEWEST_PAGE`]) and how many they have in all.
    pub(crate) fn owned_page<T: FromRow>(
        &self,
        owner: &str,
        offset: u64,
        limit: u64,
    ) -> Result<(Vec<T>, u64), StateError> {
        let conn = self.conn();
        let total = count_owned(&conn, T::TABLE, owner)?;
        let page = select(&conn, NEWEST_PAGE, params![owner, to_i64(limit), to_i64(offset)])?;
        Ok((page, total))
    }
}

/// How many rows of `table` belong to `owner`.
fn count_owned(conn: &Connection, table: &str, owner: &str) -> Result<u64, StateError> {
    let n: i64 =
        conn.query_row(&format!("SELECT COUNT(*) FROM {table} WHERE owner = ?1"), [owner], |r| {
            r.get(0)
        })?;
    Ok(n.max(0) as u64)
}

pub(crate) fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

pub(crate) fn json_text(v: &serde_json::Value) -> String {
    v.to_string()
}

pub(crate) fn parse_json(
    what: &'static str,
    s: Option<String>,
) -> Result<serde_json::Value, StateError> {
    match s {
        None => Ok(serde_json::Value::Null),
        Some(s) => serde_json::from_str(&s)
            .map_err(|e| StateError::Corrupt { what, reason: e.to_string() }),
    }
}

const SCHEMA: &str = "
CREATE TABLE sessions (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    tags TEXT NOT NULL,
    user_metadata TEXT NOT NULL,
    sdk_version TEXT,
    project_id TEXT,
    display_name TEXT,
    created_at INTEGER NOT NULL,
    last_heartbeat INTEGER NOT NULL,
    finished_at INTEGER,
    finish_reason TEXT
);
CREATE INDEX sessions_owner ON sessions(owner, created_at);
CREATE TABLE session_counters (
    session_id TEXT NOT NULL,
    name TEXT NOT NULL,
    value INTEGER NOT NULL,
    PRIMARY KEY (session_id, name)
);
CREATE TABLE runs (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    session_id TEXT NOT NULL,
    base_model TEXT NOT NULL,
    lora_rank INTEGER NOT NULL,
    seed INTEGER,
    train_unembed INTEGER NOT NULL,
    train_mlp INTEGER NOT NULL,
    train_attn INTEGER NOT NULL,
    optimizer_config TEXT,
    user_metadata TEXT,
    created_at INTEGER NOT NULL,
    last_request_time INTEGER NOT NULL,
    last_checkpoint TEXT,
    last_sampler_checkpoint TEXT,
    corrupted INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX runs_owner ON runs(owner, created_at);
CREATE INDEX runs_session ON runs(session_id);
CREATE TABLE checkpoints (
    run_id TEXT NOT NULL,
    checkpoint_id TEXT NOT NULL,
    owner TEXT NOT NULL,
    checkpoint_type TEXT NOT NULL,
    tinker_path TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    size_bytes INTEGER,
    user_metadata TEXT,
    expires_at INTEGER,
    public INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (run_id, checkpoint_id)
);
CREATE INDEX checkpoints_owner ON checkpoints(owner, created_at);
CREATE TABLE sampling_sessions (
    id TEXT PRIMARY KEY,
    session_id TEXT NOT NULL,
    owner TEXT NOT NULL,
    seq INTEGER NOT NULL,
    base_model TEXT NOT NULL,
    model_path TEXT,
    created_at INTEGER NOT NULL,
    UNIQUE (session_id, seq)
);
CREATE TABLE futures (
    request_id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    model_id TEXT,
    seq_id INTEGER,
    kind TEXT NOT NULL,
    status TEXT NOT NULL,
    sample_sequence_ids TEXT,
    result BLOB,
    content_type TEXT,
    error TEXT,
    category TEXT,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    UNIQUE (model_id, seq_id)
);
CREATE INDEX futures_status ON futures(status);
";
