//! Qwen2 / Qwen2.5 (`Qwen2ForCausalLM`): Llama-style decoder with a bias on q/k/v, GQA,
//! RMSNorm, SwiGLU, rotary embeddings. <https://huggingface.co/docs/transformers/model_doc/qwen2>

use super::{ArchFlags, HfConfig, ModelConfig};
use crate::engine::error::Result;

pub(crate) const ARCH: &str = "Qwen2ForCausalLM";

/// Qwen2 always has q/k/v bias (not a config switch in transformers).
pub(crate) fn config(hf: &HfConfig) -> Result<ModelConfig> {
    hf.to_model_config(ARCH, ArchFlags { qkv_bias: true, qk_norm: false })
}
