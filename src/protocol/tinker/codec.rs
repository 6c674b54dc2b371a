//! Conversions between the Tinker protobuf messages and plain Rust types: decoding a
//! `forward_backward` request, encoding `ForwardBackwardOutput` and `SampleResponse` results
//! (and decoding them again as the SDK does, for tests and in-process clients).

use std::collections::BTreeMap;

use prost::Message;

use super::error::ProtocolError;
use super::proto::{self, DType, StopReason};
use super::tensor::{self, DecodeLimits, TensorValues, TypedTensor, WireDtype};

/// A `loss_fn_config` value after merging the legacy and v2 maps.
#[derive(Debug, Clone, PartialEq)]
pub enum ConfigValue {
    Number(f64),
    Text(String),
}

/// One decoded training example.
#[derive(Debug, Clone, PartialEq)]
pub struct DatumInput {
    /// Concatenated token ids of all text chunks.
    pub tokens: Vec<i32>,
    pub loss_fn_inputs: BTreeMap<String, TypedTensor>,
}

/// A validated `forward_backward` / `forward` request.
#[derive(Debug, Clone, PartialEq)]
pub struct ForwardBackwardInput {
    pub model_id: String,
    pub seq_id: i32,
    pub data: Vec<DatumInput>,
    pub loss_fn: String,
    /// `loss_fn_config_v2` when it is non-empty, else the legacy numeric map.
    pub loss_config: BTreeMap<String, ConfigValue>,
    pub forward_only: bool,
}

/// Loss input keys whose kind is fixed by the SDK's conversion rules (§6.2).
const INT_KEYS: &[&str] = &["target_tokens"];
const FLOAT_KEYS: &[&str] = &[
    "weights",
    "advantages",
    "logprobs",
    "clip_low_threshold",
    "clip_high_threshold",
    "sequence_ratio_mask",
];

/// Decodes and validates a protobuf `ForwardBackwardRequest` body.
pub fn decode_forward_backward(
    body: &[u8],
    limits: &DecodeLimits,
) -> Result<ForwardBackwardInput, ProtocolError> {
    let req = proto::ForwardBackwardRequest::decode(body).map_err(|e| {
        ProtocolError::Malformed { message: "ForwardBackwardRequest", reason: e.to_string() }
    })?;
    forward_backward_from_proto(req, limits)
}

/// Validates an already-decoded `ForwardBackwardRequest`.
pub fn forward_backward_from_proto(
    req: proto::ForwardBackwardRequest,
    limits: &DecodeLimits,
) -> Result<ForwardBackwardInput, ProtocolError> {
    if req.model_id.is_empty() {
        return Err(ProtocolError::missing("model_id"));
    }
    if req.seq_id < 0 {
        return Err(ProtocolError::invalid("seq_id", format!("{} is negative", req.seq_id)));
    }
    if req.loss_fn.is_empty() {
        return Err(ProtocolError::missing("loss_fn"));
    }
    if req.data.len() > limits.max_datums {
        return Err(ProtocolError::TooLarge {
            field: "data".into(),
            what: "the number of datums",
            actual: req.data.len() as u64,
            limit: limits.max_datums as u64,
        });
    }
    let mut budget = limits.max_total_elements;
    let mut data = Vec::with_capacity(req.data.len());
    for (i, datum) in req.data.iter().enumerate() {
        data.push(decode_datum(datum, i, limits, &mut budget)?);
    }
    let loss_config = merge_config(&req)?;
    Ok(ForwardBackwardInput {
        model_id: req.model_id,
        seq_id: req.seq_id,
        data,
        loss_fn: req.loss_fn,
        loss_config,
        forward_only: req.forward_only,
    })
}

fn decode_datum(
    datum: &proto::Datum,
    i: usize,
    limits: &DecodeLimits,
    budget: &mut u64,
) -> Result<DatumInput, ProtocolError> {
    let mut tokens = Vec::new();
    for (j, chunk) in datum.model_input.iter().enumerate() {
        let field = format!("data[{i}].model_input[{j}]");
        match &chunk.chunk {
            Some(proto::chunk::Chunk::EncodedText(t)) => {
                let ids = tensor::le_i32(&t.tokens, &format!("{field}.encoded_text.tokens"))?;
                if let Some(p) = ids.iter().position(|&t| t < 0) {
                    return Err(ProtocolError::invalid(
                        format!("{field}.encoded_text.tokens"),
                        format!("token {} at position {p} is negative", ids[p]),
                    ));
                }
                if tokens.len() + ids.len() > limits.max_tokens_per_datum {
                    return Err(ProtocolError::TooLarge {
                        field: format!("data[{i}].model_input"),
                        what: "the number of tokens",
                        actual: (tokens.len() + ids.len()) as u64,
                        limit: limits.max_tokens_per_datum as u64,
                    });
                }
                tokens.extend_from_slice(&ids);
            }
            Some(proto::chunk::Chunk::Image(_)) => {
                return Err(ProtocolError::Unsupported { field, what: "an image chunk".into() });
            }
            Some(proto::chunk::Chunk::Dmel(_)) => {
                return Err(ProtocolError::Unsupported {
                    field,
                    what: "a dmel (audio) chunk".into(),
                });
            }
            None => return Err(ProtocolError::missing(format!("{field}.chunk"))),
        }
    }
    let mut inputs = BTreeMap::new();
    for (key, t) in &datum.loss_fn_inputs {
        let field = format!("data[{i}].loss_fn_inputs[{key}]");
        let typed = tensor::decode_tensor(t, &field, limits, budget)?;
        if INT_KEYS.contains(&key.as_str()) {
            tensor::require_kind(&typed, false, &field, t.dtype)?;
        } else if FLOAT_KEYS.contains(&key.as_str()) {
            tensor::require_kind(&typed, true, &field, t.dtype)?;
        }
        if key == "target_tokens"
            && let Some(v) = typed.as_i64()
            && let Some(p) = v.iter().position(|&x| x < 0 || x > i64::from(i32::MAX))
        {
            return Err(ProtocolError::invalid(
                field,
                format!("token id {} at position {p} is not a valid token id", v[p]),
            ));
        }
        inputs.insert(key.clone(), typed);
    }
    Ok(DatumInput { tokens, loss_fn_inputs: inputs })
}

fn merge_config(
    req: &proto::ForwardBackwardRequest,
) -> Result<BTreeMap<String, ConfigValue>, ProtocolError> {
    let mut out = BTreeMap::new();
    if req.loss_fn_config_v2.is_empty() {
        for (k, v) in &req.loss_fn_config {
            out.insert(k.clone(), ConfigValue::Number(*v));
        }
    } else {
        for (k, v) in &req.loss_fn_config_v2 {
            let value = match &v.value {
                Some(proto::loss_config_value::Value::Number(n)) => ConfigValue::Number(*n),
                Some(proto::loss_config_value::Value::Text(s)) => ConfigValue::Text(s.clone()),
                None => {
                    return Err(ProtocolError::missing(format!("loss_fn_config_v2[{k}].value")));
                }
            };
            out.insert(k.clone(), value);
        }
    }
    for (k, v) in &out {
        if let ConfigValue::Number(n) = v
            && !n.is_finite()
        {
            return Err(ProtocolError::invalid(
                format!("loss_fn_config[{k}]"),
                format!("{n} is not finite"),
            ));
        }
    }
    Ok(out)
}

/// A float array of one datum's output, with its full shape (`[N]` or `[N, K]`).
#[derive(Debug, Clone, PartialEq)]
pub struct FloatArray {
    pub values: Vec<f32>,
    pub shape: Vec<usize>,
}

impl FloatArray {
    /// A 1-D array `[values.len()]`.
    pub fn vector(values: Vec<f32>) -> Self {
        let n = values.len();
        FloatArray { values, shape: vec![n] }
    }
}

/// The outputs the loss produced for one datum.
#[derive(Debug, Clone, PartialEq)]
pub struct DatumOutput {
    /// Log-probabilities of the target tokens, same shape as `target_tokens`.
    pub logprobs: FloatArray,
    /// Per-token loss, `[N]`.
    pub elementwise_loss: FloatArray,
}

fn check_metric_key(key: &str) -> Result<(), ProtocolError> {
    let mut parts = key.split(':');
    let ok = matches!((parts.next(), parts.next(), parts.next()), (Some(a), Some(b), None) if !a.is_empty() && !b.is_empty());
    if ok {
        Ok(())
    } else {
        Err(ProtocolError::invalid(
            format!("metrics[{key}]"),
            "metric keys must be `name:reduction` with exactly one colon",
        ))
    }
}

/// Batches one field of every datum into a `BatchedTensor` (float32, byte offsets).
fn batch_field(arrays: &[&FloatArray], name: &str) -> Result<proto::BatchedTensor, ProtocolError> {
    let trailing: Vec<usize> =
        arrays.first().map(|a| a.shape.iter().skip(1).copied().collect()).unwrap_or_default();
    let mut data = Vec::new();
    let mut offsets = Vec::with_capacity((arrays.len() + 1) * 8);
    offsets.extend_from_slice(&0i64.to_le_bytes());
    for (i, a) in arrays.iter().enumerate() {
        let field = format!("outputs[{i}].{name}");
        let count = a.shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
        if a.shape.is_empty() || count != Some(a.values.len()) {
            return Err(ProtocolError::ShapeMismatch {
                field,
                shape: a.shape.iter().map(|&d| d as i64).collect(),
                expected: count.unwrap_or(usize::MAX) as u64,
                actual: a.values.len() as u64,
            });
        }
        if a.shape[1..] != trailing[..] {
            return Err(ProtocolError::BadShape {
                field,
                shape: a.shape.iter().map(|&d| d as i64).collect(),
                reason: format!("all datums must share the trailing shape {trailing:?}"),
            });
        }
        for v in &a.values {
            data.extend_from_slice(&v.to_le_bytes());
        }
        offsets.extend_from_slice(&(data.len() as i64).to_le_bytes());
    }
    Ok(proto::BatchedTensor {
        data,
        offsets,
        dtype: DType::DtypeFloat32 as i32,
        trailing_shape: trailing.iter().map(|&d| d as i64).collect(),
    })
}

/// Encodes a `forward_backward` result: one `ArrayRecord` holding every datum's `logprobs` and
/// `elementwise_loss`, plus the metrics (every key `name:reduction`, e.g. `loss:sum`).
pub fn encode_forward_backward_output(
    outputs: &[DatumOutput],
    metrics: &BTreeMap<String, f64>,
    loss_fn_output_type: &str,
) -> Result<Vec<u8>, ProtocolError> {
    for key in metrics.keys() {
        check_metric_key(key)?;
    }
    let logprobs: Vec<&FloatArray> = outputs.iter().map(|o| &o.logprobs).collect();
    let losses: Vec<&FloatArray> = outputs.iter().map(|o| &o.elementwise_loss).collect();
    let mut fields = BTreeMap::new();
    fields.insert("logprobs".to_string(), batch_field(&logprobs, "logprobs")?);
    fields.insert("elementwise_loss".to_string(), batch_field(&losses, "elementwise_loss")?);
    let msg = proto::ForwardBackwardOutput {
        loss_fn_output_type: loss_fn_output_type.to_string(),
        loss_fn_outputs: vec![proto::ArrayRecord {
            type_tag: "ArrayRecord".to_string(),
            fields,
            num_datums: outputs.len() as i64,
        }],
        metrics: metrics.clone(),
    };
    Ok(msg.encode_to_vec())
}

/// A decoded `ForwardBackwardOutput`, one map per datum in request order.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodedForwardBackward {
    pub loss_fn_output_type: String,
    pub outputs: Vec<BTreeMap<String, TypedTensor>>,
    pub metrics: BTreeMap<String, f64>,
}

/// Decodes a `ForwardBackwardOutput` with the SDK's rule: datum i of a field gets the elements
/// between byte offsets i and i+1, reshaped to `[count / prod(trailing), *trailing]`.
pub fn decode_forward_backward_output(
    body: &[u8],
) -> Result<DecodedForwardBackward, ProtocolError> {
    let msg = proto::ForwardBackwardOutput::decode(body).map_err(|e| ProtocolError::Malformed {
        message: "ForwardBackwardOutput",
        reason: e.to_string(),
    })?;
    let mut outputs = Vec::new();
    for (r, rec) in msg.loss_fn_outputs.iter().enumerate() {
        let n = usize::try_from(rec.num_datums).map_err(|_| {
            ProtocolError::invalid(format!("loss_fn_outputs[{r}].num_datums"), "negative")
        })?;
        let mut per: Vec<BTreeMap<String, TypedTensor>> = Vec::new();
        for (name, bt) in &rec.fields {
            let field = format!("loss_fn_outputs[{r}].fields[{name}]");
            let split = split_batched(bt, n, &field)?;
            per.resize_with(n, BTreeMap::new);
            for (slot, t) in per.iter_mut().zip(split) {
                slot.insert(name.clone(), t);
            }
        }
        per.resize_with(n, BTreeMap::new);
        outputs.extend(per);
    }
    Ok(DecodedForwardBackward {
        loss_fn_output_type: msg.loss_fn_output_type,
        outputs,
        metrics: msg.metrics,
    })
}

fn split_batched(
    bt: &proto::BatchedTensor,
    n: usize,
    field: &str,
) -> Result<Vec<TypedTensor>, ProtocolError> {
    let dtype = WireDtype::from_i32(bt.dtype, field)?;
    let item = dtype.itemsize();
    let offsets = tensor::le_i64(&bt.offsets, &format!("{field}.offsets"))?;
    if offsets.len() != n + 1 {
        return Err(ProtocolError::invalid(
            format!("{field}.offsets"),
            format!("has {} entries, expected num_datums + 1 = {}", offsets.len(), n + 1),
        ));
    }
    let mut trailing = Vec::new();
    let mut row: u64 = 1;
    for &d in &bt.trailing_shape {
        let du = usize::try_from(d)
            .map_err(|_| ProtocolError::invalid(format!("{field}.trailing_shape"), "negative"))?;
        row = row
            .checked_mul(du as u64)
            .ok_or_else(|| ProtocolError::invalid(format!("{field}.trailing_shape"), "overflow"))?;
        trailing.push(du);
    }
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let (a, b) = (offsets[i], offsets[i + 1]);
        if a < 0
            || b < a
            || b as u64 > bt.data.len() as u64
            || !(a as u64).is_multiple_of(item as u64)
            || !(b as u64).is_multiple_of(item as u64)
        {
            return Err(ProtocolError::invalid(
                format!("{field}.offsets"),
                format!(
                    "entries {i}..{} = {a}..{b} do not delimit whole items of {} data bytes",
                    i + 1,
                    bt.data.len()
                ),
            ));
        }
        let bytes = &bt.data[a as usize..b as usize];
        let count = (bytes.len() / item) as u64;
        if row == 0 || !count.is_multiple_of(row) {
            return Err(ProtocolError::invalid(
                format!("{field}.trailing_shape"),
                format!("datum {i} has {count} elements, not a multiple of {row}"),
            ));
        }
        let mut shape = vec![(count / row) as usize];
        shape.extend_from_slice(&trailing);
        let values = match dtype {
            WireDtype::F32 => TensorValues::F32(tensor::le_f32(bytes, field)?),
            WireDtype::I64 => TensorValues::I64(tensor::le_i64(bytes, field)?),
            WireDtype::I32 => TensorValues::I64(
                tensor::le_i32(bytes, field)?.into_iter().map(i64::from).collect(),
            ),
            WireDtype::Bf16 => {
                return Err(ProtocolError::Unsupported {
                    field: field.into(),
                    what: "a BFLOAT16 output".into(),
                });
            }
        };
        out.push(TypedTensor { shape, values });
    }
    Ok(out)
}

/// One generated sequence of a sample result.
#[derive(Debug, Clone, PartialEq)]
pub struct SampledSequenceOut {
    pub stop_reason: StopReason,
    /// Generated tokens only (never the prompt).
    pub tokens: Vec<i32>,
    /// One logprob per token.
    pub logprobs: Vec<f32>,
}

/// Encodes a `SampleResponse`. `prompt_logprobs` (when requested) has one entry per prompt token;
/// `None` entries (position 0 and anything not computed) are sent as NaN.
pub fn encode_sample_response(
    sequences: &[SampledSequenceOut],
    prompt_logprobs: Option<&[Option<f32>]>,
) -> Result<Vec<u8>, ProtocolError> {
    let mut seqs = Vec::with_capacity(sequences.len());
    for (i, s) in sequences.iter().enumerate() {
        if s.tokens.len() != s.logprobs.len() {
            return Err(ProtocolError::invalid(
                format!("sequences[{i}].logprobs"),
                format!("has {} entries for {} tokens", s.logprobs.len(), s.tokens.len()),
            ));
        }
        seqs.push(proto::SampledSequence {
            stop_reason: s.stop_reason as i32,
            tokens: s.tokens.iter().flat_map(|t| t.to_le_bytes()).collect(),
            logprobs: Some(s.logprobs.iter().flat_map(|t| t.to_le_bytes()).collect()),
            topk_sampled_logprobs: None,
        });
    }
    let prompt = prompt_logprobs
        .map(|p| p.iter().flat_map(|x| x.unwrap_or(f32::NAN).to_le_bytes()).collect());
    let msg =
        proto::SampleResponse { sequences: seqs, prompt_logprobs: prompt, ..Default::default() };
    Ok(msg.encode_to_vec())
}

/// A decoded `SampleResponse` (the parts this server produces).
#[derive(Debug, Clone, PartialEq)]
pub struct DecodedSample {
    pub sequences: Vec<SampledSequenceOut>,
    /// NaN decoded back to `None`.
    pub prompt_logprobs: Option<Vec<Option<f32>>>,
}

/// Decodes a `SampleResponse` body.
pub fn decode_sample_response(body: &[u8]) -> Result<DecodedSample, ProtocolError> {
    let msg = proto::SampleResponse::decode(body).map_err(|e| ProtocolError::Malformed {
        message: "SampleResponse",
        reason: e.to_string(),
    })?;
    let mut sequences = Vec::with_capacity(msg.sequences.len());
    for (i, s) in msg.sequences.iter().enumerate() {
        let stop_reason = StopReason::try_from(s.stop_reason).map_err(|_| {
            ProtocolError::invalid(
                format!("sequences[{i}].stop_reason"),
                format!("unknown value {}", s.stop_reason),
            )
        })?;
        let tokens = tensor::le_i32(&s.tokens, &format!("sequences[{i}].tokens"))?;
        let logprobs = match &s.logprobs {
            Some(b) => tensor::le_f32(b, &format!("sequences[{i}].logprobs"))?,
            None => Vec::new(),
        };
        sequences.push(SampledSequenceOut { stop_reason, tokens, logprobs });
    }
    let prompt_logprobs = match &msg.prompt_logprobs {
        Some(b) => Some(
            tensor::le_f32(b, "prompt_logprobs")?
                .into_iter()
                .map(|x| if x.is_nan() { None } else { Some(x) })
                .collect(),
        ),
        None => None,
    };
    Ok(DecodedSample { sequences, prompt_logprobs })
}
