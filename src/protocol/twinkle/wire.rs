//! Wire encodings shared by both client generations: the `_TWINKLE_TYPE_`-marked JSON strings
//! (`LoraConfig`, `DatasetMeta`), model inputs (`InputFeature` with rolled labels, `Trajectory`
//! messages) and the slice encoding of `DatasetMeta.data_slice`.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::error::TwinkleError;
use crate::engine::LoraTargets;

/// Label value of a position that is not trained on (PyTorch's `ignore_index`).
pub const IGNORE: i64 = -100;

/// Decodes a value that the client serialised with `_TWINKLE_TYPE_` = `ty`: a JSON string holding
/// an object, or (tolerated) the object itself.
pub fn decode_typed(
    field: &str,
    ty: &str,
    value: &Value,
) -> Result<serde_json::Map<String, Value>, TwinkleError> {
    let obj = match value {
        Value::String(s) => serde_json::from_str::<Value>(s)
            .map_err(|e| TwinkleError::bad(format!("{field}: not a JSON-encoded {ty}: {e}")))?,
        other => other.clone(),
    };
    let Value::Object(map) = obj else {
        return Err(TwinkleError::bad(format!("{field}: expected a {ty} object")));
    };
    match map.get("_TWINKLE_TYPE_").and_then(Value::as_str) {
        None => Ok(map),
        Some(t) if t == ty => Ok(map),
        Some(t) => Err(TwinkleError::bad(format!("{field}: expected a {ty}, got a {t}"))),
    }
}

/// What a `peft.LoraConfig` asks for, reduced to what the engine trains.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraRequest {
    pub rank: usize,
    pub alpha: f32,
    /// From `target_modules`; `lm_head` only when listed (PEFT's "all-linear" leaves it out).
    pub targets: LoraTargets,
    /// `lora_dropout` as sent (the engine trains without dropout; reported in train configs).
    pub dropout: f64,
}

const ATTN: [&str; 4] = ["q_proj", "k_proj", "v_proj", "o_proj"];
const MLP: [&str; 3] = ["gate_proj", "up_proj", "down_proj"];

/// Decodes the LoraConfig JSON string of `add_adapter_to_model`.
pub fn lora_config(value: &Value) -> Result<LoraRequest, TwinkleError> {
    let m = decode_typed("config", "LoraConfig", value)?;
    let num = |k: &str| m.get(k).and_then(Value::as_f64);
    let rank = match num("r") {
        None => 8,
        Some(r) if r >= 1.0 && r.fract() == 0.0 => r as usize,
        Some(r) => {
            return Err(TwinkleError::bad(format!("config.r must be a positive integer, got {r}")));
        }
    };
    let alpha = num("lora_alpha").unwrap_or(8.0) as f32;
    let truthy = |k: &str| m.get(k).is_some_and(|v| !(v.is_null() || v == &Value::Bool(false)));
    for (key, why) in [
        ("use_dora", "DoRA is not supported"),
        ("use_rslora", "rsLoRA scaling is not supported (use plain LoRA)"),
        ("modules_to_save", "modules_to_save (full fine-tuning of extra modules) is not supported"),
        ("layers_to_transform", "layers_to_transform is not supported (LoRA goes on every layer)"),
    ] {
        if truthy(key) {
            return Err(TwinkleError::bad(format!("config.{key}: {why}")));
        }
    }
    if let Some(b) = m.get("bias").and_then(Value::as_str)
        && b != "none"
    {
        return Err(TwinkleError::bad(format!("config.bias `{b}`: only \"none\" is supported")));
    }
    for key in ["rank_pattern", "alpha_pattern"] {
        if m.get(key).and_then(Value::as_object).is_some_and(|o| !o.is_empty()) {
            return Err(TwinkleError::bad(format!(
                "config.{key}: per-module ranks are not supported"
            )));
        }
    }
    let targets = match m.get("target_modules") {
        None | Some(Value::Null) => LoraTargets::ALL_LINEAR,
        Some(Value::String(s)) if s == "all-linear" || s == "all_linear" => LoraTargets::ALL_LINEAR,
        Some(Value::String(s)) => regex_targets(s)?,
        Some(Value::Array(items)) => {
            let names: Vec<String> =
                items.iter().filter_map(|v| v.as_str().map(str::to_string)).collect();
            if names.len() != items.len() {
                return Err(TwinkleError::bad("config.target_modules must be a list of strings"));
            }
            named_targets(&names)?
        }
        Some(other) => {
            return Err(TwinkleError::bad(format!(
                "config.target_modules must be \"all-linear\" or a list of module names, got {other}"
            )));
        }
    };
    if !(alpha.is_finite() && alpha > 0.0) {
        return Err(TwinkleError::bad(format!("config.lora_alpha must be > 0, got {alpha}")));
    }
    Ok(LoraRequest { rank, alpha, targets, dropout: num("lora_dropout").unwrap_or(0.0) })
}

/// Maps module names onto the engine's groups; a group is trained whole (all its projections).
fn named_targets(names: &[String]) -> Result<LoraTargets, TwinkleError> {
    let (mut attn, mut mlp, mut head) = (false, false, false);
    for n in names {
        let short = n.rsplit('.').next().unwrap_or(n);
        if ATTN.contains(&short) {
            attn = true;
        } else if MLP.contains(&short) {
            mlp = true;
        } else if short == "lm_head" {
            head = true;
        } else {
            return Err(TwinkleError::bad(format!(
                "config.target_modules: `{n}` is not a LoRA target here (use \"all-linear\" or \
                 names among {ATTN:?} {MLP:?} and lm_head)"
            )));
        }
    }
    if !(attn || mlp || head) {
        return Err(TwinkleError::bad("config.target_modules is empty: nothing to train"));
    }
    Ok(LoraTargets { train_attn: attn, train_mlp: mlp, train_unembed: head })
}

/// A `target_modules` string other than "all-linear" is, as in PEFT, a regular expression that
/// must match a module's whole name (`model.layers.3.self_attn.q_proj`, `lm_head`). The engine
/// trains whole groups on every layer, so it must select all or none of a group's projections,
/// the same on every layer.
fn regex_targets(pattern: &str) -> Result<LoraTargets, TwinkleError> {
    let re = regex::Regex::new(&format!("^(?:{pattern})$")).map_err(|e| {
        TwinkleError::bad(format!("config.target_modules is not a valid regular expression: {e}"))
    })?;
    let group = |kind: &str, names: &[&str]| -> Result<bool, TwinkleError> {
        let hits: Vec<bool> = (0..2)
            .flat_map(|l| names.iter().map(move |n| format!("model.layers.{l}.{kind}.{n}")))
            .map(|full| re.is_match(&full))
            .collect();
        if hits.iter().all(|&h| h) {
            Ok(true)
        } else if hits.iter().all(|&h| !h) {
            Ok(false)
        } else {
            Err(TwinkleError::bad(format!(
                "config.target_modules `{pattern}` selects only some {kind} projections or layers; \
                 LoRA here covers all of {names:?} on every layer, or none"
            )))
        }
    };
    let attn = group("self_attn", &ATTN)?;
    let mlp = group("mlp", &MLP)?;
    let head = re.is_match("lm_head");
    if !(attn || mlp || head) {
        return Err(TwinkleError::bad(format!(
            "config.target_modules `{pattern}` matches no LoRA target (names like model.layers.0.self_attn.q_proj, lm_head)"
        )));
    }
    Ok(LoraTargets { train_attn: attn, train_mlp: mlp, train_unembed: head })
}

/// A pre-tokenised model input. `labels[i]` is the target of position `i` (already rolled);
/// [`IGNORE`] marks positions without a target.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct InputFeature {
    pub input_ids: Vec<i64>,
    #[serde(default)]
    pub labels: Option<Vec<i64>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention_mask: Option<Vec<i64>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub position_ids: Option<Vec<i64>>,
}

/// A conversation encoded server-side with the chat template.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Trajectory {
    pub messages: Vec<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tools: Option<Value>,
}

/// One element of `inputs`: a Trajectory (has `messages`) or an InputFeature (has `input_ids`).
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    Feature(InputFeature),
    Trajectory(Trajectory),
}

/// Decodes `inputs` (a list, or one object) of forward/sample calls.
pub fn inputs(value: &Value) -> Result<Vec<Input>, TwinkleError> {
    let items: Vec<&Value> = match value {
        Value::Array(a) => a.iter().collect(),
        Value::Object(_) => vec![value],
        Value::Null => return Err(TwinkleError::bad("inputs is missing")),
        other => {
            return Err(TwinkleError::bad(format!(
                "inputs must be a list of InputFeature or Trajectory objects, got {other}"
            )));
        }
    };
    if items.is_empty() {
        return Err(TwinkleError::bad("inputs is empty"));
    }
    items
        .into_iter()
        .enumerate()
        .map(|(i, v)| {
            let Some(obj) = v.as_object() else {
                return Err(TwinkleError::bad(format!("inputs[{i}] must be an object")));
            };
            if obj.contains_key("input_ids") {
                serde_json::from_value(v.clone())
                    .map(Input::Feature)
                    .map_err(|e| TwinkleError::bad(format!("inputs[{i}] (InputFeature): {e}")))
            } else if obj.contains_key("messages") {
                serde_json::from_value(v.clone())
                    .map(Input::Trajectory)
                    .map_err(|e| TwinkleError::bad(format!("inputs[{i}] (Trajectory): {e}")))
            } else {
                Err(TwinkleError::bad(format!(
                    "inputs[{i}] has neither input_ids (InputFeature) nor messages (Trajectory)"
                )))
            }
        })
        .collect()
}

/// Checks token ids against the vocabulary and converts them.
pub fn token_ids(field: &str, ids: &[i64], vocab: usize) -> Result<Vec<u32>, TwinkleError> {
    ids.iter()
        .enumerate()
        .map(|(p, &t)| {
            if t >= 0 && (t as u64) < vocab as u64 {
                Ok(t as u32)
            } else {
                Err(TwinkleError::bad(format!(
                    "{field}[{p}] = {t} is not a token id (vocab {vocab})"
                )))
            }
        })
        .collect()
}

/// `DatasetMeta.data_slice`: which rows of the dataset to keep.
#[derive(Debug, Clone, PartialEq)]
pub enum DataSlice {
    Range { start: usize, stop: Option<usize>, step: usize },
    List(Vec<usize>),
}

impl DataSlice {
    /// The selected row indices of a dataset of `len` rows (out-of-range list entries are an error).
    pub fn indices(&self, len: usize) -> Result<Vec<usize>, TwinkleError> {
        match self {
            DataSlice::Range { start, stop, step } => {
                let stop = stop.unwrap_or(len).min(len);
                Ok((*start..stop).step_by((*step).max(1)).collect())
            }
            DataSlice::List(v) => v
                .iter()
                .map(|&i| {
                    if i < len {
                        Ok(i)
                    } else {
                        Err(TwinkleError::bad(format!(
                            "dataset_meta.data_slice: row {i} is beyond the dataset's {len} rows"
                        )))
                    }
                })
                .collect(),
        }
    }
}

/// A request body as the keyword arguments of an op: a JSON object (an empty body or `null`
/// reads as no arguments).
pub fn body_object(body: &[u8]) -> Result<serde_json::Map<String, Value>, TwinkleError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(serde_json::Map::new());
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(Value::Null) => Ok(serde_json::Map::new()),
        Ok(_) => Err(TwinkleError::bad("the request body must be a JSON object")),
        Err(e) => Err(TwinkleError::bad(format!("bad JSON body: {e}"))),
    }
}

/// The keyword arguments of a call that go on to a class or function: all of `body` but `skip`.
pub fn kwargs(
    body: &serde_json::Map<String, Value>,
    skip: &[&str],
) -> serde_json::Map<String, Value> {
    body.iter()
        .filter(|(k, _)| !skip.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// An optional positive whole number `key` of `op`'s arguments (`null` = absent).
pub fn positive(
    body: &serde_json::Map<String, Value>,
    op: &str,
    key: &str,
) -> Result<Option<usize>, TwinkleError> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_u64().filter(|&m| m > 0).map(|m| Some(m as usize)).ok_or_else(|| {
            TwinkleError::bad(format!("{op}: {key} must be a positive whole number, got {v}"))
        }),
    }
}

/// A decoded `DatasetMeta`.
#[derive(Debug, Clone, PartialEq)]
pub struct DatasetMeta {
    pub dataset_id: String,
    pub subset_name: Option<String>,
    pub split: Option<String>,
    pub data_slice: Option<DataSlice>,
}

/// Decodes a `DatasetMeta` JSON string.
pub fn dataset_meta(field: &str, value: &Value) -> Result<DatasetMeta, TwinkleError> {
    let m = decode_typed(field, "DatasetMeta", value)?;
    let dataset_id = m
        .get("dataset_id")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| TwinkleError::bad(format!("{field}.dataset_id is missing")))?
        .to_string();
    let string = |k: &str| m.get(k).and_then(Value::as_str).map(str::to_string);
    let data_slice = match m.get("data_slice") {
        None | Some(Value::Null) => None,
        Some(v) => Some(slice(field, v)?),
    };
    Ok(DatasetMeta {
        dataset_id,
        subset_name: string("subset_name"),
        split: string("split"),
        data_slice,
    })
}

fn slice(field: &str, v: &Value) -> Result<DataSlice, TwinkleError> {
    let bad = |m: &str| TwinkleError::bad(format!("{field}.data_slice: {m}"));
    let idx = |x: &Value| x.as_u64().map(|n| n as usize);
    match v {
        Value::Array(items) => items
            .iter()
            .map(|x| idx(x).ok_or_else(|| bad("list entries must be row numbers")))
            .collect::<Result<_, _>>()
            .map(DataSlice::List),
        Value::Object(o) => match o.get("_slice_type_").and_then(Value::as_str) {
            Some("range") => Ok(DataSlice::Range {
                start: o.get("start").and_then(idx).unwrap_or(0),
                stop: o.get("stop").and_then(idx),
                step: o.get("step").and_then(idx).unwrap_or(1),
            }),
            Some("list") => o
                .get("values")
                .and_then(Value::as_array)
                .ok_or_else(|| bad("a list slice needs values"))?
                .iter()
                .map(|x| idx(x).ok_or_else(|| bad("list entries must be row numbers")))
                .collect::<Result<_, _>>()
                .map(DataSlice::List),
            _ => Err(bad("expected {\"_slice_type_\": \"range\"|\"list\", …}")),
        },
        _ => Err(bad("expected a range or a list")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn lora_config_from_the_recorded_client_string() {
        let s = r#"{"task_type": null, "peft_type": "LORA", "r": 8, "target_modules": "all-linear", "lora_alpha": 8, "lora_dropout": 0.0, "bias": "none", "use_rslora": false, "modules_to_save": null, "rank_pattern": {}, "alpha_pattern": {}, "use_dora": false, "_TWINKLE_TYPE_": "LoraConfig"}"#;
        let l = lora_config(&json!(s)).unwrap();
        assert_eq!(
            (l.rank, l.alpha, l.targets.train_attn, l.targets.train_mlp),
            (8, 8.0, true, true)
        );
        let l =
            lora_config(&json!({"r": 4, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}))
                .unwrap();
        assert_eq!((l.rank, l.targets.train_attn, l.targets.train_mlp), (4, true, false));
        let re = r".*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)|lm_head";
        let l = lora_config(&json!({"r": 4, "target_modules": re})).unwrap();
        assert_eq!(
            (l.targets.train_attn, l.targets.train_mlp, l.targets.train_unembed),
            (true, true, true)
        );
        let l = lora_config(&json!({"r": 4, "target_modules": r".*self_attn\..*"})).unwrap();
        assert_eq!(
            (l.targets.train_attn, l.targets.train_mlp, l.targets.train_unembed),
            (true, false, false)
        );
        for bad in [
            json!({"r": 4, "target_modules": r".*q_proj"}),
            json!({"r": 4, "target_modules": r"model\.layers\.0\..*"}),
            json!({"r": 4, "target_modules": "("}),
            json!({"r": 4, "use_dora": true}),
            json!({"r": 4, "target_modules": ["embed_tokens"]}),
            json!({"r": 0}),
            json!({"r": 4, "modules_to_save": ["embed_tokens"]}),
            json!("not json"),
            json!({"_TWINKLE_TYPE_": "DatasetMeta"}),
        ] {
            assert!(lora_config(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn dataset_meta_and_slices() {
        let s = r#"{"dataset_id": "ms://swift/self-cognition", "data_slice": {"_slice_type_": "range", "start": 2, "stop": 10, "step": 3}, "split": "train", "_TWINKLE_TYPE_": "DatasetMeta"}"#;
        let m = dataset_meta("dataset_meta", &json!(s)).unwrap();
        assert_eq!(m.dataset_id, "ms://swift/self-cognition");
        assert_eq!(m.data_slice.unwrap().indices(8).unwrap(), vec![2, 5]);
        let l = DataSlice::List(vec![0, 9]);
        assert!(l.indices(5).is_err());
    }

    #[test]
    fn inputs_pick_their_kind() {
        let v = json!([{"input_ids": [1, 2], "labels": [-100, 2]}, {"messages": [{"role": "user", "content": "hi"}]}]);
        let got = inputs(&v).unwrap();
        assert!(matches!(got[0], Input::Feature(_)));
        assert!(matches!(got[1], Input::Trajectory(_)));
        assert!(inputs(&json!([{"foo": 1}])).is_err());
        assert!(inputs(&json!([])).is_err());
        assert!(token_ids("input_ids", &[1, -5], 10).is_err());
    }
}
