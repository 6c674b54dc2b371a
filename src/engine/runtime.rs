//! The device seam: everything the model and sampler applications need from one device's model
//! runtime, as one trait with two implementations side by side — [`CpuRuntime`](super::cpu::CpuRuntime)
//! (`engine/cpu/`) and [`CudaRuntime`](super::cuda::CudaRuntime) (`engine/cuda/`). The
//! applications are generic over it and pick the implementation once at start-up from
//! `device_type`; [`DataParallel`](super::parallel::DataParallel) runs over it with one runtime
//! per card. A missing operation on either device is a compile error.
//!
//! Ownership: the host [`Adapter`] is the unit of checkpoints (PEFT files, optimizer state) and
//! of adapter creation; [`ModelRuntime::Adapter`] is the same adapter resident on the device
//! (weights, accumulated gradients, Adam moments and step), moved across by
//! [`upload_adapter`](ModelRuntime::upload_adapter) / [`download_adapter`](ModelRuntime::download_adapter)
//! only when a checkpoint is written or read, never per step.
//!
//! Semantics shared by both implementations (and checked against each other in the tests):
//! the batch validation and packing of `engine::batch`, summed losses, gradients ADDED until
//! `optim_step`, and one sampling definition (`engine::sampling`).

use super::batch::{CachedGroup, EvalGroup, FwdBwdOutput, TrainGroup};
use super::error::Result;
use super::lora::Adapter;
use super::loss::{Datum, LossFn};
use super::models::ModelConfig;
use super::optim::{AdamParams, OptimMetrics};
use super::sampling::SamplingParams;

/// One device's model runtime: the frozen base model resident on the device, plus the
/// operations over device-resident adapters and KV caches.
pub trait ModelRuntime: Send + Sync + 'static {
    /// A LoRA adapter resident on this device (weights, gradients, Adam moments, step).
    type Adapter: Send + Sync + 'static;
    /// KV-cache slots for generation, resident on this device.
    type Cache: Send + 'static;
    /// Last-position logits of a [`forward_cached`](Self::forward_cached) call (one row per
    /// sequence), left on the device until tokens are selected.
    type Logits: Send;

    /// A short device name for logs and errors (`cpu`, `cuda:0`).
    fn device_name(&self) -> String;

    /// The base model's configuration.
    fn config(&self) -> &ModelConfig;

    /// Places a host adapter (weights, gradients, moments, step) on the device.
    fn upload_adapter(&self, host: &Adapter) -> Result<Self::Adapter>;

    /// Copies the device adapter's weights, gradients, moments and step into `host` (an adapter
    /// of the same configuration, usually the one it was uploaded from).
    fn download_adapter(&self, adapter: &Self::Adapter, host: &mut Adapter) -> Result<()>;

    /// A second copy of a device adapter on the same device (weights, gradients, moments,
    /// step): taken before an optimizer step so that a step which fails or panics half-way
    /// can be undone by putting the copy back.
    fn copy_adapter(&self, adapter: &Self::Adapter) -> Result<Self::Adapter>;

    /// Forward and backward over a batch; the gradients are ADDED to the adapter's accumulated
    /// gradients.
    fn forward_backward(
        &self,
        adapter: &mut Self::Adapter,
        data: &[Datum],
        loss: &LossFn,
    ) -> Result<FwdBwdOutput>;

    /// Forward only (logprobs and losses, no gradients); `None` evaluates the base model.
    fn forward(
        &self,
        adapter: Option<&Self::Adapter>,
        data: &[Datum],
        loss: &LossFn,
    ) -> Result<FwdBwdOutput>;

    /// [`forward_backward`](Self::forward_backward) of several tenants' groups (distinct
    /// adapters, each its own datums and loss), one result per group in order, each as if the
    /// group ran alone; a group with invalid input fails alone. A runtime that can share one
    /// pass over the base weights among the groups overrides this; the default runs them one
    /// after another.
    fn forward_backward_many(
        &self,
        groups: &mut [TrainGroup<'_, Self::Adapter>],
    ) -> Vec<Result<FwdBwdOutput>> {
        groups.iter_mut().map(|g| self.forward_backward(g.adapter, g.data, g.loss)).collect()
    }

    /// [`forward`](Self::forward) of several groups (see
    /// [`forward_backward_many`](Self::forward_backward_many)).
    fn forward_many(&self, groups: &[EvalGroup<'_, Self::Adapter>]) -> Vec<Result<FwdBwdOutput>> {
        groups.iter().map(|g| self.forward(g.adapter, g.data, g.loss)).collect()
    }

    /// One AdamW step with the accumulated gradients, which it then clears.
    fn optim_step(&self, adapter: &mut Self::Adapter, params: &AdamParams) -> Result<OptimMetrics>;

    /// Clears the accumulated gradients.
    fn zero_grad(&self, adapter: &mut Self::Adapter) -> Result<()>;

    /// The accumulated gradients as one host vector (per module `lora_A` then `lora_B`, modules
    /// in [`Adapter::pairs`] order): what data parallelism reduces.
    fn grads_to_host(&self, adapter: &Self::Adapter) -> Result<Vec<f32>>;

    /// Replaces the accumulated gradients (layout of [`grads_to_host`](Self::grads_to_host)).
    fn grads_from_host(&self, adapter: &mut Self::Adapter, grads: &[f32]) -> Result<()>;

    /// KV-cache space for `max_seqs` sequences of up to `max_len` tokens each (all empty).
    fn new_cache(&self, max_seqs: usize, max_len: usize) -> Result<Self::Cache>;

    /// Copies the first `len` cached positions of slot `src` into slot `dst` (which must be
    /// empty): n samples of one prompt share its prefill.
    fn fork_slot(&self, cache: &mut Self::Cache, src: usize, dst: usize) -> Result<()>;

    /// Feeds `tokens[i]` to cache slot `slots[i]` (a prefill when the slot is empty, one or more
    /// tokens later) and returns the logits of each sequence's last new position.
    fn forward_cached(
        &self,
        adapter: Option<&Self::Adapter>,
        cache: &mut Self::Cache,
        slots: &[usize],
        tokens: &[&[u32]],
    ) -> Result<Self::Logits>;

    /// [`forward_cached`](Self::forward_cached) of several requests' groups (each its own
    /// adapter and cache): one logits result per group, in order, each as if the group ran
    /// alone; a group with invalid input fails alone and its cache is left as it was. A runtime
    /// that can feed all groups through one pass over the base weights overrides this; the
    /// default runs them one after another.
    fn forward_cached_many(
        &self,
        groups: &mut [CachedGroup<'_, Self::Adapter, Self::Cache>],
    ) -> Vec<Result<Self::Logits>> {
        groups
            .iter_mut()
            .map(|g| self.forward_cached(g.adapter, g.cache, g.slots, g.tokens))
            .collect()
    }

    /// Picks one token per logits row with `engine::sampling`'s definition (row `i` with
    /// `params[i]` and the uniform draw `uniforms[i]`): (token, logprob of the raw
    /// distribution).
    fn select_tokens(
        &self,
        logits: &Self::Logits,
        params: &[SamplingParams],
        uniforms: &[f32],
    ) -> Result<Vec<(u32, f32)>>;

    /// The logits rows on the host (`[vocab]` per row): for tests and tooling.
    fn logits_to_host(&self, logits: &Self::Logits) -> Result<Vec<Vec<f32>>>;
}
