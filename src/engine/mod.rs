//! The compute engine: tensors, the backend boundary (CPU today), model architectures, LoRA,
//! losses, AdamW.

pub mod backend;
pub mod error;
pub mod tensor;

pub use error::{EngineError, Result};
pub use tensor::Tensor;
