//! Model inputs of the native protocol → engine datums: InputFeatures (rolled labels, -100
//! ignored) as they come, Trajectories through the chat template with assistant-only labels; the
//! configured loss becomes per-token weights (cross-entropy mean/sum, scaled for gradient
//! accumulation) or per-token advantages and sampler logprobs (GRPO, `old_logps` scattered onto
//! the labelled positions).

use serde_json::{Map, Value};

use crate::engine::{Datum, LossInputs};
use crate::protocol::twinkle::TwinkleError;
use crate::protocol::twinkle::wire::{self, IGNORE, Input};
use crate::tokenize::Tokenizer;
use crate::tokenize::trajectory::RenderOptions;

/// The loss of `set_loss`.
#[derive(Debug, Clone, PartialEq)]
pub enum Loss {
    /// Token-level cross-entropy, averaged over the batch's labelled tokens (`mean`) or summed.
    CrossEntropy { mean: bool },
    /// GRPO with a clipped ratio `[1 - epsilon, 1 + epsilon_high]`, token mean per sequence, mean
    /// over sequences (beta = 0: no KL term).
    Grpo { epsilon: f64, epsilon_high: f64 },
}

impl Default for Loss {
    fn default() -> Self {
        Loss::CrossEntropy { mean: true }
    }
}

/// Loss classes `set_loss` accepts.
pub const LOSSES: &[&str] = &["CrossEntropyLoss", "GRPOLoss"];

fn num(kw: &Map<String, Value>, k: &str, d: f64) -> Result<f64, TwinkleError> {
    match kw.get(k) {
        None | Some(Value::Null) => Ok(d),
        Some(v) => v
            .as_f64()
            .filter(|x| x.is_finite())
            .ok_or_else(|| TwinkleError::bad(format!("set_loss: {k} must be a number, got {v}"))),
    }
}

impl Loss {
    /// `set_loss(loss_cls, **kwargs)`.
    pub fn from_request(cls: &str, kw: &Map<String, Value>) -> Result<Self, TwinkleError> {
        let allow = |names: &[&str]| -> Result<(), TwinkleError> {
            match kw.keys().find(|k| !names.contains(&k.as_str())) {
                Some(k) => Err(TwinkleError::bad(format!(
                    "set_loss: {cls} has no argument `{k}` (accepted: {names:?})"
                ))),
                None => Ok(()),
            }
        };
        match cls {
            "CrossEntropyLoss" => {
                allow(&["reduction", "ignore_index"])?;
                let mean = match kw.get("reduction").and_then(Value::as_str) {
                    None | Some("mean") => true,
                    Some("sum") => false,
                    Some(other) => {
                        return Err(TwinkleError::bad(format!(
                            "set_loss: reduction `{other}` is not supported (mean or sum)"
                        )));
                    }
                };
                if num(kw, "ignore_index", -100.0)? != -100.0 {
                    return Err(TwinkleError::bad("set_loss: ignore_index must be -100"));
                }
                Ok(Loss::CrossEntropy { mean })
            }
            "GRPOLoss" => {
                allow(&["epsilon", "epsilon_high", "beta"])?;
                let epsilon = num(kw, "epsilon", 0.2)?;
                let epsilon_high = num(kw, "epsilon_high", epsilon)?;
                if num(kw, "beta", 0.0)? != 0.0 {
                    return Err(TwinkleError::bad(
                        "set_loss: GRPOLoss with beta != 0 (a KL penalty against a reference \
                         model) is not supported; use beta=0",
                    ));
                }
                if !(0.0..1.0).contains(&epsilon) || epsilon_high < 0.0 {
                    return Err(TwinkleError::bad(format!(
                        "set_loss: epsilon must be in [0, 1) and epsilon_high >= 0, got {epsilon}, {epsilon_high}"
                    )));
                }
                Ok(Loss::Grpo { epsilon, epsilon_high })
            }
            other => Err(TwinkleError::bad(format!(
                "set_loss: loss_cls `{other}` is not available on this server; supported: {}",
                LOSSES.join(", ")
            ))),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Loss::CrossEntropy { .. } => "CrossEntropyLoss",
            Loss::Grpo { .. } => "GRPOLoss",
        }
    }

    /// The engine loss name and config of the internal API.
    pub fn engine(&self) -> (String, std::collections::BTreeMap<String, f64>) {
        match *self {
            Loss::CrossEntropy { .. } => ("cross_entropy".into(), Default::default()),
            Loss::Grpo { epsilon, epsilon_high } => (
                "ppo".into(),
                [
                    ("clip_low_threshold".to_string(), 1.0 - epsilon),
                    ("clip_high_threshold".to_string(), 1.0 + epsilon_high),
                ]
                .into(),
            ),
        }
    }
}

/// The chat template settings of `set_template`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TemplateCfg {
    pub max_length: Option<usize>,
    pub enable_thinking: Option<bool>,
}

impl TemplateCfg {
    pub fn render(&self, max_length: usize) -> RenderOptions {
        let mut extra = Map::new();
        if let Some(t) = self.enable_thinking {
            extra.insert("enable_thinking".into(), Value::Bool(t));
        }
        RenderOptions {
            extra,
            max_length: Some(self.max_length.unwrap_or(max_length).min(max_length)),
        }
    }
}

/// One input turned into tokens and rolled labels.
#[derive(Debug, Clone, PartialEq)]
pub struct Encoded {
    pub tokens: Vec<u32>,
    pub labels: Vec<i64>,
}

/// Decodes and tokenises `inputs`; Trajectories need the template (`set_template`).
pub fn encode(
    value: &Value,
    tok: Option<&Tokenizer>,
    template: Option<&TemplateCfg>,
    vocab: usize,
    max_length: usize,
) -> Result<Vec<Encoded>, TwinkleError> {
    wire::inputs(value)?
        .into_iter()
        .enumerate()
        .map(|(i, input)| {
            let (tokens, labels) = match input {
                Input::Feature(f) => {
                    let tokens = wire::token_ids(&format!("inputs[{i}].input_ids"), &f.input_ids, vocab)?;
                    let labels = f.labels.unwrap_or_else(|| vec![IGNORE; tokens.len()]);
                    if labels.len() != tokens.len() {
                        return Err(TwinkleError::bad(format!(
                            "inputs[{i}].labels has {} values for {} input_ids",
                            labels.len(),
                            tokens.len()
                        )));
                    }
                    if let Some(p) = labels.iter().position(|&l| l != IGNORE && (l < 0 || l as u64 >= vocab as u64)) {
                        return Err(TwinkleError::bad(format!(
                            "inputs[{i}].labels[{p}] = {} is neither -100 nor a token id",
                            labels[p]
                        )));
                    }
                    (tokens, labels)
                }
                Input::Trajectory(t) => {
                    let (Some(tok), Some(cfg)) = (tok, template) else {
                        return Err(TwinkleError::bad(format!(
                            "inputs[{i}] is a Trajectory: call set_template first (or send InputFeatures)"
                        )));
                    };
                    let mut opts = cfg.render(max_length);
                    if let Some(tools) = t.tools {
                        opts.extra.insert("tools".into(), tools);
                    }
                    let e = tok.encode_for_training(&t.messages, &opts).map_err(|e| {
                        TwinkleError::bad(format!("inputs[{i}]: cannot apply the chat template: {e}"))
                    })?;
                    (e.input_ids, e.labels)
                }
            };
            if tokens.is_empty() {
                return Err(TwinkleError::bad(format!("inputs[{i}] has no tokens")));
            }
            if tokens.len() > max_length {
                return Err(TwinkleError::bad(format!(
                    "inputs[{i}]: {} tokens exceed max_length {max_length}",
                    tokens.len()
                )));
            }
            Ok(Encoded { tokens, labels })
        })
        .collect()
}

/// `advantages`: one number per input (or per labelled token of it).
fn per_input(field: &str, v: Option<&Value>, n: usize) -> Result<Option<Vec<Value>>, TwinkleError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Array(a)) if a.len() == n => Ok(Some(a.clone())),
        Some(Value::Array(a)) => {
            Err(TwinkleError::bad(format!("{field} has {} entries for {n} inputs", a.len())))
        }
        Some(other) => Err(TwinkleError::bad(format!("{field} must be a list, got {other}"))),
    }
}

fn floats(field: &str, v: &Value) -> Result<Vec<f64>, TwinkleError> {
    match v {
        Value::Number(x) => Ok(vec![x.as_f64().unwrap_or(f64::NAN)]),
        Value::Array(a) => a
            .iter()
            .map(|x| {
                x.as_f64().ok_or_else(|| TwinkleError::bad(format!("{field} must hold numbers")))
            })
            .collect(),
        _ => Err(TwinkleError::bad(format!("{field} must be a number or a list of numbers"))),
    }
}

/// Builds the internal datums. `scale` multiplies the loss (1 / gradient accumulation steps).
/// Returns the datums and the number of labelled tokens.
pub fn datums(
    enc: &[Encoded],
    loss: &Loss,
    extras: &Map<String, Value>,
    scale: f64,
) -> Result<(Vec<Datum>, usize), TwinkleError> {
    let labelled: Vec<usize> =
        enc.iter().map(|e| e.labels.iter().filter(|&&l| l != IGNORE).count()).collect();
    let total: usize = labelled.iter().sum();
    // A label that is no token id (negative, or past u32) becomes u32::MAX, which the batch
    // check refuses as outside the vocabulary, naming the position.
    let target = |e: &Encoded| {
        let id = |l: i64| if l == IGNORE { 0 } else { u32::try_from(l).unwrap_or(u32::MAX) };
        e.labels.iter().map(|&l| id(l)).collect::<Vec<u32>>()
    };
    match *loss {
        Loss::CrossEntropy { mean } => {
            let w = if mean { scale / total.max(1) as f64 } else { scale } as f32;
            let data = enc
                .iter()
                .map(|e| Datum {
                    input_tokens: e.tokens.clone(),
                    inputs: LossInputs {
                        target_tokens: target(e),
                        k: 1,
                        weights: Some(
                            e.labels.iter().map(|&l| if l == IGNORE { 0.0 } else { w }).collect(),
                        ),
                        ..Default::default()
                    },
                })
                .collect();
            Ok((data, total))
        }
        Loss::Grpo { .. } => {
            let n = enc.len();
            let adv = per_input("advantages", extras.get("advantages"), n)?
                .ok_or_else(|| TwinkleError::bad("GRPOLoss needs advantages (one per input)"))?;
            let old = per_input("old_logps", extras.get("old_logps"), n)?;
            let mut data = Vec::with_capacity(n);
            for (i, e) in enc.iter().enumerate() {
                let k = labelled[i];
                let a = floats(&format!("advantages[{i}]"), &adv[i])?;
                if !(a.len() == 1 || a.len() == k) {
                    return Err(TwinkleError::bad(format!(
                        "advantages[{i}] has {} values; expected 1 or one per labelled token ({k})",
                        a.len()
                    )));
                }
                let o = match &old {
                    Some(o) => floats(&format!("old_logps[{i}]"), &o[i])?,
                    None => Vec::new(),
                };
                // Ragged old_logps cover the labelled (completion) positions only; a full-length
                // list is accepted too and read at those positions.
                if !(o.is_empty() || o.len() == k || o.len() == e.tokens.len()) {
                    return Err(TwinkleError::bad(format!(
                        "old_logps[{i}] has {} values; expected one per labelled token ({k})",
                        o.len()
                    )));
                }
                // Token mean per sequence, mean over sequences, times the accumulation scale:
                // folded into the advantage (the clipped objective is linear in it).
                let norm = scale / (k.max(1) as f64 * n as f64);
                let mut adv_tok = vec![0.0f32; e.tokens.len()];
                let mut lp = vec![0.0f32; e.tokens.len()];
                let mut j = 0;
                for (p, &l) in e.labels.iter().enumerate() {
                    if l == IGNORE {
                        continue;
                    }
                    let av = if a.len() == 1 { a[0] } else { a[j] };
                    if !av.is_finite() {
                        return Err(TwinkleError::bad(format!("advantages[{i}] is not finite")));
                    }
                    adv_tok[p] = (av * norm) as f32;
                    lp[p] = match o.len() {
                        0 => f32::NAN,
                        len if len == e.tokens.len() => o[p] as f32,
                        _ => o[j] as f32,
                    };
                    j += 1;
                }
                data.push(Datum {
                    input_tokens: e.tokens.clone(),
                    inputs: LossInputs {
                        target_tokens: target(e),
                        k: 1,
                        weights: None,
                        logprobs: (!o.is_empty()).then_some(lp),
                        advantages: Some(adv_tok),
                    },
                });
            }
            // On-policy when no old_logps were sent: the ratio is 1 (filled in by the caller
            // from a forward pass).
            Ok((data, total))
        }
    }
}

/// The logprob of each labelled position (Twinkle's `logps`: one row per input, the values at
/// positions with a label, 0 elsewhere).
pub fn logps(enc: &[Encoded], logprobs: &[Vec<f32>]) -> Vec<Vec<f32>> {
    enc.iter()
        .zip(logprobs)
        .map(|(e, lp)| {
            e.labels.iter().zip(lp).map(|(&l, &x)| if l == IGNORE { 0.0 } else { x }).collect()
        })
        .collect()
}
