//! Token sampling as a pure function of (logits, params, one uniform draw), plus stop handling.
//!
//! Definition (the only one: the CUDA backend runs the same rule on the device, in
//! `kernels/sampling.cu`, with the same integer arithmetic and the same bit-exact `exp` of
//! [`crate::engine::sampling_weight`], so both backends choose the same token from the same draw):
//! 1. Canonical order: tokens sorted by raw logit descending, ties broken by lower token id.
//!    Scaling by a positive temperature is monotone, so this is also descending probability.
//! 2. `temperature == 0` is greedy: the first token in canonical order (argmax, lowest id on ties).
//! 3. Otherwise the candidates are all tokens, or with `top_k > 0` the first `k` in canonical
//!    order. Each gets the integer weight `q = round(exp(d) * 2^52)` (rounding half away from
//!    zero) with `d = (f64(logit) - f64(max_logit)) * (1 / f64(T))` in f64 and `exp` the
//!    deterministic [`det_exp`](crate::engine::sampling_weight::det_exp) (`q = 0` for
//!    `d < -40`, where it would round to 0 anyway), so the best token weighs exactly 2^52.
//!    `W` = the sum of the candidates' weights; `C(n)` = the sum over the first `n` candidates in
//!    canonical order. Sums are exact integers, so they do not depend on summation order (a
//!    parallel GPU reduction gets the same numbers).
//! 4. `top_p < 1` keeps the first `n` candidates, `n` the smallest with
//!    `C(n) * 2^24 >= p24 * W` where `p24 = round(f64(top_p) * 2^24)` (exact integers: top_p
//!    counts in steps of 2^-24, which is every f32 in [0.5, 1)), and sets `N = C(n)`; with
//!    `top_p == 1` all candidates are kept and `N = W`.
//! 5. The draw `u` in `[0, 1)` becomes `m = floor(u * 2^24)` and `target = floor(m * N / 2^24)`;
//!    the chosen token is the first kept candidate `i` (1-based) with `C(i) > target`. It always
//!    exists because `target < N`; a draw exactly on a boundary goes to the later token.
//!    Tokens whose weight rounds to 0 (probability below ~2^-53 of the best) are never drawn.
//!
//! [`SamplingParams::draw`] reduces a row's parameters and draw to the numbers steps 3-5 use
//! (`1/T`, `k`, `p24`, `m`); the CUDA backend uploads exactly those.
//!
//! Only the canonical position of the crossing is needed, so it is found by bisection with
//! `select_nth_unstable` (expected linear time) instead of sorting the vocabulary; since the
//! order is total and the sums exact, the result equals that of a full sort.
//!
//! The returned logprob is the log-softmax of the RAW logits (temperature 1, no top-k/top-p):
//! the model's own distribution. RL losses (importance sampling, PPO) divide the trainer's
//! probability by the sampler's; both must be the same model distribution for the ratio to be 1
//! on-policy, so the processed (scaled or truncated) distribution would bias them.
//!
//! Masked tokens may carry `-inf` (weight 0, never drawn); NaN or `+inf` logits are rejected.

use thiserror::Error;

use crate::engine::sampling_weight::{exp_sum, token_weight, weigh_row};

/// Errors from invalid sampling parameters or unusable logits.
#[derive(Debug, Error, PartialEq)]
pub enum SamplingError {
    #[error("logits are empty")]
    EmptyLogits,
    #[error("vocabulary of {0} entries does not fit token ids of 32 bits")]
    VocabTooLarge(usize),
    #[error("logit {index} is {value}; logits must be finite or -inf")]
    BadLogit { index: usize, value: f32 },
    #[error("token {token} is outside the vocabulary of {vocab}")]
    TokenOutOfRange { token: u32, vocab: usize },
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
    /// `None`: the caller draws one with [`crate::ids::seed`].
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

    /// The numbers a stochastic draw uses (module docs, steps 3-5), or `None` when greedy.
    /// Validates the parameters, and the uniform when it is used.
    pub fn draw(&self, uniform: f32) -> Result<Option<Draw>, SamplingError> {
        self.validate()?;
        if self.temperature == 0.0 {
            return Ok(None);
        }
        if !(0.0..1.0).contains(&uniform) {
            return Err(SamplingError::InvalidUniform(uniform));
        }
        // A vocabulary has fewer than 2^32 tokens, so a larger k is no limit either way.
        let top_k = self.top_k_limit().map_or(0, |k| u32::try_from(k).unwrap_or(u32::MAX));
        Ok(Some(Draw {
            inv_t: 1.0 / f64::from(self.temperature),
            top_k,
            // top_p in (0, 1]: p24 in [0, 2^24]; u in [0, 1): m < 2^24.
            top_p24: (f64::from(self.top_p) * DRAW_ONE).round() as u32,
            m: (f64::from(uniform) * DRAW_ONE).floor() as u32,
        }))
    }
}

/// 2^24: the resolution of the draw and of `top_p`.
const DRAW_ONE: f64 = 16_777_216.0;

/// A stochastic row's parameters as used by the draw (see [`SamplingParams::draw`]); the CUDA
/// backend passes these to the kernel, so host and device start from the same bits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Draw {
    /// `1 / f64(temperature)`.
    pub inv_t: f64,
    /// Candidates kept by top-k; 0 = all.
    pub top_k: u32,
    /// `round(top_p * 2^24)`; `2^24` = top-p off.
    pub top_p24: u32,
    /// `floor(uniform * 2^24)`.
    pub m: u32,
}

impl Draw {
    /// Whether top-p truncates at all.
    pub fn top_p_on(&self) -> bool {
        self.top_p24 < 1 << 24
    }
}

/// Checks logits and returns the log-normaliser `log Σ exp(logit)` (in f64).
fn log_normaliser(logits: &[f32]) -> Result<f64, SamplingError> {
    let (_, max) = scan(logits)?;
    Ok(normaliser_from(max, exp_sum(logits, max, 1.0)))
}

/// The log-normaliser from the row maximum and the sum `S` of `exp(logit - max)` of
/// [`exp_sum`] (whose deterministic `exp`, vectorised, replaced a libm `exp` per token: the
/// single largest cost of a pick, and the results differ by a few ulp of f64 at most).
fn normaliser_from(max: f64, sum: f64) -> f64 {
    max + sum.ln()
}

/// Checks logits; returns the first index of the maximum and the maximum. The maximum is
/// found by sixteen running maxima side by side (so the pass vectorises; only its value is
/// used, and the first index holding it is looked up after), NaN and `+inf` only flagged in that
/// pass and located after. Which zero a maximum of `±0` is makes no difference below:
/// `x - max` and `max + ln(sum)` come out the same for both.
fn scan(logits: &[f32]) -> Result<(usize, f64), SamplingError> {
    if logits.is_empty() {
        return Err(SamplingError::EmptyLogits);
    }
    if u32::try_from(logits.len()).is_err() {
        return Err(SamplingError::VocabTooLarge(logits.len()));
    }
    const W: usize = 16;
    let mut lanes = [f32::NEG_INFINITY; W];
    // NaN and `+inf` are flagged with `|` (no branch), so the loop vectorises.
    let mut bad = false;
    let chunks = logits.chunks_exact(W);
    let rest = chunks.remainder();
    for c in chunks {
        for (m, &x) in lanes.iter_mut().zip(c) {
            bad |= x.is_nan() | (x == f32::INFINITY);
            *m = if x > *m { x } else { *m };
        }
    }
    for (m, &x) in lanes.iter_mut().zip(rest) {
        bad |= x.is_nan() | (x == f32::INFINITY);
        *m = if x > *m { x } else { *m };
    }
    if bad && let Some(index) = logits.iter().position(|&x| x.is_nan() || x == f32::INFINITY) {
        return Err(SamplingError::BadLogit { index, value: logits[index] });
    }
    let max = lanes.iter().fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m });
    if max == f32::NEG_INFINITY {
        return Err(SamplingError::AllMasked);
    }
    // The first index of the maximum: the head of the canonical order (`==` has -0.0 == +0.0).
    let best = logits.iter().position(|&x| x == max).unwrap_or(0);
    Ok((best, f64::from(max)))
}

/// `log_softmax(logits)[token]` in the raw (temperature 1) model distribution.
pub fn token_logprob(logits: &[f32], token: u32) -> Result<f32, SamplingError> {
    let lse = log_normaliser(logits)?;
    let x = logits
        .get(token as usize)
        .ok_or(SamplingError::TokenOutOfRange { token, vocab: logits.len() })?;
    Ok((f64::from(*x) - lse) as f32)
}

/// The `k` most likely tokens with their raw logprobs, in canonical order (for
/// `topk_sample_logprobs` / `topk_prompt_logprobs`). Fewer than `k` when the vocabulary is smaller.
pub fn top_logprobs(logits: &[f32], k: usize) -> Result<Vec<(u32, f32)>, SamplingError> {
    let lse = log_normaliser(logits)?;
    if k == 0 {
        return Ok(Vec::new());
    }
    let mut keys: Vec<u64> =
        logits.iter().enumerate().map(|(t, &x)| canonical_key(x, t as u32)).collect();
    if k < keys.len() {
        keys.select_nth_unstable(k - 1);
        keys.truncate(k);
    }
    keys.sort_unstable();
    Ok(keys
        .iter()
        .map(|&key| {
            let t = key as u32;
            (t, (f64::from(logits[t as usize]) - lse) as f32)
        })
        .collect())
}

/// Sort key of token `t`: ascending keys are the canonical order (logit descending, then id
/// ascending). The high half maps the logit to an order-reversing integer (-0.0 and +0.0 first
/// made equal), so selection and sorting compare plain integers.
fn canonical_key(logit: f32, t: u32) -> u64 {
    let bits = (logit + 0.0).to_bits();
    let ascending = if bits & 0x8000_0000 != 0 { !bits } else { bits | 0x8000_0000 };
    (u64::from(!ascending) << 32) | u64::from(t)
}

/// A candidate: `(canonical key, integer weight)`. Keys are unique, so tuple order is key order.
type Candidate = (u64, u64);

fn candidate_token(c: Candidate) -> u32 {
    c.0 as u32
}

/// Samples one token. Returns `(token, logprob)` with the logprob of the raw model distribution
/// (see module docs). `uniform` must be in `[0, 1)`; it is ignored when greedy.
pub fn sample_token(
    logits: &[f32],
    params: &SamplingParams,
    uniform: f32,
) -> Result<(u32, f32), SamplingError> {
    params.validate()?;
    // `scan` checked that every id fits in u32.
    let (best, max) = scan(logits)?;
    let logprob =
        |t: u32, sum: f64| (f64::from(logits[t as usize]) - normaliser_from(max, sum)) as f32;
    let Some(draw) = params.draw(uniform)? else {
        return Ok((best as u32, logprob(best as u32, exp_sum(logits, max, 1.0))));
    };
    let (token, sum) = match draw.top_k as usize {
        k if k > 0 && k < logits.len() => (pick_top_k(logits, max, &draw, k), None),
        _ => pick_all(logits, max, &draw),
    };
    // Unreachable: `pick_*` find a token whenever the best one weighs 2^52 (always).
    let token = token.unwrap_or(best as u32);
    // At temperature 1 the weighing summed the raw exps already (`weigh_row`).
    let sum = match sum {
        Some(s) if draw.inv_t == 1.0 => s,
        _ => exp_sum(logits, max, 1.0),
    };
    Ok((token, logprob(token, sum)))
}

/// Steps 3-5 with top-k: the `k` first keys selected, only their weights computed.
fn pick_top_k(logits: &[f32], max: f64, draw: &Draw, k: usize) -> Option<u32> {
    let weight = |x: f32| token_weight((f64::from(x) - max) * draw.inv_t);
    let mut keys: Vec<u64> =
        logits.iter().enumerate().map(|(t, &x)| canonical_key(x, t as u32)).collect();
    keys.select_nth_unstable(k - 1);
    keys.truncate(k);
    let mut candidates: Vec<Candidate> =
        keys.iter().map(|&key| (key, weight(logits[(key as u32) as usize]))).collect();
    let total: u128 = candidates.iter().map(|c| u128::from(c.1)).sum();
    // Exact: sums are below 2^84 (2^32 tokens of weight <= 2^52), so a sum times 2^24 (or times
    // p24 <= 2^24, or m < 2^24) stays below 2^108.
    let (kept, normaliser) = if draw.top_p_on() {
        let bound = u128::from(draw.top_p24) * total;
        // C(all) * 2^24 == W * 2^24 >= bound, so a prefix always qualifies; `None` cannot happen.
        match first_prefix(&mut candidates, |c| c << 24 >= bound) {
            Some((n, c, _)) => (n, c),
            None => (candidates.len(), total),
        }
    } else {
        (candidates.len(), total)
    };
    let target = (u128::from(draw.m) * normaliser) >> 24;
    first_prefix(&mut candidates[..kept], |c| c > target).map(|(_, _, t)| t)
}

thread_local! {
    /// [`pick_all`]'s per-token buckets and per-bucket sums, kept between rows of a thread.
    static BUCKETS: std::cell::RefCell<(Vec<u16>, Vec<u128>)> = Default::default();
}

/// Steps 3-5 over the whole vocabulary without sorting or materialising candidates: one pass
/// weighs every token and sums the weights per bucket of `d` ([`weigh_row`]; buckets are runs
/// of the canonical order), a crossing is located to its bucket by the bucket sums and inside
/// it by [`first_prefix`] over that bucket's tokens only. Tokens of weight 0 are left out: they
/// never end the shortest prefix of a predicate that holds from some sum on (the best token
/// weighs 2^52, and a zero weight repeats the previous sum), so every `C(n)` found is the one
/// over all candidates. Top-p's prefix ends at `n` with `C(n) > target` (`target < N = C(n)`),
/// so the draw's crossing lies among the kept tokens without restricting the search to them.
/// Also returns [`weigh_row`]'s sum of the (tempered) exps.
fn pick_all(logits: &[f32], max: f64, draw: &Draw) -> (Option<u32>, Option<f64>) {
    BUCKETS.with(|cell| {
        let mut scratch = cell.borrow_mut();
        let (buckets, sums) = &mut *scratch;
        let exps = weigh_row(logits, max, draw.inv_t, buckets, sums);
        let total: u128 = sums.iter().sum();
        let crossing = |pred: &dyn Fn(u128) -> bool| -> Option<(u128, u32)> {
            let mut base = 0u128;
            // The shortest prefix has at least one token: empty buckets never end it.
            let b = sums.iter().position(|&s| {
                let hit = s > 0 && pred(base + s);
                if !hit {
                    base += s;
                }
                hit
            })? as u16;
            let mut members: Vec<Candidate> = buckets
                .iter()
                .enumerate()
                .filter(|&(_, &bt)| bt == b)
                .map(|(t, _)| {
                    let x = logits[t];
                    (canonical_key(x, t as u32), token_weight((f64::from(x) - max) * draw.inv_t))
                })
                .collect();
            first_prefix(&mut members, |c| pred(base + c)).map(|(_, c, t)| (base + c, t))
        };
        let normaliser = if draw.top_p_on() {
            let bound = u128::from(draw.top_p24) * total;
            crossing(&|c| c << 24 >= bound).map_or(total, |(c, _)| c)
        } else {
            total
        };
        let target = (u128::from(draw.m) * normaliser) >> 24;
        (crossing(&|c| c > target).map(|(_, t)| t), Some(exps))
    })
}

/// Finds the smallest `n >= 1` with `pred(C(n))`, `C(n)` the weight of the `n` canonically first
/// candidates; `pred` must be monotone (false then true). Returns `(n, C(n), n-th token)` and
/// leaves `candidates[..n]` holding exactly those `n` candidates. Bisection: each step selects the
/// better half of the open range and keeps the half where `pred` flips.
fn first_prefix(
    candidates: &mut [Candidate],
    pred: impl Fn(u128) -> bool,
) -> Option<(usize, u128, u32)> {
    const LINEAR: usize = 32;
    // candidates[..lo] are the lo first (as a set) with weight `base` and !pred(base);
    // the answer, if any, lies in lo+1..=hi.
    let (mut lo, mut hi, mut base) = (0_usize, candidates.len(), 0_u128);
    let total: u128 = candidates.iter().map(|c| u128::from(c.1)).sum();
    if !pred(total) {
        return None;
    }
    while hi - lo > LINEAR {
        let mid = lo + (hi - lo) / 2;
        candidates[lo..hi].select_nth_unstable(mid - lo - 1);
        let upper: u128 = candidates[lo..mid].iter().map(|c| u128::from(c.1)).sum();
        if pred(base + upper) {
            hi = mid;
        } else {
            base += upper;
            lo = mid;
        }
    }
    let block = &mut candidates[lo..hi];
    block.sort_unstable();
    for (i, c) in block.iter().enumerate() {
        base += u128::from(c.1);
        if pred(base) {
            return Some((lo + i + 1, base, candidate_token(*c)));
        }
    }
    None
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

#[cfg(test)]
#[path = "sampling_tests.rs"]
mod tests;
