//! `twinkle bench train|sample --device cuda`: the same benchmarks on one GPU through the
//! device-resident path (`engine::cuda`), bf16 weights. Adds MFU (model FLOPs per second over the
//! GPU's dense bf16 peak) and, for decode, the share of HBM bandwidth used.
//!
//! Peaks assumed per GPU name (dense bf16 tensor core, HBM), from shared/specs/perf-anchors.md:
//! H100 SXM 989.4 TFLOP/s, 3.35 TB/s; H100 PCIe 756, 2.0; H100 NVL 835, 3.9; H200 989, 4.8;
//! A100 312, 2.0. `TWINKLE_PEAK_TFLOPS` / `TWINKLE_PEAK_TBPS` override them.

use std::sync::Arc;
use std::time::Instant;

use serde_json::{Value, json};

use super::report::{self, SampleReport, TrainReport, flops};
use super::{BenchError, ModelSource, SampleOptions, TrainOptions};
use crate::engine::cuda::{
    self as cu, CudaAdapter, CudaDevice, CudaKvCache, CudaModel, bench_shape, bf16,
};
use crate::engine::sampling::SamplingParams;
use crate::engine::synth::SynthRng;
use crate::engine::{AdamParams, CachedGroup, LossFn, Model};

/// The GPU and the peaks its figures are measured against.
#[derive(Debug, Clone)]
pub struct GpuInfo {
    pub name: String,
    /// Dense bf16 FLOP/s.
    pub peak_flops: Option<f64>,
    /// HBM bytes/s.
    pub peak_bw: Option<f64>,
}

fn env_f64(k: &str) -> Option<f64> {
    std::env::var(k).ok().and_then(|v| v.parse().ok())
}

/// Looks up the assumed peaks for `name` (see the module docs).
pub fn peaks(name: &str) -> (Option<f64>, Option<f64>) {
    let n = name.to_ascii_uppercase();
    let table = if n.contains("H200") {
        Some((989e12, 4.8e12))
    } else if n.contains("H100") && n.contains("PCIE") {
        Some((756e12, 2.0e12))
    } else if n.contains("H100") && n.contains("NVL") {
        Some((835e12, 3.9e12))
    } else if n.contains("H100") {
        Some((989.4e12, 3.35e12))
    } else if n.contains("A100") {
        Some((312e12, 2.0e12))
    } else {
        None
    };
    (
        env_f64("TWINKLE_PEAK_TFLOPS").map(|t| t * 1e12).or(table.map(|t| t.0)),
        env_f64("TWINKLE_PEAK_TBPS").map(|t| t * 1e12).or(table.map(|t| t.1)),
    )
}

fn open() -> Result<(Arc<CudaDevice>, GpuInfo), BenchError> {
    let dev = Arc::new(CudaDevice::new(0)?);
    let name = dev.context().name().unwrap_or_else(|_| "unknown GPU".into());
    let (peak_flops, peak_bw) = peaks(&name);
    Ok((dev, GpuInfo { name, peak_flops, peak_bw }))
}

/// Builds the model on the GPU: a directory through the host loader, a shape directly on the
/// device (no f32 copy of a 7B model anywhere).
pub fn load(src: &ModelSource) -> Result<(CudaModel<bf16>, GpuInfo), BenchError> {
    let (dev, info) = open()?;
    let model = match src {
        ModelSource::Dir(d) => {
            let host: Arc<Model> = Model::load(d)?;
            CudaModel::new(dev, &host)?
        }
        // The GPU synthesises bf16 weights itself; the checkpoint dtype does not apply.
        ModelSource::Shape { name, layers, seed, .. } => {
            let mut spec = bench_shape(name).ok_or_else(|| {
                BenchError::Option(format!("unknown shape `{name}` (qwen2.5-0.5b, qwen2.5-7b)"))
            })?;
            if let Some(l) = layers {
                spec.layers = (*l).max(1);
            }
            CudaModel::synthetic(dev, &spec, *seed)?
        }
    };
    Ok((model, info))
}

fn gpu_json(info: &GpuInfo) -> Value {
    json!({
        "device": "cuda",
        "gpu": info.name,
        "peak_tflops_assumed": info.peak_flops.map(|f| f / 1e12),
        "peak_tbps_assumed": info.peak_bw.map(|b| b / 1e12),
    })
}

fn merge(mut a: Value, b: Value) -> Value {
    if let (Some(a), Value::Object(b)) = (a.as_object_mut(), b) {
        a.extend(b);
    }
    a
}

/// What both benchmarks run against: the model on its GPU and the GPU's assumed peaks.
#[derive(Clone, Copy)]
struct Gpu<'m> {
    model: &'m CudaModel<bf16>,
    info: &'m GpuInfo,
}

/// LoRA (all linears) cross-entropy forward_backward + AdamW on the GPU.
fn train(gpu: Gpu<'_>, opts: &TrainOptions) -> Result<(TrainReport, Value, String), BenchError> {
    opts.check()?;
    let Gpu { model, info } = gpu;
    let (c, dev) = (model.config(), model.device());
    let mut ad = CudaAdapter::fresh(model, &super::bench_lora(opts.rank, 0))?;
    let data = super::train_batch(opts, c.vocab_size);
    let loss = LossFn::CrossEntropy;
    let adam = AdamParams::default();
    let lora_params = ad.num_params();
    let flops_per = flops(c, opts.seq, lora_params);
    let r = super::timed_train("bench train (cuda)", opts, flops_per, lora_params, |_| {
        let t0 = Instant::now();
        cu::forward_backward(model, Some(&mut ad), &data, &loss, true)?;
        let t1 = Instant::now();
        cu::forward_backward(model, Some(&mut ad), &data, &loss, false)?;
        let t2 = Instant::now();
        ad.optim_step(dev, &adam)?;
        dev.synchronize()?;
        Ok::<_, BenchError>([t0, t1, t2, Instant::now()])
    })?;
    let tokens = r.tokens_per_step as f64;
    let achieved = r.flops.train * tokens / r.fwd_bwd_s;
    let mfu = info.peak_flops.map(|p| achieved / p);
    let extra = merge(
        gpu_json(info),
        json!({
            "train_tflops": achieved / 1e12,
            "mfu_fwd_bwd": mfu,
            "mfu_step": info.peak_flops.map(|p| r.flops.train * tokens / r.step_s() / p),
        }),
    );
    let text = format!(
        "gpu          {} (assumed dense bf16 peak {})\nMFU          {} of fwd+bwd ({:.1} TFLOP/s achieved)",
        info.name,
        info.peak_flops.map_or("unknown".into(), |p| format!("{:.1} TFLOP/s", p / 1e12)),
        mfu.map_or("n/a".into(), |m| format!("{:.1}%", m * 100.0)),
        achieved / 1e12
    );
    Ok((r, extra, text))
}

/// Prefill of `batch` random prompts, then `max_tokens` greedy decode steps (argmax on the
/// device), no adapter.
fn sample(gpu: Gpu<'_>, opts: &SampleOptions) -> Result<(SampleReport, Value, String), BenchError> {
    opts.check()?;
    let Gpu { model, info } = gpu;
    let c = model.config();
    let ctx = opts.prompt + opts.max_tokens;
    let mut cache = CudaKvCache::new(model, opts.batch, ctx)?;
    let mut rng = SynthRng(7);
    let prompts: Vec<Vec<u32>> =
        (0..opts.batch).map(|_| rng.tokens(opts.prompt, c.vocab_size)).collect();
    let seqs: Vec<usize> = (0..opts.batch).collect();
    let mut greedy = SamplingParams::new(1);
    greedy.temperature = 0.0;
    let params = vec![greedy; opts.batch];
    let draws = vec![0.0f32; opts.batch];
    let t0 = Instant::now();
    let refs: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
    let feed = |cache: &mut CudaKvCache<bf16>, tokens: &[&[u32]]| {
        let mut g = CachedGroup { adapter: None, cache, slots: &seqs, tokens };
        model.forward_cached_device(&mut g)
    };
    let mut logits = feed(&mut cache, &refs)?;
    let mut picks = model.select_tokens(&logits, &params, &draws)?;
    let prefill_s = t0.elapsed().as_secs_f64();
    let mut step_s = Vec::with_capacity(opts.max_tokens);
    let progress = crate::progress::Progress::new("bench sample (cuda)", opts.max_tokens as u64);
    for _ in 0..opts.max_tokens {
        let next: Vec<[u32; 1]> = picks.iter().map(|p| [p.0]).collect();
        let refs: Vec<&[u32]> = next.iter().map(|t| t.as_slice()).collect();
        let t = Instant::now();
        logits = feed(&mut cache, &refs)?;
        picks = model.select_tokens(&logits, &params, &draws)?;
        model.device().synchronize()?;
        step_s.push(t.elapsed().as_secs_f64());
        progress.advance(1, "decode step");
    }
    progress.finish();
    let r = SampleReport {
        batch: opts.batch,
        prompt: opts.prompt,
        prefill_s,
        step_s,
        peak_rss_bytes: report::peak_rss(),
    };
    // bytes one decode step reads: every matmul weight once (bf16) plus the KV cache at the
    // mean context length of the run
    let f = flops(c, 1, 0);
    let kv_row = 2 * c.num_kv_heads * c.head_dim.div_ceil(32) * 32 * 2;
    let mean_ctx = opts.prompt as f64 + opts.max_tokens as f64 / 2.0;
    let bytes =
        f.matmul_params * 2.0 + opts.batch as f64 * mean_ctx * (kv_row * c.num_layers) as f64;
    let steps = r.step_s.len().max(1) as f64;
    let mean_step = r.step_s.iter().sum::<f64>() / steps;
    let bw = bytes / mean_step;
    let share = info.peak_bw.map(|p| bw / p);
    let extra = merge(
        gpu_json(info),
        json!({
            "decode_bytes_per_step": bytes,
            "decode_bandwidth_tbps": bw / 1e12,
            "decode_bandwidth_share": share,
        }),
    );
    let text = format!(
        "gpu          {} (assumed HBM peak {})\nbandwidth    {} of peak ({:.2} TB/s: {:.2} GB weights+KV per step)",
        info.name,
        info.peak_bw.map_or("unknown".into(), |p| format!("{:.2} TB/s", p / 1e12)),
        share.map_or("n/a".into(), |s| format!("{:.1}%", s * 100.0)),
        bw / 1e12,
        bytes / 1e9
    );
    Ok((r, extra, text))
}

/// Runs one benchmark on the GPU and returns what to print (text or one JSON object); with
/// `explain`, then one more step profiled per kernel (`bench::explain`).
pub fn run(
    src: &ModelSource,
    what: Either<'_>,
    as_json: bool,
    explain: bool,
) -> Result<String, BenchError> {
    let (model, info) = load(src)?;
    let describe = super::describe(model.config());
    let gpu = Gpu { model: &model, info: &info };
    let (text, json, extra, extra_text) = match what {
        Either::Train(o) => {
            let (r, e, t) = train(gpu, o)?;
            (r.text(), r.json(), e, t)
        }
        Either::Sample(o) => {
            let (r, e, t) = sample(gpu, o)?;
            (r.text(), r.json(), e, t)
        }
    };
    let roofline = match (explain, what) {
        (false, _) => None,
        (true, Either::Train(o)) => Some(super::explain::train_step(&model, o)?),
        (true, Either::Sample(o)) => Some(super::explain::decode_step(&model, o)?),
    };
    if as_json {
        let mut j = merge(json, extra);
        j["layers"] = model.config().num_layers.into();
        if let Some(stats) = &roofline {
            j["explain"] = super::explain::json(stats, &info);
        }
        Ok(j.to_string())
    } else {
        let explained =
            roofline.map_or(String::new(), |s| format!("\n{}", super::explain::text(&s, &info)));
        Ok(format!("model: {describe} | device cuda (bf16)\n{text}\n{extra_text}{explained}"))
    }
}

/// Which benchmark [`run`] runs.
#[derive(Debug, Clone, Copy)]
pub enum Either<'a> {
    Train(&'a TrainOptions),
    Sample(&'a SampleOptions),
}

#[cfg(test)]
mod tests {
    use super::peaks;

    #[test]
    fn peaks_by_gpu_name() {
        assert_eq!(peaks("NVIDIA H100 80GB HBM3"), (Some(989.4e12), Some(3.35e12)));
        assert_eq!(peaks("NVIDIA H200"), (Some(989e12), Some(4.8e12)));
        assert_eq!(peaks("NVIDIA H100 PCIe"), (Some(756e12), Some(2.0e12)));
        assert_eq!(peaks("Some GPU").0, None);
    }
}
