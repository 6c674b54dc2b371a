//! Engine error type: every failure of loading, validating or computing, with what to fix.

use std::path::PathBuf;

/// Errors of the compute engine. `InvalidInput`, `UnknownLoss`, `LossConfig` and `NonFinite` are
/// the caller's fault (a `user` error in the API); the others are server-side (bad model
/// directory, I/O, a device failure).
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("i/o error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("bad JSON in {path}: {message}")]
    Json { path: PathBuf, message: String },
    #[error("bad safetensors file {path}: {message}")]
    Safetensors { path: PathBuf, message: String },
    #[error(
        "unsupported architecture `{0}` (supported: Qwen2ForCausalLM, Qwen3ForCausalLM, LlamaForCausalLM)"
    )]
    UnsupportedArchitecture(String),
    #[error("model config: {0}")]
    Config(String),
    #[error("missing tensor `{name}` in the model weights")]
    MissingTensor { name: String },
    #[error("tensor `{name}` has shape {got:?}, expected {expected:?}")]
    TensorShape { name: String, got: Vec<usize>, expected: Vec<usize> },
    #[error("tensor `{name}` has unsupported dtype {dtype} (supported: F32, BF16, F16)")]
    TensorDtype { name: String, dtype: String },
    #[error("invalid input: {0}")]
    InvalidInput(String),
    #[error(
        "unknown loss function `{0}` (known: cross_entropy, importance_sampling, ppo, cispo, dro)"
    )]
    UnknownLoss(String),
    /// A `loss_fn_config` entry that is unknown for the loss or out of range.
    #[error("loss_fn_config.{field}: {message}")]
    LossConfig { field: String, message: String },
    /// The computation overflowed (inf/NaN loss or logprobs); nothing was accumulated.
    #[error("{0}")]
    NonFinite(String),
    #[error("adapter: {0}")]
    Adapter(String),
    #[error("device worker {worker}: {message}")]
    Worker { worker: String, message: String },
    /// A device (driver, library, memory) failed; `device` is e.g. `cuda:0`.
    #[error("{device}: {message}")]
    Device { device: String, message: String },
}

impl EngineError {
    /// True when the caller sent something wrong (maps to a 4xx / `user` error).
    pub fn is_user_error(&self) -> bool {
        matches!(
            self,
            EngineError::InvalidInput(_)
                | EngineError::UnknownLoss(_)
                | EngineError::LossConfig { .. }
                | EngineError::NonFinite(_)
        )
    }

    pub(crate) fn io(path: &std::path::Path, source: std::io::Error) -> Self {
        EngineError::Io { path: path.to_path_buf(), source }
    }
}

/// Engine result alias.
pub type Result<T> = std::result::Result<T, EngineError>;
