//! `tinker://` checkpoint paths, model and sampling-session ids, and the mapping of a checkpoint
//! to its directory under the save root, inside the owner's namespace and never outside it.

use std::fmt;
use std::path::{Component, Path, PathBuf};

use hmac::{KeyInit, Mac};

/// Scheme prefix of every checkpoint path.
pub const SCHEME: &str = "tinker://";
/// Longest accepted session or run id.
pub const MAX_ID_LEN: usize = 160;
/// Longest accepted checkpoint name.
pub const MAX_NAME_LEN: usize = 128;

/// Why a path or id was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("{what} `{value}` is invalid: {reason}")]
    Invalid { what: &'static str, value: String, reason: String },
    #[error("checkpoint path would leave the save directory: {0}")]
    Escapes(String),
}

fn invalid(what: &'static str, value: &str, reason: impl Into<String>) -> PathError {
    // Cap the echoed value: it comes from the request and ends up in logs and error bodies.
    let shown: String = value.chars().take(200).collect();
    PathError::Invalid { what, value: shown, reason: reason.into() }
}

/// The three kinds of checkpoints and their directory (`weights`, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CheckpointKind {
    /// `weights/`: LoRA weights plus optimizer state (`checkpoint_type` = `training`).
    Weights,
    /// `sampler_weights/`: weights only (`sampler`).
    SamplerWeights,
    /// `external_weights/`: HF-format export (`external`).
    ExternalWeights,
}

impl CheckpointKind {
    pub const ALL: [CheckpointKind; 3] =
        [CheckpointKind::Weights, CheckpointKind::SamplerWeights, CheckpointKind::ExternalWeights];

    /// The path segment and directory name.
    pub fn dir(self) -> &'static str {
        match self {
            CheckpointKind::Weights => "weights",
            CheckpointKind::SamplerWeights => "sampler_weights",
            CheckpointKind::ExternalWeights => "external_weights",
        }
    }

    /// The `checkpoint_type` of the REST API.
    pub fn checkpoint_type(self) -> &'static str {
        match self {
            CheckpointKind::Weights => "training",
            CheckpointKind::SamplerWeights => "sampler",
            CheckpointKind::ExternalWeights => "external",
        }
    }

    pub fn from_dir(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.dir() == s)
    }

    pub fn from_checkpoint_type(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.checkpoint_type() == s)
    }
}

fn check_chars(
    what: &'static str,
    value: &str,
    max: usize,
    allow_colon: bool,
) -> Result<(), PathError> {
    if value.is_empty() {
        return Err(invalid(what, value, "must not be empty"));
    }
    if value.len() > max {
        return Err(invalid(what, value, format!("longer than {max} bytes")));
    }
    if let Some(c) = value.chars().find(|&c| {
        !(c.is_ascii_alphanumeric()
            || c == '-'
            || c == '_'
            || c == '.'
            || (allow_colon && c == ':'))
    }) {
        let allowed = if allow_colon {
            "letters, digits, `-`, `_`, `.`, `:`"
        } else {
            "letters, digits, `-`, `_`, `.`"
        };
        return Err(invalid(
            what,
            value,
            format!("character {c:?} is not allowed (use {allowed})"),
        ));
    }
    // A leading dot covers `.` and `..` and hidden files; `..` anywhere is refused for clarity.
    if value.starts_with('.') || value.contains("..") {
        return Err(invalid(what, value, "must not start with `.` or contain `..`"));
    }
    Ok(())
}

/// Validates a session id chosen by the server (no `:` so model ids stay unambiguous).
pub fn validate_session_id(id: &str) -> Result<(), PathError> {
    check_chars("session id", id, MAX_ID_LEN, false)
}

/// Validates a training-run id (= model id).
pub fn validate_run_id(id: &str) -> Result<(), PathError> {
    check_chars("run id", id, MAX_ID_LEN, true)
}

/// Validates a checkpoint name.
pub fn validate_name(name: &str) -> Result<(), PathError> {
    check_chars("checkpoint name", name, MAX_NAME_LEN, false)
}

/// A parsed `tinker://{run_id}/{kind}/{name}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TinkerPath {
    pub run_id: String,
    pub kind: CheckpointKind,
    pub name: String,
}

impl TinkerPath {
    /// Builds a path from validated parts.
    pub fn new(run_id: &str, kind: CheckpointKind, name: &str) -> Result<Self, PathError> {
        validate_run_id(run_id)?;
        validate_name(name)?;
        Ok(TinkerPath { run_id: run_id.to_string(), kind, name: name.to_string() })
    }

    /// Parses `tinker://{run_id}/{weights|sampler_weights|external_weights}/{name}`.
    pub fn parse(s: &str) -> Result<Self, PathError> {
        let rest = s
            .strip_prefix(SCHEME)
            .ok_or_else(|| invalid("tinker path", s, "must start with tinker://"))?;
        let parts: Vec<&str> = rest.split('/').collect();
        let [run, kind, name] = parts[..] else {
            return Err(invalid(
                "tinker path",
                s,
                "must have exactly three parts: tinker://RUN/KIND/NAME",
            ));
        };
        let kind = CheckpointKind::from_dir(kind).ok_or_else(|| {
            invalid(
                "tinker path",
                s,
                "the middle part must be weights, sampler_weights or external_weights",
            )
        })?;
        TinkerPath::new(run, kind, name)
    }

    /// Parses a REST `checkpoint_id` (`weights/{name}`) of the given run.
    pub fn from_checkpoint_id(run_id: &str, checkpoint_id: &str) -> Result<Self, PathError> {
        let (kind, name) = checkpoint_id.split_once('/').ok_or_else(|| {
            invalid("checkpoint id", checkpoint_id, "must be KIND/NAME, e.g. weights/ckpt-1")
        })?;
        let kind = CheckpointKind::from_dir(kind).ok_or_else(|| {
            invalid(
                "checkpoint id",
                checkpoint_id,
                "kind must be weights, sampler_weights or external_weights",
            )
        })?;
        TinkerPath::new(run_id, kind, name)
    }

    /// `{kind}/{name}`, the REST checkpoint id.
    pub fn checkpoint_id(&self) -> String {
        format!("{}/{}", self.kind.dir(), self.name)
    }
}

impl fmt::Display for TinkerPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{SCHEME}{}/{}/{}", self.run_id, self.kind.dir(), self.name)
    }
}

/// A `{session_id}:{role}:{seq}` id: role `train` for models, `sample` for sampling sessions.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SessionScopedId {
    pub session_id: String,
    pub seq: u64,
}

fn parse_scoped(s: &str, role: &str, what: &'static str) -> Result<SessionScopedId, PathError> {
    let parts: Vec<&str> = s.split(':').collect();
    let [session, r, seq] = parts[..] else {
        return Err(invalid(what, s, format!("must look like SESSION:{role}:N")));
    };
    if r != role {
        return Err(invalid(what, s, format!("middle part must be `{role}`")));
    }
    validate_session_id(session)?;
    // Only plain decimal digits: no sign, no whitespace, no leading `+`.
    if seq.is_empty() || !seq.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid(what, s, "sequence number must be decimal digits"));
    }
    let seq = seq.parse::<u64>().map_err(|_| invalid(what, s, "sequence number is too large"))?;
    Ok(SessionScopedId { session_id: session.to_string(), seq })
}

/// Model / training-run id `{session_id}:train:{model_seq_id}`.
pub fn format_model_id(session_id: &str, model_seq_id: u64) -> String {
    format!("{session_id}:train:{model_seq_id}")
}

pub fn parse_model_id(s: &str) -> Result<SessionScopedId, PathError> {
    parse_scoped(s, "train", "model id")
}

/// Sampling session id `{session_id}:sample:{seq}`.
pub fn format_sampling_session_id(session_id: &str, seq: u64) -> String {
    format!("{session_id}:sample:{seq}")
}

pub fn parse_sampling_session_id(s: &str) -> Result<SessionScopedId, PathError> {
    parse_scoped(s, "sample", "sampling session id")
}

/// Keyed hash of an API key: lowercase hex of HMAC-SHA256(salt, key). Used as the owner key in the
/// state store and as the per-key directory name, so raw keys are stored nowhere.
pub fn owner_hash(salt: &[u8], api_key: &str) -> String {
    // HMAC accepts keys of any length (long keys are hashed first), so construction cannot fail;
    // the fallback only exists to keep this function total.
    let Ok(mut mac) = hmac::Hmac::<sha2::Sha256>::new_from_slice(salt) else {
        return String::new();
    };
    mac.update(api_key.as_bytes());
    let bytes = mac.finalize().into_bytes();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn check_owner_ns(owner_ns: &str) -> Result<(), PathError> {
    if owner_ns.len() != 64
        || !owner_ns.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(invalid(
            "owner namespace",
            owner_ns,
            "must be 64 lowercase hex digits (see owner_hash)",
        ));
    }
    Ok(())
}

/// Joins validated components under `root` and proves the result stays inside it: lexically (only
/// normal components) and, for the parts that already exist, after resolving symlinks.
fn join_inside(root: &Path, parts: &[&str]) -> Result<PathBuf, PathError> {
    let mut p = root.to_path_buf();
    for part in parts {
        let comp = Path::new(part);
        let mut comps = comp.components();
        match (comps.next(), comps.next()) {
            (Some(Component::Normal(_)), None) => p.push(part),
            _ => return Err(PathError::Escapes(format!("component {part:?}"))),
        }
    }
    // The deepest entry that exists (a dangling symlink counts: `symlink_metadata` does not follow
    // it) must resolve inside the root; one that cannot be resolved is refused.
    if let Ok(real_root) = root.canonicalize()
        && let Some(existing) = p.ancestors().find(|a| a.symlink_metadata().is_ok())
    {
        match existing.canonicalize() {
            Ok(real) if real.starts_with(&real_root) => {}
            _ => return Err(PathError::Escapes(p.display().to_string())),
        }
    }
    Ok(p)
}

/// `{root}/{owner_ns}/{run_id}`: the directory of one training run.
pub fn run_dir(root: &Path, owner_ns: &str, run_id: &str) -> Result<PathBuf, PathError> {
    check_owner_ns(owner_ns)?;
    validate_run_id(run_id)?;
    join_inside(root, &[owner_ns, run_id])
}

/// `{root}/{owner_ns}/{run_id}/{kind}/{name}`: the directory of one checkpoint.
pub fn checkpoint_dir(
    root: &Path,
    owner_ns: &str,
    path: &TinkerPath,
) -> Result<PathBuf, PathError> {
    check_owner_ns(owner_ns)?;
    // Re-validate: the fields are public and could have been built without `new`.
    validate_run_id(&path.run_id)?;
    validate_name(&path.name)?;
    join_inside(root, &[owner_ns, &path.run_id, path.kind.dir(), &path.name])
}
