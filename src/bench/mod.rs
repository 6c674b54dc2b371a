//! `twinkle bench`: CPU engine benchmarks (LoRA training step and KV-cached sampling) on a model
//! directory or a random-weight model of a named shape, printing tokens/s, achieved GFLOP/s and
//! peak RSS. A benchmark, not a test: numbers depend on the host and its load.

pub mod cuda;
pub mod explain;
mod multi;
mod report;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use crate::engine::backend::profile;
use crate::engine::synth::{SynthRng, SynthSpec};
use crate::engine::{
    AdamParams, Adapter, Datum, EngineError, KvCache, LoraConfig, LoraTargets, LossFn, LossInputs,
    Model, ModelConfig,
};

pub use multi::{MultiTenantOptions, MultiTenantReport, multi_tenant};
pub use report::{SampleReport, TrainReport, flops};

/// Errors of the benchmark driver.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("unknown shape `{0}` (known: qwen2.5-0.5b)")]
    UnknownShape(String),
    #[error("bad benchmark option: {0}")]
    Option(String),
    #[error("thread pool: {0}")]
    Threads(String),
    #[error(transparent)]
    Cuda(#[from] crate::engine::cuda::CudaError),
}

/// Where the model comes from.
#[derive(Debug, Clone)]
pub enum ModelSource {
    /// An HF model directory.
    Dir(PathBuf),
    /// A named shape with random weights, optionally with fewer layers; written as bf16 when
    /// `bf16` (the CPU model then holds its matrices in bf16).
    Shape { name: String, layers: Option<usize>, seed: u64, bf16: bool },
}

/// Options of `twinkle bench train`.
#[derive(Debug, Clone)]
pub struct TrainOptions {
    pub seq: usize,
    pub batch: usize,
    pub rank: usize,
    pub steps: usize,
    pub warmup: usize,
}

/// Options of `twinkle bench sample`.
#[derive(Debug, Clone)]
pub struct SampleOptions {
    pub batch: usize,
    pub prompt: usize,
    pub max_tokens: usize,
}

impl TrainOptions {
    /// Refuses a zero `--seq`, `--batch` or `--steps` (every backend's train bench).
    pub(crate) fn check(&self) -> Result<(), BenchError> {
        check_positive(&[("--seq", self.seq), ("--batch", self.batch), ("--steps", self.steps)])
    }
}

impl SampleOptions {
    /// Refuses a zero `--batch`, `--prompt` or `--max-tokens` (every backend's sample bench).
    pub(crate) fn check(&self) -> Result<(), BenchError> {
        check_positive(&[
            ("--batch", self.batch),
            ("--prompt", self.prompt),
            ("--max-tokens", self.max_tokens),
        ])
    }
}

/// Sets the global rayon pool size (0 = rayon's default: one per core).
pub fn set_threads(n: usize) -> Result<usize, BenchError> {
    if n > 0 {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .map_err(|e| BenchError::Threads(e.to_string()))?;
    }
    Ok(rayon::current_num_threads())
}

/// Loads the model; a named shape is written to a temporary directory first (removed after).
/// Resets the peak-RSS mark afterwards so the file writing does not count.
pub fn load(src: &ModelSource) -> Result<Arc<Model>, BenchError> {
    let model = match src {
        ModelSource::Dir(dir) => Model::load(dir)?,
        ModelSource::Shape { name, layers, seed, bf16 } => {
            let mut spec =
                SynthSpec::named(name).ok_or_else(|| BenchError::UnknownShape(name.clone()))?;
            if let Some(l) = layers {
                if *l == 0 {
                    return Err(BenchError::Option("--layers must be at least 1".into()));
                }
                spec.layers = *l;
            }
            let dir = std::env::temp_dir().join(format!(
                "twinkle-bench-{}-{}",
                std::process::id(),
                spec.layers
            ));
            let written = spec.write_as(&dir, *seed, *bf16);
            let model = written.and_then(|()| Model::load(&dir));
            let _ = std::fs::remove_dir_all(&dir);
            model?
        }
    };
    report::reset_peak_rss();
    Ok(model)
}

/// The benchmarks' LoRA: rank `rank`, alpha = rank, every linear of every layer (Tinker's
/// defaults with the MLP and attention on, the head off).
pub(crate) fn bench_lora(rank: usize, seed: u64) -> LoraConfig {
    LoraConfig::from_tinker(rank, rank as f32, LoraTargets::ALL_LINEAR, seed)
}

/// `opts.batch` random sequences of `opts.seq` tokens with next-token targets (fixed seed, so
/// every backend and run trains on the same batch).
pub(crate) fn train_batch(opts: &TrainOptions, vocab: usize) -> Vec<Datum> {
    let mut rng = SynthRng(42);
    (0..opts.batch)
        .map(|_| {
            let toks = rng.tokens(opts.seq + 1, vocab);
            Datum {
                input_tokens: toks[..opts.seq].to_vec(),
                inputs: LossInputs {
                    target_tokens: toks[1..].to_vec(),
                    k: 1,
                    ..Default::default()
                },
            }
        })
        .collect()
}

/// The instants one training step passes: start, forward done, forward+backward done, optimizer
/// step done.
pub(crate) type StepInstants = [Instant; 4];

/// Runs `opts.warmup` untimed then `opts.steps` timed training steps under a progress bar named
/// `label`, and reports the per-step averages; `step(timed)` runs one step. The one place both
/// backends time a step, so CPU and GPU reports mean the same thing.
pub(crate) fn timed_train<E>(
    label: &str,
    opts: &TrainOptions,
    flops_per: report::Flops,
    lora_params: usize,
    mut step: impl FnMut(bool) -> Result<StepInstants, E>,
) -> Result<TrainReport, E> {
    let (mut t_fwd, mut t_fb, mut t_opt) = (0.0, 0.0, 0.0);
    let progress = crate::progress::Progress::new(label, (opts.warmup + opts.steps) as u64);
    for i in 0..opts.warmup + opts.steps {
        let timed = i >= opts.warmup;
        let [t0, t1, t2, t3] = step(timed)?;
        if timed {
            t_fwd += (t1 - t0).as_secs_f64();
            t_fb += (t2 - t1).as_secs_f64();
            t_opt += (t3 - t2).as_secs_f64();
        }
        progress.advance(1, if timed { "step" } else { "warm-up" });
    }
    progress.finish();
    let n = opts.steps.max(1) as f64;
    Ok(TrainReport {
        tokens_per_step: opts.seq * opts.batch,
        seq: opts.seq,
        forward_s: t_fwd / n,
        fwd_bwd_s: t_fb / n,
        optim_s: t_opt / n,
        flops: flops_per,
        lora_params,
        peak_rss_bytes: report::peak_rss(),
    })
}

/// LoRA (all seven linears) cross-entropy forward_backward + AdamW step, `opts.steps` times after
/// `opts.warmup` untimed steps; a forward-only pass per step gives the forward/backward split.
pub fn train(model: &Model, opts: &TrainOptions) -> Result<TrainReport, BenchError> {
    let c = model.config();
    opts.check()?;
    let mut adapter = Adapter::new(model, &bench_lora(opts.rank, 0))?;
    let data = train_batch(opts, c.vocab_size);
    let loss = LossFn::CrossEntropy;
    let adam = AdamParams::default();
    let mut phases: Vec<(&'static str, f64)> = Vec::new();
    let lora_params: usize = adapter.num_params();
    let flops_per = flops(c, opts.seq, lora_params);
    let r = timed_train("bench train", opts, flops_per, lora_params, |timed| {
        let t0 = Instant::now();
        crate::engine::forward(model, Some(&adapter), &data, &loss)?;
        let t1 = Instant::now();
        profile::take();
        crate::engine::forward_backward(model, Some(&mut adapter), &data, &loss, false)?;
        let t2 = Instant::now();
        if timed && profile::enabled() {
            for (i, (name, s)) in profile::take().into_iter().enumerate() {
                match phases.get_mut(i) {
                    Some(p) => p.1 += s,
                    None => phases.push((name, s)),
                }
            }
        }
        adapter.optim_step(&adam)?;
        Ok::<_, BenchError>([t0, t1, t2, Instant::now()])
    })?;
    // TWINKLE_PROFILE=1: where one forward_backward spends its time (stderr, not the report).
    for (name, s) in &phases {
        eprintln!("profile {name:28} {:8.3} s/step", s / opts.steps as f64);
    }
    Ok(r)
}

/// Prefill of `batch` random prompts in one call, then `max_tokens` greedy decode steps of the
/// whole batch (no adapter).
pub fn sample(model: &Model, opts: &SampleOptions) -> Result<SampleReport, BenchError> {
    let c = model.config();
    opts.check()?;
    if opts.prompt + opts.max_tokens > c.max_position_embeddings {
        return Err(BenchError::Option(format!(
            "--prompt + --max-tokens exceeds the model's {} positions",
            c.max_position_embeddings
        )));
    }
    let mut rng = SynthRng(7);
    let prompts: Vec<Vec<u32>> =
        (0..opts.batch).map(|_| rng.tokens(opts.prompt, c.vocab_size)).collect();
    let mut caches: Vec<KvCache> = (0..opts.batch).map(|_| KvCache::new(model)).collect();
    let t0 = Instant::now();
    let refs: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
    let mut logits = model.forward_cached(None, &refs, &mut caches)?;
    let prefill_s = t0.elapsed().as_secs_f64();
    let mut step_s = Vec::with_capacity(opts.max_tokens);
    let progress = crate::progress::Progress::new("bench sample", opts.max_tokens as u64);
    for _ in 0..opts.max_tokens {
        let next: Vec<[u32; 1]> = logits.iter().map(|l| [argmax(l)]).collect();
        let refs: Vec<&[u32]> = next.iter().map(|t| t.as_slice()).collect();
        let t = Instant::now();
        logits = model.forward_cached(None, &refs, &mut caches)?;
        step_s.push(t.elapsed().as_secs_f64());
        progress.advance(1, "decode step");
    }
    progress.finish();
    Ok(SampleReport {
        batch: opts.batch,
        prompt: opts.prompt,
        prefill_s,
        step_s,
        peak_rss_bytes: report::peak_rss(),
    })
}

/// Short description of a model for the report header.
pub fn describe(c: &ModelConfig) -> String {
    format!(
        "{} layers={} hidden={} inter={} heads={}/{} head_dim={} vocab={} tied={}",
        c.arch,
        c.num_layers,
        c.hidden_size,
        c.intermediate_size,
        c.num_heads,
        c.num_kv_heads,
        c.head_dim,
        c.vocab_size,
        c.tie_word_embeddings
    )
}

/// Resolves `--model` / `--shape` into a source (exactly one of them, `--layers` and a `--dtype`
/// other than f32 only with a shape).
pub fn source(
    model: Option<&Path>,
    shape: Option<&str>,
    layers: Option<usize>,
    dtype: &str,
) -> Result<ModelSource, BenchError> {
    let bf16 = match dtype {
        "f32" => false,
        "bf16" => true,
        other => {
            return Err(BenchError::Option(format!("--dtype must be f32 or bf16, got {other:?}")));
        }
    };
    match (model, shape) {
        (Some(_), Some(_)) => Err(BenchError::Option("give --model or --shape, not both".into())),
        (Some(_), None) if layers.is_some() || bf16 => {
            Err(BenchError::Option("--layers and --dtype only apply to --shape".into()))
        }
        (Some(d), None) => Ok(ModelSource::Dir(d.to_path_buf())),
        (None, s) => Ok(ModelSource::Shape {
            name: s.unwrap_or("qwen2.5-0.5b").to_string(),
            layers,
            seed: 1,
            bf16,
        }),
    }
}

fn check_positive(vals: &[(&str, usize)]) -> Result<(), BenchError> {
    match vals.iter().find(|(_, v)| *v == 0) {
        Some((name, _)) => Err(BenchError::Option(format!("{name} must be at least 1"))),
        None => Ok(()),
    }
}

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best as u32
}
