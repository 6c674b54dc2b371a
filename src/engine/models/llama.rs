//! Llama 2/3 (`LlamaForCausalLM`): no bias (unless `attention_bias`), GQA, optional Llama-3
//! rope frequency scaling. <https://huggingface.co/docs/transformers/model_doc/llama>

use super::{ArchFlags, HfConfig, ModelConfig};
use crate::engine::error::Result;

pub(crate) const ARCH: &str = "LlamaForCausalLM";

pub(crate) fn config(hf: &HfConfig) -> Result<ModelConfig> {
    hf.to_model_config(ARCH, ArchFlags { qkv_bias: false, qk_norm: false })
}
