//! The processor registry: which classes exist (a fixed list), the live processors of each owner
//! with their deadlines, and `create` / `call` / `heartbeat` / the expiry sweep.
//!
//! Ids are `pid:<32 hex>`; requests may name them with or without the `pid:` prefix (the Gen-1
//! client's heartbeat sends the prefix, which upstream never matched). A processor belongs to the
//! owner hash of its creator; other owners get 404, exactly as for an unknown id. Every call and
//! heartbeat moves the deadline `timeout` into the future; [`Registry::sweep`] drops expired ones.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Map, Value, json};

use super::Processor;
use super::dataloader::DataLoader;
use super::dataset::{Dataset, Tokenizers, poisoned};
use crate::protocol::twinkle::TwinkleError;
use crate::protocol::twinkle::wire::kwargs;

/// Env var: seconds a processor lives without a call or heartbeat (default 1800).
pub const TIMEOUT_ENV: &str = "TWINKLE_PROCESSOR_TIMEOUT";
/// Env var: most live processors per owner (default 64).
pub const MAX_PER_OWNER_ENV: &str = "TWINKLE_PROCESSOR_MAX_PER_OWNER";
/// Env var: most rows one dataset may load (default 1,000,000).
pub const MAX_ROWS_ENV: &str = "TWINKLE_PROCESSOR_MAX_ROWS";

/// The classes `create` accepts, as `processor_type.class_type`.
pub const CLASSES: [&str; 3] =
    ["dataset.Dataset", "dataloader.DataLoader", "processor.InputProcessor"];

/// Registry limits.
#[derive(Debug, Clone)]
pub struct Limits {
    pub timeout: Duration,
    pub max_per_owner: usize,
    pub max_rows: usize,
    /// Local dataset files must lie inside it (`None`: anywhere but the private directories;
    /// in-process tests only — the application always sets it).
    pub data_root: Option<std::path::PathBuf>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            timeout: Duration::from_secs(1800),
            max_per_owner: 64,
            max_rows: 1_000_000,
            data_root: None,
        }
    }
}

impl Limits {
    /// The defaults overridden by [`TIMEOUT_ENV`], [`MAX_PER_OWNER_ENV`], [`MAX_ROWS_ENV`].
    pub fn from_env() -> Self {
        let num = |k: &str| std::env::var(k).ok().and_then(|v| v.trim().parse::<f64>().ok());
        let d = Limits::default();
        Limits {
            timeout: num(TIMEOUT_ENV)
                .filter(|t| t.is_finite() && *t > 0.0)
                .map(Duration::from_secs_f64)
                .unwrap_or(d.timeout),
            max_per_owner: num(MAX_PER_OWNER_ENV)
                .filter(|n| *n >= 1.0)
                .map_or(d.max_per_owner, |n| n as usize),
            max_rows: num(MAX_ROWS_ENV).filter(|n| *n >= 1.0).map_or(d.max_rows, |n| n as usize),
            data_root: super::data::data_root(),
        }
    }
}

struct Entry {
    owner: String,
    deadline: Instant,
    obj: Arc<Mutex<Processor>>,
}

/// All live processors.
pub struct Registry {
    pub limits: Limits,
    entries: Mutex<HashMap<String, Entry>>,
    tokenizers: Tokenizers,
}

/// `pid:<id>` whatever form `raw` came in.
pub fn normalize_id(raw: &str) -> String {
    let raw = raw.trim();
    let bare = raw.strip_prefix("pid:").unwrap_or(raw);
    format!("pid:{bare}")
}

fn field<'a>(body: &'a Map<String, Value>, key: &str) -> Result<&'a str, TwinkleError> {
    body.get(key)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| TwinkleError::bad(format!("{key} is missing (a string)")))
}

impl Registry {
    pub fn new(limits: Limits) -> Self {
        Registry { limits, entries: Mutex::new(HashMap::new()), tokenizers: Tokenizers::default() }
    }

    /// The live processor `id` of `owner` (404 for unknown, expired or foreign ids), its
    /// deadline renewed.
    fn lookup(
        &self,
        owner: &str,
        id: &str,
        now: Instant,
    ) -> Result<Arc<Mutex<Processor>>, TwinkleError> {
        let mut map = self.entries.lock().map_err(|_| poisoned())?;
        match map.get_mut(id) {
            Some(e) if e.owner == owner && e.deadline > now => {
                e.deadline = now + self.limits.timeout;
                Ok(e.obj.clone())
            }
            _ => Err(TwinkleError::NotFound(format!(
                "processor {id} does not exist (never created by this token, or expired after {}s \
                 without a call or heartbeat)",
                self.limits.timeout.as_secs()
            ))),
        }
    }

    /// `create{processor_type, class_type, …kwargs}` → the new id.
    pub fn create(&self, owner: &str, body: &Map<String, Value>) -> Result<String, TwinkleError> {
        let ty = field(body, "processor_type")?;
        let class = field(body, "class_type")?;
        let kw = kwargs(body, &["processor_type", "class_type"]);
        let now = Instant::now();
        // Checked before the (possibly slow) construction and again when inserting.
        self.check_room(&*self.entries.lock().map_err(|_| poisoned())?, owner, now)?;
        let obj = match (ty, class) {
            ("dataset", "Dataset") => Processor::Dataset(Dataset::create(
                &kw,
                self.limits.max_rows,
                self.limits.data_root.as_deref(),
            )?),
            ("dataloader", "DataLoader") => {
                let raw = kw.get("dataset").and_then(Value::as_str).ok_or_else(|| {
                    TwinkleError::bad(
                        "DataLoader needs dataset: the processor id of a remote Dataset (\"pid:…\")",
                    )
                })?;
                let ds_id = normalize_id(raw);
                let ds = self.lookup(owner, &ds_id, now)?;
                if !matches!(&*ds.lock().map_err(|_| poisoned())?, Processor::Dataset(_)) {
                    return Err(TwinkleError::bad(format!("DataLoader: {ds_id} is not a Dataset")));
                }
                Processor::DataLoader(DataLoader::create(ds, ds_id, &kw)?)
            }
            ("processor", "InputProcessor") => {
                if let Some(side) = kw.get("padding_side").and_then(Value::as_str)
                    && side != "left"
                    && side != "right"
                {
                    return Err(TwinkleError::bad(format!(
                        "padding_side must be \"left\" or \"right\", got {side:?}"
                    )));
                }
                Processor::InputProcessor
            }
            _ => {
                let shown = |s: &str| s.chars().take(100).collect::<String>();
                return Err(TwinkleError::bad(format!(
                    "{}.{} is not available on this server; available: {}",
                    shown(ty),
                    shown(class),
                    CLASSES.join(", ")
                )));
            }
        };
        let id = normalize_id(&crate::ids::hex_id(""));
        let entry = Entry {
            owner: owner.to_string(),
            deadline: Instant::now() + self.limits.timeout,
            obj: Arc::new(Mutex::new(obj)),
        };
        let mut map = self.entries.lock().map_err(|_| poisoned())?;
        self.check_room(&map, owner, Instant::now())?;
        map.insert(id.clone(), entry);
        Ok(id)
    }

    /// 409 when `owner` already holds the most live processors allowed.
    fn check_room(
        &self,
        map: &HashMap<String, Entry>,
        owner: &str,
        now: Instant,
    ) -> Result<(), TwinkleError> {
        let live = map.values().filter(|e| e.owner == owner && e.deadline > now).count();
        if live >= self.limits.max_per_owner {
            return Err(TwinkleError::Conflict(format!(
                "this token already holds {live} processors (the limit is {}); let unused ones \
                 expire or reuse them",
                self.limits.max_per_owner
            )));
        }
        Ok(())
    }

    /// `call{processor_id, function, …kwargs}` → the method's result.
    pub fn call(&self, owner: &str, body: &Map<String, Value>) -> Result<Value, TwinkleError> {
        let id = normalize_id(field(body, "processor_id")?);
        let function = field(body, "function")?;
        let kw = kwargs(body, &["processor_id", "function"]);
        let obj = self.lookup(owner, &id, Instant::now())?;
        let mut guard = obj.lock().map_err(|_| poisoned())?;
        match &mut *guard {
            Processor::Dataset(d) => d.call(function, &kw, &self.tokenizers),
            Processor::DataLoader(l) => l.call(&id, function, &kw),
            Processor::InputProcessor => match function {
                "__call__" => Ok(kw.get("inputs").cloned().unwrap_or(Value::Null)),
                other => Err(TwinkleError::bad(format!(
                    "InputProcessor.{other} is not available on this server; available: __call__ \
                     (identity: the engine packs sequences without padding)"
                ))),
            },
        }
    }

    /// `heartbeat{processor_id: "pid:a,pid:b"}`: renews every listed processor of `owner`; 404
    /// naming the ids that are unknown or expired (the known ones are still renewed).
    pub fn heartbeat(&self, owner: &str, body: &Map<String, Value>) -> Result<Value, TwinkleError> {
        let list = field(body, "processor_id")?;
        let now = Instant::now();
        let mut missing = Vec::new();
        for raw in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let id = normalize_id(raw);
            if self.lookup(owner, &id, now).is_err() {
                missing.push(id);
            }
        }
        if !missing.is_empty() {
            return Err(TwinkleError::NotFound(format!(
                "processor(s) {} do not exist (never created by this token, or expired)",
                missing.join(", ")
            )));
        }
        Ok(json!({"status": "ok"}))
    }

    /// Drops processors whose deadline passed; returns how many.
    pub fn sweep(&self, now: Instant) -> usize {
        let Ok(mut map) = self.entries.lock() else { return 0 };
        let before = map.len();
        map.retain(|_, e| e.deadline > now);
        before - map.len()
    }

    /// Live processors (all owners).
    pub fn len(&self) -> usize {
        self.entries.lock().map(|m| m.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
