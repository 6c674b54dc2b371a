//! [`CudaRuntime`]: the device seam on one GPU. The base model is resident in its storage type
//! `T` (bf16 checkpoints stay bf16; f32 ones stay f32), adapters are [`CudaAdapter`]s (f32 LoRA
//! weights, gradients and Adam moments on the device), KV caches are [`CudaKvCache`]s and logits
//! stay on the device until tokens are selected (greedy rows on the device).
//!
//! All work of one runtime is enqueued on its device's single stream; a mutex serialises the
//! calls so two requests never interleave their kernels or share scratch buffers.
//!
//! Panics: the mutex guards no data (it only orders the calls), so its poisoning is ignored and
//! a call that panicked leaves nothing half-written under it; workspace buffers go back to the
//! pool as the unwinding drops them. [`DataParallel`](crate::engine::parallel::DataParallel)
//! turns the panic into an error and restores the adapter's gradient, enqueued on the same
//! stream after whatever the failed call had queued.

use std::sync::{Arc, Mutex, MutexGuard};

use cudarc::driver::CudaSlice;

use super::decode::CudaKvCache;
use super::model::{Act, CudaModel, download, view};
use super::{CudaAdapter, CudaDevice, CudaError};
use crate::engine::batch::{CachedGroup, EvalGroup, FwdBwdOutput, TrainGroup};
use crate::engine::error::{EngineError, Result};
use crate::engine::lora::Adapter;
use crate::engine::loss::{Datum, LossFn};
use crate::engine::models::{Model, ModelConfig};
use crate::engine::optim::{AdamParams, OptimMetrics};
use crate::engine::runtime::ModelRuntime;
use crate::engine::sampling::SamplingParams;

/// The base model on one GPU, stored as `T`.
pub struct CudaRuntime<T: Act> {
    name: String,
    model: CudaModel<T>,
    serial: Mutex<()>,
}

impl<T: Act> std::fmt::Debug for CudaRuntime<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaRuntime").field("name", &self.name).finish()
    }
}

/// Logits rows `[rows, vocab]` (f32) on the device.
pub struct CudaLogits {
    data: CudaSlice<f32>,
    rows: usize,
}

impl<T: Act> CudaRuntime<T> {
    /// Opens visible device `ordinal` and uploads `model`'s weights in `T`.
    pub fn new(ordinal: usize, model: &Model) -> std::result::Result<Self, CudaError> {
        let dev = Arc::new(CudaDevice::new(ordinal)?);
        let model = CudaModel::<T>::new(dev, model)?;
        Ok(CudaRuntime { name: format!("cuda:{ordinal}"), model, serial: Mutex::new(()) })
    }

    /// Wraps a model already on its device (e.g. [`CudaModel::synthetic`] for benchmarks).
    pub fn from_model(model: CudaModel<T>) -> Self {
        let name = format!("cuda:{}", model.device().context().ordinal());
        CudaRuntime { name, model, serial: Mutex::new(()) }
    }

    /// The device-resident model.
    pub fn model(&self) -> &CudaModel<T> {
        &self.model
    }

    fn lock(&self) -> MutexGuard<'_, ()> {
        self.serial.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Maps a backend error to the engine's: input errors keep their message (they are the
    /// caller's fault), everything else names this device.
    fn err(&self) -> impl Fn(CudaError) -> EngineError + '_ {
        move |e| match e {
            CudaError::Engine(e) => e,
            other => EngineError::Device { device: self.name.clone(), message: other.to_string() },
        }
    }
}

impl<T: Act + Send + Sync + 'static> ModelRuntime for CudaRuntime<T> {
    type Adapter = CudaAdapter;
    type Cache = CudaKvCache<T>;
    type Logits = CudaLogits;

    fn device_name(&self) -> String {
        self.name.clone()
    }

    fn config(&self) -> &ModelConfig {
        self.model.config()
    }

    fn upload_adapter(&self, host: &Adapter) -> Result<CudaAdapter> {
        host.check_fits(self.config())?;
        let _g = self.lock();
        CudaAdapter::upload(&self.model, host).map_err(self.err())
    }

    fn download_adapter(&self, adapter: &CudaAdapter, host: &mut Adapter) -> Result<()> {
        let _g = self.lock();
        adapter.download_into(self.model.device(), host).map_err(self.err())
    }

    fn copy_adapter(&self, adapter: &CudaAdapter) -> Result<CudaAdapter> {
        let _g = self.lock();
        adapter.copy_on_device(self.model.device()).map_err(self.err())
    }

    fn forward_backward(
        &self,
        adapter: &mut CudaAdapter,
        data: &[Datum],
        loss: &LossFn,
    ) -> Result<FwdBwdOutput> {
        let _g = self.lock();
        super::forward_backward(&self.model, Some(adapter), data, loss, false).map_err(self.err())
    }

    fn forward(
        &self,
        adapter: Option<&CudaAdapter>,
        data: &[Datum],
        loss: &LossFn,
    ) -> Result<FwdBwdOutput> {
        let _g = self.lock();
        super::train::forward_only(&self.model, adapter, data, loss).map_err(self.err())
    }

    fn forward_backward_many(
        &self,
        groups: &mut [TrainGroup<'_, CudaAdapter>],
    ) -> Vec<Result<FwdBwdOutput>> {
        let _g = self.lock();
        let out = super::forward_backward_many(&self.model, groups);
        out.into_iter().map(|r| r.map_err(self.err())).collect()
    }

    fn forward_many(&self, groups: &[EvalGroup<'_, CudaAdapter>]) -> Vec<Result<FwdBwdOutput>> {
        let _g = self.lock();
        let out = super::forward_many(&self.model, groups);
        out.into_iter().map(|r| r.map_err(self.err())).collect()
    }

    fn optim_step(&self, adapter: &mut CudaAdapter, params: &AdamParams) -> Result<OptimMetrics> {
        let _g = self.lock();
        adapter.optim_step(self.model.device(), params).map_err(self.err())
    }

    fn zero_grad(&self, adapter: &mut CudaAdapter) -> Result<()> {
        let _g = self.lock();
        adapter.zero_grad(self.model.device()).map_err(self.err())
    }

    fn grads_to_host(&self, adapter: &CudaAdapter) -> Result<Vec<f32>> {
        let _g = self.lock();
        adapter.grads_to_host(self.model.device()).map_err(self.err())
    }

    fn grads_from_host(&self, adapter: &mut CudaAdapter, grads: &[f32]) -> Result<()> {
        let _g = self.lock();
        adapter.grads_from_host(self.model.device(), grads).map_err(self.err())
    }

    fn new_cache(&self, max_seqs: usize, max_len: usize) -> Result<CudaKvCache<T>> {
        let _g = self.lock();
        CudaKvCache::new(&self.model, max_seqs, max_len).map_err(self.err())
    }

    fn fork_slot(&self, cache: &mut CudaKvCache<T>, src: usize, dst: usize) -> Result<()> {
        let _g = self.lock();
        cache.fork_slot(&self.model, src, dst).map_err(self.err())
    }

    fn forward_cached(
        &self,
        adapter: Option<&CudaAdapter>,
        cache: &mut CudaKvCache<T>,
        slots: &[usize],
        tokens: &[&[u32]],
    ) -> Result<CudaLogits> {
        let _g = self.lock();
        let mut g = CachedGroup { adapter, cache, slots, tokens };
        let data = self.model.forward_cached_device(&mut g).map_err(self.err())?;
        Ok(CudaLogits { data, rows: slots.len() })
    }

    fn forward_cached_many(
        &self,
        groups: &mut [CachedGroup<'_, CudaAdapter, CudaKvCache<T>>],
    ) -> Vec<Result<CudaLogits>> {
        let _g = self.lock();
        let rows: Vec<usize> = groups.iter().map(|g| g.slots.len()).collect();
        let out = self.model.forward_cached_many_device(groups);
        out.into_iter()
            .zip(rows)
            .map(|(r, rows)| r.map(|data| CudaLogits { data, rows }).map_err(self.err()))
            .collect()
    }

    fn select_tokens(
        &self,
        logits: &CudaLogits,
        params: &[SamplingParams],
        uniforms: &[f32],
    ) -> Result<Vec<(u32, f32)>> {
        if params.len() != logits.rows {
            return Err(EngineError::InvalidInput(format!(
                "{} rows of logits with {} parameter sets",
                logits.rows,
                params.len()
            )));
        }
        let _g = self.lock();
        self.model.select_tokens(&logits.data, params, uniforms).map_err(self.err())
    }

    fn logits_to_host(&self, logits: &CudaLogits) -> Result<Vec<Vec<f32>>> {
        let _g = self.lock();
        let v = self.config().vocab_size;
        let host = view(&logits.data, 0, logits.rows * v)
            .and_then(|lv| download(self.model.device(), &lv))
            .map_err(self.err())?;
        Ok(host.chunks(v).map(<[f32]>::to_vec).collect())
    }
}
