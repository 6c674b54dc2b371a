//! The compute engine: one device seam ([`runtime::ModelRuntime`]) with two implementations
//! side by side, [`cpu`] (rayon + `gemm`) and [`cuda`] (NVRTC kernels + cuBLAS), plus what both
//! share: model configuration and weights, LoRA adapters and their checkpoints, losses, AdamW
//! parameters, the batch contract and the one sampling definition.
//!
//! Public API used by the applications:
//! - [`Model::load`]`(dir) -> Arc<Model>` (host weights) and [`Model::config`].
//! - [`LoraConfig`] `{ rank, alpha, targets, seed }`, [`Adapter::new`] / [`Adapter::for_config`],
//!   [`Adapter::load_peft`], [`Adapter::save_peft`], [`Adapter::save_state`] /
//!   [`Adapter::load_state`] (with Adam moments): host adapters are the unit of checkpoints.
//! - [`Datum`], [`LossFn::from_name`], [`FwdBwdOutput`].
//! - The seam: [`runtime::ModelRuntime`] (upload/download adapters, forward_backward, forward,
//!   optim_step, their multi-tenant `_many` forms, KV-cache prefill/decode and token
//!   selection), implemented by
//!   [`cpu::CpuRuntime`] and [`cuda::CudaRuntime`]; [`parallel::DataParallel`] runs N runtimes
//!   (one per card) with replicated adapters.
//! - Direct CPU entry points for tests and tools: [`forward_backward`], [`forward`],
//!   [`Model::forward_cached`], [`Model::logits`], [`Model::sequence_logprobs`].
//! - [`golden::verify`] checks the CPU engine against a PyTorch fixture case directory.

pub mod batch;
pub mod cpu;
pub mod cuda;
pub mod error;
pub mod golden;
pub mod lora;
pub mod loss;
pub mod models;
pub mod optim;
pub mod pages;
pub mod parallel;
pub mod rng;
pub mod runtime;
pub mod sampling;
pub mod sampling_weight;
pub mod synth;
pub mod tensor;
pub mod weight;
pub mod weights;

pub use batch::{BatchLimits, CachedGroup, EvalGroup, FwdBwdOutput, TrainGroup, check_batch};
pub use cpu::backend;
pub use cpu::{KvCache, forward, forward_backward, forward_backward_many, forward_many};
pub use error::{EngineError, Result};
pub use lora::{Adapter, AdapterShape, LoraConfig, LoraTargets, Target};
pub use loss::{Datum, DatumOutput, LossFn, LossInputs};
pub use models::{Model, ModelConfig};
pub use optim::{AdamParams, OptimMetrics};
pub use runtime::ModelRuntime;
pub use tensor::Tensor;
