//! Downloading models from ModelScope (`ms://`) and the Hugging Face Hub (`hf://`) into the
//! official caches' layouts, so the Python clients reuse our downloads and we reuse theirs.
//!
//! Only what the engine loads is fetched (config, tokenizer and chat-template files, safetensors
//! shards and their index; other weight formats and subfolders are skipped) unless `--include`
//! globs say otherwise. Every file is verified (sha256, or the git blob sha1 HF gives for small
//! files), resumed with HTTP `Range` after a dropped connection, and renamed into place only once
//! complete. `config.json` is placed last, so a directory with a `config.json` is a finished one.
//! A lock file per model makes concurrent downloads of one model share a single transfer.

mod bar;
mod fetch;
mod hf;
mod http;
mod lock;
mod ms;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use globset::{Glob, GlobSet, GlobSetBuilder};

use super::id::{Hub, ModelRef, RepoRef, parse_model_id};
use super::progress::DownloadProgress;
use super::{HubEnv, HubError, cached_repo, resolve_with};

/// How download progress is shown.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum BarMode {
    /// Bars when stderr is a terminal, periodic log lines otherwise.
    #[default]
    Auto,
    /// indicatif bars on stderr (total and current file).
    Bars,
    /// A `tracing::info!` line every few seconds.
    Lines,
    /// Nothing but the shared counters.
    Off,
}

/// Options of [`resolve_or_download`].
#[derive(Debug, Clone, Default)]
pub struct FetchOptions {
    /// The revision (branch, tag or commit); also given as `model_id@revision`.
    pub revision: Option<String>,
    /// Globs over repo paths; when given, exactly the matching files are fetched (and the cache
    /// is consulted file by file instead of short-cutting on a complete model).
    pub include: Vec<String>,
    /// Counters the status report reads while the download runs.
    pub progress: Option<Arc<DownloadProgress>>,
    pub bar: BarMode,
}

/// Errors of downloading (wrapped in [`HubError::Download`]).
#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    #[error("{hub}: access to `{id}` (revision `{revision}`) was refused (HTTP {status}): {hint}")]
    Unauthorized { hub: String, id: String, revision: String, status: u16, hint: String },
    #[error("{hub}: repository `{id}` does not exist (asked for revision `{revision}`)")]
    RepoNotFound { hub: String, id: String, revision: String },
    #[error("{hub}: repository `{id}` has no revision `{revision}`")]
    RevisionNotFound { hub: String, id: String, revision: String },
    #[error(
        "model `{id}` is not in the cache and {var} forbids downloading it from {hub}; looked in:\n  {}",
        .looked.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join("\n  ")
    )]
    Offline { id: String, hub: String, var: String, looked: Vec<PathBuf> },
    #[error("{hub}: `{id}` at revision `{revision}` has no file to fetch ({detail})")]
    NoFiles { hub: String, id: String, revision: String, detail: String },
    #[error("HTTP {status} from {url}: {message}")]
    Http { url: String, status: u16, message: String },
    #[error("network error with {url}: {detail}")]
    Transport { url: String, detail: String },
    #[error("unexpected answer from {url}: {detail}")]
    Protocol { url: String, detail: String },
    #[error("`{file}` downloaded from {url} failed verification ({detail}); it was not kept")]
    Integrity { file: String, url: String, detail: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("bad include pattern `{pattern}`: {detail}")]
    BadGlob { pattern: String, detail: String },
    #[error(
        "two revisions asked for `{id}`: `{in_id}` in the model id and `{option}` as an option"
    )]
    RevisionConflict { id: String, in_id: String, option: String },
}

pub(crate) fn io_err(path: &Path, source: std::io::Error) -> DownloadError {
    DownloadError::Io { path: path.to_path_buf(), source }
}

/// Which repo files a download takes.
pub(crate) struct Selection {
    globs: Option<GlobSet>,
}

impl Selection {
    fn new(include: &[String]) -> Result<Self, DownloadError> {
        if include.is_empty() {
            return Ok(Selection { globs: None });
        }
        let mut b = GlobSetBuilder::new();
        for p in include {
            let g = Glob::new(p).map_err(|e| DownloadError::BadGlob {
                pattern: p.clone(),
                detail: e.to_string(),
            })?;
            b.add(g);
        }
        let set = b.build().map_err(|e| DownloadError::BadGlob {
            pattern: include.join(" "),
            detail: e.to_string(),
        })?;
        Ok(Selection { globs: Some(set) })
    }

    fn is_default(&self) -> bool {
        self.globs.is_none()
    }

    /// Whether `path` is fetched; `all` is the repo's file list (to see whether it is sharded).
    pub(crate) fn wants(&self, path: &str, all: &[&str]) -> bool {
        match &self.globs {
            Some(g) => g.is_match(path),
            None => engine_file(path, all),
        }
    }

    /// A short description for "nothing to fetch" errors.
    pub(crate) fn describe(&self) -> &'static str {
        if self.is_default() {
            "no config.json, tokenizer or safetensors files"
        } else {
            "no file matches the include patterns"
        }
    }
}

/// The files the engine loads: top-level config/tokenizer/template files and safetensors
/// weights. Subfolders (onnx/, original/ …) and other weight formats are skipped, and so is a
/// consolidated single-file copy next to a sharded index (Mistral repos carry both).
fn engine_file(path: &str, all: &[&str]) -> bool {
    if path.contains('/') {
        return false;
    }
    if path.ends_with(".safetensors") {
        let sharded = all.contains(&"model.safetensors.index.json");
        return !(sharded && path.starts_with("consolidated"));
    }
    let other_weights_index =
        [".bin.index.json", ".pt.index.json", ".pth.index.json", ".h5.index.json"];
    if other_weights_index.iter().any(|s| path.ends_with(s)) {
        return false;
    }
    let ext = path.rsplit_once('.').map(|(_, e)| e);
    matches!(ext, Some("json" | "txt" | "jinja" | "model" | "tiktoken"))
}

/// Refuses a repo path that could leave the model directory once joined to it (`..`, absolute,
/// empty components): the listing is remote data.
pub(crate) fn check_repo_path(path: &str, url: &str) -> Result<(), DownloadError> {
    if path.split('/').any(|c| c.is_empty() || c == "." || c == "..") || path.contains('\\') {
        return Err(DownloadError::Protocol {
            url: url.into(),
            detail: format!("unsafe file path `{path}` in the listing"),
        });
    }
    Ok(())
}

/// Puts `config.json` last: its presence is what marks a model directory complete.
pub(crate) fn config_last<T>(files: &mut [T], path: impl Fn(&T) -> &str) {
    files.sort_by_key(|f| path(f) == "config.json");
}

/// `true` when `model_id` is a hub id that is in no cache (a call to [`resolve_or_download`]
/// would download it, or fail offline).
pub fn needs_download(model_id: &str, env: &HubEnv) -> bool {
    match parse_model_id(model_id) {
        Ok(ModelRef::Repo { hub, repo }) => cached_repo(env, hub, &repo, &mut Vec::new()).is_none(),
        _ => false,
    }
}

/// Resolves `model_id` to a local model directory: a cached model is returned without any
/// network request; otherwise a hub id is downloaded (a bare `Org/Name` from ModelScope) unless
/// offline, and the directory in the hub's cache is returned. Blocking: call it from a thread
/// that may block (e.g. `spawn_blocking`).
pub fn resolve_or_download(
    model_id: &str,
    env: &HubEnv,
    opts: &FetchOptions,
) -> Result<PathBuf, HubError> {
    let (hub, mut repo) = match parse_model_id(model_id)? {
        ModelRef::Repo { hub, repo } => (hub, repo),
        _ => return resolve_with(model_id, env),
    };
    if let Some(opt) = &opts.revision {
        match &repo.revision {
            Some(in_id) if in_id != opt => {
                return Err(DownloadError::RevisionConflict {
                    id: repo.id(),
                    in_id: in_id.clone(),
                    option: opt.clone(),
                }
                .into());
            }
            _ => repo.revision = Some(opt.clone()),
        }
    }
    let selection = Selection::new(&opts.include)?;
    let mut looked = Vec::new();
    let cached = cached_repo(env, hub, &repo, &mut looked);
    if let Some(p) = cached.as_ref().filter(|_| selection.is_default()) {
        return Ok(p.clone());
    }
    let target = hub.unwrap_or(Hub::ModelScope);
    if env.offline(target) {
        return match cached {
            Some(p) => Ok(p),
            None => Err(DownloadError::Offline {
                id: model_id.trim().to_string(),
                hub: target.label().into(),
                var: env.offline_var(target).into(),
                looked,
            }
            .into()),
        };
    }
    let label = format!(
        "{}{}",
        repo.id(),
        repo.revision.as_deref().map(|r| format!("@{r}")).unwrap_or_default()
    );
    let lock_path = match target {
        Hub::HuggingFace => hf::lock_path(env, &repo),
        Hub::ModelScope => ms::lock_path(env, &repo),
    };
    let _lock = lock::acquire(&lock_path, &label)?;
    // Whoever held the lock before may have just finished this model.
    if selection.is_default()
        && let Some(p) = cached_repo(env, hub, &repo, &mut Vec::new())
    {
        return Ok(p);
    }
    let rep = bar::Reporter::new(&label, opts.progress.clone(), opts.bar);
    let (t, client) = Target::new(target, env, &repo);
    let job = Job { t, client, env, selection: &selection, rep: &rep };
    let dir = match target {
        Hub::HuggingFace => hf::download(&job)?,
        Hub::ModelScope => ms::download(&job)?,
    };
    rep.finish();
    Ok(dir)
}

/// One download: what the hub-specific modules get.
pub(crate) struct Job<'a> {
    pub t: Target<'a>,
    pub client: http::Client,
    pub env: &'a HubEnv,
    pub selection: &'a Selection,
    pub rep: &'a bar::Reporter,
}

/// What the hub-specific modules share about the repo being fetched.
pub(crate) struct Target<'a> {
    pub hub: Hub,
    pub endpoint: String,
    pub repo: &'a RepoRef,
    pub revision: String,
}

impl<'a> Target<'a> {
    /// The target for `repo` on `hub` (default revision filled in) and a client for that hub.
    pub(crate) fn new(hub: Hub, env: &HubEnv, repo: &'a RepoRef) -> (Self, http::Client) {
        let revision = repo.revision.clone().unwrap_or_else(|| hub.default_revision().into());
        let (endpoint, token) = match hub {
            Hub::HuggingFace => (env.hf.endpoint_url(), env.hf.token.clone()),
            Hub::ModelScope => (env.ms.endpoint_url(), env.ms.token.clone()),
        };
        // ModelScope also takes the token as its session cookie.
        let client = http::Client::new(&endpoint, token, hub == Hub::ModelScope);
        (Target { hub, endpoint, repo, revision }, client)
    }

    /// `ModelScope (https://modelscope.cn)`: which hub, at which address.
    pub(crate) fn hub_label(&self) -> String {
        format!("{} ({})", self.hub.label(), self.endpoint)
    }

    pub(crate) fn not_found(&self, revision_exists_not: bool) -> DownloadError {
        let (hub, id, revision) = (self.hub_label(), self.repo.id(), self.revision.clone());
        if revision_exists_not {
            DownloadError::RevisionNotFound { hub, id, revision }
        } else {
            DownloadError::RepoNotFound { hub, id, revision }
        }
    }

    /// A 401/403: says which variable carries the token, and whether one was sent.
    pub(crate) fn unauthorized(
        &self,
        status: u16,
        token_sent: bool,
        server: Option<&str>,
    ) -> DownloadError {
        let var = self.hub.token_var();
        let mut hint = if token_sent {
            format!("the token in {var} was refused or has no access to this repository")
        } else {
            format!(
                "the repository is private or gated (or does not exist); set {var} to a token with access"
            )
        };
        if let Some(m) = server.filter(|m| !m.is_empty()) {
            hint.push_str(&format!(" (server: {m})"));
        }
        DownloadError::Unauthorized {
            hub: self.hub_label(),
            id: self.repo.id(),
            revision: self.revision.clone(),
            status,
            hint,
        }
    }

    pub(crate) fn no_files(&self, selection: &Selection) -> DownloadError {
        DownloadError::NoFiles {
            hub: self.hub_label(),
            id: self.repo.id(),
            revision: self.revision.clone(),
            detail: selection.describe().into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_files_are_selected() {
        let all = ["config.json", "model.safetensors.index.json", "consolidated.safetensors"];
        for yes in [
            "config.json",
            "tokenizer.json",
            "model-00001-of-00002.safetensors",
            "merges.txt",
            "chat_template.jinja",
            "tokenizer.model",
            "model.safetensors.index.json",
        ] {
            assert!(engine_file(yes, &all), "{yes}");
        }
        for no in [
            "pytorch_model.bin",
            "pytorch_model.bin.index.json",
            "onnx/model.onnx",
            "onnx/config.json",
            "README.md",
            ".gitattributes",
            "consolidated.safetensors",
            "model.gguf",
        ] {
            assert!(!engine_file(no, &all), "{no}");
        }
        let s = Selection::new(&["*.md".into()]).unwrap();
        assert!(s.wants("README.md", &[]) && !s.wants("config.json", &[]));
        assert!(matches!(Selection::new(&["a[".into()]), Err(DownloadError::BadGlob { .. })));
        assert!(check_repo_path("a/b.json", "u").is_ok());
        for bad in ["../x", "/etc/passwd", "a//b", "a/./b"] {
            assert!(check_repo_path(bad, "u").is_err(), "{bad}");
        }
        let mut v = vec!["config.json", "a", "b"];
        config_last(&mut v, |s| s);
        assert_eq!(v, ["a", "b", "config.json"]);
    }
}
