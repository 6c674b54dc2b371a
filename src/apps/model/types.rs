//! The internal routes' request and answer types live in [`crate::protocol::internal`], shared
//! with the server application's client; this path keeps the model application's own imports
//! short.

pub use crate::protocol::internal::types::*;
