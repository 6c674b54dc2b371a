//! Typed reads of a processor call's keyword arguments (`null` reads as absent), so every
//! class refuses a wrongly typed argument with the same 400 message.

use serde_json::{Map, Value};

use crate::protocol::twinkle::TwinkleError;

/// `kw[key]` as a non-negative integer, `None` when absent.
pub(crate) fn opt_u64(kw: &Map<String, Value>, key: &str) -> Result<Option<u64>, TwinkleError> {
    match kw.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or_else(|| {
            TwinkleError::bad(format!("{key} must be a non-negative integer, got {v}"))
        }),
    }
}

/// `kw[key]` as a boolean, false when absent.
pub(crate) fn opt_bool(kw: &Map<String, Value>, key: &str) -> Result<bool, TwinkleError> {
    match kw.get(key) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(v) => Err(TwinkleError::bad(format!("{key} must be a boolean, got {v}"))),
    }
}

/// `kw[key]` as a string, `None` when absent.
pub(crate) fn opt_str<'a>(
    kw: &'a Map<String, Value>,
    key: &str,
) -> Result<Option<&'a str>, TwinkleError> {
    match kw.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(v) => Err(TwinkleError::bad(format!("{key} must be a string, got {v}"))),
    }
}
