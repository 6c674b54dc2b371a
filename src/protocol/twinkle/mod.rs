//! Twinkle's native protocol (`specs/twinkle-native-protocol.md`), shared by both client
//! generations: callers and adapter scoping from the headers, `twinkle://` paths, the wire
//! encodings (LoraConfig / DatasetMeta JSON strings, InputFeature, Trajectory), the on-disk run and
//! checkpoint metadata, and the learning-rate schedules.
//!
//! Gen-1 (twinkle-kit 0.1.x, `server_type: twinkle`) and Gen-2 (0.2–0.5.x, `/api/v1/.../twinkle/`)
//! differ only in paths, the scope header and a few reply envelopes ([`Gen`]); the applications
//! mount one handler per op under both route forms.

pub mod caller;
pub mod error;
pub mod paths;
pub mod runs;
pub mod sched;
pub mod wire;

pub use caller::{Auth, Caller};
pub use error::{TwinkleError, TwinkleReply};
pub use paths::TwinklePath;

/// Which client generation a route serves (they differ in a few reply envelopes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gen {
    /// twinkle-kit 0.1.x: `{route_prefix}/<op>`, `{result: …}` envelopes.
    One,
    /// twinkle-kit 0.2–0.5.x: `{route_prefix}/twinkle/<op>`, bare replies.
    Two,
}

impl Gen {
    /// The reply of an op that returns `value` (Gen-1 wraps it in `{result: …}`).
    pub fn result(self, value: serde_json::Value) -> serde_json::Value {
        match self {
            Gen::One => serde_json::json!({ "result": value }),
            Gen::Two => value,
        }
    }
}
