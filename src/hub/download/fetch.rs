//! One file's transfer: stream to a partial file, resume with `Range: bytes=N-` from the bytes
//! already written after a dropped connection (a few tries with backoff), verify size and
//! checksum, and only then rename into place — a killed or refused download never leaves a file
//! at the final path.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use sha1::Sha1;
use sha2::{Digest as _, Sha256};

use super::bar::Reporter;
use super::http::{Client, header};
use super::{DownloadError, io_err};

/// Transport failures in a row without progress tolerated per file (each resumes from the
/// bytes on disk).
const TRANSPORT_TRIES: u32 = 5;
/// Whole-file attempts when the checksum does not match (the second starts from zero).
const INTEGRITY_TRIES: u32 = 2;
const CHUNK: usize = 256 << 10;

/// The checksum a file must have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Checksum {
    Sha256(String),
    /// Git blob id: `sha1("blob <size>\0" + content)` (HF's ETag for non-LFS files).
    GitSha1(String),
    /// The hub gave nothing usable; only the size is checked.
    None,
}

impl Checksum {
    /// Reads a normalised HF ETag: 64 hex digits are a sha256, 40 a git blob sha1.
    pub(crate) fn from_etag(etag: &str) -> Self {
        let hex = etag.chars().all(|c| c.is_ascii_hexdigit());
        match etag.len() {
            64 if hex => Checksum::Sha256(etag.to_ascii_lowercase()),
            40 if hex => Checksum::GitSha1(etag.to_ascii_lowercase()),
            _ => Checksum::None,
        }
    }
}

/// What is known of a file before its transfer.
#[derive(Debug, Clone)]
pub(crate) struct Expected {
    pub path: String,
    pub size: Option<u64>,
    pub checksum: Checksum,
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Checks `file` against `exp`; `Err` carries a human description of the mismatch.
pub(crate) fn verify(file: &Path, exp: &Expected) -> Result<Result<(), String>, DownloadError> {
    let len = std::fs::metadata(file).map_err(|e| io_err(file, e))?.len();
    if let Some(size) = exp.size.filter(|s| *s != len) {
        return Ok(Err(format!("size {len} bytes, expected {size}")));
    }
    let mut f = File::open(file).map_err(|e| io_err(file, e))?;
    let mut sha256 = Sha256::new();
    let mut sha1 = Sha1::new();
    let git = matches!(exp.checksum, Checksum::GitSha1(_));
    if git {
        sha1.update(format!("blob {len}\0").as_bytes());
    }
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = f.read(&mut buf).map_err(|e| io_err(file, e))?;
        if n == 0 {
            break;
        }
        if git {
            sha1.update(&buf[..n]);
        } else {
            sha256.update(&buf[..n]);
        }
    }
    let (want, got, algo) = match &exp.checksum {
        Checksum::Sha256(w) => (w.clone(), hex(&sha256.finalize()), "sha256"),
        Checksum::GitSha1(w) => (w.clone(), hex(&sha1.finalize()), "git blob sha1"),
        Checksum::None => return Ok(Ok(())),
    };
    Ok(if want == got { Ok(()) } else { Err(format!("{algo} {got}, expected {want}")) })
}

/// Why one streaming attempt stopped.
enum Attempt {
    Complete,
    /// The connection broke; the bytes written so far stay on disk for the next try.
    Dropped(String),
}

fn truncate(part: &Path) -> Result<(), DownloadError> {
    File::create(part).map(drop).map_err(|e| io_err(part, e))
}

fn part_len(part: &Path) -> u64 {
    std::fs::metadata(part).map_or(0, |m| m.len())
}

/// The start offset of a `Content-Range: bytes a-b/n` value.
fn content_range_start(v: &str) -> Option<u64> {
    v.trim().strip_prefix("bytes ")?.split('-').next()?.trim().parse().ok()
}

/// One request + stream into `part`, appending from the bytes already there.
fn attempt(
    client: &Client,
    url: &str,
    part: &Path,
    exp: &Expected,
    rep: &Reporter,
) -> Result<Attempt, DownloadError> {
    let mut have = part_len(part);
    if exp.size.is_some_and(|s| have > s) {
        rep.rewind(have);
        truncate(part)?;
        have = 0;
    }
    if exp.size == Some(have) && have > 0 {
        return Ok(Attempt::Complete);
    }
    let (resp, final_url) = match client.send_following("GET", url, have) {
        Ok(r) => r,
        Err(DownloadError::Transport { detail, .. }) => return Ok(Attempt::Dropped(detail)),
        Err(e) => return Err(e),
    };
    let status = resp.status().as_u16();
    match status {
        206 => {
            let start = header(resp.headers(), "content-range").and_then(content_range_start);
            if start != Some(have) {
                // The server answered another range than asked: start over rather than splice.
                rep.rewind(have);
                truncate(part)?;
                return Ok(Attempt::Dropped(format!(
                    "unexpected Content-Range {start:?} for bytes={have}-"
                )));
            }
        }
        200 => {
            // A full answer to a ranged request: the partial bytes are replaced.
            if have > 0 {
                rep.rewind(have);
                truncate(part)?;
            }
        }
        416 => {
            rep.rewind(have);
            truncate(part)?;
            return Ok(Attempt::Dropped("range not satisfiable; restarting from zero".into()));
        }
        429 | 500..=599 => return Ok(Attempt::Dropped(format!("HTTP {status} from {final_url}"))),
        _ => {
            return Err(DownloadError::Http {
                url: final_url,
                status,
                message: format!("while downloading {}", exp.path),
            });
        }
    }
    let mut out =
        OpenOptions::new().create(true).append(true).open(part).map_err(|e| io_err(part, e))?;
    let mut body = resp.into_body().into_reader();
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = match body.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) => return Ok(Attempt::Dropped(e.to_string())),
        };
        // Each chunk goes to disk as it arrives, so a retry resumes from exactly these bytes.
        out.write_all(&buf[..n]).map_err(|e| io_err(part, e))?;
        rep.add(n as u64);
    }
    let got = part_len(part);
    match exp.size {
        Some(s) if got < s => {
            Ok(Attempt::Dropped(format!("connection closed at {got} of {s} bytes")))
        }
        _ => Ok(Attempt::Complete),
    }
}

/// Downloads `url` into `dest` through `part` (resumable across runs: an existing `part` is
/// continued), verifying against `exp`. `dest` appears only once verified.
pub(crate) fn fetch_file(
    client: &Client,
    url: &str,
    part: &Path,
    dest: &Path,
    exp: &Expected,
    rep: &Reporter,
) -> Result<(), DownloadError> {
    for dir in [part.parent(), dest.parent()].into_iter().flatten() {
        std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
    }
    rep.start_file(&exp.path, exp.size, part_len(part));
    let mut integrity_tries = 0;
    loop {
        let mut drops = 0;
        loop {
            let before = part_len(part);
            match attempt(client, url, part, exp, rep)? {
                Attempt::Complete => break,
                Attempt::Dropped(why) => {
                    // Only drops without progress count: a long download over a flaky link
                    // that keeps moving forward is never given up on.
                    if part_len(part) > before {
                        drops = 0;
                    }
                    drops += 1;
                    if drops >= TRANSPORT_TRIES {
                        return Err(DownloadError::Transport { url: url.into(), detail: why });
                    }
                    let wait = Duration::from_millis(200 << drops.min(5));
                    tracing::warn!(file = %exp.path, bytes_on_disk = part_len(part), "download interrupted ({why}); resuming in {wait:?}");
                    std::thread::sleep(wait);
                }
            }
        }
        match verify(part, exp)? {
            Ok(()) => break,
            Err(why) => {
                integrity_tries += 1;
                rep.rewind(part_len(part));
                std::fs::remove_file(part).map_err(|e| io_err(part, e))?;
                if integrity_tries >= INTEGRITY_TRIES {
                    return Err(DownloadError::Integrity {
                        file: exp.path.clone(),
                        url: url.into(),
                        detail: why,
                    });
                }
                tracing::warn!(file = %exp.path, "downloaded file failed verification ({why}); downloading it again");
            }
        }
    }
    File::open(part).and_then(|f| f.sync_all()).map_err(|e| io_err(part, e))?;
    std::fs::rename(part, dest).map_err(|e| io_err(dest, e))?;
    rep.file_done();
    Ok(())
}

/// Writes `data` to `dest` atomically (temp file in the same directory + rename).
pub(crate) fn write_atomic(dest: &Path, data: &[u8]) -> Result<(), DownloadError> {
    let dir = dest.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
    let name = dest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp: PathBuf = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    std::fs::write(&tmp, data).map_err(|e| io_err(&tmp, e))?;
    std::fs::rename(&tmp, dest).map_err(|e| io_err(dest, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn git_blob_sha1_and_etags() {
        let t = tempfile::tempdir().unwrap();
        let f = t.path().join("x");
        std::fs::write(&f, b"hello\n").unwrap();
        // `git hash-object` of "hello\n".
        let exp = |c| Expected { path: "x".into(), size: Some(6), checksum: c };
        let git = Checksum::from_etag("ce013625030ba8dba906f756967f9e9ca394464a");
        assert!(matches!(git, Checksum::GitSha1(_)));
        assert_eq!(verify(&f, &exp(git)).unwrap(), Ok(()));
        let sha =
            Checksum::from_etag("5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03");
        assert_eq!(verify(&f, &exp(sha)).unwrap(), Ok(()));
        let bad = Checksum::Sha256("00".repeat(32));
        assert!(verify(&f, &exp(bad)).unwrap().is_err());
        assert_eq!(content_range_start("bytes 100-199/200"), Some(100));
    }
}
