//! `twinkle bench multi-tenant`: many tenants' LoRA forward_backward steps batched into one pass
//! over the base weights, against the same steps one after another and against one tenant's
//! step of all their tokens (the aggregate throughput batching should approach); then the same
//! tenants sampling together, one after another and alone. Generic over the device runtime, so
//! the CPU and the CUDA stacks are measured by the same code.

use std::time::Instant;

use serde_json::{Value, json};

use super::{BenchError, check_positive, report};
use crate::apps::model::decode::{DEFAULT_MAX_SEQS, DecodeBatcher};
use crate::engine::synth::SynthRng;
use crate::engine::{Adapter, Datum, LossFn, LossInputs, ModelRuntime, TrainGroup};
use crate::protocol::internal::SampleRequest;

/// Options of `twinkle bench multi-tenant`.
#[derive(Debug, Clone)]
pub struct MultiTenantOptions {
    pub tenants: usize,
    /// Tokens of each tenant's step (one sequence).
    pub seq: usize,
    pub rank: usize,
    /// Timed rounds (after one untimed warm-up round); a round runs each measurement once.
    pub steps: usize,
    /// Tokens each tenant samples in the decode measurement (0: no decode measurement).
    pub decode_tokens: usize,
}

impl Default for MultiTenantOptions {
    /// The measurement: 8 tenants x 128 tokens, rank 16, 64 sampled tokens each.
    fn default() -> Self {
        MultiTenantOptions { tenants: 8, seq: 128, rank: 16, steps: 2, decode_tokens: 64 }
    }
}

/// Seconds of each way of running the tenants' work (averaged over the rounds).
#[derive(Debug, Clone, Copy)]
pub struct ThreeWays {
    /// All tenants' work together (one shared pass / continuous batching).
    pub batched_s: f64,
    /// The same work, one tenant after another.
    pub sequential_s: f64,
    /// One tenant alone (training: one step of all the tenants' tokens).
    pub single_s: f64,
}

impl ThreeWays {
    fn from_sums(sums: [f64; 3], rounds: usize) -> Self {
        let [batched_s, sequential_s, single_s] = sums.map(|s| s / rounds as f64);
        ThreeWays { batched_s, sequential_s, single_s }
    }

    /// The figures, with `all` tokens in the batched and sequential runs and `one` in the
    /// single run; `ratio` is the aggregate ratio the report reads.
    fn json(&self, all: f64, one: f64, ratio: f64) -> Value {
        json!({
            "batched_s": self.batched_s,
            "sequential_s": self.sequential_s,
            "single_s": self.single_s,
            "batched_tokens_per_s": all / self.batched_s,
            "sequential_tokens_per_s": all / self.sequential_s,
            "single_tokens_per_s": one / self.single_s,
            "batched_over_sequential": self.sequential_s / self.batched_s,
            "aggregate_ratio": ratio,
        })
    }

    fn text(&self, title: &str, all: f64, one: f64, single: &str, ratio: (&str, f64)) -> String {
        format!(
            "{title}\n\
             batched      {:8.3} s  {:9.1} tokens/s\n\
             sequential   {:8.3} s  {:9.1} tokens/s  (batched is {:.2}x faster)\n\
             single       {:8.3} s  {:9.1} tokens/s  ({single})\n\
             {} {:.3}\n",
            self.batched_s,
            all / self.batched_s,
            self.sequential_s,
            all / self.sequential_s,
            self.sequential_s / self.batched_s,
            self.single_s,
            one / self.single_s,
            ratio.0,
            ratio.1,
        )
    }
}

/// What `twinkle bench multi-tenant` measured.
#[derive(Debug, Clone)]
pub struct MultiTenantReport {
    pub tenants: usize,
    pub seq: usize,
    /// forward_backward: all steps in one `forward_backward_many`, one after another, and one
    /// tenant's step of `tenants × seq` tokens.
    pub train: ThreeWays,
    /// Decoding (tokens per tenant and times), when measured.
    pub decode: Option<(usize, ThreeWays)>,
    pub peak_rss_bytes: Option<u64>,
}

impl MultiTenantReport {
    fn tokens(&self) -> f64 {
        (self.tenants * self.seq) as f64
    }

    /// Batched aggregate tokens/s over the single tenant's tokens/s on as many tokens.
    pub fn train_aggregate_ratio(&self) -> f64 {
        self.train.single_s / self.train.batched_s
    }

    /// Aggregate decode tokens/s of all tenants sampling together over one tenant's alone.
    pub fn decode_aggregate_ratio(&self) -> Option<f64> {
        self.decode.map(|(_, d)| self.tenants as f64 * d.single_s / d.batched_s)
    }

    pub fn json(&self) -> Value {
        let t = self.tokens();
        let decode = self.decode.map(|(k, d)| {
            let all = (self.tenants * k) as f64;
            let mut j = d.json(all, k as f64, self.decode_aggregate_ratio().unwrap_or(0.0));
            j["tokens_per_tenant"] = k.into();
            j
        });
        let j = json!({
            "kind": "multi-tenant",
            "tenants": self.tenants,
            "seq": self.seq,
            "train": self.train.json(t, t, self.train_aggregate_ratio()),
            "decode": decode,
        });
        report::with_machine(j, self.peak_rss_bytes)
    }

    /// The closing line of `--json`: the two ratios the acceptance reads (the decode ratio is
    /// null when `--decode-tokens 0` skipped it).
    pub fn ratios_json(&self) -> Value {
        json!({
            "train_aggregate_ratio": self.train_aggregate_ratio(),
            "decode_aggregate_ratio": self.decode_aggregate_ratio(),
        })
    }

    pub fn text(&self) -> String {
        let t = self.tokens();
        let (n, s) = (self.tenants, self.seq);
        let mut out = self.train.text(
            &format!("{n} tenants x {s} tokens forward_backward (LoRA, cross-entropy)"),
            t,
            t,
            &format!("one tenant, one sequence of {t:.0}"),
            ("train_aggregate_ratio", self.train_aggregate_ratio()),
        );
        if let (Some((k, d)), Some(r)) = (self.decode, self.decode_aggregate_ratio()) {
            out += &d.text(
                &format!(
                    "{n} tenants sampling {k} tokens each (continuous batching across adapters)"
                ),
                (n * k) as f64,
                k as f64,
                "one tenant alone",
                ("decode_aggregate_ratio", r),
            );
        }
        out + &report::machine_text(self.peak_rss_bytes)
    }
}

/// One sequence of `n` random tokens with next-token targets.
fn sequence(rng: &mut SynthRng, n: usize, vocab: usize) -> Datum {
    let toks = rng.tokens(n + 1, vocab);
    Datum {
        input_tokens: toks[..n].to_vec(),
        inputs: LossInputs { target_tokens: toks[1..].to_vec(), k: 1, ..Default::default() },
    }
}

/// Seconds of one run of `f`.
fn seconds(f: impl FnOnce() -> Result<(), BenchError>) -> Result<f64, BenchError> {
    let t0 = Instant::now();
    f()?;
    Ok(t0.elapsed().as_secs_f64())
}

/// Runs the three training measurements on `rt` (gradients accumulate across repetitions; no
/// optimizer step, which is per tenant and not batched), then the decode ones.
pub fn multi_tenant<R: ModelRuntime>(
    rt: &R,
    opts: &MultiTenantOptions,
) -> Result<MultiTenantReport, BenchError> {
    let c = rt.config();
    check_positive(&[
        ("--tenants", opts.tenants),
        ("--seq", opts.seq),
        ("--rank", opts.rank),
        ("--steps", opts.steps),
    ])?;
    let total = opts.tenants * opts.seq;
    if total > c.max_position_embeddings {
        return Err(BenchError::Option(format!(
            "--tenants x --seq = {total} exceeds the model's {} positions (the single-tenant step \
             is one sequence of all the tokens)",
            c.max_position_embeddings
        )));
    }
    let tokens = opts.decode_tokens;
    if DECODE_PROMPT + tokens > c.max_position_embeddings {
        return Err(BenchError::Option(format!(
            "--decode-tokens {tokens} plus a {DECODE_PROMPT}-token prompt exceed the model's {} \
             positions",
            c.max_position_embeddings
        )));
    }
    let mut adapters = (0..opts.tenants as u64)
        .map(|i| rt.upload_adapter(&Adapter::for_config(c, &super::bench_lora(opts.rank, i))?))
        .collect::<Result<Vec<_>, _>>()?;
    let mut rng = SynthRng(42);
    let data: Vec<Vec<Datum>> =
        (0..opts.tenants).map(|_| vec![sequence(&mut rng, opts.seq, c.vocab_size)]).collect();
    let loss = LossFn::CrossEntropy;

    let long = [sequence(&mut rng, total, c.vocab_size)];
    // The three measurements take turns, one round each after a warm-up round, so that a
    // shared host's load falls on all of them alike.
    let mut sums = [0.0f64; 3];
    for round in 0..=opts.steps {
        let t = [
            seconds(|| {
                let mut groups: Vec<TrainGroup<R::Adapter>> = adapters
                    .iter_mut()
                    .zip(&data)
                    .map(|(a, d)| TrainGroup { adapter: a, data: d, loss: &loss })
                    .collect();
                rt.forward_backward_many(&mut groups).into_iter().try_for_each(|r| {
                    r?;
                    Ok(())
                })
            })?,
            seconds(|| {
                for (a, d) in adapters.iter_mut().zip(&data) {
                    rt.forward_backward(a, d, &loss)?;
                }
                Ok(())
            })?,
            seconds(|| {
                rt.forward_backward(&mut adapters[0], &long, &loss)?;
                Ok(())
            })?,
        ];
        if round > 0 {
            sums.iter_mut().zip(t).for_each(|(s, t)| *s += t);
        }
    }
    let decode = match opts.decode_tokens {
        0 => None,
        k => Some((k, decode_times(rt, &adapters, k, opts.steps)?)),
    };
    Ok(MultiTenantReport {
        tenants: opts.tenants,
        seq: opts.seq,
        train: ThreeWays::from_sums(sums, opts.steps),
        decode,
        peak_rss_bytes: report::peak_rss(),
    })
}

/// Prompt tokens of each tenant's sampling request.
const DECODE_PROMPT: usize = 16;

/// Every tenant samples `tokens` tokens (EOS ignored, temperature 1, its own seed and
/// adapter) through the model app's decoder: all at once from one thread each, one after
/// another, and the first tenant alone. Rounds as in [`multi_tenant`].
fn decode_times<R: ModelRuntime>(
    rt: &R,
    adapters: &[R::Adapter],
    tokens: usize,
    steps: usize,
) -> Result<ThreeWays, BenchError> {
    let c = rt.config();
    let batcher = DecodeBatcher::new(DEFAULT_MAX_SEQS);
    let mut rng = SynthRng(7);
    let reqs: Vec<SampleRequest> = (0..adapters.len())
        .map(|i| {
            let mut r = SampleRequest::new(rng.tokens(DECODE_PROMPT, c.vocab_size), 1);
            r.max_tokens = tokens;
            r.temperature = 1.0;
            r.seed = Some(i as u64);
            r.stop = Some(json!([]));
            r
        })
        .collect();
    let max_length = c.max_position_embeddings;
    let sample = |i: usize| -> Result<(), BenchError> {
        let out = batcher
            .generate(rt, Some(&adapters[i]), None, max_length, &reqs[i])
            .map_err(|e| BenchError::Option(format!("sampling failed: {e}")))?;
        match out.sequences.first().map(|s| s.tokens.len()) {
            Some(n) if n == tokens => Ok(()),
            n => Err(BenchError::Option(format!("sampled {n:?} tokens, not {tokens}"))),
        }
    };
    let mut sums = [0.0f64; 3];
    for round in 0..=steps {
        let t = [
            seconds(|| {
                std::thread::scope(|s| {
                    let handles: Vec<_> =
                        (0..adapters.len()).map(|i| s.spawn(move || sample(i))).collect();
                    handles.into_iter().try_for_each(|h| {
                        h.join()
                            .map_err(|_| BenchError::Option("a sampler thread panicked".into()))?
                    })
                })
            })?,
            seconds(|| (0..adapters.len()).try_for_each(sample))?,
            seconds(|| sample(0))?,
        ];
        if round > 0 {
            sums.iter_mut().zip(t).for_each(|(s, t)| *s += t);
        }
    }
    Ok(ThreeWays::from_sums(sums, steps))
}
