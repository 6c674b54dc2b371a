//! The compute engine: tensors, CPU/CUDA backends, model architectures, LoRA, losses, AdamW, sampling.
pub mod cuda;
