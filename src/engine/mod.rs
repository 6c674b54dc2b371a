//! The compute engine: tensors, the backend boundary (CPU today), model architectures, LoRA,
//! losses, AdamW.
//!
//! Public API used by the server:
//! - [`Model::load`]`(dir) -> Arc<Model>`; [`Model::config`] (vocab, hidden, layers, eos ids, ...).
//! - [`LoraConfig`] `{ rank, alpha, targets, seed }` ([`LoraConfig::from_tinker`] maps Tinker's
//!   train_attn / train_mlp / train_unembed), [`Adapter::new`], [`Adapter::load_peft`],
//!   [`Adapter::save_peft`], [`Adapter::save_state`] / [`Adapter::load_state`] (with Adam moments).
//! - [`Datum`] `{ input_tokens, inputs: LossInputs { target_tokens, k, weights, logprobs,
//!   advantages } }`, [`LossFn::from_name`].
//! - [`forward_backward`]`(&model, Option<&mut Adapter>, &[Datum], &LossFn, forward_only)` ->
//!   [`FwdBwdOutput`] `{ per_datum: [DatumOutput { logprobs, elementwise_loss }], loss_sum }`;
//!   gradients accumulate in the adapter until [`Adapter::optim_step`]`(&AdamParams)`.
//!   [`forward`] is the forward-only variant with a shared adapter borrow;
//!   [`Model::sequence_logprobs`] gives next-token logprobs of one sequence (prompt logprobs).
//! - Generation: [`KvCache::new`] per sequence and [`Model::forward_cached`] (prefill and
//!   incremental decode of several sequences, last-position logits); [`Model::logits`] for a
//!   whole sequence.
//! - Data parallel: [`parallel::DataParallel`] over N [`parallel::Worker`]s (one per device;
//!   [`parallel::CpuWorker`] on CPU) splits a batch by tokens and sums the shards' gradients into
//!   the master adapter on the host.
//! - [`golden::verify`] checks the engine against a PyTorch fixture case directory.

pub mod backend;
pub mod cuda;
pub mod error;
pub mod golden;
pub mod kv_cache;
pub mod lora;
pub mod loss;
pub mod models;
pub mod optim;
pub mod parallel;
pub mod rng;
pub mod sampling;
pub mod synth;
pub mod tensor;
mod train;
mod transformer;
pub mod weights;

pub use error::{EngineError, Result};
pub use kv_cache::KvCache;
pub use lora::{Adapter, LoraConfig, Target};
pub use loss::{Datum, DatumOutput, LossFn, LossInputs};
pub use models::{Model, ModelConfig};
pub use optim::{AdamParams, OptimMetrics};
pub use tensor::Tensor;
pub use train::{FwdBwdOutput, forward, forward_backward};
