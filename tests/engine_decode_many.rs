//! Batched multi-tenant decoding on the CPU runtime: `forward_cached_many` feeds several
//! requests (each its own adapter, or the base model, and its own cache) through one pass and
//! gives every sequence exactly the logits it gets alone, step after step; a bad group fails alone and
//! leaves its cache as it was.

mod engine_support;

use std::sync::Arc;

use engine_support::{Rng, Spec, fresh_adapter, randomize_b, test_shape, tokens, write_model};
use twinkle::engine::cpu::{CpuCache, CpuRuntime};
use twinkle::engine::synth::SynthSpec;
use twinkle::engine::{Adapter, CachedGroup, Model, ModelRuntime, Target};

const VOCAB: usize = 48;

fn model(dir: &std::path::Path) -> Arc<Model> {
    let shape = SynthSpec {
        arch: "Qwen3ForCausalLM".into(),
        vocab: VOCAB,
        hidden: 32,
        inter: 40,
        head_dim: 8,
        ..test_shape()
    };
    let spec = Spec { shape, implied_head_dim: false, new_style: true };
    write_model(dir, &spec, 5);
    Model::load(dir).unwrap()
}

fn adapter(m: &Model, rank: usize, targets: Vec<Target>, seed: u64) -> Adapter {
    let mut a = fresh_adapter(m, rank, 2.0 * rank as f32, targets, seed);
    randomize_b(&mut a, seed + 100, 0.3);
    a
}

/// A request: its adapter (index into the list, `None` the base), prompts per slot.
struct Req {
    adapter: Option<usize>,
    prompts: Vec<Vec<u32>>,
}

fn requests() -> Vec<Req> {
    let mut rng = Rng(11);
    let mut p = |n: usize| tokens(&mut rng, n, VOCAB);
    vec![
        Req { adapter: Some(0), prompts: vec![p(5), p(9)] },
        Req { adapter: None, prompts: vec![p(3)] },
        // 70 tokens: a prompt longer than the engine's row-by-row limit (64) takes the
        // `gemm` block path in the same pass as the others.
        Req { adapter: Some(1), prompts: vec![p(12), p(1), p(70), p(4)] },
        Req { adapter: Some(2), prompts: vec![p(7)] },
    ]
}

fn max_rel(a: &[Vec<f32>], b: &[Vec<f32>]) -> f64 {
    assert_eq!(a.len(), b.len());
    let mut worst = 0.0f64;
    for (x, y) in a.iter().zip(b) {
        let scale = y.iter().fold(0.0f64, |m, v| m.max(v.abs() as f64)).max(1e-6);
        for (p, q) in x.iter().zip(y) {
            worst = worst.max((*p as f64 - *q as f64).abs() / scale);
        }
    }
    worst
}

/// Runs prefill then `steps` one-token steps for every request, either all requests in one
/// `forward_cached_many` per step or each alone; the next token of a sequence is the argmax
/// of its logits so that both runs feed the same tokens as long as the logits agree.
fn run(rt: &CpuRuntime, adapters: &[Adapter], reqs: &[Req], together: bool) -> Vec<Vec<Vec<f32>>> {
    let mut caches: Vec<CpuCache> =
        reqs.iter().map(|r| rt.new_cache(r.prompts.len(), 96).unwrap()).collect();
    let mut inputs: Vec<Vec<Vec<u32>>> = reqs.iter().map(|r| r.prompts.clone()).collect();
    let mut all = Vec::new();
    for _step in 0..6 {
        let slots: Vec<Vec<usize>> = reqs.iter().map(|r| (0..r.prompts.len()).collect()).collect();
        let toks: Vec<Vec<&[u32]>> =
            inputs.iter().map(|i| i.iter().map(Vec::as_slice).collect()).collect();
        let logits: Vec<Vec<Vec<f32>>> = if together {
            let mut groups: Vec<CachedGroup<'_, Adapter, CpuCache>> = caches
                .iter_mut()
                .zip(reqs)
                .zip(&slots)
                .zip(&toks)
                .map(|(((cache, r), slots), toks)| CachedGroup {
                    adapter: r.adapter.map(|i| &adapters[i]),
                    cache,
                    slots,
                    tokens: toks,
                })
                .collect();
            rt.forward_cached_many(&mut groups).into_iter().map(|r| r.unwrap()).collect()
        } else {
            caches
                .iter_mut()
                .zip(reqs)
                .zip(slots.iter().zip(&toks))
                .map(|((cache, r), (slots, toks))| {
                    rt.forward_cached(r.adapter.map(|i| &adapters[i]), cache, slots, toks).unwrap()
                })
                .collect()
        };
        for (inp, l) in inputs.iter_mut().zip(&logits) {
            for (seq, row) in inp.iter_mut().zip(l) {
                let best = (0..row.len()).max_by(|&a, &b| row[a].total_cmp(&row[b])).unwrap();
                *seq = vec![best as u32];
            }
        }
        all.extend(logits);
    }
    all
}

#[test]
fn batched_decode_matches_each_request_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let m = model(tmp.path());
    let all: Vec<Target> = Target::LAYER.into_iter().chain([Target::LmHead]).collect();
    let adapters = vec![
        adapter(&m, 4, all, 1),
        adapter(&m, 2, vec![Target::Q, Target::V], 2),
        adapter(&m, 8, vec![Target::Gate, Target::Up, Target::Down, Target::LmHead], 3),
    ];
    let rt = CpuRuntime::new(m);
    let reqs = requests();
    let together = run(&rt, &adapters, &reqs, true);
    let alone = run(&rt, &adapters, &reqs, false);
    let err = max_rel(
        &together.iter().flatten().cloned().collect::<Vec<_>>(),
        &alone.iter().flatten().cloned().collect::<Vec<_>>(),
    );
    // Bit for bit: the base products of decode rows sum in a fixed order (engine/cpu/rowdot.rs),
    // so a sequence's logits do not depend on the other rows of its pass.
    assert_eq!(err, 0.0, "batched decode differs from alone by {err:e} (relative)");
    // The adapters matter: the same prompt through another adapter gives other logits.
    let swapped: Vec<Req> = requests()
        .into_iter()
        .map(|r| Req { adapter: r.adapter.map(|i| (i + 1) % 3), ..r })
        .collect();
    let other = run(&rt, &adapters, &swapped, true);
    assert!(max_rel(&other[0], &together[0]) > 1e-3, "adapters did not change the logits");
}

#[test]
fn a_bad_group_fails_alone_and_keeps_its_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let m = model(tmp.path());
    let a = adapter(&m, 4, vec![Target::Q, Target::O], 1);
    let rt = CpuRuntime::new(m);
    let mut good = rt.new_cache(1, 16).unwrap();
    let mut bad = rt.new_cache(2, 16).unwrap();
    let p = [1u32, 2, 3];
    let out_of_vocab = [VOCAB as u32];
    let expected =
        rt.forward_cached(Some(&a), &mut rt.new_cache(1, 16).unwrap(), &[0], &[&p]).unwrap();
    let bad_tokens: [&[u32]; 2] = [&p, &out_of_vocab];
    let mut groups = [
        CachedGroup { adapter: None, cache: &mut bad, slots: &[0, 1], tokens: &bad_tokens },
        CachedGroup { adapter: Some(&a), cache: &mut good, slots: &[0], tokens: &[&p] },
    ];
    let out = rt.forward_cached_many(&mut groups);
    let err = out[0].as_ref().unwrap_err().to_string();
    assert!(err.contains("vocabulary"), "{err}");
    assert_eq!(out[1].as_ref().unwrap(), &expected);
    // The failed group's slots are still empty: it can run again from the start.
    let retry = rt.forward_cached(None, &mut bad, &[0], &[&p]);
    assert!(retry.is_ok(), "{retry:?}");
    let too_long = [0u32; 20];
    let mut groups =
        [CachedGroup { adapter: None, cache: &mut good, slots: &[0], tokens: &[&too_long] }];
    let err = rt.forward_cached_many(&mut groups).remove(0).unwrap_err().to_string();
    assert!(err.contains("exceed"), "{err}");
}
