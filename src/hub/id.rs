//! Parsing of `model_id` strings: local paths, `generate://`, and hub ids with an optional
//! `@revision` suffix (`ms://Org/Name@v1.0`, `hf://Org/Name@<sha>`, bare `Org/Name`).

use std::path::{Path, PathBuf};

use super::HubError;

/// Which hub a repository id names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hub {
    ModelScope,
    HuggingFace,
}

impl Hub {
    /// The hub's name as users know it (used in every error message).
    pub fn label(self) -> &'static str {
        match self {
            Hub::ModelScope => "ModelScope",
            Hub::HuggingFace => "Hugging Face Hub",
        }
    }

    /// The environment variable that carries this hub's token.
    pub fn token_var(self) -> &'static str {
        match self {
            Hub::ModelScope => "MODELSCOPE_API_TOKEN",
            Hub::HuggingFace => "HF_TOKEN",
        }
    }

    /// The revision used when none is given (`master` on ModelScope, `main` on the HF Hub).
    pub fn default_revision(self) -> &'static str {
        match self {
            Hub::ModelScope => "master",
            Hub::HuggingFace => "main",
        }
    }
}

/// A repository on a hub: `Org/Name` plus the revision asked for, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoRef {
    pub org: String,
    pub name: String,
    pub revision: Option<String>,
}

impl RepoRef {
    /// `Org/Name`.
    pub fn id(&self) -> String {
        format!("{}/{}", self.org, self.name)
    }
}

/// What a `model_id` string names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelRef {
    /// `generate://<preset>`.
    Generate(String),
    /// A local directory (it may not exist; resolution then reports where it looked).
    Local(PathBuf),
    /// A hub repository; `hub` is `None` for a bare `Org/Name` (ModelScope, then the HF cache).
    Repo { hub: Option<Hub>, repo: RepoRef },
}

/// Splits `Org/Name` (exactly two non-empty parts).
pub(crate) fn repo_parts(id: &str) -> Option<(&str, &str)> {
    let (org, name) = id.split_once('/')?;
    (!org.is_empty() && !name.is_empty() && !name.contains('/')).then_some((org, name))
}

/// Parses `Org/Name[@revision]`.
fn repo_ref(text: &str) -> Option<RepoRef> {
    let (repo, revision) = match text.split_once('@') {
        Some((_, "")) => return None,
        Some((r, rev)) => (r, Some(rev.to_string())),
        None => (text, None),
    };
    let (org, name) = repo_parts(repo)?;
    Some(RepoRef { org: org.into(), name: name.into(), revision })
}

/// Parses a (trimmed, non-empty) `model_id`.
pub fn parse_model_id(model_id: &str) -> Result<ModelRef, HubError> {
    let id = model_id.trim();
    if id.is_empty() {
        return Err(HubError::Empty);
    }
    if let Some(preset) = id.strip_prefix("generate://") {
        return Ok(ModelRef::Generate(preset.to_string()));
    }
    for (prefix, hub) in [("ms://", Hub::ModelScope), ("hf://", Hub::HuggingFace)] {
        if let Some(rest) = id.strip_prefix(prefix) {
            let repo = repo_ref(rest).ok_or_else(|| HubError::BadRepoId(id.into()))?;
            return Ok(ModelRef::Repo { hub: Some(hub), repo });
        }
    }
    let local = Path::new(id);
    // An existing directory wins over the hub reading of a relative `Org/Name`.
    if local.is_dir() || local.is_absolute() {
        return Ok(ModelRef::Local(local.to_path_buf()));
    }
    match repo_ref(id) {
        Some(repo) => Ok(ModelRef::Repo { hub: None, repo }),
        None => Ok(ModelRef::Local(local.to_path_buf())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repo(org: &str, name: &str, rev: Option<&str>) -> RepoRef {
        RepoRef { org: org.into(), name: name.into(), revision: rev.map(String::from) }
    }

    #[test]
    fn revisions_parse() {
        assert_eq!(
            parse_model_id("ms://Qwen/Qwen2.5-0.5B@v1.0").unwrap(),
            ModelRef::Repo {
                hub: Some(Hub::ModelScope),
                repo: repo("Qwen", "Qwen2.5-0.5B", Some("v1.0"))
            }
        );
        let sha = "0123456789abcdef0123456789abcdef01234567";
        assert_eq!(
            parse_model_id(&format!("hf://Org/Name@{sha}")).unwrap(),
            ModelRef::Repo { hub: Some(Hub::HuggingFace), repo: repo("Org", "Name", Some(sha)) }
        );
        assert_eq!(
            parse_model_id("Org/Name").unwrap(),
            ModelRef::Repo { hub: None, repo: repo("Org", "Name", None) }
        );
        assert!(matches!(parse_model_id("hf://Org/Name@"), Err(HubError::BadRepoId(_))));
        assert!(matches!(parse_model_id("ms://Org"), Err(HubError::BadRepoId(_))));
        assert_eq!(parse_model_id("generate://x").unwrap(), ModelRef::Generate("x".into()));
        assert_eq!(parse_model_id("/abs/a/b").unwrap(), ModelRef::Local("/abs/a/b".into()));
        assert_eq!(parse_model_id("a/b/c").unwrap(), ModelRef::Local("a/b/c".into()));
    }
}
