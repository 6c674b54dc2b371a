//! Generation shared by the model and sampler applications: one prefill of the prompt, its KV
//! cache cloned per sample, then the samples decoded together (one batched `forward_cached` per
//! step over the sequences still running).
//!
//! Randomness: token `t` of sample `i` uses `uniform_f32(seed, stream = i, draw = t)`, so a
//! request with a seed gives the same tokens on every run and in every application.

use crate::engine::rng::{resolve_seed, uniform_f32};
use crate::engine::sampling::{SamplingParams, Stop, StopChecker, StopReason, sample_token};
use crate::engine::{Adapter, KvCache, Model};
use crate::tokenize::{IncrementalDecoder, Tokenizer};

use super::error::AppError;
use super::types::{SampleRequest, SampleResponse, SequenceJson, StopReasonJson};

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

/// Samples `req.num_samples` continuations of `req.prompt`. `max_length` bounds prompt plus
/// generation (`max_tokens` is clamped to what is left).
pub fn generate(
    model: &Model,
    adapter: Option<&Adapter>,
    tokenizer: Option<&Tokenizer>,
    max_length: usize,
    req: &SampleRequest,
) -> Result<SampleResponse, AppError> {
    let c = model.config();
    let prompt = &req.prompt;
    if prompt.is_empty() {
        return Err(AppError::BadRequest("prompt: must contain at least one token".into()));
    }
    if let Some((i, t)) = prompt.iter().enumerate().find(|(_, t)| **t as usize >= c.vocab_size) {
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

    let mut prefill = vec![KvCache::new(model)];
    let first = model.forward_cached(adapter, &[prompt.as_slice()], &mut prefill)?;
    let first_logits = first
        .into_iter()
        .next()
        .ok_or_else(|| AppError::Internal("prefill returned no logits".into()))?;
    let n = req.num_samples;
    let context = &prompt[prompt.len().saturating_sub(DECODE_CONTEXT)..];
    let mut runs: Vec<Running> = (0..n)
        .map(|_| {
            let checker = StopChecker::new(&params.stop, &eos, params.max_tokens);
            let decoder = (checker.needs_text() && tokenizer.is_some())
                .then(|| IncrementalDecoder::with_context(context, true));
            Running { tokens: Vec::new(), logprobs: Vec::new(), checker, decoder, reason: None }
        })
        .collect();
    let mut caches: Vec<KvCache> = vec![prefill.swap_remove(0); n];

    let mut logits: Vec<Vec<f32>> = vec![first_logits];
    let mut active: Vec<usize> = (0..n).collect();
    let mut step = 0u64;
    while !active.is_empty() {
        for (slot, &i) in active.iter().enumerate() {
            // Before the first decode step every sample shares the prefill's logits.
            let row = if step == 0 { logits.first() } else { logits.get(slot) };
            let row = row.ok_or_else(|| {
                AppError::Internal("missing logits for a running sequence".into())
            })?;
            let u = uniform_f32(seed, i as u64, step);
            let (tok, lp) = sample_token(row, &params, u)?;
            let r = &mut runs[i];
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
        active.retain(|&i| runs[i].reason.is_none());
        if active.is_empty() {
            break;
        }
        let mut batch: Vec<KvCache> =
            active.iter().map(|&i| std::mem::take(&mut caches[i])).collect();
        let last: Vec<[u32; 1]> =
            active.iter().map(|&i| [runs[i].tokens.last().copied().unwrap_or(0)]).collect();
        let inputs: Vec<&[u32]> = last.iter().map(|t| t.as_slice()).collect();
        let out = model.forward_cached(adapter, &inputs, &mut batch);
        for (&i, cache) in active.iter().zip(batch) {
            caches[i] = cache;
        }
        logits = out?;
        step += 1;
    }

    let prompt_logprobs = if req.prompt_logprobs {
        let lps = model.sequence_logprobs(adapter, prompt)?;
        Some(std::iter::once(None).chain(lps.into_iter().map(Some)).collect())
    } else {
        None
    };
    let sequences = runs
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
