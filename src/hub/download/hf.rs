//! The Hugging Face Hub side: resolve the revision to a commit, `HEAD /resolve` each file for its
//! checksum (`X-Linked-Etag` sha256 for LFS files, `ETag` git blob sha1 otherwise), size and
//! storage URL, then fill `models--Org--Name/{blobs,snapshots/<commit>,refs/<revision>}` exactly as
//! huggingface_hub does.
//!
//! Why not the `hf-hub` crate: 1.0 is built on reqwest/tokio (a second HTTP stack next to ours,
//! and its rustls feature is not pinned to ring), it does not verify checksums, and its resume
//! restarts rather than continuing from the bytes already in our partial file; the HTTP part it
//! would save is a few dozen lines on the client both hubs share here.

use std::path::{Path, PathBuf};

use super::fetch::{Checksum, Expected, fetch_file, write_atomic};
use super::http::{Client, header, is_redirect, quote};
use super::{DownloadError, Job, Target, check_repo_path, config_last, io_err};
use crate::hub::HubEnv;
use crate::hub::id::RepoRef;

/// Where HF downloads go: the first cache root (`HF_HUB_CACHE`, `HF_HOME/hub`, `~/.cache/…`).
fn root(env: &HubEnv) -> PathBuf {
    env.hf_roots().into_iter().next().unwrap_or_else(|| PathBuf::from(".cache/huggingface/hub"))
}

fn folder(repo: &RepoRef) -> String {
    format!("models--{}--{}", repo.org, repo.name)
}

/// The lock next to huggingface_hub's own (`.locks/models--Org--Name/`).
pub(super) fn lock_path(env: &HubEnv, repo: &RepoRef) -> PathBuf {
    root(env).join(".locks").join(folder(repo)).join("twinkle.lock")
}

/// A file's metadata from its `HEAD /resolve` answer.
struct FileMeta {
    path: String,
    etag: String,
    size: Option<u64>,
    url: String,
}

/// The error a non-success Hub answer stands for (`X-Error-Code` decides, as in the client).
fn error_for(
    t: &Target,
    client: &Client,
    url: &str,
    status: u16,
    h: &ureq::http::HeaderMap,
) -> DownloadError {
    let code = header(h, "x-error-code");
    let message = header(h, "x-error-message");
    match (status, code) {
        (404, Some("RevisionNotFound")) => t.not_found(true),
        (404, Some("RepoNotFound")) => t.not_found(false),
        (401 | 403, _) => t.unauthorized(status, client.has_token(), message),
        _ => DownloadError::Http {
            url: url.into(),
            status,
            message: message.or(code).unwrap_or("unexpected answer").to_string(),
        },
    }
}

/// `W/"abc"` → `abc` (huggingface_hub's `_normalize_etag`).
fn normalize_etag(v: &str) -> String {
    v.trim().trim_start_matches("W/").trim_matches('"').to_string()
}

fn head(t: &Target, client: &Client, commit: &str, path: &str) -> Result<FileMeta, DownloadError> {
    let mut url = format!(
        "{}/{}/{}/resolve/{commit}/{}",
        t.endpoint,
        quote(&t.repo.org, ""),
        quote(&t.repo.name, ""),
        quote(path, "/")
    );
    for _ in 0..5 {
        let resp = client.send_retrying("HEAD", &url)?;
        let (status, h) = (resp.status(), resp.headers());
        let redirect = is_redirect(status);
        // A redirect without Hub metadata is a rename on the Hub itself: follow it.
        if redirect && header(h, "x-repo-commit").is_none() {
            url = client.location(&resp, &url)?;
            continue;
        }
        if !status.is_success() && !redirect {
            return Err(error_for(t, client, &url, status.as_u16(), h));
        }
        let proto =
            |detail: &str| DownloadError::Protocol { url: url.clone(), detail: detail.into() };
        if header(h, "x-repo-commit").is_none() {
            return Err(proto(
                "no X-Repo-Commit header: the endpoint does not seem to be a Hugging Face Hub",
            ));
        }
        let etag = header(h, "x-linked-etag")
            .or_else(|| header(h, "etag"))
            .map(normalize_etag)
            .filter(|e| !e.is_empty() && !e.contains(['/', '\\', '.']))
            .ok_or_else(|| proto("no usable ETag / X-Linked-Etag header"))?;
        let num = |name| header(h, name).and_then(|v| v.trim().parse::<u64>().ok());
        let size =
            num("x-linked-size").or_else(|| if redirect { None } else { num("content-length") });
        let dl = if redirect { client.location(&resp, &url)? } else { url.clone() };
        return Ok(FileMeta { path: path.into(), etag, size, url: dl });
    }
    Err(DownloadError::Protocol { url, detail: "too many redirects".into() })
}

/// Points `snapshots/<commit>/<path>` at `blobs/<etag>` with a relative symlink (replaced
/// atomically when it exists).
fn link(snapshot: &Path, path: &str, etag: &str) -> Result<(), DownloadError> {
    let link = snapshot.join(path);
    let dir = link.parent().unwrap_or(snapshot);
    std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
    let target = format!("{}blobs/{etag}", "../".repeat(2 + path.matches('/').count()));
    let tmp = dir.join(format!(".{etag}.{}.link", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(&target, &tmp).map_err(|e| io_err(&tmp, e))?;
    std::fs::rename(&tmp, &link).map_err(|e| io_err(&link, e))
}

/// Downloads the selected files of `repo` into the HF cache; returns the snapshot directory.
pub(super) fn download(job: &Job) -> Result<PathBuf, DownloadError> {
    let Job { t, client, env, selection, rep } = job;
    let repo = t.repo;
    let url = format!(
        "{}/api/models/{}/{}/revision/{}",
        t.endpoint,
        quote(&repo.org, ""),
        quote(&repo.name, ""),
        quote(&t.revision, "")
    );
    let (status, h, info) = client.get_json(&url)?;
    if !status.is_success() {
        return Err(error_for(t, client, &url, status.as_u16(), &h));
    }
    let commit = info["sha"]
        .as_str()
        .filter(|s| s.len() == 40 && s.chars().all(|c| c.is_ascii_hexdigit()))
        .ok_or_else(|| DownloadError::Protocol {
            url: url.clone(),
            detail: "no 40-hex `sha` in the model info".into(),
        })?
        .to_string();
    let all: Vec<&str> = info["siblings"]
        .as_array()
        .map(|s| s.iter().filter_map(|f| f["rfilename"].as_str()).collect())
        .unwrap_or_default();
    let wanted: Vec<&str> = all.iter().copied().filter(|p| selection.wants(p, &all)).collect();
    for p in &wanted {
        check_repo_path(p, &url)?;
    }
    if wanted.is_empty() {
        return Err(t.no_files(selection));
    }
    // Every file by commit hash, so all come from one commit even if the branch moves meanwhile.
    let mut metas =
        wanted.iter().map(|p| head(t, client, &commit, p)).collect::<Result<Vec<_>, _>>()?;
    config_last(&mut metas, |m| &m.path);
    rep.plan(metas.iter().filter_map(|m| m.size).sum(), metas.len() as u64);
    let dir = root(env).join(folder(repo));
    let snapshot = dir.join("snapshots").join(&commit);
    for m in &metas {
        let blob = dir.join("blobs").join(&m.etag);
        if blob.is_file() {
            rep.cached_file(m.size.unwrap_or(0));
        } else {
            let part = dir.join("blobs").join(format!("{}.incomplete", m.etag));
            let exp = Expected {
                path: m.path.clone(),
                size: m.size,
                checksum: Checksum::from_etag(&m.etag),
            };
            fetch_file(client, &m.url, &part, &blob, &exp, rep)?;
        }
        link(&snapshot, &m.path, &m.etag)?;
    }
    if t.revision != commit {
        // No trailing newline: huggingface_hub reads refs/<revision> without stripping.
        write_atomic(&dir.join("refs").join(&t.revision), commit.as_bytes())?;
    }
    Ok(snapshot)
}
