//! Checkpoint files of the model application: atomic directory writes (temp sibling + rename),
//! the idle-unload spill format (training state + pending gradients), and the LRU of adapters
//! loaded by directory for sampling.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use crate::engine::weights::{load_f32, save_f32};
use crate::engine::{Adapter, ModelConfig, Tensor};

use super::error::AppError;

/// File with the optimizer step written by `Adapter::save_state` (marks a training state).
pub const OPTIM_META: &str = "optimizer_state.json";
const GRADS_FILE: &str = "gradients.safetensors";

fn io(what: &str, path: &Path, e: impl std::fmt::Display) -> AppError {
    AppError::Internal(format!("{what} {}: {e}", path.display()))
}

/// Checks a request's PEFT directory `dir` (the request's field `field`): absolute (else 400), and
/// holding `adapter_config.json` (else 404, calling it `what`).
pub fn check_peft_dir(dir: &Path, field: &str, what: &str) -> Result<(), AppError> {
    if !dir.is_absolute() {
        return Err(AppError::BadRequest(format!(
            "{field} must be an absolute path, got {}",
            dir.display()
        )));
    }
    if !dir.join("adapter_config.json").is_file() {
        return Err(AppError::NotFound(format!(
            "{what} {} holds no adapter_config.json",
            dir.display()
        )));
    }
    Ok(())
}

/// Writes a directory with `write` into a temp sibling, then renames it to `dir` (replacing an
/// older `dir`), so `dir` is never half written. Returns the total size of its files.
pub fn write_dir_atomic(
    dir: &Path,
    write: impl FnOnce(&Path) -> Result<(), AppError>,
) -> Result<u64, AppError> {
    let parent = dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .ok_or_else(|| AppError::BadRequest(format!("dir {} has no parent", dir.display())))?;
    // Checkpoints are a caller's weights: owner-only whatever the umask (see `private_fs`).
    crate::private_fs::create_dir_all(parent).map_err(|e| io("cannot create", parent, e))?;
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    // Random, not the clock: two writers of one directory in one process must not share a name.
    let stamp = crate::ids::hex(8);
    let tmp = parent.join(format!(".{name}.tmp-{}-{stamp}", std::process::id()));
    let cleanup = |p: &Path| {
        let _ = std::fs::remove_dir_all(p);
    };
    crate::private_fs::create_dir_all(&tmp).map_err(|e| io("cannot create", &tmp, e))?;
    if let Err(e) = write(&tmp) {
        cleanup(&tmp);
        return Err(e);
    }
    // The writer used plain `fs::write` (umask modes); nobody else could enter `tmp` (0700).
    if let Err(e) = crate::private_fs::restrict_tree(&tmp) {
        cleanup(&tmp);
        return Err(io("cannot restrict", &tmp, e));
    }
    let size = dir_size(&tmp);
    // An existing checkpoint is moved aside first: rename cannot replace a non-empty directory.
    let old = parent.join(format!(".{name}.old-{}-{stamp}", std::process::id()));
    let had_old = dir.exists();
    if had_old && let Err(e) = std::fs::rename(dir, &old) {
        cleanup(&tmp);
        return Err(io("cannot replace", dir, e));
    }
    if let Err(e) = std::fs::rename(&tmp, dir) {
        if had_old {
            let _ = std::fs::rename(&old, dir);
        }
        cleanup(&tmp);
        return Err(io("cannot rename into", dir, e));
    }
    if had_old {
        cleanup(&old);
    }
    Ok(size)
}

fn dir_size(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| e.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// Spills an adapter (weights, moments, step, and pending gradients) to `dir`.
pub fn spill(adapter: &Adapter, id: &str, pending_grads: bool, dir: &Path) -> Result<(), AppError> {
    write_dir_atomic(dir, |tmp| {
        adapter.save_state(tmp)?;
        let id_file = tmp.join(super::durable::ID_FILE);
        std::fs::write(&id_file, id).map_err(|e| io("cannot write", &id_file, e))?;
        if pending_grads {
            save_f32(&tmp.join(GRADS_FILE), &adapter.gradients())?;
        }
        Ok(())
    })
    .map(|_| ())
}

/// Restores what `spill` wrote; returns the adapter and whether it has pending gradients.
pub fn restore(dir: &Path, model: &ModelConfig) -> Result<(Adapter, bool), AppError> {
    let mut adapter = Adapter::load_state_for(dir, model)?;
    let grads_path = dir.join(GRADS_FILE);
    if !grads_path.is_file() {
        return Ok((adapter, false));
    }
    let mut grads: BTreeMap<String, Tensor> = load_f32(&grads_path)?;
    for (key, p) in adapter.pairs_mut() {
        for (s, dst) in [("lora_A", &mut p.a.g), ("lora_B", &mut p.b.g)] {
            let name = format!("{key}.{s}.weight");
            let t = grads
                .remove(&name)
                .ok_or_else(|| io("spilled gradients lack", &grads_path, &name))?;
            if t.len() != dst.len() {
                return Err(io("spilled gradient has the wrong size in", &grads_path, &name));
            }
            *dst = t.into_data();
        }
    }
    Ok((adapter, true))
}

/// Identity of a weights file version: modification time and inode (every atomic re-save writes
/// a new file, so the inode changes even within one timestamp tick).
type FileStamp = Option<(SystemTime, u64)>;
/// One cached adapter: its directory, its weights file's stamp when loaded, the adapter.
type CacheEntry<A> = (PathBuf, FileStamp, Arc<A>);

/// Adapters loaded from PEFT directories for sampling (as the runtime holds them: `A` is the
/// device-resident form), most recently used first. An entry is reused while its weights file
/// is the same file version (a re-save reloads it).
pub struct AdapterCache<A> {
    capacity: usize,
    entries: Mutex<Vec<CacheEntry<A>>>,
}

impl<A> std::fmt::Debug for AdapterCache<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdapterCache").field("dirs", &self.dirs()).finish()
    }
}

impl<A> AdapterCache<A> {
    pub fn new(capacity: usize) -> Self {
        AdapterCache { capacity: capacity.max(1), entries: Mutex::new(Vec::new()) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<CacheEntry<A>>> {
        // A panic while holding this lock cannot leave the list inconsistent (plain pushes and
        // removals), so a poisoned lock is still usable.
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The adapter in `dir` (a PEFT directory), loaded for `model` and placed with `place` on a
    /// miss.
    pub fn get(
        &self,
        dir: &Path,
        model: &ModelConfig,
        place: impl FnOnce(&Adapter) -> Result<A, AppError>,
    ) -> Result<Arc<A>, AppError> {
        check_peft_dir(dir, "adapter_dir", "adapter_dir")?;
        let mtime: FileStamp = std::fs::metadata(dir.join("adapter_model.safetensors"))
            .and_then(|m| Ok((m.modified()?, std::os::unix::fs::MetadataExt::ino(&m))))
            .ok();
        {
            let mut e = self.lock();
            if let Some(pos) = e.iter().position(|(p, t, _)| p == dir && *t == mtime) {
                let hit = e.remove(pos);
                let a = hit.2.clone();
                e.insert(0, hit);
                return Ok(a);
            }
        }
        let host = Adapter::load_peft_for(dir, model).map_err(|e| {
            AppError::BadRequest(format!("cannot load adapter_dir {}: {e}", dir.display()))
        })?;
        host.check_fits(model).map_err(|e| AppError::BadRequest(e.to_string()))?;
        let adapter = Arc::new(place(&host)?);
        let mut e = self.lock();
        e.retain(|(p, _, _)| p != dir);
        e.insert(0, (dir.to_path_buf(), mtime, adapter.clone()));
        e.truncate(self.capacity);
        Ok(adapter)
    }

    /// Cached directories, most recent first.
    pub fn dirs(&self) -> Vec<PathBuf> {
        self.lock().iter().map(|(p, _, _)| p.clone()).collect()
    }
}
