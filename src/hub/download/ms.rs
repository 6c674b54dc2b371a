//! The ModelScope side: list the repo's files at the revision (`Data.Files[]`, each with its
//! `Sha256` and `Size`), fetch each through `/repo?Revision=&FilePath=` (LFS files answer 302 to
//! storage), and place them in the layout both SDK generations find: `<root>/models/Org/Name___`
//! with the old SDK's `.mdl`/`.msc`/`.mv` index files and a `Name` symlink for dotted names.

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::fetch::{Checksum, Expected, fetch_file, verify, write_atomic};
use super::http::{Client, quote};
use super::{DownloadError, Job, Target, check_repo_path, config_last, io_err};
use crate::hub::id::RepoRef;
use crate::hub::{HubEnv, ms_escape};

/// Where ModelScope downloads go: `$MODELSCOPE_CACHE`, else `~/.cache/modelscope/hub`.
fn root(env: &HubEnv) -> PathBuf {
    env.modelscope_roots()
        .into_iter()
        .next()
        .unwrap_or_else(|| PathBuf::from(".cache/modelscope/hub"))
}

/// The old SDK's lock file (`.lock/Org___Name`), so it and we serialise on the same file.
pub(super) fn lock_path(env: &HubEnv, repo: &RepoRef) -> PathBuf {
    root(env).join(".lock").join(format!("{}___{}", repo.org, repo.name))
}

/// One file of the listing.
struct MsFile {
    path: String,
    size: u64,
    sha256: String,
    /// The commit that last changed the file (recorded in `.msc`).
    revision: String,
}

fn api(t: &Target) -> String {
    format!("{}/api/v1/models/{}/{}", t.endpoint, quote(&t.repo.org, ""), quote(&t.repo.name, ""))
}

/// Checks status and envelope (`{"Code": 200, "Success": true, "Data": …}`); returns `Data`.
fn envelope(t: &Target, client: &Client, url: &str) -> Result<Value, DownloadError> {
    let (status, _, body) = client.get_json(url)?;
    let message = body["Message"].as_str().map(String::from);
    match status.as_u16() {
        401 | 403 => {
            return Err(t.unauthorized(status.as_u16(), client.has_token(), message.as_deref()));
        }
        404 => {
            // The listing's 404 does not say whether the repo or the revision is missing.
            let exists = client.get_json(&api(t)).is_ok_and(|(s, _, b)| {
                s.is_success() && b["Code"].as_i64().is_none_or(|c| c == 200)
            });
            return Err(t.not_found(exists));
        }
        _ => {}
    }
    let code_ok = body["Code"].as_i64().is_none_or(|c| c == 200);
    let success = body["Success"].as_bool().unwrap_or(true);
    if !status.is_success() || !code_ok || !success {
        return Err(DownloadError::Http {
            url: url.into(),
            status: status.as_u16(),
            message: message.unwrap_or_else(|| format!("envelope Code {}", body["Code"])),
        });
    }
    Ok(body["Data"].clone())
}

fn list_files(t: &Target, client: &Client) -> Result<Vec<MsFile>, DownloadError> {
    let url = format!("{}/repo/files?Revision={}&Recursive=True", api(t), quote(&t.revision, ""));
    let data = envelope(t, client, &url)?;
    // Both `Data: [...]` and `Data: {"Files": [...]}` occur.
    let files = data.as_array().or_else(|| data["Files"].as_array()).cloned().unwrap_or_default();
    let mut out = Vec::new();
    for f in files.iter().filter(|f| f["Type"].as_str() == Some("blob")) {
        let (Some(path), Some(size), Some(sha)) =
            (f["Path"].as_str(), f["Size"].as_u64(), f["Sha256"].as_str())
        else {
            return Err(DownloadError::Protocol {
                url,
                detail: format!("file entry without Path/Size/Sha256: {f}"),
            });
        };
        check_repo_path(path, &url)?;
        let revision = f["Revision"].as_str().unwrap_or(&t.revision).to_string();
        out.push(MsFile { path: path.into(), size, sha256: sha.to_ascii_lowercase(), revision });
    }
    Ok(out)
}

/// Python pickle (protocol 2) of a str→str dict, enough for the old SDK's `.mdl`/`.msc`.
fn pickle_dict(out: &mut Vec<u8>, pairs: &[(&str, &str)]) {
    out.extend_from_slice(b"}(");
    for s in pairs.iter().flat_map(|(k, v)| [k, v]) {
        out.push(b'X');
        out.extend_from_slice(&(s.len() as u32).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
    }
    out.push(b'u');
}

/// `.mdl`: `{"id": "Org/Name"}`; `.msc`: `[{"Path": …, "Revision": …}, …]`; `.mv`: the revision.
fn write_index(
    dir: &Path,
    repo: &RepoRef,
    revision: &str,
    files: &[MsFile],
) -> Result<(), DownloadError> {
    let mut mdl = b"\x80\x02".to_vec();
    pickle_dict(&mut mdl, &[("id", &repo.id())]);
    mdl.push(b'.');
    let mut msc = b"\x80\x02](".to_vec();
    for f in files {
        pickle_dict(&mut msc, &[("Path", &f.path), ("Revision", &f.revision)]);
    }
    msc.extend_from_slice(b"e.");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    write_atomic(&dir.join(".mdl"), &mdl)?;
    write_atomic(&dir.join(".msc"), &msc)?;
    write_atomic(&dir.join(".mv"), format!("Revision:{revision},CreatedAt:{now}").as_bytes())
}

/// Downloads the selected files of `repo` into the ModelScope cache; returns the model directory.
pub(super) fn download(job: &Job) -> Result<PathBuf, DownloadError> {
    let Job { t, client, env, selection, rep } = job;
    let repo = t.repo;
    let listed = list_files(t, client)?;
    let all: Vec<&str> = listed.iter().map(|f| f.path.as_str()).collect();
    let keep: Vec<bool> = listed.iter().map(|f| selection.wants(&f.path, &all)).collect();
    let mut files: Vec<MsFile> =
        listed.into_iter().zip(keep).filter_map(|(f, k)| k.then_some(f)).collect();
    if files.is_empty() {
        return Err(t.no_files(selection));
    }
    config_last(&mut files, |f| &f.path);
    rep.plan(files.iter().map(|f| f.size).sum(), files.len() as u64);
    let models = root(env).join("models");
    let escaped = ms_escape(&repo.name);
    let dir = models.join(&repo.org).join(&escaped);
    // Partial files live outside the model directory (the old SDK's temp folder), so the model
    // directory only ever holds complete, verified files.
    let temp = models.join("._____temp").join(&repo.org).join(&escaped);
    for f in &files {
        let dest = dir.join(&f.path);
        let exp = Expected {
            path: f.path.clone(),
            size: Some(f.size),
            checksum: Checksum::Sha256(f.sha256.clone()),
        };
        if dest.is_file() && verify(&dest, &exp)?.is_ok() {
            rep.cached_file(f.size);
            continue;
        }
        let url = format!(
            "{}/repo?Revision={}&FilePath={}",
            api(t),
            quote(&t.revision, ""),
            quote(&f.path, "")
        );
        let part = temp.join(format!("{}.incomplete", f.path));
        fetch_file(client, &url, &part, &dest, &exp, rep)?;
    }
    write_index(&dir, repo, &t.revision, &files)?;
    if escaped != repo.name {
        // snapshot_download's `models/Org/Name` link to the escaped directory.
        let link = models.join(&repo.org).join(&repo.name);
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(&escaped, &link).map_err(|e| io_err(&link, e))?;
        }
    }
    let _ = std::fs::remove_dir_all(&temp);
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pickles_are_well_formed() {
        let mut v = b"\x80\x02".to_vec();
        pickle_dict(&mut v, &[("id", "A/B")]);
        v.push(b'.');
        assert_eq!(v, b"\x80\x02}(X\x02\x00\x00\x00idX\x03\x00\x00\x00A/Bu.");
    }
}
