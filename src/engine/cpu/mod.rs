//! The CPU stack: the numeric kernels ([`backend`], rayon + `gemm`), the decoder stack with its
//! explicit backward, the row-blocked output head, the per-sequence KV cache, the orchestration of
//! a batch (`forward_backward`, `forward`, cached decoding) and [`CpuRuntime`], its
//! implementation of the device seam ([`ModelRuntime`](crate::engine::runtime::ModelRuntime)).
//! The same layout as `engine/cuda/`.

pub mod backend;
mod decode;
pub(crate) mod head;
pub mod kv_cache;
mod rowdot;
mod rowkernel;
mod runtime;
mod segment;
#[cfg(test)]
mod test_util;
mod train;
pub(crate) mod transformer;
mod wmatmul;

pub use decode::DecodeSegment;
pub use kv_cache::KvCache;
pub use runtime::{CpuCache, CpuRuntime};
pub use train::{forward, forward_backward, forward_backward_many, forward_many};
