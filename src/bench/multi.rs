//! `twinkle bench multi-tenant`: many tenants' LoRA forward_backward steps batched into one pass
//! over the base weights, against the same steps one after another and against one tenant's
//! step of all their tokens (the aggregate throughput batching should approach).

use std::time::Instant;

use serde_json::{Value, json};

use super::{BenchError, check_positive, report};
use crate::engine::synth::SynthRng;
use crate::engine::{
    Adapter, Datum, LoraConfig, LossFn, LossInputs, Model, TrainGroup, forward_backward,
    forward_backward_many,
};

/// Options of `twinkle bench multi-tenant`.
#[derive(Debug, Clone)]
pub struct MultiTenantOptions {
    pub tenants: usize,
    /// Tokens of each tenant's step (one sequence).
    pub seq: usize,
    pub rank: usize,
    /// Timed rounds (after one untimed warm-up round); a round runs each measurement once.
    pub steps: usize,
}

/// Seconds per step of each way of running the tenants' work (averaged).
#[derive(Debug, Clone)]
pub struct MultiTenantReport {
    pub tenants: usize,
    pub seq: usize,
    /// All tenants' steps in one `forward_backward_many`.
    pub batched_s: f64,
    /// The same steps, one `forward_backward` after another.
    pub sequential_s: f64,
    /// One tenant's step of `tenants × seq` tokens.
    pub single_s: f64,
    pub peak_rss_bytes: Option<u64>,
}

impl MultiTenantReport {
    fn tokens(&self) -> f64 {
        (self.tenants * self.seq) as f64
    }

    /// Batched aggregate tokens/s over the single tenant's tokens/s on as many tokens.
    pub fn train_aggregate_ratio(&self) -> f64 {
        self.single_s / self.batched_s
    }

    pub fn json(&self) -> Value {
        let t = self.tokens();
        let j = json!({
            "kind": "multi-tenant",
            "tenants": self.tenants,
            "seq": self.seq,
            "batched_s": self.batched_s,
            "sequential_s": self.sequential_s,
            "single_s": self.single_s,
            "batched_tokens_per_s": t / self.batched_s,
            "sequential_tokens_per_s": t / self.sequential_s,
            "single_tokens_per_s": t / self.single_s,
            "batched_over_sequential": self.sequential_s / self.batched_s,
        });
        report::with_machine(j, self.peak_rss_bytes)
    }

    /// The closing line of `--json`: the two ratios the acceptance reads (decoding is
    /// not batched across tenants yet, so its ratio is null).
    pub fn ratios_json(&self) -> Value {
        json!({
            "train_aggregate_ratio": self.train_aggregate_ratio(),
            "decode_aggregate_ratio": Value::Null,
        })
    }

    pub fn text(&self) -> String {
        let t = self.tokens();
        format!(
            "{n} tenants x {s} tokens forward_backward (LoRA, cross-entropy)\n\
             batched      {:8.3} s  {:9.1} tokens/s\n\
             sequential   {:8.3} s  {:9.1} tokens/s  (batched is {:.2}x faster)\n\
             single       {:8.3} s  {:9.1} tokens/s  (one tenant, one sequence of {t:.0})\n\
             train_aggregate_ratio {:.3}\n{}",
            self.batched_s,
            t / self.batched_s,
            self.sequential_s,
            t / self.sequential_s,
            self.sequential_s / self.batched_s,
            self.single_s,
            t / self.single_s,
            self.train_aggregate_ratio(),
            report::machine_text(self.peak_rss_bytes),
            n = self.tenants,
            s = self.seq,
        )
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

/// Runs the three measurements on the CPU engine (gradients accumulate across repetitions;
/// no optimizer step, which is per tenant and not batched).
pub fn multi_tenant(
    model: &Model,
    opts: &MultiTenantOptions,
) -> Result<MultiTenantReport, BenchError> {
    let c = model.config();
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
    let lora = |seed| LoraConfig::from_tinker(opts.rank, opts.rank as f32, true, true, false, seed);
    let mut adapters = (0..opts.tenants as u64)
        .map(|i| Adapter::new(model, &lora(i)))
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
                let mut groups: Vec<TrainGroup<Adapter>> = adapters
                    .iter_mut()
                    .zip(&data)
                    .map(|(a, d)| TrainGroup { adapter: a, data: d, loss: &loss })
                    .collect();
                forward_backward_many(model, &mut groups).into_iter().try_for_each(|r| {
                    r?;
                    Ok(())
                })
            })?,
            seconds(|| {
                for (a, d) in adapters.iter_mut().zip(&data) {
                    forward_backward(model, Some(a), d, &loss, false)?;
                }
                Ok(())
            })?,
            seconds(|| {
                forward_backward(model, Some(&mut adapters[0]), &long, &loss, false)?;
                Ok(())
            })?,
        ];
        if round > 0 {
            sums.iter_mut().zip(t).for_each(|(s, t)| *s += t);
        }
    }
    let n = opts.steps as f64;
    let [batched_s, sequential_s, single_s] = sums.map(|s| s / n);
    Ok(MultiTenantReport {
        tenants: opts.tenants,
        seq: opts.seq,
        batched_s,
        sequential_s,
        single_s,
        peak_rss_bytes: report::peak_rss(),
    })
}
