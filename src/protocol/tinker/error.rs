//! Typed errors of the Tinker wire layer; every variant names the offending field so the HTTP
//! layer can answer 4xx (or fail a future with category `user`) with a message that says what to fix.

/// A request (or a response we were asked to build) that does not follow the protocol.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ProtocolError {
    #[error("body is not a valid protobuf {message}: {reason}")]
    Malformed { message: &'static str, reason: String },
    #[error("{field}: required but missing or empty")]
    Missing { field: String },
    #[error("{field}: dtype {dtype} is not allowed here (expected {expected})")]
    BadDtype { field: String, dtype: String, expected: &'static str },
    #[error("{field}: byte length {len} is not a multiple of the item size {itemsize}")]
    ByteLength { field: String, len: usize, itemsize: usize },
    #[error("{field}: shape {shape:?} holds {expected} elements but the data holds {actual}")]
    ShapeMismatch { field: String, shape: Vec<i64>, expected: u64, actual: u64 },
    #[error("{field}: invalid shape {shape:?}: {reason}")]
    BadShape { field: String, shape: Vec<i64>, reason: String },
    #[error(
        "{field}: index {index} at position {position} is out of range (must be in 0..{bound})"
    )]
    IndexOutOfRange { field: String, position: usize, index: i64, bound: u64 },
    #[error("{field}: {reason}")]
    InvalidValue { field: String, reason: String },
    #[error("{field}: {what} is {actual}, above the limit of {limit}")]
    TooLarge { field: String, what: &'static str, actual: u64, limit: u64 },
    #[error("{field}: {what} is not supported by this server")]
    Unsupported { field: String, what: String },
    /// A check the engine owns (its message names the field).
    #[error("{0}")]
    Engine(String),
}

impl ProtocolError {
    pub(crate) fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        ProtocolError::InvalidValue { field: field.into(), reason: reason.into() }
    }

    pub(crate) fn missing(field: impl Into<String>) -> Self {
        ProtocolError::Missing { field: field.into() }
    }
}
