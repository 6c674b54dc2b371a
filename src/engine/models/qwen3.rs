//! Qwen3 (`Qwen3ForCausalLM`): no q/k/v bias (unless `attention_bias`), per-head RMSNorm on q
//! and k before rotary, explicit `head_dim` that may differ from hidden/heads.
//! <https://huggingface.co/docs/transformers/model_doc/qwen3>

use super::{ArchFlags, HfConfig, ModelConfig};
use crate::engine::error::Result;

pub(crate) const ARCH: &str = "Qwen3ForCausalLM";

pub(crate) fn config(hf: &HfConfig) -> Result<ModelConfig> {
    hf.to_model_config(ARCH, ArchFlags { qkv_bias: false, qk_norm: true })
}
