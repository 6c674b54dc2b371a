//! Restart durability of the Twinkle layer: the training state of each adapter (what
//! `add_adapter_to_model` and the `set_*` calls configured, plus the step counters) is kept in a
//! small JSON file next to the adapter snapshots, so a model application restarted by its node
//! agent serves the same adapters to the same clients. The engine side (weights, Adam moments)
//! comes back from `durable.rs`; this file only says how the client configured it.
//!
//! The file holds the request bodies of the configuring calls (the latest of each) rather than a
//! second serialised form of the parsed state: on start-up they are replayed through the same
//! parsing code, so the restored state cannot drift from what a live call would have built.
//! Written atomically (`runs::write_json`: temp + rename) after every call that changes it; removed when the
//! adapter expires. Engine adapters of Twinkle shape left without a journal (a crash between
//! the two writes, or a journal removed by hand) are unloaded on start-up instead of being kept
//! forever with no client able to reach them.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::{TrainState, TwinkleModel, lock};
use crate::apps::model::durable;
use crate::apps::twinkle_http::Call;
use crate::protocol::internal::UnloadRequest;
use crate::protocol::twinkle::runs;
use crate::protocol::twinkle::{Caller, Gen, TwinkleError};

/// Subdirectory of the model application's spill directory holding the journals.
pub const JOURNAL_DIR: &str = "twinkle";

/// Calls whose body configures an adapter (replayed in their first-call order on restore).
pub(super) const CONFIG_OPS: &[&str] = &[
    "add_adapter_to_model",
    "set_template",
    "set_processor",
    "set_loss",
    "set_optimizer",
    "set_lr_scheduler",
];
/// Calls after which the counters (steps, scheduler steps, samples) are written.
const COUNTER_OPS: &[&str] =
    &["step", "clip_grad_and_step", "lr_step", "save", "load", "resume_from_checkpoint"];

/// One adapter's journal file.
#[derive(Debug, Serialize, Deserialize)]
struct Entry {
    owner: String,
    scope: Option<String>,
    gen1: bool,
    ops: Vec<(String, Map<String, Value>)>,
    cur_step: u64,
    sched_steps: u64,
    consumed_train_samples: u64,
    /// Creation time, seconds since the Unix epoch (the maximum lifetime spans restarts).
    #[serde(default)]
    created_unix: u64,
}

/// Whether a model-service id has the Twinkle layer's shape `{owner hash}/{run id}` (a Tinker
/// id never contains `/`, and a Twinkle scope or adapter name cannot).
fn is_twinkle_id(id: &str) -> bool {
    id.split_once('/')
        .is_some_and(|(o, _)| o.len() == 64 && o.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Records a configuring call's body in the adapter's state (replacing an earlier one of the
/// same call, keeping its place).
pub(super) fn remember(st: &mut TrainState, op: &str, body: &Map<String, Value>) {
    match st.config_ops.iter_mut().find(|(o, _)| o == op) {
        Some(slot) => slot.1 = body.clone(),
        None => st.config_ops.push((op.to_string(), body.clone())),
    }
}

impl TwinkleModel {
    /// Keeps the adapters' journals in `dir` (the model application does; in-process tests
    /// may not).
    pub fn with_journal(mut self, dir: PathBuf) -> Self {
        self.journal = Some(dir);
        self
    }

    fn journal_path(&self, engine_id: &str) -> Option<PathBuf> {
        self.journal.as_ref().map(|d| d.join(format!("{}.json", durable::key(engine_id))))
    }

    /// Whether a successful `op` changes what the journal holds.
    pub(super) fn journaled(&self, op: &str) -> bool {
        self.journal.is_some() && (CONFIG_OPS.contains(&op) || COUNTER_OPS.contains(&op))
    }

    /// After a successful [`journaled`](Self::journaled) `op`: records a configuring body and
    /// writes the journal. A failed write is logged: the call itself succeeded, and only a
    /// later restart would miss it.
    pub(super) fn journal_after(&self, c: Call) {
        let Ok(s) = self.state(c) else { return };
        let mut st = lock(&s);
        if CONFIG_OPS.contains(&c.op) {
            remember(&mut st, c.op, c.body);
        }
        let entry = Entry {
            owner: c.caller.owner.clone(),
            scope: c.caller.scope.clone(),
            gen1: c.g == Gen::One,
            ops: st.config_ops.clone(),
            cur_step: st.cur_step,
            sched_steps: st.sched_steps,
            consumed_train_samples: st.consumed_train_samples,
            created_unix: st
                .created
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        };
        let Some(path) = self.journal_path(&st.engine_id) else { return };
        // Written under the adapter's lock: two calls of one adapter never interleave writes.
        if let Err(e) = runs::write_json(&path, &entry) {
            tracing::warn!(adapter = %st.engine_id, error = %e, "cannot write the twinkle journal");
        }
    }

    /// Deletes adapter `engine_id`'s journal (it expired or could not be restored).
    pub(super) fn journal_forget(&self, engine_id: &str) {
        if let Some(p) = self.journal_path(engine_id) {
            let _ = std::fs::remove_file(p);
        }
    }

    /// Registers again every adapter a previous life of this application journaled whose
    /// engine adapter came back (from its snapshot); unloads Twinkle-shaped engine adapters
    /// with no journal, and drops journals whose engine adapter is gone. Returns how many came
    /// back. Their idle clock starts now: a client that is gone lets them expire as usual.
    pub fn restore(&self) -> usize {
        let Some(dir) = self.journal.clone() else { return 0 };
        let live: Vec<String> = self.app.info().adapters;
        let mut restored = 0;
        for path in journal_files(&dir) {
            let entry = match runs::read_json::<Entry>(&path) {
                Ok(Some(e)) => e,
                // Removed since the directory was listed.
                Ok(None) => continue,
                Err(e) => {
                    tracing::warn!(file = %path.display(), error = %e, "dropping an unreadable twinkle journal");
                    let _ = std::fs::remove_file(&path);
                    continue;
                }
            };
            let caller = Caller { owner: entry.owner.clone(), scope: entry.scope.clone() };
            match self.replay(&caller, &entry, &live) {
                Ok(id) => {
                    tracing::info!(adapter = %id, step = entry.cur_step, "twinkle adapter restored");
                    restored += 1;
                }
                Err(e) => {
                    tracing::warn!(file = %path.display(), error = %e, "cannot restore a twinkle adapter; dropping it");
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        let known: Vec<String> = lock(&self.adapters).keys().cloned().collect();
        for id in live.iter().filter(|id| is_twinkle_id(id) && !known.contains(id)) {
            tracing::warn!(adapter = %id, "unloading a twinkle adapter with no training state");
            if let Err(e) = self.app.unload(&UnloadRequest { model_id: id.clone() }) {
                tracing::warn!(adapter = %id, error = %e, "cannot unload an orphaned adapter");
            }
        }
        restored
    }

    /// Rebuilds one adapter's state from its journal (its engine adapter must be in `live`).
    fn replay(&self, caller: &Caller, e: &Entry, live: &[String]) -> Result<String, TwinkleError> {
        let g = if e.gen1 { Gen::One } else { Gen::Two };
        let add = e
            .ops
            .first()
            .filter(|(op, _)| op == "add_adapter_to_model")
            .map(|(_, body)| body)
            .ok_or_else(|| {
                TwinkleError::bad("the journal does not start with add_adapter_to_model")
            })?;
        let name = super::adapter_name(add)?;
        let eid = super::engine_id(caller, &caller.adapter_id(&name)?);
        if !live.contains(&eid) {
            return Err(TwinkleError::NotFound(format!(
                "adapter `{eid}` did not come back (no snapshot)"
            )));
        }
        let first = Call { g, op: "add_adapter_to_model", caller, body: add };
        self.add_adapter_state(first)?;
        for (op, body) in &e.ops[1..] {
            self.apply(Call { g, op, caller, body })?;
        }
        let s = self.state(first)?;
        let mut st = lock(&s);
        for (op, body) in &e.ops {
            remember(&mut st, op, body);
        }
        st.cur_step = e.cur_step;
        st.sched_steps = e.sched_steps;
        st.consumed_train_samples = e.consumed_train_samples;
        if e.created_unix > 0 {
            st.created = std::time::UNIX_EPOCH + Duration::from_secs(e.created_unix);
        }
        st.last_seen = Instant::now();
        Ok(eid)
    }

    /// Inserts a prepared state (used by `add_adapter_to_model` and by restore).
    pub(super) fn insert_state(&self, st: TrainState) {
        let id = st.engine_id.clone();
        lock(&self.adapters).insert(id, Arc::new(Mutex::new(st)));
    }
}

fn journal_files(dir: &Path) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut out = Vec::new();
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            // A temp file of an interrupted write: the previous journal is still in place.
            let _ = std::fs::remove_file(e.path());
        } else if name.ends_with(".json") {
            out.push(e.path());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::is_twinkle_id;

    #[test]
    fn twinkle_ids_are_told_from_tinker_ids() {
        let owner = "ab".repeat(32);
        assert!(is_twinkle_id(&format!("{owner}/sess-default")));
        assert!(!is_twinkle_id("run-1:train:0"));
        assert!(!is_twinkle_id("abc/def"));
        assert!(!is_twinkle_id(&format!("{}/x", "zz".repeat(32))));
    }
}
