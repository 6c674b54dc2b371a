//! The internal hop: the server application's calls to the model and sampler applications
//! (`POST /_internal/v1/<route>` on loopback, with the shared token in [`TOKEN_HEADER`]).
//!
//! One set of request and answer types ([`types`]), used by both ends; one trait, [`Call`], that
//! ties each request to its route and answer type, so the server's client
//! (`apps::server::upstream::Upstreams::call`) and the model application's routes
//! (`apps::model::http`) cannot disagree on either.
//!
//! Bodies travel as MessagePack with named fields ([`Encoding::MsgPack`]): a float is its four
//! IEEE-754 bytes instead of decimal text, so logprobs, advantages and losses arrive bit-exact
//! (NaN and infinities included, which JSON cannot carry at all), and a batch is smaller and
//! cheaper to parse. JSON is still accepted and answered for callers that send it (the tests,
//! `scripts/bench_api.py`, an operator's curl): the answer uses the request's encoding.

pub mod types;

use serde::Serialize;
use serde::de::DeserializeOwned;

pub use types::*;

/// Header carrying the internal token (the secret the parent hands every child).
pub const TOKEN_HEADER: &str = "X-Twinkle-Internal";
/// Content type of a MessagePack body.
pub const MSGPACK: &str = "application/msgpack";
/// Content type of a JSON body.
pub const JSON: &str = "application/json";

/// A request of the internal API: its route under `/_internal/v1/` and its answer type.
pub trait Call: Serialize + DeserializeOwned {
    const ROUTE: &'static str;
    type Answer: Serialize + DeserializeOwned;
}

/// A body that cannot be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("cannot encode the body as {encoding}: {detail}")]
    Encode { encoding: &'static str, detail: String },
    #[error("the {encoding} body is not valid: {detail}")]
    Decode { encoding: &'static str, detail: String },
}

/// How a body is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Json,
    MsgPack,
}

impl Encoding {
    /// The encoding a `Content-Type` (or `Accept`) value names; JSON when absent or anything
    /// else, so plain JSON callers keep working.
    pub fn of(content_type: Option<&str>) -> Self {
        let ct = content_type.unwrap_or_default();
        if ct.split(';').next().is_some_and(|m| m.trim().eq_ignore_ascii_case(MSGPACK)) {
            Encoding::MsgPack
        } else {
            Encoding::Json
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Encoding::Json => JSON,
            Encoding::MsgPack => MSGPACK,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Encoding::Json => "JSON",
            Encoding::MsgPack => "MessagePack",
        }
    }

    pub fn encode<T: Serialize>(self, value: &T) -> Result<Vec<u8>, CodecError> {
        let detail = |e: &dyn std::fmt::Display| CodecError::Encode {
            encoding: self.name(),
            detail: e.to_string(),
        };
        match self {
            Encoding::Json => serde_json::to_vec(value).map_err(|e| detail(&e)),
            // Named fields: optional fields may be left out, and either end may add one.
            Encoding::MsgPack => rmp_serde::to_vec_named(value).map_err(|e| detail(&e)),
        }
    }

    pub fn decode<T: DeserializeOwned>(self, bytes: &[u8]) -> Result<T, CodecError> {
        let detail = |e: &dyn std::fmt::Display| CodecError::Decode {
            encoding: self.name(),
            detail: e.to_string(),
        };
        match self {
            Encoding::Json => {
                let de = &mut serde_json::Deserializer::from_slice(bytes);
                // The path names the field a caller got wrong (`data[0].target_tokens`).
                serde_path_to_error::deserialize(de).map_err(|e| detail(&e))
            }
            Encoding::MsgPack => {
                let de = &mut rmp_serde::Deserializer::new(bytes);
                serde_path_to_error::deserialize(de).map_err(|e| detail(&e))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{Datum, LossInputs};

    fn request() -> ForwardBackwardRequest {
        ForwardBackwardRequest {
            model_id: "m".into(),
            forward_only: false,
            disable_lora: false,
            loss_fn: "importance_sampling".into(),
            loss_config: [("beta".to_string(), 0.25)].into(),
            data: vec![Datum {
                input_tokens: vec![1, 2, 3],
                inputs: LossInputs {
                    target_tokens: vec![2, 3, 4],
                    k: 1,
                    weights: None,
                    logprobs: Some(vec![-1.5, f32::NEG_INFINITY, 1e-30]),
                    advantages: Some(vec![f32::MIN_POSITIVE, -0.1, 3.0]),
                },
            }],
        }
    }

    #[test]
    fn msgpack_carries_every_float_bit_exact_and_is_smaller_than_json() {
        let r = request();
        let bytes = Encoding::MsgPack.encode(&r).unwrap();
        let back: ForwardBackwardRequest = Encoding::MsgPack.decode(&bytes).unwrap();
        assert_eq!(back, r);
        let lp = back.data[0].inputs.logprobs.as_ref().unwrap();
        assert_eq!(lp[1], f32::NEG_INFINITY);
        // NaN survives too (JSON would turn it into null).
        let mut nan = ForwardBackwardResponse { outputs: vec![], metrics: Default::default() };
        nan.metrics.insert("loss:sum".into(), f64::NAN);
        let b = Encoding::MsgPack.encode(&nan).unwrap();
        let m: ForwardBackwardResponse = Encoding::MsgPack.decode(&b).unwrap();
        assert!(m.metrics["loss:sum"].is_nan());
        let mut finite = r.clone();
        finite.data[0].inputs.logprobs = Some(vec![-1.2345678; 3]);
        let json = Encoding::Json.encode(&finite).unwrap();
        assert!(Encoding::MsgPack.encode(&finite).unwrap().len() < json.len());
    }

    #[test]
    fn the_json_datum_shape_is_unchanged_and_errors_name_the_field() {
        let json = br#"{"model_id": "m", "loss_fn": "cross_entropy",
            "data": [{"tokens": [1, 2], "target_tokens": [2, 3], "weights": [1.0, 0.0]}]}"#;
        let r: ForwardBackwardRequest = Encoding::Json.decode(json).unwrap();
        assert_eq!(r.data[0].inputs.k, 1);
        assert_eq!(r.data[0].inputs.weights, Some(vec![1.0, 0.0]));
        let bad = br#"{"model_id": "m", "loss_fn": "cross_entropy",
            "data": [{"tokens": [1, 2], "target_tokens": [2, -3]}]}"#;
        let e = Encoding::Json.decode::<ForwardBackwardRequest>(bad).unwrap_err().to_string();
        assert!(e.contains("data[0]"), "{e}");
    }

    #[test]
    fn content_types_select_the_encoding() {
        assert_eq!(Encoding::of(Some("application/msgpack")), Encoding::MsgPack);
        assert_eq!(Encoding::of(Some("Application/MsgPack; x=1")), Encoding::MsgPack);
        assert_eq!(Encoding::of(Some("application/json")), Encoding::Json);
        assert_eq!(Encoding::of(None), Encoding::Json);
    }
}
