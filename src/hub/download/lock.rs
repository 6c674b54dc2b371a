//! One download per model at a time: an exclusive `flock` on a lock file in the cache. Other
//! processes (or threads) wanting the same model wait for it, then find the model cached.

use std::fs::{File, OpenOptions};
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

use super::{DownloadError, io_err};

/// Held while downloading; dropping it releases the lock.
pub(crate) struct RepoLock {
    _lock: Flock<File>,
}

/// Takes the lock at `path`, waiting (with a log line) while another download holds it.
pub(crate) fn acquire(path: &Path, label: &str) -> Result<RepoLock, DownloadError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
    }
    let open = || {
        OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(|e| io_err(path, e))
    };
    let lock_err = |e: Errno| io_err(path, std::io::Error::from(e));
    match Flock::lock(open()?, FlockArg::LockExclusiveNonblock) {
        Ok(l) => Ok(RepoLock { _lock: l }),
        Err((file, Errno::EWOULDBLOCK)) => {
            tracing::info!("waiting for another download of {label} (lock {})", path.display());
            Flock::lock(file, FlockArg::LockExclusive)
                .map(|l| RepoLock { _lock: l })
                .map_err(|(_, e)| lock_err(e))
        }
        Err((_, e)) => Err(lock_err(e)),
    }
}
