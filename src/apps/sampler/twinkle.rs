//! The sampler application's Twinkle-native API (both client generations): `create`,
//! `set_template` (kept per tenant, not per replica as in Python, so tenants do not overwrite each
//! other), `sample` with Trajectory or InputFeature inputs and an optional `adapter_uri` of the
//! caller's own checkpoints, Gen-2 `samples[]` (with `decoded` and `new_input_feature`) or Gen-1
//! flat `sequences`, and `sample_stream` as NDJSON lines.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde_json::{Map, Value, json};

use super::SamplerApp;
use crate::apps::twinkle_http::{Call, Ops, Reply};
use crate::protocol::internal::{SampleRequest, SampleResponse, StopReasonJson};
use crate::protocol::twinkle::wire::{self, IGNORE, Input};
use crate::protocol::twinkle::{Auth, Caller, Gen, TwinkleError, TwinklePath};
use crate::tokenize::IncrementalDecoder;
use crate::tokenize::trajectory::RenderOptions;

/// Template settings of one tenant.
#[derive(Debug, Clone, Default)]
struct Template {
    max_length: Option<usize>,
    enable_thinking: Option<bool>,
}

/// The Twinkle layer of one sampler application.
pub struct TwinkleSampler {
    app: Arc<dyn SamplerApp>,
    auth: Auth,
    templates: Mutex<HashMap<String, Template>>,
}

/// Template names accepted (all mean the served model's own chat template).
const TEMPLATES: &[&str] = crate::apps::model::twinkle::TEMPLATES;

impl TwinkleSampler {
    pub fn new(app: Arc<dyn SamplerApp>, auth: Auth) -> Self {
        TwinkleSampler { app, auth, templates: Mutex::new(HashMap::new()) }
    }

    fn dispatch(&self, c: Call) -> Result<Value, TwinkleError> {
        match c.op {
            "create" | "heartbeat" => Ok(json!({"status": "ok"})),
            "set_template" => self.set_template(c.caller, c.body),
            "sample" => self.sample(c.g, c.caller, c.body),
            "add_adapter_to_sampler" => Err(TwinkleError::bad(
                "add_adapter_to_sampler is not supported: save the adapter with save(is_sampler=True) and pass its twinkle:// path as adapter_uri",
            )),
            "apply_patch" => Err(TwinkleError::bad(
                "apply_patch: patches are Python code and are not executed by this server",
            )),
            other => {
                Err(TwinkleError::NotFound(format!("the sampler application has no op `{other}`")))
            }
        }
    }

    fn set_template(
        &self,
        caller: &Caller,
        body: &Map<String, Value>,
    ) -> Result<Value, TwinkleError> {
        let cls = body.get("template_cls").and_then(Value::as_str).unwrap_or("Template");
        if !TEMPLATES.contains(&cls) {
            return Err(TwinkleError::bad(format!(
                "set_template: template_cls `{cls}` is not available; use one of {TEMPLATES:?} (the served model's own chat template)"
            )));
        }
        let max_length = wire::positive(body, "set_template", "max_length")?;
        let t = Template {
            max_length,
            enable_thinking: body.get("enable_thinking").and_then(Value::as_bool),
        };
        self.templates.lock().unwrap_or_else(|p| p.into_inner()).insert(caller.owner.clone(), t);
        Ok(json!({"status": "ok"}))
    }

    /// Prompts of `inputs`: Trajectories through the tenant's template with the generation
    /// prompt, InputFeatures as their `input_ids`.
    fn prompts(&self, caller: &Caller, value: &Value) -> Result<Vec<Vec<u32>>, TwinkleError> {
        let served = self.app.served();
        let vocab = served.config.vocab_size;
        let t = self
            .templates
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&caller.owner)
            .cloned()
            .unwrap_or_default();
        wire::inputs(value)?
            .into_iter()
            .enumerate()
            .map(|(i, input)| match input {
                Input::Feature(f) => {
                    wire::token_ids(&format!("inputs[{i}].input_ids"), &f.input_ids, vocab)
                }
                Input::Trajectory(tr) => {
                    let tok = served.tokenizer.as_deref().ok_or_else(|| {
                        TwinkleError::bad("the served model has no tokenizer: send InputFeatures")
                    })?;
                    let mut extra = Map::new();
                    if let Some(th) = t.enable_thinking {
                        extra.insert("enable_thinking".into(), Value::Bool(th));
                    }
                    if let Some(tools) = tr.tools {
                        extra.insert("tools".into(), tools);
                    }
                    let opts = RenderOptions { extra, max_length: t.max_length };
                    tok.encode_prompt(&tr.messages, &opts).map_err(|e| {
                        TwinkleError::bad(format!(
                            "inputs[{i}]: cannot apply the chat template: {e}"
                        ))
                    })
                }
            })
            .collect()
    }

    fn sample_one(
        &self,
        prompt: Vec<u32>,
        p: &Params,
        adapter_dir: Option<&std::path::PathBuf>,
    ) -> Result<SampleResponse, TwinkleError> {
        let mut req = SampleRequest::new(prompt, p.max_tokens);
        req.num_samples = p.num_samples;
        req.temperature = p.temperature;
        req.top_k = p.top_k;
        req.top_p = p.top_p;
        req.seed = p.seed;
        req.stop = p.stop.clone();
        req.prompt_logprobs = p.prompt_logprobs;
        req.adapter_dir = adapter_dir.cloned();
        Ok(self.app.sample(&req)?)
    }

    fn sample(
        &self,
        g: Gen,
        caller: &Caller,
        body: &Map<String, Value>,
    ) -> Result<Value, TwinkleError> {
        let prompts = self.prompts(caller, body.get("inputs").unwrap_or(&Value::Null))?;
        let mut p = Params::parse(body.get("sampling_params").unwrap_or(&Value::Null))?;
        if g == Gen::One
            && let Some(n) = body.get("num_samples").and_then(Value::as_u64)
        {
            p.num_samples = (n as usize).max(1);
        }
        let adapter_dir =
            match body.get("adapter_uri").and_then(Value::as_str).filter(|s| !s.is_empty()) {
                None => None,
                Some(uri) => {
                    let path = TwinklePath::parse("adapter_uri", uri)?;
                    let dir = path.dir(&self.auth, caller)?;
                    if !dir.join("adapter_config.json").is_file() {
                        return Err(TwinkleError::NotFound(format!(
                            "adapter_uri {path}: no such checkpoint of yours"
                        )));
                    }
                    Some(dir)
                }
            };
        let tok = self.app.served().tokenizer.clone();
        let mut samples = Vec::with_capacity(prompts.len());
        let mut flat = Vec::new();
        let mut flat_prompt_lps = Vec::new();
        for prompt in prompts {
            let out = self.sample_one(prompt.clone(), &p, adapter_dir.as_ref())?;
            let mut seqs = Vec::with_capacity(out.sequences.len());
            for s in &out.sequences {
                let stop_reason = match s.stop_reason {
                    StopReasonJson::Stop => "stop",
                    StopReasonJson::Length => "length",
                };
                flat.push(
                    json!({"stop_reason": stop_reason, "tokens": s.tokens, "logprobs": s.logprobs}),
                );
                let decoded = match tok.as_deref() {
                    Some(t) => t
                        .decode(&s.tokens, true)
                        .map_err(|e| TwinkleError::Internal(format!("decode: {e}")))?,
                    None => String::new(),
                };
                let logprobs = if p.logprobs {
                    json!(
                        s.tokens
                            .iter()
                            .zip(&s.logprobs)
                            .map(|(t, l)| json!([[t, l]]))
                            .collect::<Vec<_>>()
                    )
                } else {
                    Value::Null
                };
                seqs.push(json!({"stop_reason": stop_reason, "tokens": s.tokens, "logprobs": logprobs,
                                 "decoded": decoded, "new_input_feature": new_input_feature(&prompt, &s.tokens)}));
            }
            flat_prompt_lps.push(out.prompt_logprobs.clone());
            samples.push(json!({"sequences": seqs, "prompt_logprobs": out.prompt_logprobs, "topk_prompt_logprobs": null}));
        }
        Ok(match g {
            Gen::Two => json!({"samples": samples}),
            Gen::One => {
                let plp = if p.prompt_logprobs { json!(flat_prompt_lps) } else { Value::Null };
                json!({"sequences": flat, "prompt_logprobs": plp, "topk_prompt_logprobs": null})
            }
        })
    }

    /// `sample_stream`: NDJSON `{"delta", "finish_reason"}` lines of the first sequence.
    fn stream(&self, caller: &Caller, body: &Map<String, Value>) -> Result<String, TwinkleError> {
        let prompts = self.prompts(
            caller,
            body.get("inputs").or_else(|| body.get("input")).unwrap_or(&Value::Null),
        )?;
        let [prompt] = &prompts[..] else {
            return Err(TwinkleError::bad(format!(
                "sample_stream takes one input, got {}",
                prompts.len()
            )));
        };
        let mut p = Params::parse(body.get("sampling_params").unwrap_or(&Value::Null))?;
        p.num_samples = 1;
        let out = self.sample_one(prompt.clone(), &p, None)?;
        let tok = self
            .app
            .served()
            .tokenizer
            .clone()
            .ok_or_else(|| TwinkleError::bad("the served model has no tokenizer"))?;
        let s = out
            .sequences
            .first()
            .ok_or_else(|| TwinkleError::Internal("no sequence sampled".into()))?;
        let mut dec = IncrementalDecoder::new(true);
        let mut lines = String::new();
        for &t in &s.tokens {
            let delta =
                dec.push(&tok, t).map_err(|e| TwinkleError::Internal(format!("decode: {e}")))?;
            if !delta.is_empty() {
                lines.push_str(&json!({"delta": delta, "finish_reason": null}).to_string());
                lines.push('\n');
            }
        }
        let rest = dec.flush(&tok).map_err(|e| TwinkleError::Internal(format!("decode: {e}")))?;
        let reason = match s.stop_reason {
            StopReasonJson::Stop => "stop",
            StopReasonJson::Length => "length",
        };
        lines.push_str(&json!({"delta": rest, "finish_reason": reason}).to_string());
        lines.push('\n');
        Ok(lines)
    }
}

/// Prompt + completion with the completion labelled (rolled): what GRPO feeds back to
/// `forward_backward`, its labelled positions aligned with the sampled logprobs.
fn new_input_feature(prompt: &[u32], completion: &[u32]) -> Value {
    let ids: Vec<u32> = prompt.iter().chain(completion).copied().collect();
    let unrolled: Vec<i64> = std::iter::repeat_n(IGNORE, prompt.len())
        .chain(completion.iter().map(|&t| i64::from(t)))
        .collect();
    let labels = crate::tokenize::trajectory::roll(&unrolled);
    let n = ids.len();
    json!({"input_ids": ids, "labels": labels, "attention_mask": vec![1; n], "position_ids": (0..n).collect::<Vec<_>>()})
}

/// `sampling_params` of a sample call.
#[derive(Debug, Clone)]
struct Params {
    max_tokens: usize,
    temperature: f32,
    top_k: i64,
    top_p: f32,
    seed: Option<u64>,
    stop: Option<Value>,
    logprobs: bool,
    prompt_logprobs: bool,
    num_samples: usize,
}

impl Params {
    fn parse(v: &Value) -> Result<Self, TwinkleError> {
        let m = match v {
            Value::Null => Map::new(),
            Value::Object(m) => m.clone(),
            other => {
                return Err(TwinkleError::bad(format!(
                    "sampling_params must be an object, got {other}"
                )));
            }
        };
        let bad = |k: &str, v: &Value| {
            TwinkleError::bad(format!("sampling_params.{k}: unsupported value {v}"))
        };
        let get = |k: &str| m.get(k).filter(|v| !v.is_null());
        let uint = |k: &str, d: u64| -> Result<u64, TwinkleError> {
            get(k).map_or(Ok(d), |v| v.as_u64().ok_or_else(|| bad(k, v)))
        };
        let float = |k: &str, d: f64| -> Result<f64, TwinkleError> {
            get(k).map_or(Ok(d), |v| v.as_f64().ok_or_else(|| bad(k, v)))
        };
        if float("repetition_penalty", 1.0)? != 1.0 {
            return Err(TwinkleError::bad(
                "sampling_params.repetition_penalty other than 1.0 is not supported",
            ));
        }
        // `logprobs`: k top logprobs per token; this server returns the sampled token's (k = 1).
        let k_of = |k: &str| -> Result<u64, TwinkleError> {
            match get(k) {
                None => Ok(0),
                Some(Value::Bool(b)) => Ok(u64::from(*b)),
                Some(v) => v.as_u64().ok_or_else(|| bad(k, v)),
            }
        };
        let logprobs = k_of("logprobs")?;
        if logprobs > 1 {
            return Err(TwinkleError::bad(format!(
                "sampling_params.logprobs = {logprobs}: only the sampled token's logprob (1) is supported"
            )));
        }
        let prompt_logprobs = k_of("prompt_logprobs")?;
        if prompt_logprobs > 1 {
            return Err(TwinkleError::bad(
                "sampling_params.prompt_logprobs: only the prompt tokens' own logprobs (1) are supported",
            ));
        }
        let top_k = match get("top_k") {
            None => -1,
            Some(v) => v.as_i64().ok_or_else(|| bad("top_k", v))?,
        };
        Ok(Params {
            max_tokens: uint("max_tokens", 16)?.max(1) as usize,
            temperature: float("temperature", 1.0)? as f32,
            top_k,
            top_p: float("top_p", 1.0)? as f32,
            seed: get("seed").map(|v| v.as_u64().ok_or_else(|| bad("seed", v))).transpose()?,
            stop: get("stop").cloned(),
            logprobs: logprobs > 0,
            prompt_logprobs: prompt_logprobs > 0,
            num_samples: uint("num_samples", uint("n", 1)?)?.max(1) as usize,
        })
    }
}

/// Mounted by `apps::twinkle_http::routes`: `{prefix}/twinkle/{op}` (Gen-2) always,
/// `{prefix}/{op}` with `server_type: twinkle`.
impl Ops for TwinkleSampler {
    const GET_TOO: bool = false;

    fn auth(&self) -> &Auth {
        &self.auth
    }

    fn call(&self, c: Call<'_>) -> Result<Reply, TwinkleError> {
        if c.op == "sample_stream" {
            self.stream(c.caller, c.body).map(Reply::NdJson)
        } else {
            self.dispatch(c).map(Reply::Json)
        }
    }
}
