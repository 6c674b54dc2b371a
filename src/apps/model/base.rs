//! The base model as the model and sampler applications load it: the host weights, tokenizer,
//! served length and reported info.

use std::path::Path;
use std::sync::Arc;

use super::MAX_RANK;
use super::error::AppError;
use crate::engine::{Model, ModelConfig};
use crate::protocol::internal::InfoResponse;
use crate::tokenize::Tokenizer;

/// A loaded base model and its tokenizer, shared by the model and sampler applications.
#[derive(Debug)]
pub struct BaseModel {
    /// The host weights (f32): the CPU runtime computes on them; the CUDA runtime uploads them
    /// and the application then drops them.
    pub model: Arc<Model>,
    pub served: Served,
}

/// What an application keeps of its base model besides the runtimes: the configuration, the
/// tokenizer, the served length and the info it reports.
#[derive(Debug, Clone)]
pub struct Served {
    pub config: ModelConfig,
    pub tokenizer: Option<Arc<Tokenizer>>,
    pub max_length: usize,
    pub info: InfoResponse,
}

impl Served {
    /// What a batch is checked against here: the vocabulary and the served length.
    pub fn limits(&self) -> crate::engine::BatchLimits {
        crate::engine::BatchLimits {
            vocab_size: self.config.vocab_size,
            max_tokens: self.max_length,
        }
    }
}

impl BaseModel {
    /// Loads the model (and `tokenizer.json` when the directory has one).
    pub fn load(base_model: &str, dir: &Path, max_length: Option<usize>) -> Result<Self, AppError> {
        let model = Model::load(dir).map_err(|e| {
            AppError::Startup(format!("cannot load the model in {}: {e}", dir.display()))
        })?;
        let tokenizer = if dir.join("tokenizer.json").is_file() {
            match Tokenizer::from_dir(dir) {
                Ok(t) => Some(Arc::new(t)),
                Err(e) => {
                    tracing::warn!(error = %e, "tokenizer not loaded; stop strings are unavailable");
                    None
                }
            }
        } else {
            None
        };
        let c = model.config();
        let max_pos = c.max_position_embeddings;
        let max_length = max_length.map_or(max_pos, |m| m.min(max_pos));
        let model_name = crate::hub::display_name(base_model);
        let tokenizer_id = if base_model.trim().starts_with("generate://qwen3") {
            "Qwen/Qwen3-0.6B".to_string()
        } else {
            model_name.clone()
        };
        let arch = c.arch.trim_end_matches("ForCausalLM").to_lowercase();
        let info = InfoResponse {
            base_model: base_model.to_string(),
            model_name,
            arch,
            vocab_size: c.vocab_size,
            max_length,
            eos_token_ids: c.eos_token_ids.clone(),
            tokenizer_id,
            max_rank: MAX_RANK,
            adapters: Vec::new(),
            devices: Vec::new(),
        };
        let served = Served { config: c.clone(), tokenizer, max_length, info };
        Ok(BaseModel { model, served })
    }
}
