//! `$TWINKLE_HOME/serve.json`: where a running `twinkle serve` can be reached (like Ray's
//! current-cluster file), so `twinkle status` needs no address.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::HeadError;

/// What `twinkle serve` records about itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServeRecord {
    pub control_address: String,
    pub gateway_address: String,
    pub pid: u32,
    pub config: String,
    /// The serve's internal token, which `GET /v1/status` requires (empty in old records).
    #[serde(default)]
    pub token: String,
}

/// The state directory: `$TWINKLE_HOME`, else `$HOME/.twinkle`, else `./.twinkle`.
pub fn twinkle_home() -> PathBuf {
    if let Some(h) = std::env::var_os("TWINKLE_HOME").filter(|h| !h.is_empty()) {
        return PathBuf::from(h);
    }
    match std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        Some(home) => PathBuf::from(home).join(".twinkle"),
        None => PathBuf::from(".twinkle"),
    }
}

pub fn serve_file(home: &Path) -> PathBuf {
    home.join("serve.json")
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> HeadError + '_ {
    move |source| HeadError::StateFile { path: path.display().to_string(), source }
}

/// Reads the record; `NotRunning` when there is none.
pub fn read(home: &Path) -> Result<ServeRecord, HeadError> {
    let path = serve_file(home);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(HeadError::NotRunning { path: path.display().to_string() });
        }
        Err(e) => return Err(io_err(&path)(e)),
    };
    serde_json::from_str(&text)
        .map_err(|source| HeadError::StateFileFormat { path: path.display().to_string(), source })
}

/// Whether a process with this pid exists (signal 0 probes without sending anything).
pub fn pid_alive(pid: u32) -> bool {
    let Ok(raw) = i32::try_from(pid) else {
        return false;
    };
    match nix::sys::signal::kill(nix::unistd::Pid::from_raw(raw), None) {
        Ok(()) => true,
        // EPERM: it exists but belongs to someone else.
        Err(e) => e == nix::errno::Errno::EPERM,
    }
}

/// Refuses to start when another live serve owns this state directory; a stale record (its pid
/// is gone) is ignored and will be overwritten.
pub fn ensure_free(home: &Path) -> Result<(), HeadError> {
    match read(home) {
        Ok(rec) if rec.pid != std::process::id() && pid_alive(rec.pid) => {
            Err(HeadError::AlreadyRunning {
                pid: rec.pid,
                path: serve_file(home).display().to_string(),
            })
        }
        _ => Ok(()),
    }
}

/// Writes the record atomically (temp file + rename), creating the directory.
pub fn write(home: &Path, rec: &ServeRecord) -> Result<(), HeadError> {
    crate::private_fs::create_dir_all(home).map_err(io_err(home))?;
    let path = serve_file(home);
    let tmp = home.join(format!("serve.json.{}.tmp", std::process::id()));
    let text = serde_json::to_string_pretty(rec).map_err(|source| HeadError::StateFileFormat {
        path: path.display().to_string(),
        source,
    })?;
    // The record carries the token that unlocks `/v1/status`: owner-only.
    crate::private_fs::write(&tmp, text).map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, &path).map_err(io_err(&path))
}

/// Removes the record if it is still ours (a newer serve may have replaced it).
pub fn remove_if_ours(home: &Path) {
    if let Ok(rec) = read(home)
        && rec.pid == std::process::id()
    {
        let _ = std::fs::remove_file(serve_file(home));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_stale_record() {
        let dir = tempfile::tempdir().expect("temp dir");
        assert!(matches!(read(dir.path()), Err(HeadError::NotRunning { .. })));
        let rec = ServeRecord {
            control_address: "127.0.0.1:1".into(),
            gateway_address: "127.0.0.1:2".into(),
            pid: std::process::id(),
            config: "c.yaml".into(),
            token: "t".into(),
        };
        assert!(write(dir.path(), &rec).is_ok());
        assert_eq!(read(dir.path()).ok(), Some(rec.clone()));
        // Our own pid is not "another serve".
        assert!(ensure_free(dir.path()).is_ok());
        remove_if_ours(dir.path());
        assert!(matches!(read(dir.path()), Err(HeadError::NotRunning { .. })));
    }
}
