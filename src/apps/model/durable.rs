//! Durable snapshots of live adapters, so a restarted model application serves every run it
//! served before (issue #12, items 2 and 9).
//!
//! `optim_step` answers only once a snapshot of that step (or of a later state) is written to
//! `{spill_dir}/live/<key>`: an acknowledged step survives a `kill -9` of the application (the
//! page cache is enough; the threat is the process dying, not the machine). The adapter lock is
//! held only for the host copy (`engine.download`); weights + Adam moments + step are written
//! outside it (temp dir + rename: never half written), so other requests do not wait for the disk.
//! Create and load queue a snapshot for a background thread instead (the queue is a set: a burst
//! costs one write of the latest state), and so does every step with `adapter_config.
//! durable_steps: false` (faster steps for large adapters; a crash may lose the last answered one).
//!
//! Writers of one adapter's directory are serialized by the slot's `snap_written` lock, which
//! also holds the generation of the copy on disk: copies are numbered under the adapter lock, so
//! a copy older than the one written is dropped (a later state on disk is just as durable).
//!
//! `<key>` is the SHA-256 of the id and the id itself is a file inside: ids are long (a Twinkle id
//! is an owner digest plus a session and adapter name), and a name derived from the id byte for
//! byte overflows the 255-byte file-name limit. Pending gradients are not written: a snapshot is
//! the state right after a completed step, and a crash loses at most the `forward_backward` work
//! since then.
//!
//! On start-up [`ModelService::restore_live`] registers every snapshot found as a spilled
//! adapter (nothing is read until its first request, so start-up stays fast). `unload` deletes
//! the snapshot. Without an active writer (in-process tests) none of this costs anything.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::Duration;

use super::{ModelService, Slot, SlotState, checkpoint, lock};
use crate::engine::parallel::Replicated;
use crate::engine::{Adapter, ModelRuntime};

/// Subdirectory of the spill directory holding the snapshots.
pub const LIVE_DIR: &str = "live";

/// The snapshot queue and directory of one model service.
pub struct Snapshots {
    root: PathBuf,
    /// Whether a writer runs: without one (in-process tests), nothing is queued.
    active: AtomicBool,
    queue: Mutex<BTreeSet<String>>,
    wake: Condvar,
    /// Numbers host copies (taken under the adapter lock, so per adapter it follows the order
    /// of its states).
    generation: AtomicU64,
}

/// A host copy of an adapter to be written as its snapshot.
pub(super) struct SnapCopy {
    host: Adapter,
    generation: u64,
}

/// File inside a snapshot or spill directory holding the adapter id it belongs to.
pub const ID_FILE: &str = "adapter_id";

/// The directory name of adapter `id`'s snapshot or spill: 64 hex digits of its SHA-256, a safe
/// and short file name whatever the id (plus the temp suffix of `write_dir_atomic`).
pub fn key(id: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(id.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

/// The id a snapshot directory was written for (its [`ID_FILE`]).
fn id_of(dir: &Path) -> Option<String> {
    std::fs::read_to_string(dir.join(ID_FILE)).ok().filter(|id| key(id) == dir_name(dir))
}

fn dir_name(dir: &Path) -> String {
    dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

impl Snapshots {
    pub fn new(spill_dir: &Path) -> Self {
        Snapshots {
            root: spill_dir.join(LIVE_DIR),
            active: AtomicBool::new(false),
            queue: Mutex::new(BTreeSet::new()),
            wake: Condvar::new(),
            generation: AtomicU64::new(0),
        }
    }

    fn active(&self) -> bool {
        self.active.load(Ordering::Relaxed)
    }

    /// Where adapter `id`'s snapshot lives.
    pub fn dir(&self, id: &str) -> PathBuf {
        self.root.join(key(id))
    }

    /// Whether `dir` is a snapshot (kept when the adapter is reloaded from it, unlike a spill).
    pub fn owns(&self, dir: &Path) -> bool {
        dir.starts_with(&self.root)
    }

    /// Queues a snapshot of adapter `id` (coalesced with one already queued).
    pub fn schedule(&self, id: &str) {
        if !self.active() {
            return;
        }
        lock(&self.queue).insert(id.to_string());
        self.wake.notify_one();
    }

    /// Forgets adapter `id`: drops a queued snapshot and deletes the written one.
    pub fn discard(&self, id: &str) {
        lock(&self.queue).remove(id);
        let _ = std::fs::remove_dir_all(self.dir(id));
    }

    /// The next queued id, waiting up to `wait`.
    fn next(&self, wait: Duration) -> Option<String> {
        let mut q = lock(&self.queue);
        if q.is_empty() {
            q = self
                .wake
                .wait_timeout(q, wait)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
        q.pop_first()
    }

    /// Snapshots on disk: (id, dir). Leftover temp directories of an interrupted write are
    /// removed (the previous complete snapshot, if any, is still in place).
    fn found(&self) -> Vec<(String, PathBuf)> {
        let Ok(rd) = std::fs::read_dir(&self.root) else { return Vec::new() };
        let entries: Vec<_> = rd.flatten().collect();
        // A crash between "move the old snapshot aside" and "rename the new one in" (see
        // `write_dir_atomic`) leaves only `.<key>.old-…`: that one is the last complete state.
        for e in &entries {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some((key, _)) = name.strip_prefix('.').and_then(|n| n.split_once(".old-")) {
                let _ = std::fs::rename(e.path(), self.root.join(key));
            }
        }
        let Ok(rd) = std::fs::read_dir(&self.root) else { return Vec::new() };
        let mut out = Vec::new();
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                let _ = std::fs::remove_dir_all(e.path());
                continue;
            }
            match id_of(&e.path()) {
                Some(id) if e.path().join("adapter_config.json").is_file() => {
                    out.push((id, e.path()))
                }
                _ => tracing::warn!(dir = %e.path().display(), "ignoring a stray snapshot entry"),
            }
        }
        out
    }
}

impl<R: ModelRuntime> ModelService<R> {
    /// Registers every adapter snapshotted by a previous run of this application, as spilled
    /// (loaded on first use). A newer idle spill of the same adapter (it was idle at the crash:
    /// it holds the same step plus pending gradients) wins over the snapshot. Returns how many.
    pub fn restore_live(&self) -> usize {
        let mut map = lock(&self.adapters);
        let mut n = 0;
        for (id, snap) in self.snaps.found() {
            if map.contains_key(&id) {
                continue;
            }
            let spill = self.spill_path(&id);
            let dir = if spill.join("adapter_config.json").is_file() { spill } else { snap };
            map.insert(id, Arc::new(Slot::new(SlotState::Spilled(dir))));
            n += 1;
        }
        if n > 0 {
            tracing::info!(adapters = n, "restored live adapters from their last snapshots");
        }
        n
    }

    /// A host copy of `adapter` for its snapshot, taken while its lock is held; `None` when
    /// snapshots are off (nothing copied) or the copy failed (logged; the background writer
    /// tries again).
    pub(super) fn snapshot_copy(&self, id: &str, adapter: &Replicated<R>) -> Option<SnapCopy> {
        if !self.snaps.active() {
            return None;
        }
        match self.engine.download(adapter) {
            Ok(host) => {
                let generation = self.snaps.generation.fetch_add(1, Ordering::Relaxed) + 1;
                Some(SnapCopy { host, generation })
            }
            Err(e) => {
                tracing::warn!(model_id = %id, error = %e, "cannot copy adapter for its snapshot");
                self.snaps.schedule(id);
                None
            }
        }
    }

    /// Writes `copy` as the snapshot of adapter `id` (whose slot is `slot`), without the
    /// adapter lock. Returns once this copy or a later one is on disk; writes nothing for a
    /// slot that was unloaded (its snapshot must not resurrect it after a restart).
    pub(super) fn write_snapshot(
        &self,
        id: &str,
        slot: &Arc<Slot<R>>,
        copy: SnapCopy,
    ) -> Result<(), super::AppError> {
        let mut written = lock(&slot.snap_written);
        if copy.generation <= *written {
            return Ok(());
        }
        // `unload` takes `snap_written` before removing the slot, so this answer holds until
        // the write below is done.
        let still = lock(&self.adapters).get(id).is_some_and(|s| Arc::ptr_eq(s, slot));
        if !still {
            return Ok(());
        }
        checkpoint::spill(&copy.host, id, false, &self.snaps.dir(id))?;
        *written = copy.generation;
        Ok(())
    }

    /// Writes adapter `id`'s snapshot now (the writer thread's job; tests call it directly).
    /// The adapter lock is held only for the host copy.
    pub fn snapshot_now(&self, id: &str) -> Result<(), super::AppError> {
        let Ok(slot) = self.slot(id) else { return Ok(()) };
        let copy = {
            let state = lock(&slot.state);
            match &*state {
                SlotState::Loaded { adapter, .. } => {
                    let host = self.engine.download(adapter)?;
                    let generation = self.snaps.generation.fetch_add(1, Ordering::Relaxed) + 1;
                    SnapCopy { host, generation }
                }
                // Spilled: unchanged since its last snapshot; removed: nothing to keep.
                _ => return Ok(()),
            }
        };
        self.write_snapshot(id, &slot, copy)
    }

    /// Writes every queued snapshot now; returns how many were written.
    pub fn flush_snapshots(&self) -> usize {
        let mut n = 0;
        while let Some(id) = self.snaps.next(Duration::ZERO) {
            match self.snapshot_now(&id) {
                Ok(()) => n += 1,
                Err(e) => tracing::warn!(model_id = %id, error = %e, "cannot snapshot adapter"),
            }
        }
        n
    }

    /// Starts the snapshot writer (a background thread that ends with the service).
    pub fn spawn_snapshotter(self: &Arc<Self>) -> std::thread::JoinHandle<()> {
        self.enable_snapshots();
        let weak: Weak<Self> = Arc::downgrade(self);
        std::thread::spawn(move || {
            loop {
                let Some(svc) = weak.upgrade() else { return };
                let Some(id) = svc.snaps.next(Duration::from_millis(500)) else { continue };
                if let Err(e) = svc.snapshot_now(&id) {
                    tracing::warn!(model_id = %id, error = %e, "cannot snapshot adapter");
                }
            }
        })
    }

    /// Enables snapshots without a writer thread (tests drive [`Self::flush_snapshots`]).
    pub fn enable_snapshots(&self) {
        self.snaps.active.store(true, Ordering::Relaxed);
    }

    /// A background thread that calls [`sweep_idle`](Self::sweep_idle) every `every` until the
    /// service is dropped.
    pub fn spawn_sweeper(self: &Arc<Self>, every: Duration) -> std::thread::JoinHandle<()> {
        crate::apps::every_while_alive(self, every, |svc| {
            svc.sweep_idle();
        })
    }

    /// How often the sweeper should look: a fraction of the timeout, between 0.1 s and 5 s.
    pub fn sweep_interval(&self) -> Duration {
        (self.timeout / 4).clamp(Duration::from_millis(100), Duration::from_secs(5))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_short_file_names_for_any_id() {
        let long = format!("{}/session_{}-default", "a".repeat(64), "b".repeat(32));
        for id in ["a", "run-1:train:0", "ü/..", "x y", "", long.as_str()] {
            let k = key(id);
            assert_eq!(k.len(), 64);
            assert!(k.bytes().all(|b| b.is_ascii_hexdigit()), "{k}");
        }
        assert_ne!(key("a"), key("b"));
    }

    #[test]
    fn a_long_id_snapshots_and_is_found_again() {
        // 113 bytes, like a Twinkle id: hex of it plus the temp suffix was over 255 bytes.
        let id = format!("{}/session_{}-default", "a".repeat(64), "b".repeat(32));
        let t = tempfile::tempdir().unwrap();
        let snaps = Snapshots::new(t.path());
        let spec = crate::engine::cuda::bench_shape("tiny").unwrap();
        let cfg = crate::engine::cuda::spec_config(&spec);
        let attn = crate::engine::LoraTargets {
            train_mlp: false,
            train_unembed: false,
            ..crate::engine::LoraTargets::ALL
        };
        let lora = crate::engine::LoraConfig::from_tinker(2, 4.0, attn, 1);
        let adapter = crate::engine::Adapter::for_config(&cfg, &lora).unwrap();
        checkpoint::spill(&adapter, &id, false, &snaps.dir(&id)).unwrap();
        let found = snaps.found();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].0, id);
    }

    #[test]
    fn an_interrupted_replace_keeps_the_previous_snapshot() {
        let t = tempfile::tempdir().unwrap();
        let snaps = Snapshots::new(t.path());
        let put = |name: &str, id: &str| {
            let d = t.path().join(LIVE_DIR).join(name);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("adapter_config.json"), "{}").unwrap();
            std::fs::write(d.join(ID_FILE), id).unwrap();
        };
        // "ab": only the moved-aside old snapshot and a half-written temp; "cd": complete.
        put(&format!(".{}.old-1-2", key("ab")), "ab");
        put(&format!(".{}.tmp-1-2", key("ab")), "ab");
        put(&key("cd"), "cd");
        // A directory whose id file does not match its name is not anyone's snapshot.
        put(&key("ef"), "xx");
        let mut ids: Vec<String> = snaps.found().into_iter().map(|(id, _)| id).collect();
        ids.sort();
        assert_eq!(ids, ["ab", "cd"]);
        let left = std::fs::read_dir(t.path().join(LIVE_DIR)).unwrap().count();
        assert_eq!(left, 3, "temp directories are removed, the stray entry is left alone");
    }
}
