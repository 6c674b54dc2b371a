//! The batch contract shared by every device: input validation (one set of error messages), the
//! packing of datums into rows, and the result type of `forward_backward`.

use super::error::{EngineError, Result};
use super::loss::{Datum, DatumOutput, LossFn};
use super::models::ModelConfig;

/// Result of `forward_backward`.
#[derive(Debug, Clone, PartialEq)]
pub struct FwdBwdOutput {
    /// One entry per datum, in order.
    pub per_datum: Vec<DatumOutput>,
    /// The summed loss (`loss:sum`).
    pub loss_sum: f64,
}

impl FwdBwdOutput {
    /// Tinker-style metrics (`name:reduction` keys): `loss:sum`.
    pub fn metrics(&self) -> std::collections::BTreeMap<String, f64> {
        [("loss:sum".to_string(), self.loss_sum)].into()
    }
}

pub(crate) fn check_tokens(what: &str, i: usize, toks: &[u32], vocab: usize) -> Result<()> {
    if let Some((p, t)) = toks.iter().enumerate().find(|(_, t)| **t as usize >= vocab) {
        return Err(EngineError::InvalidInput(format!(
            "data[{i}].{what}[{p}] = {t} is not below the vocabulary size {vocab} (out of range)"
        )));
    }
    Ok(())
}

/// What a batch is checked against: the vocabulary and the longest sequence accepted (the
/// model's `max_position_embeddings` in the engine; the served `max_length` in the model
/// application and in the server, which check before queueing so a bad batch is a 400 on the
/// request instead of a failed future).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLimits {
    pub vocab_size: usize,
    pub max_tokens: usize,
}

impl BatchLimits {
    pub fn of(c: &ModelConfig) -> Self {
        BatchLimits { vocab_size: c.vocab_size, max_tokens: c.max_position_embeddings }
    }
}

pub(crate) fn validate(c: &ModelConfig, data: &[Datum], loss: &LossFn) -> Result<()> {
    check_batch(&BatchLimits::of(c), data, loss)
}

/// The one validation of a `forward_backward` batch (every caller maps its error onto its own
/// protocol): non-empty, lengths consistent with the targets' `[N]`/`[N, k]` shape, ids inside
/// the vocabulary, finite loss inputs, and the inputs the loss needs.
pub fn check_batch(limits: &BatchLimits, data: &[Datum], loss: &LossFn) -> Result<()> {
    if data.is_empty() {
        return Err(EngineError::InvalidInput("data: the batch has no datums".into()));
    }
    for (i, d) in data.iter().enumerate() {
        let n = d.input_tokens.len();
        let inp = &d.inputs;
        if n == 0 {
            return Err(EngineError::InvalidInput(format!("data[{i}].model_input is empty")));
        }
        if n > limits.max_tokens {
            return Err(EngineError::InvalidInput(format!(
                "data[{i}].model_input: {n} tokens exceed max_length {}",
                limits.max_tokens
            )));
        }
        let k = inp.k.max(1);
        if inp.target_tokens.len() != n * k {
            return Err(EngineError::InvalidInput(format!(
                "data[{i}].loss_fn_inputs.target_tokens has {} values, expected {} ({n} input tokens × {k})",
                inp.target_tokens.len(),
                n * k
            )));
        }
        check_tokens("model_input", i, &d.input_tokens, limits.vocab_size)?;
        check_tokens("loss_fn_inputs.target_tokens", i, &inp.target_tokens, limits.vocab_size)?;
        if let Some(w) = &inp.weights
            && w.len() != n * k
        {
            return Err(EngineError::InvalidInput(format!(
                "data[{i}].loss_fn_inputs.weights has {} values, target_tokens {}",
                w.len(),
                n * k
            )));
        }
        for (name, v) in [
            ("weights", &inp.weights),
            ("logprobs", &inp.logprobs),
            ("advantages", &inp.advantages),
        ] {
            if let Some(p) = v.as_ref().and_then(|v| v.iter().position(|x| !x.is_finite())) {
                return Err(EngineError::InvalidInput(format!(
                    "data[{i}].loss_fn_inputs.{name}[{p}] is not a finite number (NaN or infinity)"
                )));
            }
        }
        for (name, v) in [("logprobs", &inp.logprobs), ("advantages", &inp.advantages)] {
            match v {
                None if loss.is_rl() => {
                    return Err(EngineError::InvalidInput(format!(
                        "data[{i}].loss_fn_inputs.{name}: required by loss {} (it needs loss_fn_inputs `{name}`)",
                        loss.name()
                    )));
                }
                Some(v) if v.len() != n => {
                    return Err(EngineError::InvalidInput(format!(
                        "data[{i}].loss_fn_inputs.{name} has {} values, expected {n}",
                        v.len()
                    )));
                }
                _ => {}
            }
        }
        if loss.is_rl() && k != 1 {
            return Err(EngineError::InvalidInput(format!(
                "data[{i}].loss_fn_inputs.target_tokens: {} needs target_tokens of shape [N], got [N,{k}]",
                loss.name()
            )));
        }
    }
    Ok(())
}

/// The frame of every batched call: each group is checked on its own, the groups that pass go
/// to `run` together (which returns one result per group it was given, in order), and each
/// group gets its check's error or its result, in the original order.
pub(crate) fn run_checked<J, O, E: From<EngineError>>(
    groups: Vec<J>,
    check: impl Fn(&J) -> Result<()>,
    run: impl FnOnce(Vec<J>) -> Vec<std::result::Result<O, E>>,
) -> Vec<std::result::Result<O, E>> {
    let mut failed = Vec::with_capacity(groups.len());
    let mut valid = Vec::with_capacity(groups.len());
    for g in groups {
        match check(&g) {
            Ok(()) => {
                valid.push(g);
                failed.push(None);
            }
            Err(e) => failed.push(Some(e)),
        }
    }
    let mut outs = if valid.is_empty() { Vec::new() } else { run(valid) }.into_iter();
    failed
        .into_iter()
        .map(|f| match f {
            Some(e) => Err(e.into()),
            None => outs.next().unwrap_or_else(|| {
                Err(EngineError::InvalidInput("the batch produced too few results".into()).into())
            }),
        })
        .collect()
}

/// Packs datums: concatenated tokens, `(start, len)` per datum, positions restarting at 0.
pub(crate) fn pack(data: &[Datum]) -> (Vec<u32>, Vec<(usize, usize)>, Vec<u32>) {
    let mut tokens = Vec::new();
    let mut seqs = Vec::with_capacity(data.len());
    let mut positions = Vec::new();
    for d in data {
        seqs.push((tokens.len(), d.input_tokens.len()));
        tokens.extend_from_slice(&d.input_tokens);
        positions.extend(0..d.input_tokens.len() as u32);
    }
    (tokens, seqs, positions)
}

/// One tenant's share of a batched `forward_backward_many`: its adapter (gradients are ADDED to
/// it), its datums and its own loss (kind and parameters may differ between groups).
#[derive(Debug)]
pub struct TrainGroup<'a, A> {
    pub adapter: &'a mut A,
    pub data: &'a [Datum],
    pub loss: &'a LossFn,
}

/// One tenant's share of a batched `forward_many`: its adapter (`None`: the base model), its
/// datums and its own loss.
#[derive(Debug)]
pub struct EvalGroup<'a, A> {
    pub adapter: Option<&'a A>,
    pub data: &'a [Datum],
    pub loss: &'a LossFn,
}

/// One request's share of a batched decode pass
/// ([`forward_cached_many`](crate::engine::ModelRuntime::forward_cached_many)): its adapter
/// (`None`: the base model), its own KV cache, and the new tokens of some of the cache's slots
/// (`tokens[i]` for slot `slots[i]`).
#[derive(Debug)]
pub struct CachedGroup<'a, A, C> {
    pub adapter: Option<&'a A>,
    pub cache: &'a mut C,
    pub slots: &'a [usize],
    pub tokens: &'a [&'a [u32]],
}
