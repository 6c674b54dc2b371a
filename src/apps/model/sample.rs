//! Generation shared by the model and sampler applications, on any runtime of the device seam:
//! one prefill of the prompt, its KV-cache slot forked per sample, then the samples decoded
//! together (one batched pass per step over the sequences still running, tokens selected where
//! the logits are). A [`Generation`] is one request's state between passes, so that the
//! decode batcher can run many requests' sequences in each pass.
//!
//! Randomness: token `t` of sample `i` uses `uniform_f32(seed, stream = i, draw = t)`, so a
//! request with a seed gives the same tokens on every run and in every application.

use crate::engine::rng::{resolve_seed, uniform_f32};
use crate::engine::sampling::{SamplingParams, Stop, StopChecker, StopReason};
use crate::engine::{Datum, LossFn, LossInputs, ModelRuntime};
use crate::tokenize::{IncrementalDecoder, Tokenizer};

use super::error::AppError;
use crate::protocol::internal::{SampleRequest, SampleResponse, SequenceJson, StopReasonJson};

/// Most samples one request may ask for.
pub const MAX_NUM_SAMPLES: usize = 256;
/// Prompt tokens given to the incremental detokenizer as context.
const DECODE_CONTEXT: usize = 4;

struct Running {
    tokens: Vec<u32>,
    logprobs: Vec<f32>,
    checker: StopChecker,
    decoder: Option<IncrementalDecoder>,
    reason: Option<StopReason>,
}

/// One request's generation in progress: its own KV cache (one slot per sample) and the
/// samples still running. It is advanced one pass at a time by [`super::decode::DecodeBatcher`],
/// alone or together with other requests' generations; the tokens it picks do
/// not depend on which, because its draws are keyed by (seed, sample, step).
pub struct Generation<R: ModelRuntime> {
    prompt: Vec<u32>,
    params: SamplingParams,
    seed: u64,
    want_prompt_logprobs: bool,
    cache: R::Cache,
    runs: Vec<Running>,
    /// Samples still running (their cache slots).
    active: Vec<usize>,
    /// Passes done: 0 before the prefill.
    step: u64,
    /// This pass's new tokens per active slot (filled by [`inputs`](Self::inputs)).
    feed: Vec<[u32; 1]>,
}

impl<R: ModelRuntime> Generation<R> {
    /// Checks `req` and sets up its cache. `max_length` bounds prompt plus generation
    /// (`max_tokens` is clamped to what is left).
    pub fn new(
        rt: &R,
        tokenizer: Option<&Tokenizer>,
        max_length: usize,
        req: &SampleRequest,
    ) -> Result<Self, AppError> {
        let c = rt.config();
        let prompt = &req.prompt;
        if prompt.is_empty() {
            return Err(AppError::BadRequest("prompt: must contain at least one token".into()));
        }
        if let Some((i, t)) = prompt.iter().enumerate().find(|(_, t)| **t as usize >= c.vocab_size)
        {
            return Err(AppError::BadRequest(format!(
                "prompt[{i}] = {t} is not below the vocabulary size {}",
                c.vocab_size
            )));
        }
        if prompt.len() >= max_length {
            return Err(AppError::BadRequest(format!(
                "prompt: {} tokens leave no room to generate within max_length {max_length}",
                prompt.len()
            )));
        }
        if req.num_samples == 0 || req.num_samples > MAX_NUM_SAMPLES {
            return Err(AppError::BadRequest(format!(
                "num_samples must be in 1..={MAX_NUM_SAMPLES}, got {}",
                req.num_samples
            )));
        }
        let stop = Stop::from_json(req.stop.as_ref())?;
        let params = SamplingParams {
            temperature: req.temperature,
            top_k: req.top_k,
            top_p: req.top_p,
            seed: req.seed,
            max_tokens: req.max_tokens.min(max_length - prompt.len()),
            stop,
        };
        if req.max_tokens == 0 {
            return Err(AppError::BadRequest("max_tokens must be at least 1".into()));
        }
        params.validate()?;
        if matches!(&params.stop, Stop::Strings(s) if !s.is_empty()) && tokenizer.is_none() {
            return Err(AppError::BadRequest(
                "stop strings need a tokenizer, and this model directory has none; stop on token ids"
                    .into(),
            ));
        }
        let seed = resolve_seed(params.seed);
        let eos: Vec<u32> = if c.eos_token_ids.is_empty() {
            tokenizer.map(|t| t.eos_token_ids().to_vec()).unwrap_or_default()
        } else {
            c.eos_token_ids.clone()
        };
        let n = req.num_samples;
        let cache = rt.new_cache(n, prompt.len() + params.max_tokens)?;
        let context = &prompt[prompt.len().saturating_sub(DECODE_CONTEXT)..];
        let runs = (0..n)
            .map(|_| {
                let checker = StopChecker::new(&params.stop, &eos, params.max_tokens);
                let decoder = (checker.needs_text() && tokenizer.is_some())
                    .then(|| IncrementalDecoder::with_context(context, true));
                Running { tokens: Vec::new(), logprobs: Vec::new(), checker, decoder, reason: None }
            })
            .collect();
        Ok(Generation {
            prompt: prompt.clone(),
            params,
            seed,
            want_prompt_logprobs: req.prompt_logprobs,
            cache,
            runs,
            active: (0..n).collect(),
            step: 0,
            feed: Vec::new(),
        })
    }

    /// Samples still running: the sequences this generation holds in a pass (its prefill
    /// feeds one, which is then forked to all of them).
    pub fn width(&self) -> usize {
        self.active.len()
    }

    /// Whether every sample has stopped.
    pub fn finished(&self) -> bool {
        self.active.is_empty()
    }

    /// The next pass's input: this generation's cache, its slots and their new tokens.
    pub fn inputs(&mut self) -> (&mut R::Cache, &[usize], Vec<&[u32]>) {
        if self.step == 0 {
            return (&mut self.cache, &[0], vec![self.prompt.as_slice()]);
        }
        let runs = &self.runs;
        self.feed =
            self.active.iter().map(|&i| [runs[i].tokens.last().copied().unwrap_or(0)]).collect();
        (&mut self.cache, &self.active, self.feed.iter().map(|t| t.as_slice()).collect())
    }

    /// Takes the logits of a pass over [`inputs`](Self::inputs): picks each running sample's
    /// token and applies its stop rule. After the prefill the prompt's slot is forked to every
    /// sample.
    pub fn advance(
        &mut self,
        rt: &R,
        tokenizer: Option<&Tokenizer>,
        logits: &R::Logits,
    ) -> Result<(), AppError> {
        let (seed, step, params) = (self.seed, self.step, &self.params);
        // Before the first decode step every sample shares the prefill's one row.
        let picks: Vec<(u32, f32)> = if step == 0 {
            for i in 1..self.runs.len() {
                rt.fork_slot(&mut self.cache, 0, i)?;
            }
            let mut v = Vec::with_capacity(self.active.len());
            for &i in &self.active {
                let u = uniform_f32(seed, i as u64, step);
                v.extend(rt.select_tokens(logits, std::slice::from_ref(params), &[u])?);
            }
            v
        } else {
            let us: Vec<f32> =
                self.active.iter().map(|&i| uniform_f32(seed, i as u64, step)).collect();
            let ps = vec![params.clone(); self.active.len()];
            rt.select_tokens(logits, &ps, &us)?
        };
        if picks.len() != self.active.len() {
            return Err(AppError::Internal("token selection returned the wrong count".into()));
        }
        for (&i, (tok, lp)) in self.active.iter().zip(picks) {
            let r = &mut self.runs[i];
            r.tokens.push(tok);
            r.logprobs.push(lp);
            let delta = match (&mut r.decoder, tokenizer) {
                (Some(d), Some(t)) => d.push(t, tok)?,
                _ => String::new(),
            };
            if let Some(d) = r.checker.push(tok, &delta) {
                r.tokens.truncate(d.keep);
                r.logprobs.truncate(d.keep);
                r.reason = Some(d.reason);
            }
        }
        let runs = &self.runs;
        self.active.retain(|&i| runs[i].reason.is_none());
        self.step += 1;
        Ok(())
    }

    /// The answer: every sample, and the prompt's logprobs when asked for (one forward-only
    /// pass with the same adapter).
    pub fn finish(self, rt: &R, adapter: Option<&R::Adapter>) -> Result<SampleResponse, AppError> {
        let prompt_logprobs = if self.want_prompt_logprobs {
            let lps = sequence_logprobs(rt, adapter, &self.prompt)?;
            Some(std::iter::once(None).chain(lps.into_iter().map(Some)).collect())
        } else {
            None
        };
        let sequences = self
            .runs
            .into_iter()
            .map(|r| SequenceJson {
                tokens: r.tokens,
                logprobs: r.logprobs,
                stop_reason: match r.reason {
                    Some(StopReason::Stop) => StopReasonJson::Stop,
                    _ => StopReasonJson::Length,
                },
            })
            .collect();
        Ok(SampleResponse { sequences, prompt_logprobs })
    }
}

/// `log p(tokens[i+1] | tokens[..=i])` for each position of one sequence (`len − 1` values), by
/// a forward-only cross-entropy pass.
fn sequence_logprobs<R: ModelRuntime>(
    rt: &R,
    adapter: Option<&R::Adapter>,
    tokens: &[u32],
) -> Result<Vec<f32>, AppError> {
    if tokens.len() < 2 {
        return Ok(Vec::new());
    }
    let n = tokens.len() - 1;
    let datum = Datum {
        input_tokens: tokens[..n].to_vec(),
        inputs: LossInputs { target_tokens: tokens[1..].to_vec(), k: 1, ..Default::default() },
    };
    let out = rt.forward(adapter, &[datum], &LossFn::CrossEntropy)?;
    Ok(out.per_datum.into_iter().next().map(|d| d.logprobs).unwrap_or_default())
}
