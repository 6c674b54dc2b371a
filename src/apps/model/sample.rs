//! Generation shared by the model and sampler applications, on any runtime of the device seam:
//! one prefill of the prompt, its KV-cache slot forked per sample, then the samples decoded
//! together (one batched `forward_cached` per step over the sequences still running, tokens
//! selected where the logits are).
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

/// Samples `req.num_samples` continuations of `req.prompt`. `max_length` bounds prompt plus
/// generation (`max_tokens` is clamped to what is left).
pub fn generate<R: ModelRuntime>(
    rt: &R,
    adapter: Option<&R::Adapter>,
    tokenizer: Option<&Tokenizer>,
    max_length: usize,
    req: &SampleRequest,
) -> Result<SampleResponse, AppError> {
    let c = rt.config();
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

    let n = req.num_samples;
    let mut cache = rt.new_cache(n, prompt.len() + params.max_tokens)?;
    let first = rt.forward_cached(adapter, &mut cache, &[0], &[prompt.as_slice()])?;
    for i in 1..n {
        rt.fork_slot(&mut cache, 0, i)?;
    }
    let context = &prompt[prompt.len().saturating_sub(DECODE_CONTEXT)..];
    let mut runs: Vec<Running> = (0..n)
        .map(|_| {
            let checker = StopChecker::new(&params.stop, &eos, params.max_tokens);
            let decoder = (checker.needs_text() && tokenizer.is_some())
                .then(|| IncrementalDecoder::with_context(context, true));
            Running { tokens: Vec::new(), logprobs: Vec::new(), checker, decoder, reason: None }
        })
        .collect();

    let mut active: Vec<usize> = (0..n).collect();
    let mut step = 0u64;
    let mut logits = first;
    while !active.is_empty() {
        // Before the first decode step every sample shares the prefill's one row.
        let picks: Vec<(u32, f32)> = if step == 0 {
            let mut v = Vec::with_capacity(n);
            for &i in &active {
                let u = uniform_f32(seed, i as u64, step);
                v.extend(rt.select_tokens(&logits, std::slice::from_ref(&params), &[u])?);
            }
            v
        } else {
            let us: Vec<f32> = active.iter().map(|&i| uniform_f32(seed, i as u64, step)).collect();
            let ps = vec![params.clone(); active.len()];
            rt.select_tokens(&logits, &ps, &us)?
        };
        if picks.len() != active.len() {
            return Err(AppError::Internal("token selection returned the wrong count".into()));
        }
        for (&i, (tok, lp)) in active.iter().zip(picks) {
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
        let last: Vec<[u32; 1]> =
            active.iter().map(|&i| [runs[i].tokens.last().copied().unwrap_or(0)]).collect();
        let inputs: Vec<&[u32]> = last.iter().map(|t| t.as_slice()).collect();
        logits = rt.forward_cached(adapter, &mut cache, &active, &inputs)?;
        step += 1;
    }

    let prompt_logprobs = if req.prompt_logprobs {
        let lps = sequence_logprobs(rt, adapter, prompt)?;
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
