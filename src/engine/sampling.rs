//! Token sampling as a pure function of (logits, params, one uniform draw), plus stop handling.
//!
//! Definition (the CUDA path must reproduce exactly this):
//! 1. Canonical order: tokens sorted by raw logit descending, ties broken by lower token id.
//!    Scaling by a positive temperature is monotone, so this is also descending probability.
//! 2. `temperature == 0` is greedy: the first token in canonical order (argmax, lowest id on ties).
//! 3. Otherwise `z = logit / temperature` (in f64). `top_k > 0` keeps the first `k` tokens in
//!    canonical order. Probabilities are `softmax(z)` over the kept tokens (accumulated in f64 in
//!    canonical order). `top_p < 1` then keeps the shortest canonical prefix whose cumulative
//!    probability is `>= top_p * total` (at least one token).
//! 4. The draw `u` in `[0, 1)` picks token `i` of the kept prefix with `C(i-1) <= u * C(n) < C(i)`,
//!    `C` being the cumulative sums of the kept probabilities (so a draw exactly on a boundary
//!    goes to the later token).
//!
//! The returned logprob is the log-softmax of the RAW logits (temperature 1, no top-k/top-p):
//! the model's own distribution. RL losses (importance sampling, PPO) divide the trainer's
//! probability by the sampler's; both must be the same model distribution for the ratio to be 1
//! on-policy, so the processed (scaled or truncated) distribution would bias them.
//!
//! Masked tokens may carry `-inf`; NaN or `+inf` logits are rejected as a backend bug.

use std::cmp::Ordering;

use thiserror::Error;

/// Errors from invalid sampling parameters or unusable logits.
#[derive(Debug, Error, PartialEq)]
pub enum SamplingError {
    #[error("logits are empty")]
    EmptyLogits,
    #[error("vocabulary of {0} entries does not fit token ids of 32 bits")]
    VocabTooLarge(usize),
    #[error("logit {index} is {value}; logits must be finite or -inf")]
    BadLogit { index: usize, value: f32 },
    #[error("every logit is -inf; nothing can be sampled")]
    AllMasked,
    #[error("temperature must be a finite number >= 0, got {0}")]
    InvalidTemperature(f32),
    #[error("top_k must be -1 (off), 0 (off) or a positive count, got {0}")]
    InvalidTopK(i64),
    #[error("top_p must be in (0, 1], got {0}")]
    InvalidTopP(f32),
    #[error("max_tokens must be at least 1")]
    InvalidMaxTokens,
    #[error("the uniform draw must be in [0, 1), got {0}")]
    InvalidUniform(f32),
    #[error("invalid stop: {0}")]
    InvalidStop(String),
}

/// When generation stops besides `max_tokens`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Stop {
    /// `stop` omitted: stop at the model's EOS token ids.
    #[default]
    Eos,
    /// Stop when the generated text contains one of these strings, or at EOS.
    /// An empty list means: ignore EOS too and run to `max_tokens`.
    Strings(Vec<String>),
    /// Stop when one of these token ids is generated, or at EOS.
    /// An empty list means: ignore EOS too and run to `max_tokens`.
    Tokens(Vec<u32>),
}

impl Stop {
    /// Parses the wire form of `SamplingParams.stop`: absent/null, a string, a list of strings,
    /// or a list of token ids. `[]` is kept as "ignore EOS".
    pub fn from_json(value: Option<&serde_json::Value>) -> Result<Self, SamplingError> {
        use serde_json::Value;
        let items = match value {
            None | Some(Value::Null) => return Ok(Stop::Eos),
            Some(Value::String(s)) => return Ok(Stop::Strings(vec![s.clone()])),
            Some(Value::Array(items)) => items,
            Some(other) => {
                return Err(SamplingError::InvalidStop(format!(
                    "expected a string, a list of strings or a list of token ids, got {other}"
                )));
            }
        };
        if items.iter().all(Value::is_string) {
            let strings = items.iter().filter_map(|v| v.as_str().map(str::to_owned));
            return Ok(Stop::Strings(strings.collect()));
        }
        let mut tokens = Vec::with_capacity(items.len());
        for item in items {
            let id = item.as_u64().and_then(|id| u32::try_from(id).ok()).ok_or_else(|| {
                SamplingError::InvalidStop(format!(
                    "a stop list must be all strings or all token ids (0..2^32), found {item}"
                ))
            })?;
            tokens.push(id);
        }
        Ok(Stop::Tokens(tokens))
    }
}

/// Sampling parameters with Tinker's semantics (see `specs/tinker-protocol.md` §6.5).
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 = greedy.
    pub temperature: f32,
    /// -1 or 0 = off.
    pub top_k: i64,
    /// 1.0 = off.
    pub top_p: f32,
    /// `None`: the caller draws one with [`crate::engine::rng::fresh_seed`].
    pub seed: Option<u64>,
    pub max_tokens: usize,
    pub stop: Stop,
}

impl SamplingParams {
    /// Tinker's defaults (temperature 1, no top-k/top-p, no seed, stop at EOS).
    pub fn new(max_tokens: usize) -> Self {
        Self { temperature: 1.0, top_k: -1, top_p: 1.0, seed: None, max_tokens, stop: Stop::Eos }
    }

    /// Rejects values the sampler cannot give a meaning to.
    pub fn validate(&self) -> Result<(), SamplingError> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(SamplingError::InvalidTemperature(self.temperature));
        }
        if self.top_k < -1 {
            return Err(SamplingError::InvalidTopK(self.top_k));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(SamplingError::InvalidTopP(self.top_p));
        }
        if self.max_tokens == 0 {
            return Err(SamplingError::InvalidMaxTokens);
        }
        if let Stop::Strings(strings) = &self.stop
            && strings.iter().any(String::is_empty)
        {
            return Err(SamplingError::InvalidStop("a stop string is empty".into()));
        }
        Ok(())
    }

    fn top_k_limit(&self) -> Option<usize> {
        usize::try_from(self.top_k).ok().filter(|&k| k > 0)
    }
}

/// Checks logits and returns the log-normaliser `log Σ exp(logit)` (in f64).
fn log_normaliser(logits: &[f32]) -> Result<f64, SamplingError> {
    if logits.is_empty() {
        return Err(SamplingError::EmptyLogits);
    }
    if u32::try_from(logits.len()).is_err() {
        return Err(SamplingError::VocabTooLarge(logits.len()));
    }
    let mut max = f32::NEG_INFINITY;
    for (index, &value) in logits.iter().enumerate() {
        if value.is_nan() || value == f32::INFINITY {
            return Err(SamplingError::BadLogit { index, value });
        }
        max = max.max(value);
    }
    if max == f32::NEG_INFINITY {
        return Err(SamplingError::AllMasked);
    }
    let max = f64::from(max);
    let sum: f64 = logits.iter().map(|&x| (f64::from(x) - max).exp()).sum();
    Ok(max + sum.ln())
}

/// `log_softmax(logits)[token]` in the raw (temperature 1) model distribution.
pub fn token_logprob(logits: &[f32], token: u32) -> Result<f32, SamplingError> {
    let lse = log_normaliser(logits)?;
    let x = logits
        .get(token as usize)
        .ok_or(SamplingError::BadLogit { index: token as usize, value: f32::NAN })?;
    Ok((f64::from(*x) - lse) as f32)
}

/// The canonical order: logit descending, then token id ascending. Logits are NaN-free here
/// (checked in `log_normaliser`), so `partial_cmp` is total; `Equal` also merges -0.0 and +0.0.
fn canonical(logits: &[f32], a: u32, b: u32) -> Ordering {
    let (xa, xb) = (logits[a as usize], logits[b as usize]);
    xb.partial_cmp(&xa).unwrap_or(Ordering::Equal).then(a.cmp(&b))
}

/// Samples one token. Returns `(token, logprob)` with the logprob of the raw model distribution
/// (see module docs). `uniform` must be in `[0, 1)`; it is ignored when greedy.
pub fn sample_token(
    logits: &[f32],
    params: &SamplingParams,
    uniform: f32,
) -> Result<(u32, f32), SamplingError> {
    params.validate()?;
    let lse = log_normaliser(logits)?;
    let logprob = |t: u32| (f64::from(logits[t as usize]) - lse) as f32;
    // Fits in u32: `log_normaliser` checked the length.
    let vocab = logits.len() as u32;

    if params.temperature == 0.0 {
        let best = (1..vocab).fold(0_u32, |best, t| {
            if canonical(logits, t, best) == Ordering::Less { t } else { best }
        });
        return Ok((best, logprob(best)));
    }
    if !(0.0..1.0).contains(&uniform) {
        return Err(SamplingError::InvalidUniform(uniform));
    }

    let mut order: Vec<u32> = (0..vocab).collect();
    match params.top_k_limit() {
        Some(k) if k < order.len() => {
            // Selection then a sort of only k entries; the order is total, so the kept set and
            // its order equal those of a full sort.
            order.select_nth_unstable_by(k - 1, |&a, &b| canonical(logits, a, b));
            order.truncate(k);
            order.sort_unstable_by(|&a, &b| canonical(logits, a, b));
        }
        _ => order.sort_unstable_by(|&a, &b| canonical(logits, a, b)),
    }

    let inv_t = 1.0 / f64::from(params.temperature);
    let z_max = f64::from(logits[order[0] as usize]) * inv_t;
    let probs: Vec<f64> =
        order.iter().map(|&t| (f64::from(logits[t as usize]) * inv_t - z_max).exp()).collect();

    let mut kept = probs.len();
    if params.top_p < 1.0 {
        let total: f64 = probs.iter().sum();
        let threshold = f64::from(params.top_p) * total;
        let mut cum = 0.0;
        for (i, p) in probs.iter().enumerate() {
            cum += p;
            if cum >= threshold {
                kept = i + 1;
                break;
            }
        }
    }
    let probs = &probs[..kept];
    let total: f64 = probs.iter().sum();
    let target = f64::from(uniform) * total;
    let mut cum = 0.0;
    for (i, p) in probs.iter().enumerate() {
        cum += p;
        if cum > target {
            return Ok((order[i], logprob(order[i])));
        }
    }
    // Only reachable through rounding (u * total == total): take the last kept token that has
    // any probability. probs[0] == 1 (it is exp(0)), so one exists.
    let last = probs.iter().rposition(|&p| p > 0.0).unwrap_or(0);
    Ok((order[last], logprob(order[last])))
}

/// Why a sequence ended (`SampleResponse.sequences[j].stop_reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// EOS, a stop token or a stop string.
    Stop,
    /// `max_tokens` reached.
    Length,
}

/// The checker's verdict: stop now, keeping the first `keep` generated tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StopDecision {
    pub reason: StopReason,
    pub keep: usize,
}

/// Decides when a sequence ends.
///
/// Convention: the token that ends the sequence is kept in the output (an EOS or stop token, or
/// the token whose text completes a stop string), so `tokens` and `logprobs` stay aligned and a
/// trainer sees exactly what was sampled; therefore `keep` is always the number of tokens pushed.
/// A stop condition hit on the `max_tokens`-th token reports `Stop`, not `Length`.
#[derive(Debug, Clone)]
pub struct StopChecker {
    stop_tokens: Vec<u32>,
    stop_strings: Vec<String>,
    /// Longest stop string in bytes; the tail keeps fewer bytes than that.
    longest: usize,
    max_tokens: usize,
    generated: usize,
    /// Recent generated text, just long enough to catch a stop string split across tokens.
    tail: String,
    done: Option<StopDecision>,
}

impl StopChecker {
    /// `eos_token_ids` are the tokenizer's/model's EOS ids; they stop the sequence unless `stop`
    /// is an explicit empty list.
    pub fn new(stop: &Stop, eos_token_ids: &[u32], max_tokens: usize) -> Self {
        let (mut stop_tokens, stop_strings) = match stop {
            Stop::Eos => (eos_token_ids.to_vec(), Vec::new()),
            Stop::Strings(s) if s.is_empty() => (Vec::new(), Vec::new()),
            Stop::Tokens(t) if t.is_empty() => (Vec::new(), Vec::new()),
            Stop::Strings(s) => (eos_token_ids.to_vec(), s.clone()),
            Stop::Tokens(t) => {
                let mut all = t.clone();
                all.extend_from_slice(eos_token_ids);
                (all, Vec::new())
            }
        };
        stop_tokens.sort_unstable();
        stop_tokens.dedup();
        let longest = stop_strings.iter().map(String::len).max().unwrap_or(0);
        Self {
            stop_tokens,
            stop_strings,
            longest,
            max_tokens,
            generated: 0,
            tail: String::new(),
            done: None,
        }
    }

    /// Whether `push` needs the decoded text (only with stop strings); otherwise pass `""`.
    pub fn needs_text(&self) -> bool {
        !self.stop_strings.is_empty()
    }

    /// Tokens pushed so far.
    pub fn generated(&self) -> usize {
        self.generated
    }

    /// The decision once made (later pushes are ignored).
    pub fn decision(&self) -> Option<StopDecision> {
        self.done
    }

    /// Feeds the next generated token and the text it added (the incremental detokenizer's
    /// output for it, usually decoded with special tokens skipped). Returns `Some` when the
    /// sequence must end with this token.
    pub fn push(&mut self, token: u32, text_delta: &str) -> Option<StopDecision> {
        if self.done.is_some() {
            return self.done;
        }
        self.generated += 1;
        let hit_token = self.stop_tokens.binary_search(&token).is_ok();
        let hit_string = self.needs_text() && self.push_text(text_delta);
        let reason = if hit_token || hit_string {
            Some(StopReason::Stop)
        } else if self.generated >= self.max_tokens {
            Some(StopReason::Length)
        } else {
            None
        };
        self.done = reason.map(|reason| StopDecision { reason, keep: self.generated });
        self.done
    }

    /// Appends text and reports whether a stop string now occurs. Any occurrence is new: an
    /// older one would have stopped the sequence when it appeared.
    fn push_text(&mut self, delta: &str) -> bool {
        self.tail.push_str(delta);
        if self.stop_strings.iter().any(|s| self.tail.contains(s.as_str())) {
            return true;
        }
        // Keep at most longest-1 bytes (whole chars): enough for any partial match.
        let keep = self.longest.saturating_sub(1);
        if self.tail.len() > keep {
            let mut cut = self.tail.len() - keep;
            while !self.tail.is_char_boundary(cut) {
                cut -= 1;
            }
            self.tail.drain(..cut);
        }
        false
    }
}
