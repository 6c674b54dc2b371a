//! `twinkle bench train|sample|multi-tenant`: the command-line side of the benchmarks (arguments, device
//! choice, text or JSON output) over `twinkle::bench`. Part of the binary (declared in main.rs),
//! not of the library, like the rest of the command line.

use std::path::PathBuf;

use clap::Subcommand;

/// Options shared by both benchmarks.
#[derive(clap::Args, Debug)]
pub struct BenchModelArgs {
    /// HF model directory (default: a random-weight model of --shape).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Named shape with random weights (default qwen2.5-0.5b).
    #[arg(long)]
    shape: Option<String>,
    /// Keep only this many layers of the shape (a 24-layer 0.5B model is ~2 GB in f32).
    #[arg(long)]
    layers: Option<usize>,
    /// Storage dtype of the --shape checkpoint: `f32`, or `bf16` (held in bf16 on the CPU).
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Worker threads (default: one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// `cpu`, or `cuda` for the GPU path (bf16, GPU 0; adds MFU / bandwidth share).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// With `--device cuda` (train and sample): one more step profiled per kernel, printed as
    /// a roofline (FLOPs, bytes, time at the card's peak, measured time).
    #[arg(long)]
    explain: bool,
}

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// LoRA (all linears) cross-entropy forward_backward + optim_step.
    Train {
        #[command(flatten)]
        m: BenchModelArgs,
        #[arg(long, default_value_t = 2048)]
        seq: usize,
        #[arg(long, default_value_t = 1)]
        batch: usize,
        #[arg(long, default_value_t = 32)]
        rank: usize,
        /// Timed steps (after one untimed warm-up step).
        #[arg(long, default_value_t = 3)]
        steps: usize,
    },
    /// KV-cached prefill + greedy decode of a batch of random prompts.
    Sample {
        #[command(flatten)]
        m: BenchModelArgs,
        #[arg(long, default_value_t = 1)]
        batch: usize,
        #[arg(long, default_value_t = 128)]
        prompt: usize,
        #[arg(long, default_value_t = 64)]
        max_tokens: usize,
    },
    /// Many tenants' LoRA forward_backward batched into one base pass, vs one after another,
    /// vs one tenant's step of all their tokens (CPU; `--json` ends with the ratios line).
    MultiTenant {
        #[command(flatten)]
        m: BenchModelArgs,
        #[arg(long, default_value_t = 8)]
        tenants: usize,
        /// Tokens of each tenant's step.
        #[arg(long, default_value_t = 128)]
        seq: usize,
        #[arg(long, default_value_t = 16)]
        rank: usize,
        /// Timed repetitions of each measurement (after one untimed warm-up).
        #[arg(long, default_value_t = 2)]
        steps: usize,
        /// Tokens each tenant samples in the decode measurement (0 skips it).
        #[arg(long, default_value_t = 64)]
        decode_tokens: usize,
    },
}

pub fn bench(what: BenchCommand) -> anyhow::Result<()> {
    use twinkle::bench;
    let m = match &what {
        BenchCommand::Train { m, .. }
        | BenchCommand::Sample { m, .. }
        | BenchCommand::MultiTenant { m, .. } => m,
    };
    let threads = bench::set_threads(m.threads)?;
    let src = bench::source(m.model.as_deref(), m.shape.as_deref(), m.layers, &m.dtype)?;
    if m.device == "cuda" {
        let (train, sample);
        let which = match &what {
            BenchCommand::Train { seq, batch, rank, steps, .. } => {
                train = bench::TrainOptions {
                    seq: *seq,
                    batch: *batch,
                    rank: *rank,
                    steps: *steps,
                    warmup: 1,
                };
                bench::cuda::Either::Train(&train)
            }
            BenchCommand::Sample { batch, prompt, max_tokens, .. } => {
                sample = bench::SampleOptions {
                    batch: *batch,
                    prompt: *prompt,
                    max_tokens: *max_tokens,
                };
                bench::cuda::Either::Sample(&sample)
            }
            BenchCommand::MultiTenant { .. } => {
                if m.explain {
                    anyhow::bail!("--explain applies to bench train and bench sample");
                }
                let opts = multi_options(&what).unwrap_or_default();
                // the weights are made on the device (no host copy of a 7B model)
                let (model, _) = bench::cuda::load(&src)?;
                let rt = twinkle::engine::cuda::CudaRuntime::from_model(model);
                let r = bench::multi_tenant(&rt, &opts)?;
                return print_multi(
                    &r,
                    m.json,
                    threads,
                    twinkle::engine::ModelRuntime::config(&rt).num_layers,
                );
            }
        };
        println!("{}", bench::cuda::run(&src, which, m.json, m.explain)?);
        return Ok(());
    } else if m.device != "cpu" {
        anyhow::bail!("--device must be cpu or cuda, got {:?}", m.device);
    } else if m.explain {
        anyhow::bail!("--explain profiles the GPU kernels: add --device cuda");
    }
    let model = bench::load(&src)?;
    if !m.json {
        println!(
            "model: {} | weights {:.1} MB held | threads {threads}",
            bench::describe(model.config()),
            model.weight_bytes() as f64 / 1e6
        );
    }
    let (text, mut json) = match &what {
        BenchCommand::Train { seq, batch, rank, steps, .. } => {
            let opts = bench::TrainOptions {
                seq: *seq,
                batch: *batch,
                rank: *rank,
                steps: *steps,
                warmup: 1,
            };
            let r = bench::train(&model, &opts)?;
            (r.text(), r.json())
        }
        BenchCommand::Sample { batch, prompt, max_tokens, .. } => {
            let opts =
                bench::SampleOptions { batch: *batch, prompt: *prompt, max_tokens: *max_tokens };
            let r = bench::sample(&model, &opts)?;
            (r.text(), r.json())
        }
        BenchCommand::MultiTenant { .. } => {
            let opts = multi_options(&what).unwrap_or_default();
            let rt = twinkle::engine::cpu::CpuRuntime::new(model.clone());
            let r = bench::multi_tenant(&rt, &opts)?;
            return print_multi(&r, m.json, threads, model.config().num_layers);
        }
    };
    if m.json {
        json["threads"] = threads.into();
        json["layers"] = model.config().num_layers.into();
        json["weight_bytes"] = model.weight_bytes().into();
        println!("{json}");
    } else {
        println!("{text}");
    }
    Ok(())
}

/// Prints a multi-tenant report: text, or with `--json` the report and then one line with the
/// ratios alone (the acceptance reads the last line).
fn print_multi(
    r: &twinkle::bench::MultiTenantReport,
    json: bool,
    threads: usize,
    layers: usize,
) -> anyhow::Result<()> {
    if json {
        let mut j = r.json();
        j["threads"] = threads.into();
        j["layers"] = layers.into();
        println!("{j}");
        println!("{}", r.ratios_json());
    } else {
        println!("{}", r.text());
    }
    Ok(())
}

/// The options of a `multi-tenant` command (None for the other benchmarks).
fn multi_options(what: &BenchCommand) -> Option<twinkle::bench::MultiTenantOptions> {
    match what {
        BenchCommand::MultiTenant { tenants, seq, rank, steps, decode_tokens, .. } => {
            Some(twinkle::bench::MultiTenantOptions {
                tenants: *tenants,
                seq: *seq,
                rank: *rank,
                steps: *steps,
                decode_tokens: *decode_tokens,
            })
        }
        _ => None,
    }
}
