//! Owner-only files and directories, whatever the process umask.
//!
//! Checkpoints, the owner salt, the state database and the `TWINKLE_HOME` records hold weights,
//! secrets and every caller's metadata: directories are created `0700` and files `0600`. The
//! mode given at creation is filtered by the umask (which can only remove bits), so each helper
//! also sets the exact mode afterwards; an existing directory that we did not create (the
//! operator's save root, `$HOME`) is left as it is.

use std::fs::{DirBuilder, File, OpenOptions, Permissions};
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::Path;

/// Mode of every directory Twinkle creates for private data.
pub const DIR_MODE: u32 = 0o700;
/// Mode of every private file.
pub const FILE_MODE: u32 = 0o600;

/// `create_dir_all` where every directory it creates is `0700` (existing ones are untouched).
pub fn create_dir_all(path: &Path) -> std::io::Result<()> {
    if path.as_os_str().is_empty() || path.is_dir() {
        return Ok(());
    }
    if let Some(parent) = path.parent() {
        create_dir_all(parent)?;
    }
    match DirBuilder::new().mode(DIR_MODE).create(path) {
        Ok(()) => std::fs::set_permissions(path, Permissions::from_mode(DIR_MODE)),
        // Another process created it between the check and here: fine, it is not ours to chmod.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && path.is_dir() => Ok(()),
        Err(e) => Err(e),
    }
}

/// Opens `path` for writing with mode `0600`: `create_new` fails when it exists (exclusive
/// creation, for files several processes race to create), otherwise it is created or truncated.
pub fn open_write(path: &Path, create_new: bool) -> std::io::Result<File> {
    let mut opts = OpenOptions::new();
    opts.write(true).mode(FILE_MODE);
    if create_new {
        opts.create_new(true);
    } else {
        opts.create(true).truncate(true);
    }
    let f = opts.open(path)?;
    f.set_permissions(Permissions::from_mode(FILE_MODE))?;
    Ok(f)
}

/// `std::fs::write` with mode `0600`.
pub fn write(path: &Path, data: impl AsRef<[u8]>) -> std::io::Result<()> {
    let mut f = open_write(path, false)?;
    f.write_all(data.as_ref())
}

/// Sets `0600` on `path` when it exists (a missing file is not an error).
pub fn restrict_file(path: &Path) -> std::io::Result<()> {
    match std::fs::set_permissions(path, Permissions::from_mode(FILE_MODE)) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// Makes a tree owner-only: directories `0700`, files `0600` (symlinks are not followed).
pub fn restrict_tree(root: &Path) -> std::io::Result<()> {
    let meta = std::fs::symlink_metadata(root)?;
    if meta.is_dir() {
        std::fs::set_permissions(root, Permissions::from_mode(DIR_MODE))?;
        for entry in std::fs::read_dir(root)? {
            restrict_tree(&entry?.path())?;
        }
    } else if meta.is_file() {
        std::fs::set_permissions(root, Permissions::from_mode(FILE_MODE))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).map(|m| m.permissions().mode() & 0o777).unwrap_or(0)
    }

    #[test]
    fn private_dirs_and_files() {
        let dir = tempfile::tempdir().expect("temp dir");
        let deep = dir.path().join("a/b/c");
        create_dir_all(&deep).expect("mkdir");
        assert_eq!(mode(&dir.path().join("a")), DIR_MODE);
        assert_eq!(mode(&deep), DIR_MODE);
        let f = deep.join("f");
        std::fs::write(&f, b"x").expect("write");
        std::fs::set_permissions(&f, Permissions::from_mode(0o644)).expect("chmod");
        write(&f, b"y").expect("write");
        assert_eq!(mode(&f), FILE_MODE);
        assert!(open_write(&f, true).is_err(), "create_new refuses an existing file");
        std::fs::set_permissions(&deep, Permissions::from_mode(0o755)).expect("chmod");
        std::fs::set_permissions(&f, Permissions::from_mode(0o644)).expect("chmod");
        restrict_tree(&dir.path().join("a")).expect("restrict");
        assert_eq!((mode(&deep), mode(&f)), (DIR_MODE, FILE_MODE));
        assert!(restrict_file(&deep.join("missing")).is_ok());
    }
}
