//! The device seam end to end: `CudaRuntime` and `CpuRuntime` driven through the same
//! `ModelRuntime` calls an application makes (upload, forward_backward twice, optim_step,
//! download, forward, prefill + fork + decode + token selection), and through `DataParallel`,
//! must agree: the apps cannot tell the devices apart except by speed.

use std::sync::Arc;

use anyhow::{Result, ensure};
use twinkle::engine::cpu::CpuRuntime;
use twinkle::engine::cuda::{Act, CudaRuntime};
use twinkle::engine::parallel::DataParallel;
use twinkle::engine::sampling::SamplingParams;
use twinkle::engine::synth::{Init, SynthSpec};
use twinkle::engine::{AdamParams, Adapter, Datum, LossFn, Model, ModelRuntime};

fn tiny_model() -> Result<(tempfile::TempDir, Arc<Model>)> {
    let spec = SynthSpec {
        arch: "Qwen2ForCausalLM".into(),
        vocab: 97,
        hidden: 64,
        inter: 96,
        layers: 2,
        heads: 4,
        kv_heads: 2,
        head_dim: 16,
        rope_theta: 10000.0,
        eps: 1e-6,
        max_positions: 128,
        tied: false,
        init: Init::Spread,
    };
    let tmp = tempfile::tempdir()?;
    spec.write(tmp.path(), 21)?;
    let model = Model::load(tmp.path())?;
    Ok((tmp, model))
}

fn adapter(model: &Model) -> Result<Adapter> {
    Ok(crate::engine_support::full_lora(model, 3, 17, 0.2))
}

fn batch(seed: u64, lens: &[usize], vocab: usize) -> Vec<Datum> {
    crate::engine_support::random_batch(seed, lens, vocab, false)
}

fn max_rel(got: &[f32], want: &[f32]) -> f64 {
    let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs() as f64)).max(1e-30);
    got.iter().zip(want).map(|(a, b)| (*a as f64 - *b as f64).abs()).fold(0.0, f64::max) / scale
}

/// What one runtime produces for the application-level sequence of calls.
struct Trace {
    losses: Vec<f64>,
    grads: Vec<f32>,
    weights_after: Vec<f32>,
    forward_after: Vec<f32>,
    tokens: Vec<Vec<u32>>,
}

fn trace<R: ModelRuntime>(dp: &DataParallel<R>, model: &Model) -> Result<Trace> {
    let vocab = model.config().vocab_size;
    let loss = LossFn::CrossEntropy;
    let mut rep = dp.upload(&adapter(model)?)?;
    let a = dp.forward_backward(&mut rep, &batch(1, &[7, 5, 9], vocab), &loss)?;
    let b = dp.forward_backward(&mut rep, &batch(2, &[4, 6], vocab), &loss)?;
    let grads = dp.download(&rep)?.grads_flat();
    let adam = AdamParams { learning_rate: 1e-2, eps: 1e-3, ..Default::default() };
    dp.optim_step(&mut rep, &adam)?;
    let host = dp.download(&rep)?;
    let weights_after: Vec<f32> = host
        .pairs()
        .iter()
        .flat_map(|(_, p)| p.a.w.data().iter().chain(p.b.w.data()))
        .copied()
        .collect();
    let fwd = dp.forward(Some(&rep), &batch(3, &[8], vocab), &loss)?;

    // Generation as the apps do it: prefill slot 0, fork it to slot 1, decode both greedily.
    let rt = dp.worker(0);
    let replica = rep.replica(0);
    let mut cache = rt.new_cache(2, 32)?;
    let prompt: Vec<u32> = batch(4, &[6], vocab)[0].input_tokens.clone();
    let greedy = SamplingParams { temperature: 0.0, ..SamplingParams::new(8) };
    let mut logits = rt.forward_cached(replica, &mut cache, &[0], &[prompt.as_slice()])?;
    rt.fork_slot(&mut cache, 0, 1)?;
    let first = rt.select_tokens(&logits, std::slice::from_ref(&greedy), &[0.5])?;
    let mut tokens = vec![vec![first[0].0], vec![first[0].0]];
    for _ in 0..5 {
        let last: Vec<[u32; 1]> = tokens.iter().map(|t| [*t.last().unwrap_or(&0)]).collect();
        let inputs: Vec<&[u32]> = last.iter().map(|t| t.as_slice()).collect();
        logits = rt.forward_cached(replica, &mut cache, &[0, 1], &inputs)?;
        let picks = rt.select_tokens(&logits, &[greedy.clone(), greedy.clone()], &[0.1, 0.9])?;
        for (t, (tok, _)) in tokens.iter_mut().zip(picks) {
            t.push(tok);
        }
    }
    Ok(Trace {
        losses: vec![a.loss_sum, b.loss_sum, fwd.loss_sum],
        grads,
        weights_after,
        forward_after: fwd.per_datum[0].logprobs.clone(),
        tokens,
    })
}

/// `CudaRuntime<T>` (one card, and `workers` replicas on the same card for the data-parallel
/// path) against `CpuRuntime` on the same model.
pub fn seam_parity<T: Act + Send + Sync + 'static>(grad_tol: f64, workers: usize) -> Result<()> {
    let (_tmp, model) = tiny_model()?;
    let cpu = trace(&DataParallel::single(CpuRuntime::new(model.clone())), &model)?;
    let gpus =
        (0..workers).map(|_| CudaRuntime::<T>::new(0, &model)).collect::<Result<Vec<_>, _>>()?;
    let gpu = trace(&DataParallel::new(gpus)?, &model)?;
    for (i, (g, c)) in gpu.losses.iter().zip(&cpu.losses).enumerate() {
        ensure!((g - c).abs() <= grad_tol * c.abs().max(1.0), "loss {i}: cuda {g} vs cpu {c}");
    }
    let e = max_rel(&gpu.grads, &cpu.grads);
    eprintln!("  seam ({} x{workers}): grads {e:.2e}", std::any::type_name::<T>());
    ensure!(e <= grad_tol, "accumulated gradients differ by {e:.3e} (tolerance {grad_tol:.1e})");
    let e = max_rel(&gpu.weights_after, &cpu.weights_after);
    ensure!(e <= grad_tol, "weights after the step differ by {e:.3e}");
    let e = max_rel(&gpu.forward_after, &cpu.forward_after);
    ensure!(e <= grad_tol, "logprobs after the step differ by {e:.3e}");
    ensure!(gpu.tokens[0] == gpu.tokens[1], "a forked slot decoded differently: {:?}", gpu.tokens);
    if grad_tol < 1e-2 {
        ensure!(
            gpu.tokens == cpu.tokens,
            "greedy tokens: cuda {:?} vs cpu {:?}",
            gpu.tokens,
            cpu.tokens
        );
    }
    Ok(())
}

/// Every value a step could change, bit for bit (NaN gradients compare by their bits).
fn state_bits(a: &Adapter) -> (Vec<u32>, u64) {
    let bits = a
        .pairs()
        .iter()
        .flat_map(|(_, p)| {
            let w = p.a.w.data().iter().chain(p.b.w.data());
            let moments =
                p.a.adam.m.iter().chain(&p.a.adam.v).chain(&p.b.adam.m).chain(&p.b.adam.v);
            w.chain(&p.a.g).chain(&p.b.g).chain(moments).copied()
        })
        .map(f32::to_bits)
        .collect();
    (bits, a.step())
}

/// Refused by the runtime alone and through `DataParallel` (as the model application calls
/// it, which also restores a copy on failure): the error message, and the adapter downloaded
/// afterwards from each path.
fn refused_step<R: ModelRuntime>(
    dp: &DataParallel<R>,
    host: &Adapter,
) -> Result<(String, [Adapter; 2])> {
    let adam = AdamParams { learning_rate: 1e-2, ..Default::default() };
    let check = |r: twinkle::engine::Result<twinkle::engine::OptimMetrics>| match r {
        Ok(m) => anyhow::bail!("a non-finite gradient was applied (step {})", m.step),
        Err(e) if matches!(e, twinkle::engine::EngineError::NonFinite(_)) => Ok(e.to_string()),
        Err(e) => anyhow::bail!("expected the NonFinite user error, got {e:?}"),
    };
    // The runtime itself must not move anything (no copy to fall back on here).
    let w = dp.worker(0);
    let mut alone = w.upload_adapter(host)?;
    let msg = check(w.optim_step(&mut alone, &adam))?;
    let mut after_alone = host.clone();
    w.download_adapter(&alone, &mut after_alone)?;
    let mut rep = dp.upload(host)?;
    ensure!(check(dp.optim_step(&mut rep, &adam))? == msg, "the two paths disagree");
    Ok((msg, [after_alone, dp.download(&rep)?]))
}

/// A gradient with an inf or a NaN (after one good step, so the moments are non-zero) is
/// refused by the CUDA step before anything moves, with the CPU's error: weights, moments,
/// gradients and step stay bit for bit, on one card and as two data-parallel replicas; the
/// adapter then steps normally once the gradient is cleared.
pub fn non_finite_gradient_is_refused<T: Act + Send + Sync + 'static>() -> Result<()> {
    let (_tmp, model) = tiny_model()?;
    let vocab = model.config().vocab_size;
    let cpu = DataParallel::single(CpuRuntime::new(model.clone()));
    let mut rep = cpu.upload(&adapter(&model)?)?;
    cpu.forward_backward(&mut rep, &batch(1, &[7, 5], vocab), &LossFn::CrossEntropy)?;
    cpu.optim_step(&mut rep, &AdamParams { learning_rate: 1e-2, ..Default::default() })?;
    cpu.forward_backward(&mut rep, &batch(2, &[6], vocab), &LossFn::CrossEntropy)?;
    let good = cpu.download(&rep)?;
    for bad in [f32::INFINITY, f32::NAN] {
        let mut host = good.clone();
        let mut g = host.grads_flat();
        let mid = g.len() / 2;
        g[mid] = bad;
        host.set_grads_flat(&g)?;
        let (cpu_msg, cpu_after) = refused_step(&cpu, &host)?;
        for a in &cpu_after {
            ensure!(state_bits(a) == state_bits(&host), "cpu changed the adapter ({bad})");
        }
        for workers in [1, 2] {
            let gpus = (0..workers)
                .map(|_| CudaRuntime::<T>::new(0, &model))
                .collect::<Result<Vec<_>, _>>()?;
            let dp = DataParallel::new(gpus)?;
            let (msg, after) = refused_step(&dp, &host)?;
            ensure!(msg == cpu_msg, "cuda x{workers} ({bad}): {msg:?} vs cpu {cpu_msg:?}");
            for (a, path) in after.iter().zip(["the runtime", "DataParallel"]) {
                ensure!(
                    state_bits(a) == state_bits(&host),
                    "cuda x{workers} through {path} changed the adapter on a refused step ({bad})"
                );
            }
            // Cleared, the same adapter steps on.
            let mut rep = dp.upload(&host)?;
            dp.zero_grad(&mut rep)?;
            dp.forward_backward(&mut rep, &batch(3, &[5], vocab), &LossFn::CrossEntropy)?;
            let m =
                dp.optim_step(&mut rep, &AdamParams { learning_rate: 1e-2, ..Default::default() })?;
            ensure!(m.step == 2 && m.grad_norm.is_finite(), "step after clearing: {m:?}");
        }
    }
    Ok(())
}
