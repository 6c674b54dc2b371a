//! Batched multi-tenant training on the CPU engine: several adapters' groups in one pass over
//! the base weights (`forward_backward_many`, `forward_many`, and the runtime seam's methods)
//! give each group what it gets alone — logprobs, losses and LoRA gradients — and a group with
//! bad input fails alone.

mod engine_support;

use std::sync::Arc;

use engine_support::{Rng, Spec, fresh_adapter, randomize_b, rel, test_shape, tokens, write_model};
use twinkle::engine::cpu::CpuRuntime;
use twinkle::engine::synth::SynthSpec;
use twinkle::engine::{
    Adapter, Datum, EvalGroup, FwdBwdOutput, LossFn, LossInputs, Model, ModelRuntime, Result,
    Target, TrainGroup, forward, forward_backward, forward_backward_many, forward_many,
};

const VOCAB: usize = 48;

/// Qwen2 with tied embeddings (lm_head LoRA on the embedding matrix), Qwen3 untied with q/k
/// norms and an explicit head_dim.
fn spec(arch: &'static str) -> Spec {
    let qwen3 = arch.starts_with("Qwen3");
    let shape = SynthSpec {
        arch: arch.into(),
        vocab: VOCAB,
        hidden: 32,
        inter: 40,
        kv_heads: if qwen3 { 1 } else { 2 },
        head_dim: if qwen3 { 12 } else { 8 },
        tied: !qwen3,
        ..test_shape()
    };
    Spec { shape, implied_head_dim: !qwen3, new_style: qwen3 }
}

fn model(dir: &std::path::Path, arch: &'static str) -> Arc<Model> {
    write_model(dir, &spec(arch), 42);
    Model::load(dir).unwrap()
}

/// An adapter with random A and B (a fresh one has B = 0, which would hide the LoRA path).
fn adapter(m: &Model, rank: usize, targets: Vec<Target>, seed: u64) -> Adapter {
    let mut a = fresh_adapter(m, rank, 2.0 * rank as f32, targets, seed);
    randomize_b(&mut a, seed + 100, 0.3);
    a
}

fn datum(rng: &mut Rng, n: usize) -> Datum {
    Datum {
        input_tokens: tokens(rng, n, VOCAB),
        inputs: LossInputs {
            target_tokens: tokens(rng, n, VOCAB),
            k: 1,
            weights: Some(
                (0..n).map(|i| if i == 0 { 0.0 } else { 1.0 + i as f32 * 0.1 }).collect(),
            ),
            logprobs: Some(rng.vec(n, 1.0).into_iter().map(|v| v - 3.5).collect()),
            advantages: Some(rng.vec(n, 1.0)),
        },
    }
}

/// Four tenants: different ranks, seeds, target sets, batch shapes and losses.
fn tenants(m: &Model) -> Vec<(Adapter, Vec<Datum>, LossFn)> {
    let attn = vec![Target::Q, Target::K, Target::V, Target::O];
    let all: Vec<Target> = Target::LAYER.into_iter().chain([Target::LmHead]).collect();
    let mlp_head = vec![Target::Gate, Target::Up, Target::Down, Target::LmHead];
    let mut rng = Rng(7);
    let mut batch = |lens: &[usize]| lens.iter().map(|&n| datum(&mut rng, n)).collect::<Vec<_>>();
    vec![
        (adapter(m, 4, all.clone(), 1), batch(&[5, 9]), LossFn::CrossEntropy),
        (adapter(m, 2, attn, 2), batch(&[17]), LossFn::Ppo { clip_low: 0.7, clip_high: 1.3 }),
        (
            adapter(m, 8, mlp_head, 3),
            batch(&[3, 4, 12]),
            LossFn::Ppo { clip_low: 0.9, clip_high: 1.1 },
        ),
        (adapter(m, 3, all, 4), batch(&[7]), LossFn::Dro { beta: 0.05 }),
    ]
}

/// Worst relative error between batched and alone outputs: (logprobs, losses, loss_sum).
fn compare(got: &FwdBwdOutput, want: &FwdBwdOutput) -> [f64; 3] {
    assert_eq!(got.per_datum.len(), want.per_datum.len());
    let mut e = [0.0f64; 3];
    for (g, w) in got.per_datum.iter().zip(&want.per_datum) {
        e[0] = e[0].max(rel(&g.logprobs, &w.logprobs));
        e[1] = e[1].max(rel(&g.elementwise_loss, &w.elementwise_loss));
    }
    e[2] = (got.loss_sum - want.loss_sum).abs() / want.loss_sum.abs().max(1e-30);
    e
}

const TOL: f64 = 1e-5;

#[test]
fn batched_training_matches_each_tenant_alone() {
    for arch in ["Qwen2ForCausalLM", "Qwen3ForCausalLM"] {
        let tmp = tempfile::tempdir().unwrap();
        let m = model(tmp.path(), arch);
        let mut alone = tenants(&m);
        let want: Vec<FwdBwdOutput> = alone
            .iter_mut()
            .map(|(a, d, l)| forward_backward(&m, Some(a), d, l, false).unwrap())
            .collect();
        let mut batched = tenants(&m);
        let mut groups: Vec<TrainGroup<Adapter>> = batched
            .iter_mut()
            .map(|(a, d, l)| TrainGroup { adapter: a, data: d, loss: l })
            .collect();
        let got = forward_backward_many(&m, &mut groups);
        let mut worst = [0.0f64; 4];
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            let e = compare(g.as_ref().unwrap(), w);
            let ge = rel(&batched[i].0.grads_flat(), &alone[i].0.grads_flat());
            assert!(alone[i].0.grads_flat().iter().any(|v| *v != 0.0), "tenant {i}: no gradient");
            for (k, v) in e.into_iter().chain([ge]).enumerate() {
                worst[k] = worst[k].max(v);
            }
        }
        eprintln!(
            "{arch}: max rel err logprobs {:.2e} losses {:.2e} loss_sum {:.2e} grads {:.2e}",
            worst[0], worst[1], worst[2], worst[3]
        );
        assert!(worst.iter().all(|&e| e <= TOL), "{arch}: {worst:?}");
    }
}

#[test]
fn batched_forward_matches_alone_including_the_base_model() {
    let tmp = tempfile::tempdir().unwrap();
    let m = model(tmp.path(), "Qwen2ForCausalLM");
    let ts = tenants(&m);
    let mut groups: Vec<EvalGroup<Adapter>> =
        ts.iter().map(|(a, d, l)| EvalGroup { adapter: Some(a), data: d, loss: l }).collect();
    groups.insert(1, EvalGroup { adapter: None, data: &ts[2].1, loss: &LossFn::CrossEntropy });
    let got = forward_many(&m, &groups);
    for (i, (g, grp)) in got.iter().zip(&groups).enumerate() {
        let want = forward(&m, grp.adapter, grp.data, grp.loss).unwrap();
        let e = compare(g.as_ref().unwrap(), &want);
        assert!(e.iter().all(|&v| v <= TOL), "group {i}: {e:?}");
    }
}

#[test]
fn a_bad_group_fails_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let m = model(tmp.path(), "Qwen2ForCausalLM");
    let mut alone = tenants(&m);
    let mut batched = tenants(&m);
    // Tenant 1's batch names a token outside the vocabulary; tenant 3's PPO has no advantages.
    for ts in [&mut alone, &mut batched] {
        ts[1].1[0].input_tokens[2] = VOCAB as u32;
        ts[3].1[0].inputs.advantages = None;
        ts[3].2 = LossFn::Ppo { clip_low: 0.8, clip_high: 1.2 };
    }
    let want: Vec<Result<FwdBwdOutput>> =
        alone.iter_mut().map(|(a, d, l)| forward_backward(&m, Some(a), d, l, false)).collect();
    let runtime = CpuRuntime::new(m.clone());
    let mut groups: Vec<TrainGroup<Adapter>> =
        batched.iter_mut().map(|(a, d, l)| TrainGroup { adapter: a, data: d, loss: l }).collect();
    let got = runtime.forward_backward_many(&mut groups);
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        match (g, w) {
            (Ok(g), Ok(w)) => {
                assert!(compare(g, w).iter().all(|&v| v <= TOL), "group {i}");
                let ge = rel(&batched[i].0.grads_flat(), &alone[i].0.grads_flat());
                assert!(ge <= TOL, "group {i}: grads {ge}");
            }
            (Err(g), Err(w)) => {
                assert_eq!(g.to_string(), w.to_string());
                assert!(batched[i].0.grads_flat().iter().all(|v| *v == 0.0), "group {i}");
            }
            _ => panic!("group {i}: batched {g:?} vs alone {w:?}"),
        }
    }
    assert!(got[0].is_ok() && got[1].is_err() && got[2].is_ok() && got[3].is_err());
}

#[test]
fn the_bench_ends_with_the_ratios() {
    let tmp = tempfile::tempdir().unwrap();
    let m = twinkle::engine::cpu::CpuRuntime::new(model(tmp.path(), "Qwen2ForCausalLM"));
    let opts = twinkle::bench::MultiTenantOptions {
        tenants: 3,
        seq: 6,
        rank: 2,
        steps: 1,
        decode_tokens: 5,
    };
    let r = twinkle::bench::multi_tenant(&m, &opts).unwrap();
    let ratios = r.ratios_json();
    assert!(ratios["train_aggregate_ratio"].as_f64().is_some_and(|v| v > 0.0), "{ratios}");
    assert!(ratios["decode_aggregate_ratio"].as_f64().is_some_and(|v| v > 0.0), "{ratios}");
    assert_eq!(r.json()["tenants"], 3);
    assert_eq!(r.json()["decode"]["tokens_per_tenant"], 5);
    assert_eq!(r.json()["decode"]["aggregate_ratio"], ratios["decode_aggregate_ratio"]);
    assert_eq!(r.json()["train"]["aggregate_ratio"], ratios["train_aggregate_ratio"]);
    assert!(r.text().contains("train_aggregate_ratio"));
    assert!(r.text().contains("decode_aggregate_ratio"));
    let skipped = twinkle::bench::MultiTenantOptions { decode_tokens: 0, ..opts.clone() };
    assert!(
        twinkle::bench::multi_tenant(&m, &skipped).unwrap().ratios_json()["decode_aggregate_ratio"]
            .is_null()
    );
    let too_long = twinkle::bench::MultiTenantOptions { tenants: 100, seq: 6, ..opts.clone() };
    assert!(twinkle::bench::multi_tenant(&m, &too_long).is_err());
    let too_long = twinkle::bench::MultiTenantOptions { decode_tokens: 100_000, ..opts };
    assert!(twinkle::bench::multi_tenant(&m, &too_long).is_err());
}
