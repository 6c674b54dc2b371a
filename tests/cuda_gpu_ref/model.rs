//! The whole CUDA execution path (CudaModel / CudaAdapter / forward_backward / optim_step /
//! KV-cache decode) against the PyTorch golden fixtures (tests/fixtures/parity) and against the
//! CPU engine. f32 storage is held to the fixtures' float32 tolerances (slightly widened for
//! GPU summation order); bf16 to ~2e-2 relative, as tests/fixtures/parity/README.md allows.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, anyhow};
use serde_json::Value;
use twinkle::engine::cuda::{self as cu, Act, CudaAdapter, CudaDevice, CudaKvCache, CudaModel};
use twinkle::engine::sampling::{SamplingParams, sample_token};
use twinkle::engine::{AdamParams, Adapter, Datum, LossFn, LossInputs, Model, Tensor, weights};

pub const CASES: [&str; 3] = ["qwen2-tiny", "qwen3-tiny", "qwen2-tiny-bf16"];

/// The fixture directory: under the run-time `CARGO_MANIFEST_DIR` (cargo test), else the
/// build-time one, else the working directory (a prebuilt test binary run from the repository
/// root on another machine, as scripts/gpu-check.sh does).
fn case_dir(name: &str) -> PathBuf {
    let rel = Path::new("tests/fixtures/parity").join(name);
    let roots = [
        std::env::var_os("CARGO_MANIFEST_DIR").map(PathBuf::from),
        Some(PathBuf::from(env!("CARGO_MANIFEST_DIR"))),
    ];
    roots.into_iter().flatten().map(|r| r.join(&rel)).find(|p| p.is_dir()).unwrap_or(rel)
}

/// Tolerances of one storage type.
pub struct Tol {
    /// Target logprobs / last-position logits, absolute.
    pub logprob_abs: f64,
    /// Summed losses, relative.
    pub loss_rel: f64,
    /// Gradients, relative to the tensor's largest magnitude.
    pub grad_rel: f64,
    /// Adapter tensors after Adam steps, absolute (None: compare mean drift instead).
    pub adam_abs: Option<f64>,
    /// Greedy decode: the GPU must pick the CPU's token where the CPU's top-2 margin exceeds this.
    pub greedy_margin: f32,
}

pub const F32: Tol = Tol {
    logprob_abs: 2e-4,
    loss_rel: 2e-4,
    grad_rel: 2e-3,
    adam_abs: Some(2e-4),
    greedy_margin: 0.0,
};

pub const BF16: Tol =
    Tol { logprob_abs: 0.15, loss_rel: 2e-2, grad_rel: 6e-2, adam_abs: None, greedy_margin: 0.25 };

struct Case {
    model: Arc<Model>,
    adapter: Adapter,
    data: Vec<Datum>,
    exp: BTreeMap<String, Tensor>,
    case: Value,
}

fn nums(v: &Value) -> Result<Vec<f64>> {
    v.as_array()
        .ok_or_else(|| anyhow!("expected a list"))?
        .iter()
        .map(|x| x.as_f64().ok_or_else(|| anyhow!("expected a number")))
        .collect()
}

fn load(name: &str) -> Result<Case> {
    let dir = case_dir(name);
    let model = Model::load(&dir.join("model"))?;
    let adapter = Adapter::load_peft(&dir.join("adapter"), &model)?;
    let case: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("case.json"))?)?;
    let exp = weights::load_f32(&dir.join("expected.safetensors"))?;
    let list = |k: &str, i: usize| -> Result<Vec<f64>> {
        nums(case.get(k).and_then(|l| l.get(i)).with_context(|| format!("{name}: {k}[{i}]"))?)
    };
    let n = case.get("sequences").and_then(Value::as_array).map(Vec::len).unwrap_or(0);
    let mut data = Vec::new();
    for i in 0..n {
        let f = |k: &str| -> Result<Vec<f32>> {
            Ok(list(k, i)?.into_iter().map(|x| x as f32).collect())
        };
        data.push(Datum {
            input_tokens: list("sequences", i)?.into_iter().map(|x| x as u32).collect(),
            inputs: LossInputs {
                target_tokens: list("target_tokens", i)?.into_iter().map(|x| x as u32).collect(),
                k: 1,
                weights: Some(f("weights")?),
                logprobs: Some(f("sampling_logprobs")?),
                advantages: Some(f("advantages")?),
            },
        });
    }
    Ok(Case { model, adapter, data, exp, case })
}

fn max_abs(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len(), "length");
    got.iter().zip(want).map(|(a, b)| (*a as f64 - *b as f64).abs()).fold(0.0, f64::max)
}

/// Max over tensors of |got - want| / max|want|, for every `prefix.{key}` of the fixture.
fn rel_to_max(got: &BTreeMap<String, Tensor>, exp: &BTreeMap<String, Tensor>, prefix: &str) -> f64 {
    let mut worst = 0.0f64;
    for (k, t) in got {
        let want = exp.get(&format!("{prefix}.{k}")).unwrap_or_else(|| panic!("{prefix}.{k}"));
        let scale = want.data().iter().fold(0.0f64, |m, v| m.max(v.abs() as f64)).max(1e-30);
        worst = worst.max(max_abs(t.data(), want.data()) / scale);
    }
    worst
}

fn check(name: &str, err: f64, tol: f64) {
    eprintln!("  {name}: {err:.3e} (tolerance {tol:.1e})");
    assert!(err <= tol, "{name}: error {err:.3e} exceeds {tol:.1e}");
}

/// Every fixture check for one case through `CudaModel<T>`.
pub fn golden<T: Act>(dev: &Arc<CudaDevice>, name: &str, tol: &Tol) -> Result<()> {
    eprintln!("golden {name} ({})", std::any::type_name::<T>());
    let c = load(name)?;
    let gm = CudaModel::<T>::new(dev.clone(), &c.model)?;
    let ce = LossFn::CrossEntropy;

    // target logprobs with the adapter; the base model must differ
    let mut ga = CudaAdapter::upload(&gm, &c.adapter)?;
    let out = cu::forward_backward(&gm, Some(&mut ga), &c.data, &ce, true)?;
    let base = cu::forward_backward(&gm, None, &c.data, &ce, true)?;
    let mut worst = 0.0f64;
    let mut moved = 0.0f64;
    for (i, (o, b)) in out.per_datum.iter().zip(&base.per_datum).enumerate() {
        worst = worst.max(max_abs(&o.logprobs, c.exp[&format!("target_logprobs.{i}")].data()));
        moved = moved.max(max_abs(&o.logprobs, &b.logprobs));
    }
    check("target_logprobs", worst, tol.logprob_abs);
    assert!(moved > 1e-3, "the adapter did not change the output ({moved})");

    // last-position logits through prefill
    let v = c.model.config().vocab_size;
    let mut worst = 0.0f64;
    let mut cache = CudaKvCache::new(&gm, c.data.len(), 64)?;
    let seqs: Vec<usize> = (0..c.data.len()).collect();
    let toks: Vec<&[u32]> = c.data.iter().map(|d| d.input_tokens.as_slice()).collect();
    let last = gm.forward_cached(Some(&ga), &mut cache, &seqs, &toks)?;
    for (i, (row, d)) in last.iter().zip(&c.data).enumerate() {
        let want = c.exp[&format!("logits.{i}")].data();
        let n = d.input_tokens.len();
        worst = worst.max(max_abs(row, &want[(n - 1) * v..n * v]));
    }
    check("last_logits", worst, tol.logprob_abs);

    // losses and gradients
    let clip = c.case.get("ppo_clip").and_then(Value::as_f64).unwrap_or(0.2);
    for (lname, lf) in [
        ("cross_entropy", LossFn::CrossEntropy),
        ("importance_sampling", LossFn::ImportanceSampling),
        ("ppo", LossFn::Ppo { clip_low: 1.0 - clip, clip_high: 1.0 + clip }),
    ] {
        let mut ga = CudaAdapter::upload(&gm, &c.adapter)?;
        let out = cu::forward_backward(&gm, Some(&mut ga), &c.data, &lf, false)?;
        let want = c.exp[&format!("loss.{lname}")].data()[0] as f64;
        check(
            &format!("loss.{lname}"),
            (out.loss_sum - want).abs() / want.abs().max(1e-12),
            tol.loss_rel,
        );
        let mut host = c.adapter.clone();
        ga.download_into(dev, &mut host)?;
        check(
            &format!("grad.{lname}"),
            rel_to_max(&host.gradients(), &c.exp, &format!("grad.{lname}")),
            tol.grad_rel,
        );
    }

    // two Adam steps on cross-entropy
    let adam: AdamParams = serde_json::from_value(c.case.get("adam").cloned().unwrap_or_default())?;
    let mut ga = CudaAdapter::upload(&gm, &c.adapter)?;
    for step in 1..=2 {
        cu::forward_backward(&gm, Some(&mut ga), &c.data, &ce, false)?;
        let m = ga.optim_step(dev, &adam)?;
        assert_eq!(m.step, step);
        let mut host = c.adapter.clone();
        ga.download_into(dev, &mut host)?;
        assert_eq!(host.step(), step);
        if let Some(t) = tol.adam_abs {
            let prefix = format!("adam_step{step}");
            let mut worst = 0.0f64;
            for (k, t) in host.tensors() {
                worst = worst.max(max_abs(t.data(), c.exp[&format!("{prefix}.{k}")].data()));
            }
            check(&prefix, worst, t);
        }
    }

    greedy_vs_cpu(&gm, &c, tol)
}

/// Teacher-forced greedy decode: the CPU engine's greedy continuation is fed to both; wherever
/// the CPU's best-vs-second margin exceeds `tol.greedy_margin` the GPU's argmax must be the
/// same token. Also checks `select_tokens` (device greedy, host sampling) against the CPU
/// sampler on the same logits.
fn greedy_vs_cpu<T: Act>(gm: &CudaModel<T>, c: &Case, tol: &Tol) -> Result<()> {
    let g = c.case.get("greedy").context("greedy")?;
    let prompt: Vec<u32> =
        nums(g.get("prompt").context("prompt")?)?.into_iter().map(|x| x as u32).collect();
    for (label, ad) in [("with_adapter", Some(&c.adapter)), ("base_model", None)] {
        let want: Vec<u32> =
            nums(g.get(label).context("greedy tokens")?)?.into_iter().map(|x| x as u32).collect();
        let ga = ad.map(|a| CudaAdapter::upload(gm, a)).transpose()?;
        let mut caches = [twinkle::engine::KvCache::new(&c.model)];
        let mut cache = CudaKvCache::new(gm, 2, 64)?;
        let mut next = prompt.clone();
        let mut checked = 0;
        for (step, &tok) in want.iter().enumerate() {
            let cpu = c.model.forward_cached(ad, &[&next], &mut caches)?.remove(0);
            let gpu = gm.forward_cached(ga.as_ref(), &mut cache, &[1], &[&next])?.remove(0);
            let mut sorted = cpu.clone();
            sorted.sort_by(|a, b| b.total_cmp(a));
            let margin = sorted[0] - sorted[1];
            let best =
                |r: &[f32]| (0..r.len()).fold(0, |b, i| if r[i] > r[b] { i } else { b }) as u32;
            assert_eq!(best(&cpu), tok, "{label} step {step}: CPU engine differs from the fixture");
            if margin > tol.greedy_margin {
                assert_eq!(best(&gpu), tok, "{label} step {step}: GPU argmax (margin {margin})");
                checked += 1;
            }
            // the sampler: same logits -> same token for the same draw, greedy on the device
            let mut ps = vec![SamplingParams::new(1), SamplingParams::new(1)];
            ps[0].temperature = 0.0;
            ps[1].temperature = 0.8;
            ps[1].top_p = 0.9;
            let u = (step as f32 * 0.37).fract();
            let rows = [gpu.clone(), gpu.clone()].concat();
            let dl2 = upload_logits(gm, &rows)?;
            let picks = gm.select_tokens(&dl2, &ps, &[0.0, u])?;
            assert_eq!(picks[0].0, best(&gpu), "{label} step {step}: device greedy");
            let (t1, lp1) = sample_token(&gpu, &ps[1], u)?;
            assert_eq!(picks[1].0, t1, "{label} step {step}: host sampling");
            assert!((picks[0].1 - sample_token(&gpu, &ps[0], 0.0)?.1).abs() < 1e-5);
            assert_eq!(picks[1].1, lp1);
            next = vec![tok];
        }
        eprintln!("  greedy.{label}: {checked}/{} steps compared", want.len());
        assert!(checked > 0, "no greedy step had a clear margin");
    }
    Ok(())
}

fn upload_logits<T: Act>(gm: &CudaModel<T>, v: &[f32]) -> Result<cudarc::driver::CudaSlice<f32>> {
    Ok(gm.device().stream().clone_htod(v)?)
}

/// One training step (cross-entropy forward_backward + AdamW) on the CPU engine and on the GPU
/// from the same adapter: loss, gradients and the updated weights agree within `tol`.
pub fn train_step_vs_cpu<T: Act>(dev: &Arc<CudaDevice>, name: &str, tol: &Tol) -> Result<()> {
    let c = load(name)?;
    let gm = CudaModel::<T>::new(dev.clone(), &c.model)?;
    let ce = LossFn::CrossEntropy;
    let adam = AdamParams { learning_rate: 1e-3, ..AdamParams::default() };
    let mut cpu = c.adapter.clone();
    let cpu_out = twinkle::engine::forward_backward(&c.model, Some(&mut cpu), &c.data, &ce, false)?;
    let cpu_grads = cpu.gradients();
    cpu.optim_step(&adam)?;
    let mut ga = CudaAdapter::upload(&gm, &c.adapter)?;
    let out = cu::forward_backward(&gm, Some(&mut ga), &c.data, &ce, false)?;
    check(
        "train.loss",
        (out.loss_sum - cpu_out.loss_sum).abs() / cpu_out.loss_sum.abs(),
        tol.loss_rel,
    );
    for (a, b) in out.per_datum.iter().zip(&cpu_out.per_datum) {
        check("train.logprobs", max_abs(&a.logprobs, &b.logprobs), tol.logprob_abs);
        assert_eq!(a.elementwise_loss.len(), b.elementwise_loss.len());
    }
    let mut host = c.adapter.clone();
    ga.download_into(dev, &mut host)?;
    let mut exp = BTreeMap::new();
    for (k, t) in &cpu_grads {
        exp.insert(format!("g.{k}"), t.clone());
    }
    check("train.grads", rel_to_max(&host.gradients(), &exp, "g"), tol.grad_rel);
    ga.optim_step(dev, &adam)?;
    let mut after = c.adapter.clone();
    ga.download_into(dev, &mut after)?;
    // the first Adam step moves each weight by ~lr * sign(gradient): compare the drift from the
    // CPU's result where the gradient is clearly non-zero (above 5% of its tensor's largest),
    // since near-zero gradients take a sign from rounding noise
    let (cpu_w, gpu_w) = (cpu.tensors(), after.tensors());
    let (mut sum, mut n) = (0.0f64, 0usize);
    for (k, g) in &cpu_grads {
        let gmax = g.data().iter().fold(0.0f32, |m, x| m.max(x.abs()));
        let (a, b) = (&gpu_w[k], &cpu_w[k]);
        for ((x, y), gi) in a.data().iter().zip(b.data()).zip(g.data()) {
            if gi.abs() > 0.05 * gmax {
                sum += (x - y).abs() as f64;
                n += 1;
            }
        }
    }
    assert!(n > 0, "no clearly non-zero gradients");
    check("train.step_drift/lr", sum / n as f64 / adam.learning_rate, 0.1);
    Ok(())
}
