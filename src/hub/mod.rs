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
pub mod generate;
pub mod id;
pub mod progress;

use std::path::{Path, PathBuf};

pub use download::{BarMode, DownloadError, FetchOptions, needs_download, resolve_or_download};
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

/// The environment resolution and downloading read, captured once so tests can pass their own.
#[derive(Debug, Clone, Default)]
pub struct HubEnv {
    pub home: Option<PathBuf>,
    pub modelscope_cache: Option<PathBuf>,
    pub hf_hub_cache: Option<PathBuf>,
    pub hf_home: Option<PathBuf>,
    pub twinkle_home: Option<PathBuf>,
    /// `HF_ENDPOINT` (default `https://huggingface.co`).
    pub hf_endpoint: Option<String>,
    /// `HF_TOKEN`, `HUGGING_FACE_HUB_TOKEN`, else the token file (`HF_TOKEN_PATH`, `$HF_HOME/token`).
    pub hf_token: Option<String>,
    /// `HF_HUB_OFFLINE` (or `TRANSFORMERS_OFFLINE`) is true.
    pub hf_offline: bool,
    /// `MODELSCOPE_ENDPOINT` (a full URL).
    pub ms_endpoint: Option<String>,
    /// `MODELSCOPE_DOMAIN` (deprecated; `https://` is added when it has no scheme).
    pub ms_domain: Option<String>,
    /// `MODELSCOPE_API_TOKEN`.
    pub ms_token: Option<String>,
    /// `TWINKLE_OFFLINE` is true: no hub is contacted.
    pub twinkle_offline: bool,
}

fn env_path(name: &str) -> Option<PathBuf> {
    std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from)
}

fn env_string(name: &str) -> Option<String> {
    std::env::var(name).ok().map(|v| v.trim().to_string()).filter(|v| !v.is_empty())
}

/// huggingface_hub's truthy values (`1`, `ON`, `YES`, `TRUE`, any case).
fn env_flag(name: &str) -> bool {
    env_string(name)
        .is_some_and(|v| matches!(v.to_ascii_uppercase().as_str(), "1" | "ON" | "YES" | "TRUE"))
}

impl HubEnv {
    /// Reads `HOME`, the cache variables, `TWINKLE_HOME`, and the hubs' endpoint, token and
    /// offline variables (see the field docs).
    pub fn from_process() -> Self {
        let home = env_path("HOME");
        // huggingface_hub: HF_HOME, else $XDG_CACHE_HOME/huggingface, else ~/.cache/huggingface.
        let hf_home = env_path("HF_HOME")
            .or_else(|| env_path("XDG_CACHE_HOME").map(|x| x.join("huggingface")));
        let token_file = env_path("HF_TOKEN_PATH").or_else(|| {
            let base =
                hf_home.clone().or_else(|| home.as_ref().map(|h| h.join(".cache/huggingface")));
            base.map(|b| b.join("token"))
        });
        let hf_token =
            env_string("HF_TOKEN").or_else(|| env_string("HUGGING_FACE_HUB_TOKEN")).or_else(|| {
                let t = std::fs::read_to_string(token_file?).ok()?;
                Some(t.trim().to_string()).filter(|t| !t.is_empty())
            });
        HubEnv {
            home,
            modelscope_cache: env_path("MODELSCOPE_CACHE"),
            hf_hub_cache: env_path("HF_HUB_CACHE").or_else(|| env_path("HUGGINGFACE_HUB_CACHE")),
            hf_home,
            twinkle_home: env_path("TWINKLE_HOME"),
            hf_endpoint: env_string("HF_ENDPOINT"),
            hf_token,
            hf_offline: env_flag("HF_HUB_OFFLINE") || env_flag("TRANSFORMERS_OFFLINE"),
            ms_endpoint: env_string("MODELSCOPE_ENDPOINT"),
            ms_domain: env_string("MODELSCOPE_DOMAIN"),
            ms_token: env_string("MODELSCOPE_API_TOKEN"),
            twinkle_offline: env_flag("TWINKLE_OFFLINE"),
        }
    }

    /// ModelScope cache roots of the layout both SDK generations read (`models/Org/Name___`),
    /// in lookup order; the first is where downloads go.
    pub fn modelscope_roots(&self) -> Vec<PathBuf> {
        let mut v = Vec::new();
        v.extend(self.modelscope_cache.clone());
        v.extend(self.home.as_ref().map(|h| h.join(".cache/modelscope/hub")));
        v.dedup();
        v
    }

    /// Roots of the newer ModelScope SDK's layout (`models/Org--Name/snapshots/<rev>`).
    pub fn modelscope_new_roots(&self) -> Vec<PathBuf> {
        let mut v = Vec::new();
        v.extend(self.modelscope_cache.clone());
        v.extend(self.home.as_ref().map(|h| h.join(".cache/modelscope")));
        v.dedup();
        v
    }

    /// Hugging Face hub cache roots, in lookup order; the first is where downloads go.
    pub fn hf_roots(&self) -> Vec<PathBuf> {
        let mut v = Vec::new();
        v.extend(self.hf_hub_cache.clone());
        v.extend(self.hf_home.as_ref().map(|h| h.join("hub")));
        v.extend(self.home.as_ref().map(|h| h.join(".cache/huggingface/hub")));
        v.dedup();
        v
    }

    /// The HF Hub base URL, without a trailing `/`.
    pub fn hf_endpoint_url(&self) -> String {
        self.hf_endpoint
            .as_deref()
            .unwrap_or("https://huggingface.co")
            .trim_end_matches('/')
            .to_string()
    }

    /// The ModelScope base URL: `MODELSCOPE_ENDPOINT`, else `MODELSCOPE_DOMAIN` (scheme optional),
    /// else `https://modelscope.cn`, as the current SDK picks it.
    pub fn ms_endpoint_url(&self) -> String {
        let url = match (&self.ms_endpoint, &self.ms_domain) {
            (Some(e), _) => e.clone(),
            (None, Some(d)) if d.contains("://") => d.clone(),
            (None, Some(d)) => format!("https://{d}"),
            (None, None) => "https://modelscope.cn".into(),
        };
        url.trim_end_matches('/').to_string()
    }

    /// Whether downloads from `hub` are forbidden.
    pub fn offline(&self, hub: Hub) -> bool {
        self.twinkle_offline || (hub == Hub::HuggingFace && self.hf_offline)
    }

    /// The variable that made `hub` offline (for error messages).
    pub fn offline_var(&self, hub: Hub) -> &'static str {
        if self.twinkle_offline || hub == Hub::ModelScope {
            "TWINKLE_OFFLINE=1"
        } else {
            "HF_HUB_OFFLINE=1"
        }
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
    fn endpoints_follow_the_sdks_precedence() {
        let e = HubEnv::default();
        assert_eq!(e.hf_endpoint_url(), "https://huggingface.co");
        assert_eq!(e.ms_endpoint_url(), "https://modelscope.cn");
        let e = HubEnv {
            hf_endpoint: Some("http://m:1/".into()),
            ms_domain: Some("www.x.cn".into()),
            ..e
        };
        assert_eq!(e.hf_endpoint_url(), "http://m:1");
        assert_eq!(e.ms_endpoint_url(), "https://www.x.cn");
        let e = HubEnv { ms_domain: Some("http://d".into()), ..e };
        assert_eq!(e.ms_endpoint_url(), "http://d");
        let e = HubEnv { ms_endpoint: Some("http://ep/".into()), ..e };
        assert_eq!(e.ms_endpoint_url(), "http://ep");
        assert!(!e.offline(Hub::HuggingFace));
        let e = HubEnv { hf_offline: true, ..e };
        assert!(e.offline(Hub::HuggingFace) && !e.offline(Hub::ModelScope));
        let e = HubEnv { twinkle_offline: true, ..e };
        assert!(e.offline(Hub::ModelScope));
        assert_eq!(display_name("ms://Org/Name@v1"), "Org/Name");
    }
}
