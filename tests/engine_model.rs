//! Whole-model checks on random tiny models of several shapes (no PyTorch here): LoRA gradients
//! against central finite differences through the entire network, packing independence,
//! vocabulary chunking, KV-cache decoding, and config/loader variants.

mod engine_support;

use std::collections::BTreeMap;
use std::path::Path;

use engine_support::{Rng, Spec, fresh_adapter, randomize_b, test_shape, tokens, write_model};
use std::sync::Arc;
use twinkle::engine::synth::SynthSpec;
use twinkle::engine::{
    Adapter, Datum, EngineError, FwdBwdOutput, LossFn, LossInputs, Model, Target, forward_backward,
};

fn llama_gqa() -> Spec {
    let shape = SynthSpec {
        arch: "LlamaForCausalLM".into(),
        vocab: 97,
        hidden: 40,
        inter: 56,
        layers: 3,
        heads: 6,
        head_dim: 8,
        rope_theta: 500000.0,
        eps: 1e-5,
        ..test_shape()
    };
    Spec { shape, implied_head_dim: false, new_style: true }
}

fn qwen3_untied() -> Spec {
    let shape = SynthSpec {
        arch: "Qwen3ForCausalLM".into(),
        vocab: 64,
        hidden: 24,
        inter: 40,
        heads: 3,
        kv_heads: 1,
        head_dim: 12,
        rope_theta: 1000.0,
        ..test_shape()
    };
    Spec { shape, implied_head_dim: false, new_style: false }
}

fn qwen2_mha_tied() -> Spec {
    let shape = SynthSpec {
        vocab: 50,
        hidden: 32,
        inter: 48,
        kv_heads: 4,
        head_dim: 8,
        tied: true,
        ..test_shape()
    };
    Spec { shape, implied_head_dim: true, new_style: false }
}

/// [`qwen2_mha_tied`] cut to one narrow layer, for the tests that need many rows or columns.
fn qwen2_tied_one_layer() -> Spec {
    let tied = qwen2_mha_tied();
    let shape = SynthSpec {
        hidden: 8,
        inter: 12,
        layers: 1,
        heads: 2,
        kv_heads: 1,
        head_dim: 4,
        ..tied.shape
    };
    Spec { shape, ..tied }
}

fn load(dir: &Path, spec: &Spec, seed: u64) -> std::sync::Arc<Model> {
    write_model(dir, spec, seed);
    Model::load(dir).unwrap()
}

/// What a whole-model test starts from, all drawn from `seed`: a random `spec` model (weights
/// from `seed`) in a temp dir, a LoRA of `rank` and `alpha` on `targets` (init from `seed + 1`)
/// whose B is random too, so every A gradient is non-trivial, and the test's input stream
/// (`seed + 2`).
fn model_with_adapter(
    spec: &Spec,
    seed: u64,
    rank: usize,
    alpha: f32,
    targets: Vec<Target>,
) -> (tempfile::TempDir, Arc<Model>, Adapter, Rng) {
    let tmp = tempfile::tempdir().unwrap();
    let model = load(tmp.path(), spec, seed);
    let mut ad = fresh_adapter(&model, rank, alpha, targets, seed + 1);
    randomize_b(&mut ad, (seed + 1) ^ 0xabc, 0.3);
    (tmp, model, ad, Rng(seed + 2))
}

fn batch(rng: &mut Rng, lens: &[usize], vocab: usize) -> Vec<Datum> {
    lens.iter()
        .map(|&n| Datum {
            input_tokens: tokens(rng, n, vocab),
            inputs: LossInputs {
                target_tokens: tokens(rng, n, vocab),
                k: 1,
                weights: Some(
                    (0..n).map(|i| if i == 0 { 0.0 } else { rng.next_f32() * 1.5 }).collect(),
                ),
                logprobs: None,
                advantages: Some(rng.vec(n, 1.0)),
            },
        })
        .collect()
}

/// Sampler logprobs off the model's own by ±0.03 or ±0.3, so PPO ratios (clip 0.9–1.1) lie
/// clearly inside or clearly outside the clip range, away from its kinks.
fn with_sampler_logprobs(
    model: &Model,
    ad: &Adapter,
    mut data: Vec<Datum>,
    rng: &mut Rng,
) -> Vec<Datum> {
    let out =
        forward_backward(model, Some(&mut ad.clone()), &data, &LossFn::CrossEntropy, true).unwrap();
    for (d, o) in data.iter_mut().zip(&out.per_datum) {
        d.inputs.logprobs = Some(
            o.logprobs
                .iter()
                .map(|lp| {
                    let r = rng.next_f32();
                    lp + r.signum() * if r.abs() < 0.5 { 0.03 } else { 0.3 }
                })
                .collect(),
        );
    }
    data
}

fn loss_at(model: &Model, ad: &Adapter, data: &[Datum], loss: &LossFn) -> f64 {
    forward_backward(model, Some(&mut ad.clone()), data, loss, true).unwrap().loss_sum
}

/// For every LoRA tensor: directional derivative along a random unit direction by extrapolated
/// central differences vs the analytic gradient's projection; returns the worst relative error.
fn check_gradients(model: &Model, ad: &Adapter, data: &[Datum], loss: &LossFn, seed: u64) -> f64 {
    let mut trained = ad.clone();
    forward_backward(model, Some(&mut trained), data, loss, false).unwrap();
    let grads = trained.gradients();
    let mut rng = Rng(seed);
    let h = 1e-2f32;
    let mut worst = 0.0f64;
    let tol = 2e-3;
    for (key, g) in &grads {
        let gnorm = g.data().iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
        assert!(gnorm > 1e-4, "{key}: gradient is (near) zero, the check would be vacuous");
        // Two directions: a random one, and the analytic gradient itself (which catches a
        // gradient that is off by a scale factor).
        let random = rng.vec(g.len(), 1.0);
        for mut d in [random, g.data().to_vec()] {
            let norm = d.iter().map(|x| x * x).sum::<f32>().sqrt();
            d.iter_mut().for_each(|x| *x /= norm);
            let analytic: f64 = g.data().iter().zip(&d).map(|(a, b)| *a as f64 * *b as f64).sum();
            let shifted = |step: f32| {
                let mut a = ad.clone();
                for (k, p) in a.pairs_mut() {
                    for (s, t) in p.named_mut() {
                        if key == &format!("{k}.{s}.weight") {
                            let w = t.w.data_mut().iter_mut();
                            w.zip(&d).for_each(|(w, dv)| *w += step * dv);
                        }
                    }
                }
                loss_at(model, &a, data, loss)
            };
            // Central differences at h and h/2 combined (Richardson): the h² truncation term
            // cancels, so the check does not hinge on how curved the loss happens to be along
            // this direction for these random weights.
            let central = |h: f32| (shifted(h) - shifted(-h)) / (2.0 * h as f64);
            let numeric = (4.0 * central(h / 2.0) - central(h)) / 3.0;
            let err = (numeric - analytic).abs() / gnorm;
            worst = worst.max(err);
            assert!(
                err < tol,
                "{}: {key}: numeric {numeric} analytic {analytic} (|g| {gnorm})",
                loss.name()
            );
        }
    }
    worst
}

#[test]
fn lora_gradients_match_finite_differences_llama_gqa_subset() {
    let spec = llama_gqa();
    let targets = vec![Target::K, Target::O, Target::Up, Target::LmHead];
    let (_tmp, model, ad, mut rng) = model_with_adapter(&spec, 1, 3, 5.0, targets);
    let data = batch(&mut rng, &[5, 9, 3], spec.vocab);
    let data = with_sampler_logprobs(&model, &ad, data, &mut rng);
    for loss in [
        LossFn::CrossEntropy,
        LossFn::ImportanceSampling,
        LossFn::Ppo { clip_low: 0.9, clip_high: 1.1 },
        LossFn::Dro { beta: 0.3 },
    ] {
        let worst = check_gradients(&model, &ad, &data, &loss, 4);
        println!("{}: worst relative error {worst:.2e}", loss.name());
    }
}

#[test]
fn lora_gradients_match_finite_differences_qwen3_all_targets() {
    let spec = qwen3_untied();
    let all = Target::LAYER.into_iter().chain([Target::LmHead]).collect();
    let (_tmp, model, ad, mut rng) = model_with_adapter(&spec, 5, 2, 4.0, all);
    let data = batch(&mut rng, &[6, 4], spec.vocab);
    let worst = check_gradients(&model, &ad, &data, &LossFn::CrossEntropy, 8);
    println!("worst relative error {worst:.2e}");
}

#[test]
fn lora_gradients_match_finite_differences_qwen2_tied_topk_targets() {
    let spec = qwen2_mha_tied();
    let targets = vec![Target::Q, Target::V, Target::Gate, Target::Down];
    let (_tmp, model, ad, mut rng) = model_with_adapter(&spec, 9, 4, 8.0, targets);
    // [N, K] targets: K = 3 weighted targets per position (distillation-style).
    let data: Vec<Datum> = [4usize, 7]
        .iter()
        .map(|&n| Datum {
            input_tokens: tokens(&mut rng, n, spec.vocab),
            inputs: LossInputs {
                target_tokens: tokens(&mut rng, n * 3, spec.vocab),
                k: 3,
                weights: Some(rng.vec(n * 3, 1.0)),
                ..Default::default()
            },
        })
        .collect();
    check_gradients(&model, &ad, &data, &LossFn::CrossEntropy, 12);
}

/// A packing check's run: a rank-2, alpha-2 LoRA model of `spec` on `targets` (see
/// [`model_with_adapter`]) and a random batch of `lens` through one packed cross-entropy
/// `forward_backward` and through one call per datum, each on its own copy of the adapter.
struct PackedRun {
    _tmp: tempfile::TempDir,
    model: Arc<Model>,
    ad: Adapter,
    data: Vec<Datum>,
    /// The packed call's output and its adapter.
    packed: (FwdBwdOutput, Adapter),
    /// The per-datum outputs and their adapter.
    apart: (Vec<FwdBwdOutput>, Adapter),
}

fn packed_run(spec: &Spec, seed: u64, targets: Vec<Target>, lens: &[usize]) -> PackedRun {
    let (_tmp, model, ad, mut rng) = model_with_adapter(spec, seed, 2, 2.0, targets);
    let data = batch(&mut rng, lens, spec.vocab);
    let ce = LossFn::CrossEntropy;
    let mut packed = ad.clone();
    let out = forward_backward(&model, Some(&mut packed), &data, &ce, false).unwrap();
    let mut apart = ad.clone();
    let each = data
        .iter()
        .map(|d| {
            forward_backward(&model, Some(&mut apart), std::slice::from_ref(d), &ce, false).unwrap()
        })
        .collect();
    PackedRun { _tmp, model, ad, data, packed: (out, packed), apart: (each, apart) }
}

/// Per gradient of `a`: its name, the largest difference from `b`'s, and its largest magnitude.
fn gradient_gaps(a: &Adapter, b: &Adapter) -> Vec<(String, f32, f32)> {
    let (g1, g2) = (a.gradients(), b.gradients());
    g1.iter()
        .map(|(k, t)| {
            let scale = t.data().iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let err =
                t.data().iter().zip(g2[k].data()).fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
            (k.clone(), err, scale)
        })
        .collect()
}

#[test]
fn packed_batch_equals_separate_calls() {
    let run = packed_run(&llama_gqa(), 13, vec![Target::Q, Target::Down], &[7, 3, 11]);
    let ((out, together), (each, apart)) = (&run.packed, &run.apart);
    let mut sum = 0.0;
    for (i, o) in each.iter().enumerate() {
        sum += o.loss_sum;
        for (a, b) in o.per_datum[0].logprobs.iter().zip(&out.per_datum[i].logprobs) {
            assert!((a - b).abs() < 1e-5, "datum {i}: {a} vs {b}");
        }
    }
    assert!((sum - out.loss_sum).abs() < 1e-4 * sum.abs().max(1.0));
    // Gradients accumulated over three calls equal those of one packed call.
    for (k, err, scale) in gradient_gaps(together, apart) {
        assert!(err <= 1e-4 * scale.max(1e-3), "{k}: {err} vs scale {scale}");
    }
}

/// log_softmax from fully materialised logits (the unchunked reference), in f64.
fn reference_logprobs(
    model: &Model,
    ad: Option<&Adapter>,
    input: &[u32],
    targets: &[u32],
) -> Vec<f64> {
    let v = model.config().vocab_size;
    let logits = model.logits(ad, input).unwrap();
    logits
        .chunks(v)
        .zip(targets)
        .map(|(row, &t)| {
            let m = row.iter().fold(f64::NEG_INFINITY, |m, x| m.max(*x as f64));
            let z: f64 = row.iter().map(|x| (*x as f64 - m).exp()).sum();
            row[t as usize] as f64 - m - z.ln()
        })
        .collect()
}

#[test]
fn vocabulary_chunking_matches_full_logits_and_gradients() {
    // More than one 8192-column chunk, with targets on both sides of the boundary.
    let narrow = qwen2_tied_one_layer();
    let spec = Spec { shape: SynthSpec { vocab: 8192 + 77, ..narrow.shape }, ..narrow };
    let (_tmp, model, ad, _) =
        model_with_adapter(&spec, 16, 2, 2.0, vec![Target::LmHead, Target::V]);
    let input = vec![5u32, 8191, 8192, 9, 8200];
    let targets = vec![8191u32, 8192, 3, 8268, 8190];
    let d = Datum {
        input_tokens: input.clone(),
        inputs: LossInputs {
            target_tokens: targets.clone(),
            k: 1,
            weights: Some(vec![1.0, 0.5, 1.0, -0.25, 1.0]),
            ..Default::default()
        },
    };
    let out = forward_backward(
        &model,
        Some(&mut ad.clone()),
        std::slice::from_ref(&d),
        &LossFn::CrossEntropy,
        true,
    )
    .unwrap();
    let want = reference_logprobs(&model, Some(&ad), &input, &targets);
    for (a, b) in out.per_datum[0].logprobs.iter().zip(&want) {
        assert!((*a as f64 - b).abs() < 1e-4, "{a} vs {b}");
    }
    check_gradients(&model, &ad, &[d], &LossFn::CrossEntropy, 18);
}

#[test]
fn kv_cache_decoding_matches_full_forward() {
    let spec = qwen3_untied();
    let targets = vec![Target::Q, Target::K, Target::V, Target::LmHead];
    let (_tmp, model, ad, mut rng) = model_with_adapter(&spec, 19, 2, 2.0, targets);
    let v = spec.vocab;
    let seqs = [tokens(&mut rng, 9, v), tokens(&mut rng, 6, v)];
    for adapter in [None, Some(&ad)] {
        let full: Vec<Vec<f32>> = seqs.iter().map(|s| model.logits(adapter, s).unwrap()).collect();
        let mut caches =
            vec![twinkle::engine::KvCache::new(&model), twinkle::engine::KvCache::new(&model)];
        // Prefill different prompt lengths together, then decode one token at a time.
        let (p0, p1) = (4usize, 2usize);
        let first =
            model.forward_cached(adapter, &[&seqs[0][..p0], &seqs[1][..p1]], &mut caches).unwrap();
        let close =
            |got: &[f32], want: &[f32]| got.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-4);
        assert!(close(&first[0], &full[0][(p0 - 1) * v..p0 * v]));
        assert!(close(&first[1], &full[1][(p1 - 1) * v..p1 * v]));
        for step in 0..4 {
            let (i0, i1) = (p0 + step, p1 + step);
            let out = model
                .forward_cached(adapter, &[&seqs[0][i0..=i0], &seqs[1][i1..=i1]], &mut caches)
                .unwrap();
            assert!(close(&out[0], &full[0][i0 * v..(i0 + 1) * v]), "seq 0 step {step}");
            assert!(close(&out[1], &full[1][i1 * v..(i1 + 1) * v]), "seq 1 step {step}");
        }
        assert_eq!(caches[0].len(), p0 + 4);
    }
}

#[test]
fn config_variants_and_sharded_weights_load_identically() {
    let tmp = tempfile::tempdir().unwrap();
    let mut spec = llama_gqa();
    spec.new_style = false;
    let a = load(&tmp.path().join("a"), &spec, 22);
    spec.new_style = true;
    let b = load(&tmp.path().join("b"), &spec, 22);
    assert_eq!(a.config().rope_theta, 500000.0);
    assert_eq!(a.config(), b.config());
    assert_eq!(a.config().head_dim, 8);
    assert_eq!(a.config().eos_token_ids, vec![2, 3]);
    // Sharded: split the same tensors over two files with an index.
    let dir = tmp.path().join("c");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(tmp.path().join("a/config.json"), dir.join("config.json")).unwrap();
    let all = engine_support::random_weights(&spec, 22);
    let (mut s1, mut s2, mut map) = (BTreeMap::new(), BTreeMap::new(), serde_json::Map::new());
    for (i, (k, t)) in all.into_iter().enumerate() {
        let file = if i % 2 == 0 {
            "model-00001-of-00002.safetensors"
        } else {
            "model-00002-of-00002.safetensors"
        };
        map.insert(k.clone(), serde_json::json!(file));
        if i % 2 == 0 {
            s1.insert(k, t)
        } else {
            s2.insert(k, t)
        };
    }
    twinkle::engine::weights::save_f32(&dir.join("model-00001-of-00002.safetensors"), &s1).unwrap();
    twinkle::engine::weights::save_f32(&dir.join("model-00002-of-00002.safetensors"), &s2).unwrap();
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        serde_json::json!({"weight_map": map}).to_string(),
    )
    .unwrap();
    let c = Model::load(&dir).unwrap();
    let toks = [1u32, 5, 9, 33];
    assert_eq!(a.logits(None, &toks).unwrap(), c.logits(None, &toks).unwrap());
    assert_eq!(a.logits(None, &toks).unwrap(), b.logits(None, &toks).unwrap());
}

#[test]
fn loader_errors_name_the_problem() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = qwen2_mha_tied();
    write_model(tmp.path(), &spec, 23);
    let cfg_path = tmp.path().join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["architectures"] = serde_json::json!(["GPT2LMHeadModel"]);
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let err = Model::load(tmp.path()).unwrap_err();
    assert!(
        matches!(&err, EngineError::UnsupportedArchitecture(a) if a == "GPT2LMHeadModel"),
        "{err}"
    );
    // Qwen3 needs q_norm/k_norm, which a Qwen2 checkpoint lacks.
    cfg["architectures"] = serde_json::json!(["Qwen3ForCausalLM"]);
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let err = Model::load(tmp.path()).unwrap_err();
    assert!(err.to_string().contains("model.layers.0.self_attn.q_norm.weight"), "{err}");
    // Untied config without lm_head.weight.
    cfg["architectures"] = serde_json::json!(["Qwen2ForCausalLM"]);
    cfg["tie_word_embeddings"] = serde_json::json!(false);
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let err = Model::load(tmp.path()).unwrap_err();
    assert!(
        matches!(&err, EngineError::MissingTensor { name } if name == "lm_head.weight"),
        "{err}"
    );
}

#[test]
fn head_row_blocks_match_single_block_results() {
    // 1200 packed rows span two 1024-row blocks of the output head; three 400-row calls fit in
    // one block each. Logprobs and accumulated gradients must agree.
    let targets = vec![Target::LmHead, Target::Q];
    let run = packed_run(&qwen2_tied_one_layer(), 24, targets, &[400, 400, 400]);
    let ((out, packed), (each, apart)) = (&run.packed, &run.apart);
    for ((i, o), d) in each.iter().enumerate().zip(&run.data) {
        let want =
            reference_logprobs(&run.model, Some(&run.ad), &d.input_tokens, &d.inputs.target_tokens);
        for ((a, b), c) in o.per_datum[0].logprobs.iter().zip(&out.per_datum[i].logprobs).zip(&want)
        {
            assert!((a - b).abs() < 1e-5 && (*b as f64 - c).abs() < 1e-4, "datum {i}: {a} {b} {c}");
        }
    }
    for (k, err, scale) in gradient_gaps(packed, apart) {
        assert!(scale > 0.0 && err <= 1e-4 * scale, "{k}: {err} vs scale {scale}");
    }
}

#[test]
fn sequence_logprobs_and_shared_forward_match_the_reference() {
    let spec = llama_gqa();
    let (_tmp, model, ad, mut rng) =
        model_with_adapter(&spec, 27, 2, 2.0, vec![Target::V, Target::LmHead]);
    let seq = tokens(&mut rng, 10, spec.vocab);
    for adapter in [None, Some(&ad)] {
        let got = model.sequence_logprobs(adapter, &seq).unwrap();
        let want = reference_logprobs(&model, adapter, &seq[..9], &seq[1..]);
        assert_eq!(got.len(), 9);
        for (a, b) in got.iter().zip(&want) {
            assert!((*a as f64 - b).abs() < 1e-4, "{a} vs {b}");
        }
    }
    assert!(model.sequence_logprobs(None, &seq[..1]).unwrap().is_empty());
    let data = batch(&mut rng, &[4, 6], spec.vocab);
    let shared = twinkle::engine::forward(&model, Some(&ad), &data, &LossFn::CrossEntropy).unwrap();
    let mut owned = ad.clone();
    let fb =
        forward_backward(&model, Some(&mut owned), &data, &LossFn::CrossEntropy, true).unwrap();
    assert_eq!(shared, fb);
    assert_eq!(shared.metrics()["loss:sum"], shared.loss_sum);
}
