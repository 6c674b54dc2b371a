//! `twinkle bench train|sample --device cuda --explain`: one more step of the benchmark with the
//! device's profiler on (see `engine::cuda::profile`), and per kernel its launches, FLOPs, bytes,
//! the time it would take at the card's stated peak and the measured time — the roofline the
//! GPU tuning is read from.

use serde_json::{Value, json};

use super::cuda::GpuInfo;
use super::{BenchError, SampleOptions, TrainOptions};
use crate::engine::cuda::profile::{KernelStat, at_peak, roofline};
use crate::engine::cuda::{self as cu, CudaAdapter, CudaKvCache, CudaModel, bf16};
use crate::engine::sampling::SamplingParams;
use crate::engine::synth::SynthRng;
use crate::engine::{AdamParams, CachedGroup, LossFn};

/// One training step (forward_backward + AdamW) of the benchmark's batch, profiled.
pub fn train_step(
    model: &CudaModel<bf16>,
    opts: &TrainOptions,
) -> Result<Vec<KernelStat>, BenchError> {
    let dev = model.device();
    let mut ad = CudaAdapter::fresh(model, &super::bench_lora(opts.rank, 0))?;
    let data = super::train_batch(opts, model.config().vocab_size);
    dev.profile_start();
    let step = cu::forward_backward(model, Some(&mut ad), &data, &LossFn::CrossEntropy, false)
        .and_then(|_| ad.optim_step(dev, &AdamParams::default()));
    // take the profile (and turn it off) whether or not the step worked
    let stats = dev.profile_take()?;
    step?;
    Ok(stats)
}

/// One decode step (every sequence one token, then the greedy pick) after an unprofiled
/// prefill of the benchmark's prompts.
pub fn decode_step(
    model: &CudaModel<bf16>,
    opts: &SampleOptions,
) -> Result<Vec<KernelStat>, BenchError> {
    let dev = model.device();
    let v = model.config().vocab_size;
    let mut cache = CudaKvCache::new(model, opts.batch, opts.prompt + 1)?;
    let mut rng = SynthRng(7);
    let prompts: Vec<Vec<u32>> = (0..opts.batch).map(|_| rng.tokens(opts.prompt, v)).collect();
    let slots: Vec<usize> = (0..opts.batch).collect();
    let prompt_refs: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
    let mut g =
        CachedGroup { adapter: None, cache: &mut cache, slots: &slots, tokens: &prompt_refs };
    model.forward_cached_device(&mut g)?;
    dev.synchronize()?;
    let next: Vec<[u32; 1]> = prompts.iter().map(|p| [p[0]]).collect();
    let next_refs: Vec<&[u32]> = next.iter().map(|t| t.as_slice()).collect();
    let greedy = vec![SamplingParams { temperature: 0.0, ..SamplingParams::new(1) }; opts.batch];
    dev.profile_start();
    let step = (|| {
        let mut g =
            CachedGroup { adapter: None, cache: &mut cache, slots: &slots, tokens: &next_refs };
        let logits = model.forward_cached_device(&mut g)?;
        model.select_tokens(&logits, &greedy, &vec![0.0; opts.batch])
    })();
    let stats = dev.profile_take()?;
    step?;
    Ok(stats)
}

/// The roofline as text (after the benchmark's own report).
pub fn text(stats: &[KernelStat], info: &GpuInfo) -> String {
    let peaks = info.peak_flops.zip(info.peak_bw);
    let head = match peaks {
        Some((f, b)) => format!(
            "roofline of one step on {} (peaks assumed: {:.1} TFLOP/s bf16, {:.2} TB/s)",
            info.name,
            f / 1e12,
            b / 1e12
        ),
        None => format!("roofline of one step on {} (peaks unknown: no time at peak)", info.name),
    };
    format!("{head}\n{}", roofline(stats, peaks))
}

/// The roofline as JSON rows.
pub fn json(stats: &[KernelStat], info: &GpuInfo) -> Value {
    let peaks = info.peak_flops.zip(info.peak_bw);
    let rows: Vec<Value> = stats
        .iter()
        .map(|s| {
            let peak = s.cost.zip(peaks).map(|(c, (f, b))| at_peak(c, f, b));
            json!({
                "kernel": s.name,
                "launches": s.launches,
                "flops": s.cost.map(|c| c.flops),
                "bytes": s.cost.map(|c| c.bytes),
                "at_peak_ms": peak.map(|p| p.0 * 1e3),
                "bound": peak.map(|p| p.1),
                "measured_ms": s.measured_ms,
            })
        })
        .collect();
    Value::Array(rows)
}
