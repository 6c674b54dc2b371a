//! Model id resolution: turns a config's `model_id` into a local Hugging Face–layout directory,
//! downloading it from its hub when it is not cached (see [`resolve_or_download`]).
//!
//! Forms (hub ids take an optional `@revision` suffix: `ms://Org/Name@v1.0`, `hf://Org/Name@<sha>`):
//! * a local path (absolute or relative) that exists: used as-is;
//! * `ms://Org/Name`: the ModelScope caches: the layout both SDK generations read,
//!   `<root>/models/Org/Name___` with `.` in the name written as `___` (root `$MODELSCOPE_CACHE`,
//!   else `~/.cache/modelscope/hub`; the unescaped name and `<root>/Org/Name` are also tried), then
//!   the newer SDK's `models/Org--Name/snapshots/<revision>` (root `$MODELSCOPE_CACHE`, else
//!   `~/.cache/modelscope`);
//! * `hf://Org/Name`: the Hugging Face cache (`$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
//!   `~/.cache/huggingface/hub`), `models--Org--Name/snapshots/<commit>` where `<commit>` is named
//!   by `refs/<revision>` (`main` by default), is the revision itself, or is the only snapshot;
//! * a bare `Org/Name`: the ModelScope caches, then the Hugging Face cache; when in neither it is
//!   downloaded from ModelScope (the Python Twinkle's default hub);
//! * `generate://<preset>` (see [`generate`]): a small deterministic random model written into
//!   `$TWINKLE_HOME/models/generated/` (else `~/.cache/twinkle/models/generated/`) on first use.
//!
//! [`resolve_with`] only looks in the caches; [`resolve_or_download`] also downloads (unless
//! `TWINKLE_OFFLINE=1`, or `HF_HUB_OFFLINE=1` for the HF Hub).

pub mod download;
mod env;
pub mod generate;
pub mod id;
pub mod progress;

use std::path::{Path, PathBuf};

pub use download::{BarMode, DownloadError, FetchOptions, needs_download, resolve_or_download};
pub use env::{HfEnv, HubEnv, MsEnv};
use id::{Hub, ModelRef, RepoRef, parse_model_id, repo_parts};

/// Errors of model id resolution.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("model id is empty")]
    Empty,
    #[error(
        "model `{id}` was not found locally; looked in:\n  {}\nput the model in one of these directories, set model_id to a local path, or download it with `twinkle download`",
        .looked.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join("\n  ")
    )]
    NotFound { id: String, looked: Vec<PathBuf> },
    #[error(
        "model id `{0}` is not `Org/Name[@revision]` (expected ms://Org/Name, hf://Org/Name or a path)"
    )]
    BadRepoId(String),
    #[error("unknown generated model `{0}` (known: {known})", known = generate::PRESETS.join(", "))]
    UnknownPreset(String),
    #[error("cannot generate model into {path}: {detail}")]
    Generate { path: PathBuf, detail: String },
    #[error(transparent)]
    Download(#[from] DownloadError),
}

impl HubError {
    /// Whether trying again later may succeed: the network or the hub failed, not the id,
    /// the token or the bytes the hub serves.
    pub fn is_transient(&self) -> bool {
        match self {
            HubError::Download(DownloadError::Transport { .. }) => true,
            HubError::Download(DownloadError::Http { status, .. }) => {
                *status == 429 || *status >= 500
            }
            _ => false,
        }
    }
}

/// A model directory is usable when it has a `config.json` and, when it is sharded, every shard
/// its safetensors index names (so a half-copied directory is not taken for a model).
fn is_model_dir(p: &Path) -> bool {
    if !p.join("config.json").is_file() {
        return false;
    }
    let Ok(text) = std::fs::read_to_string(p.join("model.safetensors.index.json")) else {
        return true;
    };
    let Ok(index) = serde_json::from_str::<serde_json::Value>(&text) else {
        return false;
    };
    index["weight_map"]
        .as_object()
        .is_none_or(|m| m.values().filter_map(|v| v.as_str()).all(|f| p.join(f).is_file()))
}

/// ModelScope's directory name for a repo name: `.` becomes `___`.
pub(crate) fn ms_escape(name: &str) -> String {
    name.replace('.', "___")
}

fn modelscope_candidates(env: &HubEnv, org: &str, name: &str) -> Vec<PathBuf> {
    // The escaped directory is the real one; the plain name is (at most) a symlink to it.
    let mut names = vec![ms_escape(name)];
    if name.contains('.') {
        names.push(name.to_string());
    }
    let mut v = Vec::new();
    for root in env.modelscope_roots() {
        for n in &names {
            v.push(root.join("models").join(org).join(n));
            v.push(root.join(org).join(n));
        }
    }
    v
}

/// The revision a ModelScope old-layout directory records in `.mv` (`Revision:<rev>,…`).
fn ms_recorded_revision(dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(dir.join(".mv")).ok()?;
    let rev = text.trim().strip_prefix("Revision:")?.split(',').next()?;
    Some(rev.to_string())
}

/// The snapshot of a Hugging Face cache repo directory for `revision`: `refs/<revision>`, a
/// commit hash that is itself a snapshot, or (no revision asked) the only snapshot present.
fn hf_snapshot(repo: &Path, revision: Option<&str>) -> Option<PathBuf> {
    let snaps = repo.join("snapshots");
    let rev = revision.unwrap_or("main");
    if let Ok(commit) = std::fs::read_to_string(repo.join("refs").join(rev)) {
        let p = snaps.join(commit.trim());
        if is_model_dir(&p) {
            return Some(p);
        }
    }
    if revision.is_some() {
        let p = snaps.join(rev);
        return is_model_dir(&p).then_some(p);
    }
    let entries: Vec<PathBuf> = std::fs::read_dir(&snaps)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    match entries.as_slice() {
        [only] if is_model_dir(only) => Some(only.clone()),
        _ => None,
    }
}

fn hf_lookup(env: &HubEnv, repo: &RepoRef, looked: &mut Vec<PathBuf>) -> Option<PathBuf> {
    for root in env.hf_roots() {
        let dir = root.join(format!("models--{}--{}", repo.org, repo.name));
        if let Some(p) = hf_snapshot(&dir, repo.revision.as_deref()) {
            return Some(p);
        }
        looked.push(dir.join("snapshots"));
    }
    None
}

fn ms_lookup(env: &HubEnv, repo: &RepoRef, looked: &mut Vec<PathBuf>) -> Option<PathBuf> {
    let wanted = repo.revision.as_deref();
    for c in modelscope_candidates(env, &repo.org, &repo.name) {
        // The old layout has no revision dimension: a specific revision other than `master` is
        // only taken from a directory whose `.mv` records it.
        let rev_ok = match (wanted, ms_recorded_revision(&c)) {
            (None, _) => true,
            (Some(w), Some(r)) => w == r,
            (Some(w), None) => w == "master",
        };
        if rev_ok && is_model_dir(&c) {
            return Some(c);
        }
        looked.push(c);
    }
    let revs: Vec<&str> = match wanted {
        Some(r) => vec![r],
        None => vec!["master", "main"],
    };
    for root in env.modelscope_new_roots() {
        let snaps =
            root.join("models").join(format!("{}--{}", repo.org, repo.name)).join("snapshots");
        for r in &revs {
            let p = snaps.join(r);
            if is_model_dir(&p) {
                return Some(p);
            }
        }
        looked.push(snaps);
    }
    None
}

/// Looks `repo` up in the caches of `hub` (both, ModelScope first, when `hub` is `None`).
pub(crate) fn cached_repo(
    env: &HubEnv,
    hub: Option<Hub>,
    repo: &RepoRef,
    looked: &mut Vec<PathBuf>,
) -> Option<PathBuf> {
    match hub {
        Some(Hub::ModelScope) => ms_lookup(env, repo, looked),
        Some(Hub::HuggingFace) => hf_lookup(env, repo, looked),
        None => ms_lookup(env, repo, looked).or_else(|| hf_lookup(env, repo, looked)),
    }
}

/// Resolves `model_id` with the process environment (see [`resolve_with`]).
pub fn resolve(model_id: &str) -> Result<PathBuf, HubError> {
    resolve_with(model_id, &HubEnv::from_process())
}

/// Resolves `model_id` to a local model directory from the caches only (see the module docs for
/// the forms); nothing is downloaded.
pub fn resolve_with(model_id: &str, env: &HubEnv) -> Result<PathBuf, HubError> {
    let id = model_id.trim();
    let mut looked = Vec::new();
    match parse_model_id(id)? {
        ModelRef::Generate(preset) => generate::ensure_preset(&preset, &env.generated_root()),
        ModelRef::Local(p) if p.is_dir() => Ok(p),
        ModelRef::Local(p) => {
            looked.push(p);
            Err(HubError::NotFound { id: id.into(), looked })
        }
        ModelRef::Repo { hub, repo } => {
            if hub.is_none() {
                looked.push(PathBuf::from(id));
            }
            cached_repo(env, hub, &repo, &mut looked)
                .ok_or(HubError::NotFound { id: id.into(), looked })
        }
    }
}

/// A display name for `model_id`: `Org/Name` for hub ids, the directory name for paths.
pub fn display_name(model_id: &str) -> String {
    let id = model_id.trim();
    if let Some(rest) = id.strip_prefix("generate://") {
        return rest.to_string();
    }
    // Hub ids drop their `@revision`.
    for prefix in ["ms://", "hf://"] {
        if let Some(rest) = id.strip_prefix(prefix) {
            return rest.split('@').next().unwrap_or(rest).to_string();
        }
    }
    let repo = id.split('@').next().unwrap_or(id);
    if repo_parts(repo).is_some() && !Path::new(id).exists() {
        return repo.to_string();
    }
    Path::new(id)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| id.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_names() {
        assert_eq!(display_name("ms://Org/Name@v1"), "Org/Name");
    }
}
