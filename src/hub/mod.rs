//! Model id resolution: turns a config's `model_id` into a local Hugging Face–layout directory.
//!
//! Forms:
//! * a local path (absolute or relative) that exists: used as-is;
//! * `ms://Org/Name` and a bare `Org/Name`: the ModelScope cache (`$MODELSCOPE_CACHE`, else
//!   `~/.cache/modelscope/hub`), layouts `models/Org/Name` and `Org/Name`, with `.` in the name
//!   also tried as `___` (how ModelScope stores such names); a bare id also tries the Hugging
//!   Face cache;
//! * `hf://Org/Name`: the Hugging Face cache (`$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
//!   `~/.cache/huggingface/hub`), `models--Org--Name/snapshots/<rev>` where `<rev>` is named by
//!   `refs/main`, or is the only snapshot;
//! * `generate://<preset>` (see [`generate`]): a small deterministic random model written into
//!   `$TWINKLE_HOME/models/generated/` (else `~/.cache/twinkle/models/generated/`) on first use.
//!
//! Nothing is downloaded: a model that is not in any cache is an error listing every place looked.

pub mod generate;
pub mod progress;

use std::path::{Path, PathBuf};

/// Errors of model id resolution.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("model id is empty")]
    Empty,
    #[error(
        "model `{id}` was not found locally (downloading is not supported); looked in:\n  {}\nput the model in one of these directories or set model_id to a local path",
        .looked.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join("\n  ")
    )]
    NotFound { id: String, looked: Vec<PathBuf> },
    #[error("model id `{0}` is not `Org/Name` (expected ms://Org/Name, hf://Org/Name or a path)")]
    BadRepoId(String),
    #[error("unknown generated model `{0}` (known: {known})", known = generate::PRESETS.join(", "))]
    UnknownPreset(String),
    #[error("cannot generate model into {path}: {detail}")]
    Generate { path: PathBuf, detail: String },
}

/// The environment resolution reads, captured once so tests can pass their own.
#[derive(Debug, Clone, Default)]
pub struct HubEnv {
    pub home: Option<PathBuf>,
    pub modelscope_cache: Option<PathBuf>,
    pub hf_hub_cache: Option<PathBuf>,
    pub hf_home: Option<PathBuf>,
    pub twinkle_home: Option<PathBuf>,
}

fn env_path(name: &str) -> Option<PathBuf> {
    std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from)
}

impl HubEnv {
    /// Reads `HOME`, `MODELSCOPE_CACHE`, `HF_HUB_CACHE`, `HF_HOME` and `TWINKLE_HOME`.
    pub fn from_process() -> Self {
        HubEnv {
            home: env_path("HOME"),
            modelscope_cache: env_path("MODELSCOPE_CACHE"),
            hf_hub_cache: env_path("HF_HUB_CACHE"),
            hf_home: env_path("HF_HOME"),
            twinkle_home: env_path("TWINKLE_HOME"),
        }
    }

    /// ModelScope cache roots, in lookup order.
    pub fn modelscope_roots(&self) -> Vec<PathBuf> {
        let mut v = Vec::new();
        v.extend(self.modelscope_cache.clone());
        v.extend(self.home.as_ref().map(|h| h.join(".cache/modelscope/hub")));
        v.dedup();
        v
    }

    /// Hugging Face hub cache roots, in lookup order.
    pub fn hf_roots(&self) -> Vec<PathBuf> {
        let mut v = Vec::new();
        v.extend(self.hf_hub_cache.clone());
        v.extend(self.hf_home.as_ref().map(|h| h.join("hub")));
        v.extend(self.home.as_ref().map(|h| h.join(".cache/huggingface/hub")));
        v.dedup();
        v
    }

    /// Where generated models are cached.
    pub fn generated_root(&self) -> PathBuf {
        match (&self.twinkle_home, &self.home) {
            (Some(t), _) => t.join("models/generated"),
            (None, Some(h)) => h.join(".cache/twinkle/models/generated"),
            (None, None) => PathBuf::from(".twinkle/models/generated"),
        }
    }
}

/// A model directory is usable when it has a `config.json`.
fn is_model_dir(p: &Path) -> bool {
    p.join("config.json").is_file()
}

/// Splits `Org/Name` (exactly two non-empty parts).
fn repo_parts(id: &str) -> Option<(&str, &str)> {
    let (org, name) = id.split_once('/')?;
    (!org.is_empty() && !name.is_empty() && !name.contains('/')).then_some((org, name))
}

fn modelscope_candidates(env: &HubEnv, org: &str, name: &str) -> Vec<PathBuf> {
    let mut names = vec![name.to_string()];
    if name.contains('.') {
        names.push(name.replace('.', "___"));
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

/// The snapshot of a Hugging Face cache repo directory: the one `refs/main` names, else the
/// only one present.
fn hf_snapshot(repo: &Path) -> Option<PathBuf> {
    let snaps = repo.join("snapshots");
    if let Ok(rev) = std::fs::read_to_string(repo.join("refs/main")) {
        let p = snaps.join(rev.trim());
        if is_model_dir(&p) {
            return Some(p);
        }
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

fn hf_lookup(env: &HubEnv, org: &str, name: &str, looked: &mut Vec<PathBuf>) -> Option<PathBuf> {
    for root in env.hf_roots() {
        let repo = root.join(format!("models--{org}--{name}"));
        if let Some(p) = hf_snapshot(&repo) {
            return Some(p);
        }
        looked.push(repo.join("snapshots"));
    }
    None
}

fn ms_lookup(env: &HubEnv, org: &str, name: &str, looked: &mut Vec<PathBuf>) -> Option<PathBuf> {
    for c in modelscope_candidates(env, org, name) {
        if is_model_dir(&c) {
            return Some(c);
        }
        looked.push(c);
    }
    None
}

/// Resolves `model_id` with the process environment (see [`resolve_with`]).
pub fn resolve(model_id: &str) -> Result<PathBuf, HubError> {
    resolve_with(model_id, &HubEnv::from_process())
}

/// Resolves `model_id` to a local model directory (see the module docs for the forms).
pub fn resolve_with(model_id: &str, env: &HubEnv) -> Result<PathBuf, HubError> {
    let id = model_id.trim();
    if id.is_empty() {
        return Err(HubError::Empty);
    }
    if let Some(preset) = id.strip_prefix("generate://") {
        return generate::ensure_preset(preset, &env.generated_root());
    }
    let mut looked = Vec::new();
    if let Some(repo) = id.strip_prefix("ms://") {
        let (org, name) = repo_parts(repo).ok_or_else(|| HubError::BadRepoId(id.into()))?;
        return ms_lookup(env, org, name, &mut looked)
            .ok_or(HubError::NotFound { id: id.into(), looked });
    }
    if let Some(repo) = id.strip_prefix("hf://") {
        let (org, name) = repo_parts(repo).ok_or_else(|| HubError::BadRepoId(id.into()))?;
        return hf_lookup(env, org, name, &mut looked)
            .ok_or(HubError::NotFound { id: id.into(), looked });
    }
    let local = Path::new(id);
    if local.is_dir() {
        return Ok(local.to_path_buf());
    }
    looked.push(local.to_path_buf());
    // A bare `Org/Name` that is not a local directory is a hub id: ModelScope first (the
    // project's default hub), then the Hugging Face cache.
    if !local.is_absolute()
        && let Some((org, name)) = repo_parts(id)
    {
        if let Some(p) = ms_lookup(env, org, name, &mut looked) {
            return Ok(p);
        }
        if let Some(p) = hf_lookup(env, org, name, &mut looked) {
            return Ok(p);
        }
    }
    Err(HubError::NotFound { id: id.into(), looked })
}

/// A display name for `model_id`: `Org/Name` for hub ids, the directory name for paths.
pub fn display_name(model_id: &str) -> String {
    let id = model_id.trim();
    for prefix in ["ms://", "hf://", "generate://"] {
        if let Some(rest) = id.strip_prefix(prefix) {
            return rest.to_string();
        }
    }
    if repo_parts(id).is_some() && !Path::new(id).exists() {
        return id.to_string();
    }
    Path::new(id)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| id.to_string())
}
