//! Requests and answers of the internal routes (`/_internal/v1/...`), shared by the model and
//! sampler applications (which serve them, `apps::model::http`) and the server application's
//! client (`apps::server::upstream`). Each request names its route and answer through
//! [`super::Call`].

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::Call;
use crate::engine::{AdamParams, Datum, LoraTargets};

/// `GET /_internal/v1/info`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct InfoResponse {
    pub base_model: String,
    pub model_name: String,
    pub arch: String,
    pub vocab_size: usize,
    pub max_length: usize,
    pub eos_token_ids: Vec<u32>,
    pub tokenizer_id: String,
    pub max_rank: usize,
    pub adapters: Vec<String>,
    /// The devices computing for this application (`cpu:0`, `cuda:0`, `cuda:1`, ...).
    #[serde(default)]
    pub devices: Vec<String>,
}

impl InfoResponse {
    /// The name clients use: `model_name` when the app reports one, else its `base_model`.
    pub fn public_name(&self) -> &str {
        if self.model_name.is_empty() { &self.base_model } else { &self.model_name }
    }

    /// Whether `name` designates this model: its public name, its configured id with or
    /// without an `ms://` / `hf://` scheme, or the name derived from that id (see
    /// [`crate::config::naming::designates`]).
    pub fn answers_to(&self, name: &str) -> bool {
        crate::config::naming::designates(name, self.public_name(), &self.base_model)
    }
}

/// The answer of a call that returns nothing but success (`{}`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Done {}

/// Each request's route and answer.
macro_rules! calls {
    ($($req:ty => $route:literal, $answer:ty;)*) => {
        $(impl Call for $req {
            const ROUTE: &'static str = $route;
            type Answer = $answer;
        })*
    };
}

calls! {
    CreateAdapterRequest => "create_adapter", Done;
    ForwardBackwardRequest => "forward_backward", ForwardBackwardResponse;
    OptimStepRequest => "optim_step", MetricsResponse;
    SaveRequest => "save", SaveResponse;
    LoadRequest => "load", Done;
    UnloadRequest => "unload", Done;
    SampleRequest => "sample", SampleResponse;
}

/// Tokens an answer reports processing, for the tokens metrics (0: not a token workload).
pub trait Tokens {
    fn tokens(&self) -> u64 {
        0
    }
}

impl Tokens for Done {}
impl Tokens for MetricsResponse {}
impl Tokens for SaveResponse {}

impl Tokens for ForwardBackwardResponse {
    /// One logprob per target token of every datum.
    fn tokens(&self) -> u64 {
        self.outputs.iter().map(|o| o.logprobs.len() as u64).sum()
    }
}

impl Tokens for SampleResponse {
    /// Generated tokens of every sequence.
    fn tokens(&self) -> u64 {
        self.sequences.iter().map(|s| s.tokens.len() as u64).sum()
    }
}

fn default_alpha() -> f32 {
    32.0
}

/// LoRA settings of `create_adapter` (and `load.create`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraSettings {
    #[serde(default)]
    pub rank: usize,
    #[serde(default = "default_alpha")]
    pub alpha: f32,
    #[serde(flatten)]
    pub targets: LoraTargets,
    #[serde(default)]
    pub seed: Option<u64>,
}

/// `POST /_internal/v1/create_adapter`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CreateAdapterRequest {
    pub model_id: String,
    #[serde(flatten)]
    pub lora: LoraSettings,
}

/// `POST /_internal/v1/forward_backward`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ForwardBackwardRequest {
    pub model_id: String,
    #[serde(default)]
    pub forward_only: bool,
    /// With `forward_only`: compute with the base model alone (a reference model for DPO/KL).
    #[serde(default)]
    pub disable_lora: bool,
    pub loss_fn: String,
    /// The loss's numeric parameters (`clip_low_threshold`, `beta` …); a key the loss does not
    /// take is a 400 naming the key. `null` reads as none.
    #[serde(default, deserialize_with = "null_as_default")]
    pub loss_config: BTreeMap<String, f64>,
    /// Checked by [`crate::engine::check_batch`], the one validation of a batch.
    pub data: Vec<Datum>,
}

/// One datum's outputs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatumOutputJson {
    pub logprobs: Vec<f32>,
    pub elementwise_loss: Vec<f32>,
    pub shape: Vec<usize>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ForwardBackwardResponse {
    pub outputs: Vec<DatumOutputJson>,
    pub metrics: BTreeMap<String, f64>,
}

/// `POST /_internal/v1/optim_step`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OptimStepRequest {
    pub model_id: String,
    #[serde(default)]
    pub adam_params: AdamParams,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricsResponse {
    pub metrics: BTreeMap<String, f64>,
}

/// What `save` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SaveKind {
    /// PEFT adapter + optimizer moments + step.
    State,
    /// PEFT adapter only.
    Sampler,
}

/// `POST /_internal/v1/save`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SaveRequest {
    pub model_id: String,
    pub dir: PathBuf,
    pub kind: SaveKind,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SaveResponse {
    pub size_bytes: u64,
}

/// `POST /_internal/v1/load`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoadRequest {
    pub model_id: String,
    pub dir: PathBuf,
    #[serde(default)]
    pub with_optimizer: bool,
    /// Present: create the adapter from the checkpoint (its own adapter_config.json decides the
    /// LoRA shape); absent: load onto the existing adapter.
    #[serde(default)]
    pub create: Option<LoraSettings>,
}

/// `POST /_internal/v1/unload`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UnloadRequest {
    pub model_id: String,
}

/// `POST /_internal/v1/sample`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SampleRequest {
    #[serde(default)]
    pub model_id: Option<String>,
    #[serde(default)]
    pub adapter_dir: Option<PathBuf>,
    pub prompt: Vec<u32>,
    #[serde(default = "one", deserialize_with = "null_one")]
    pub num_samples: usize,
    #[serde(default = "default_max_tokens", deserialize_with = "null_max_tokens")]
    pub max_tokens: usize,
    #[serde(default = "default_temperature", deserialize_with = "null_temperature")]
    pub temperature: f32,
    #[serde(default = "minus_one", deserialize_with = "null_minus_one")]
    pub top_k: i64,
    #[serde(default = "default_top_p", deserialize_with = "null_top_p")]
    pub top_p: f32,
    #[serde(default)]
    pub seed: Option<u64>,
    /// null = stop at EOS; `[]` = ignore EOS; list of strings or of token ids.
    #[serde(default)]
    pub stop: Option<serde_json::Value>,
    #[serde(default)]
    pub prompt_logprobs: bool,
}

fn one() -> usize {
    1
}
fn default_max_tokens() -> usize {
    16
}
fn default_temperature() -> f32 {
    1.0
}
fn minus_one() -> i64 {
    -1
}
fn default_top_p() -> f32 {
    1.0
}

/// `null` reads as `T::default()`.
fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// `null` reads as the field's default (the server forwards optional SDK fields as they came).
macro_rules! null_as {
    ($name:ident, $t:ty, $default:ident) => {
        fn $name<'de, D: serde::Deserializer<'de>>(d: D) -> Result<$t, D::Error> {
            Ok(Option::<$t>::deserialize(d)?.unwrap_or_else($default))
        }
    };
}
null_as!(null_one, usize, one);
null_as!(null_max_tokens, usize, default_max_tokens);
null_as!(null_temperature, f32, default_temperature);
null_as!(null_minus_one, i64, minus_one);
null_as!(null_top_p, f32, default_top_p);

impl SampleRequest {
    /// A request with Tinker's defaults for `prompt`.
    pub fn new(prompt: Vec<u32>, max_tokens: usize) -> Self {
        SampleRequest {
            model_id: None,
            adapter_dir: None,
            prompt,
            num_samples: 1,
            max_tokens,
            temperature: 1.0,
            top_k: -1,
            top_p: 1.0,
            seed: None,
            stop: None,
            prompt_logprobs: false,
        }
    }
}

/// Why a sequence ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StopReasonJson {
    Stop,
    Length,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SequenceJson {
    pub tokens: Vec<u32>,
    pub logprobs: Vec<f32>,
    pub stop_reason: StopReasonJson,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SampleResponse {
    pub sequences: Vec<SequenceJson>,
    /// One per prompt token, the first `null`; `null` when not requested.
    pub prompt_logprobs: Option<Vec<Option<f32>>>,
}
