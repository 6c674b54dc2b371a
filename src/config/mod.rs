//! Server configuration: YAML loading, validation with key paths and line numbers, normalisation.

pub mod schema;

pub use schema::*;

use std::path::Path;

/// A configuration that cannot be used, with the key path and line that are wrong.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("{0}")]
    Invalid(String),
}

/// Reads and validates a configuration file.
pub fn load_file(path: &Path) -> Result<ServerConfig, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| ConfigError::Io { path: path.display().to_string(), source })?;
    load_str(&text)
}

/// Parses and validates configuration text.
pub fn load_str(text: &str) -> Result<ServerConfig, ConfigError> {
    serde_norway::from_str(text).map_err(|e| ConfigError::Invalid(e.to_string()))
}
