//! JSON body of `POST /asample`: the prompt (`ModelInput` chunks), `SamplingParams` with its
//! polymorphic `stop`, and the request's validation.

use serde::Deserialize;
use serde_json::Value;

use super::error::ProtocolError;
use super::types::SamplerSource;
use crate::engine::sampling::{SamplingError, Stop};

/// Raw shape of a JSON chunk before dispatch on `type`.
#[derive(Deserialize)]
struct RawChunk {
    #[serde(rename = "type", default)]
    kind: Option<String>,
    #[serde(default)]
    tokens: Option<Vec<i64>>,
    #[serde(default)]
    data: Option<String>,
    #[serde(default)]
    format: Option<String>,
    #[serde(default)]
    expected_tokens: Option<i64>,
    #[serde(default)]
    location: Option<String>,
    #[serde(default)]
    dmel: Option<String>,
}

/// One `ModelInput` chunk (JSON form).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(try_from = "RawChunk")]
pub enum ModelInputChunk {
    EncodedText { tokens: Vec<i64> },
    Image { data: String, format: String, expected_tokens: Option<i64> },
    ImageAssetPointer { location: String, format: String, expected_tokens: Option<i64> },
    Dmel { dmel: String },
}

impl TryFrom<RawChunk> for ModelInputChunk {
    type Error = String;
    fn try_from(r: RawChunk) -> Result<Self, String> {
        let need =
            |v: Option<String>, f: &str| v.ok_or_else(|| format!("chunk field `{f}` is required"));
        // A chunk without `type` but with `tokens` is text (older clients omit the tag).
        let kind = r.kind.clone().or_else(|| r.tokens.as_ref().map(|_| "encoded_text".to_string()));
        match kind.as_deref() {
            Some("encoded_text") => Ok(ModelInputChunk::EncodedText {
                tokens: r.tokens.ok_or("chunk field `tokens` is required")?,
            }),
            Some("image") => Ok(ModelInputChunk::Image {
                data: need(r.data, "data")?,
                format: need(r.format, "format")?,
                expected_tokens: r.expected_tokens,
            }),
            Some("image_asset_pointer") => Ok(ModelInputChunk::ImageAssetPointer {
                location: need(r.location, "location")?,
                format: need(r.format, "format")?,
                expected_tokens: r.expected_tokens,
            }),
            Some("dmel") => Ok(ModelInputChunk::Dmel { dmel: need(r.dmel, "dmel")? }),
            Some(other) => Err(format!(
                "unknown chunk type `{other}` (expected encoded_text, image, image_asset_pointer or dmel)"
            )),
            None => Err("chunk has no `type`".to_string()),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct ModelInput {
    pub chunks: Vec<ModelInputChunk>,
}

impl ModelInput {
    /// The token ids of a text-only input; images and audio are refused as unsupported.
    pub fn text_tokens(&self, field: &str) -> Result<Vec<i32>, ProtocolError> {
        let mut out = Vec::new();
        for (j, c) in self.chunks.iter().enumerate() {
            match c {
                ModelInputChunk::EncodedText { tokens } => {
                    for (p, &t) in tokens.iter().enumerate() {
                        let id = i32::try_from(t).ok().filter(|v| *v >= 0).ok_or_else(|| {
                            ProtocolError::invalid(
                                format!("{field}.chunks[{j}].tokens[{p}]"),
                                format!("{t} is not a valid token id"),
                            )
                        })?;
                        out.push(id);
                    }
                }
                other => {
                    let what = match other {
                        ModelInputChunk::Image { .. }
                        | ModelInputChunk::ImageAssetPointer { .. } => "an image chunk",
                        _ => "a dmel (audio) chunk",
                    };
                    return Err(ProtocolError::Unsupported {
                        field: format!("{field}.chunks[{j}]"),
                        what: what.into(),
                    });
                }
            }
        }
        Ok(out)
    }
}

/// `stop` of SamplingParams: a string, a list of strings or a list of token ids.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "Value")]
pub enum StopCondition {
    Strings(Vec<String>),
    /// An empty list means: ignore EOS too and run to `max_tokens`.
    Tokens(Vec<i64>),
}

impl TryFrom<Value> for StopCondition {
    type Error = String;
    fn try_from(v: Value) -> Result<Self, String> {
        const WHAT: &str = "`stop` must be a string, a list of strings or a list of token ids";
        match v {
            Value::String(s) => Ok(StopCondition::Strings(vec![s])),
            Value::Array(items) if items.is_empty() => Ok(StopCondition::Tokens(Vec::new())),
            Value::Array(items) if items.iter().all(Value::is_string) => {
                Ok(StopCondition::Strings(
                    items.into_iter().filter_map(|i| i.as_str().map(String::from)).collect(),
                ))
            }
            Value::Array(items) => {
                let ids: Option<Vec<i64>> = items.iter().map(Value::as_i64).collect();
                ids.map(StopCondition::Tokens).ok_or_else(|| WHAT.to_string())
            }
            _ => Err(WHAT.to_string()),
        }
    }
}

fn d_temperature() -> f64 {
    1.0
}
fn d_top_k() -> i64 {
    -1
}
fn d_top_p() -> f64 {
    1.0
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct SamplingParams {
    #[serde(default)]
    pub max_tokens: Option<u32>,
    #[serde(default)]
    pub seed: Option<u64>,
    #[serde(default = "d_temperature")]
    pub temperature: f64,
    #[serde(default = "d_top_k")]
    pub top_k: i64,
    #[serde(default = "d_top_p")]
    pub top_p: f64,
    /// Absent = stop at EOS.
    #[serde(default)]
    pub stop: Option<StopCondition>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            max_tokens: None,
            seed: None,
            temperature: 1.0,
            top_k: -1,
            top_p: 1.0,
            stop: None,
        }
    }
}

fn d_one() -> u32 {
    1
}

/// Body of `POST /asample`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct SampleRequest {
    #[serde(default = "d_one")]
    pub num_samples: u32,
    pub prompt: ModelInput,
    pub sampling_params: SamplingParams,
    #[serde(default)]
    pub sampling_session_id: Option<String>,
    #[serde(flatten)]
    pub source: SamplerSource,
    #[serde(default)]
    pub seq_id: Option<i64>,
    #[serde(default)]
    pub prompt_logprobs: bool,
    #[serde(flatten)]
    pub unsupported: UnsupportedLogprobs,
    #[serde(default)]
    pub record_stability_info: bool,
}

/// The logprob options of `asample` this server does not implement: each is refused (category
/// `user`) when set, rather than silently ignored.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct UnsupportedLogprobs {
    pub topk_prompt_logprobs: u32,
    pub topk_sample_logprobs: u32,
    /// `null` when absent.
    pub target_prompt_logprobs: Value,
    pub prompt_alt_tokens_k: u32,
    pub prompt_logprobs_last_n: Option<u32>,
}

impl UnsupportedLogprobs {
    /// The name of the first option that is set.
    pub fn first_set(&self) -> Option<&'static str> {
        let set = [
            (self.topk_prompt_logprobs > 0, "topk_prompt_logprobs"),
            (self.topk_sample_logprobs > 0, "topk_sample_logprobs"),
            (!self.target_prompt_logprobs.is_null(), "target_prompt_logprobs"),
            (self.prompt_alt_tokens_k > 0, "prompt_alt_tokens_k"),
            (self.prompt_logprobs_last_n.is_some(), "prompt_logprobs_last_n"),
        ];
        set.into_iter().find_map(|(on, name)| on.then_some(name))
    }
}

impl SampleRequest {
    /// Range checks, and refusal (category `user`) of options this server does not implement.
    pub fn validate(&self, max_samples: u32) -> Result<(), ProtocolError> {
        if self.num_samples == 0 || self.num_samples > max_samples {
            return Err(ProtocolError::invalid(
                "num_samples",
                format!("{} is not in 1..={max_samples}", self.num_samples),
            ));
        }
        // The sampler's own check of its parameters, run here so a bad value is a 400 on the
        // request rather than a failed future.
        let p = &self.sampling_params;
        let stop = match &p.stop {
            Some(StopCondition::Strings(s)) => Stop::Strings(s.clone()),
            // Token ids are checked against the vocabulary by the model application.
            _ => Stop::Eos,
        };
        let params = crate::engine::sampling::SamplingParams {
            temperature: p.temperature as f32,
            top_k: p.top_k,
            top_p: p.top_p as f32,
            seed: None,
            max_tokens: p.max_tokens.map_or(1, |m| m as usize),
            stop,
        };
        params.validate().map_err(|e| {
            let field = match e {
                SamplingError::InvalidTemperature(_) => "temperature",
                SamplingError::InvalidTopK(_) => "top_k",
                SamplingError::InvalidTopP(_) => "top_p",
                SamplingError::InvalidMaxTokens => "max_tokens",
                _ => "stop",
            };
            ProtocolError::invalid(format!("sampling_params.{field}"), e.to_string())
        })?;
        if let Some(name) = self.unsupported.first_set() {
            return Err(ProtocolError::Unsupported {
                field: name.into(),
                what: format!("`{name}`"),
            });
        }
        Ok(())
    }
}
