//! Checkpoint operations of the model service: `save` (PEFT directory, with the optimizer
//! state for training checkpoints), `load` (create-via-load or onto an existing adapter) and
//! `unload`, over the internal API.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use super::checkpoint::{OPTIM_META, check_peft_dir, write_dir_atomic};
use super::{AppError, ModelService, SlotState, lock};
use crate::engine::{Adapter, ModelRuntime};
use crate::protocol::internal::*;

impl<R: ModelRuntime> ModelService<R> {
    /// `POST /_internal/v1/save`.
    pub fn save(&self, req: &SaveRequest) -> Result<SaveResponse, AppError> {
        if !req.dir.is_absolute() {
            return Err(AppError::BadRequest(format!(
                "dir must be an absolute path, got {}",
                req.dir.display()
            )));
        }
        let size_bytes = self.with_adapter(&req.model_id, |adapter, _| {
            let adapter = self.engine.download(adapter)?;
            write_dir_atomic(&req.dir, |tmp| {
                match req.kind {
                    SaveKind::State => adapter.save_state(tmp)?,
                    SaveKind::Sampler => adapter.save_peft(tmp)?,
                }
                Ok(())
            })
        })?;
        Ok(SaveResponse { size_bytes })
    }

    fn load_checkpoint(&self, dir: &Path, with_optimizer: bool) -> Result<Adapter, AppError> {
        check_peft_dir(dir, "dir", "checkpoint")?;
        let model = self.config();
        let bad = |e: crate::engine::EngineError| {
            AppError::BadRequest(format!("cannot load checkpoint {}: {e}", dir.display()))
        };
        let adapter = if with_optimizer {
            if !dir.join(OPTIM_META).is_file() {
                return Err(AppError::BadRequest(format!(
                    "checkpoint {} has no optimizer state (a sampler checkpoint?); load it without the optimizer",
                    dir.display()
                )));
            }
            Adapter::load_state_for(dir, model).map_err(bad)?
        } else {
            Adapter::load_peft_for(dir, model).map_err(bad)?
        };
        adapter.check_fits(model).map_err(bad)?;
        Ok(adapter)
    }

    /// `POST /_internal/v1/load`: create-via-load (`create` present) or onto an existing id.
    pub fn load(&self, req: &LoadRequest) -> Result<(), AppError> {
        Self::check_id(&req.model_id)?;
        if req.create.is_some() {
            if lock(&self.adapters).contains_key(&req.model_id) {
                return Err(AppError::Conflict(format!(
                    "model_id `{}` already exists",
                    req.model_id
                )));
            }
            let adapter = self.load_checkpoint(&req.dir, req.with_optimizer)?;
            return self.insert(&req.model_id, adapter);
        }
        let Ok(slot) = self.slot(&req.model_id) else {
            // Unknown here (lost by a restart without a snapshot): loading re-attaches it, so
            // `load_state` recovers the run.
            let adapter = self.load_checkpoint(&req.dir, req.with_optimizer)?;
            return self.insert(&req.model_id, adapter);
        };
        let host = self.load_checkpoint(&req.dir, req.with_optimizer)?;
        let adapter = self.engine.upload(&host)?;
        let mut state = lock(&slot.state);
        if matches!(*state, SlotState::Removed) {
            return Err(AppError::NotFound(format!("model_id `{}` was unloaded", req.model_id)));
        }
        if let SlotState::Spilled(dir) = &*state {
            self.drop_spill(dir);
        }
        *state = SlotState::Loaded { adapter: Box::new(adapter), pending_grads: false };
        *lock(&slot.last_used) = Instant::now();
        drop(state);
        self.snaps.schedule(&req.model_id);
        Ok(())
    }

    /// `POST /_internal/v1/unload`: frees the adapter (and any spilled copy).
    pub fn unload(&self, req: &UnloadRequest) -> Result<(), AppError> {
        let gone = || AppError::NotFound(format!("model_id `{}` is not loaded here", req.model_id));
        let slot = self.slot(&req.model_id).map_err(|_| gone())?;
        // Taken before the slot leaves the map: a snapshot writer of this slot either finished
        // (its directory is deleted below) or sees the slot gone and writes nothing, so it never
        // races a new adapter created under the same id.
        let _writing = lock(&slot.snap_written);
        {
            let mut map = lock(&self.adapters);
            match map.get(&req.model_id) {
                Some(s) if Arc::ptr_eq(s, &slot) => map.remove(&req.model_id),
                _ => return Err(gone()),
            };
        }
        let mut state = lock(&slot.state);
        if let SlotState::Spilled(dir) = &*state {
            let _ = std::fs::remove_dir_all(dir);
        }
        *state = SlotState::Removed;
        self.snaps.discard(&req.model_id);
        Ok(())
    }
}
