//! The CUDA backend: hand-written kernels (`kernels/*.cu`) compiled at run time by NVRTC for the
//! device's exact `sm_XY` (CUBIN, cached per process), their Rust launchers, and the device
//! wrapper (context, stream, cuBLAS).
//!
//! Everything here loads the CUDA libraries lazily (cudarc `dynamic-loading`), and every entry
//! point first checks that the library is loadable, so a machine without CUDA gets a
//! [`CudaError`] instead of cudarc's panic. The head process never calls into this module's
//! device side: only children (started with `CUDA_VISIBLE_DEVICES`) create a [`CudaDevice`].
//!
//! | here | CPU analogue |
//! |---|---|
//! | [`CudaDevice`] | the thread pool + allocator |
//! | `CudaSlice<T>` / `CudaView<T>` (cudarc) | `Vec<T>` / `&[T]` |
//! | `launch::*` functions | the CPU twin functions (same shapes, same math) |
//!
//! Device-resident execution (mirrors the CPU engine's API, so the model app can switch on
//! "GPU present"):
//! - [`CudaModel::new`]`(Arc<CudaDevice>, &Model)` uploads the weights once (bf16, or f32 for
//!   checks); [`CudaModel::synthetic`] builds a random-weight shape on the device (benchmarks).
//! - [`CudaAdapter::upload`]`(&model, &Adapter)` / [`CudaAdapter::download_into`]: LoRA master
//!   weights, gradients and Adam moments in f32 on the device; checkpoints stay the host
//!   `Adapter`'s job. [`CudaAdapter::grads_to_host`] / [`CudaAdapter::grads_from_host`] for a
//!   data-parallel all-reduce; [`CudaAdapter::optim_step`]`(&dev, &AdamParams)`.
//! - [`forward_backward`]`(&model, Option<&mut CudaAdapter>, &[Datum], &LossFn, forward_only)`
//!   -> `FwdBwdOutput`, exactly the CPU engine's output semantics; [`forward_backward_many`] /
//!   [`forward_many`] run several tenants' groups in one pass over the base weights. Every
//!   LoRA product goes through the segmented kernels (`kernels/lora.cu`, S-LoRA/Punica style):
//!   a pass's rows are split into one segment per tenant and a per-pass table (`segment.rs`)
//!   gives each segment its adapter's addresses, rank and scale, so one launch serves all
//!   tenants and a single tenant is simply one segment.
//! - Generation: [`CudaKvCache::new`]`(&model, max_seqs, max_len)`,
//!   [`CudaModel::forward_cached_device`] (one request's prefill / decode, last-position logits
//!   per sequence, left on the device; [`CudaModel::forward_cached_many_device`] decodes several
//!   requests, each with its own adapter and cache, in one pass) and
//!   [`CudaModel::select_tokens`] (the one sampling definition of `engine::sampling`, greedy
//!   and stochastic rows both on the device; the draw's `exp` is `engine::sampling_weight`'s
//!   deterministic one, so host and device pick bit-identically).
//!
//! Decode steps are captured as CUDA graphs once per step shape and replayed per token
//! (`graph.rs`); token selection downloads each step's picks in one copy, the step's one host
//! synchronisation.
//!
//! Execution model: one stream per device, so cudarc's cross-stream event tracking is off and
//! ordering is the stream's. Per-op intermediates come from the device's buffer pool
//! (`workspace.rs`: exact-size reuse, no memset unless a kernel accumulates), the default memory
//! pool keeps freed memory, and a training step (`forward_backward`) or optimizer step
//! (`CudaAdapter::optim_step`) enqueues all its work and synchronises once, at its final
//! download.
//!
//! Library versions: cudarc is built with the `cuda-13000` bindings because, with dynamic
//! loading, the pinned major decides which sonames are searched: 13 searches `libnvrtc.so`,
//! `.so.13`, `.so.12`, `.so.11`, ... (likewise cuBLAS), so both CUDA 13 hosts and the CUDA 12
//! NVRTC wheel used in CI are found; the NVRTC / cuBLAS calls made here have the same ABI in
//! 12 and 13. The driver must be at least as new as the NVRTC that built the CUBIN (driver
//! 580 = CUDA 13.0 loads CUBIN from NVRTC 12.x and 13.0). `TWINKLE_NVRTC_LIB` names an exact
//! libnvrtc to use.

mod adapter;
mod decode;
mod device;
mod error;
mod generate;
mod graph;
mod head;
pub mod launch;
mod layer;
mod linear;
mod model;
mod nvrtc;
pub mod profile;
mod runtime;
mod segment;
mod synth;
mod train;
mod workspace;

pub use adapter::CudaAdapter;
pub use decode::CudaKvCache;
pub use device::{CudaDevice, cublas_available, driver_available};
pub use error::CudaError;
pub use model::{Act, CudaModel};
pub use nvrtc::{
    COMMON_PRELUDE, Compiled, KERNEL_FILES, compile_all, compile_file, kernel_source,
    nvrtc_available, nvrtc_version,
};
pub use runtime::{CudaLogits, CudaRuntime};
pub use synth::{bench_shape, host_tensor, spec_config};
pub use train::{
    forward_backward, forward_backward_many, forward_many, forward_only, loss_term_reference,
};

/// bf16 as used by the kernels and cudarc (`half::bf16`, bit-compatible with the kernels' `bf16`).
pub use half::bf16;
