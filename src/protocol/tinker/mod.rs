//! The Tinker protocol spoken by the official `tinker` SDK 0.38.0 (`specs/tinker-protocol.md`):
//! protobuf messages and their codecs, JSON request/response types, `tinker://` paths and ids.

pub mod codec;
pub mod error;
pub mod paths;
pub mod proto;
pub mod rest;
pub mod sample;
pub mod tensor;
pub mod types;
pub mod views;

pub use error::ProtocolError;
