//! The engine's public API as the server uses it: input validation (typed user errors),
//! gradient accumulation, forward-only, AdamW against hand-derived steps, LoRA initialisation,
//! PEFT and training-state round trips.

mod engine_support;

use std::sync::Arc;

use engine_support::{Rng, Spec, fresh_adapter, test_shape, tokens, write_model};
use twinkle::engine::synth::SynthSpec;
use twinkle::engine::{
    AdamParams, Adapter, Datum, EngineError, LoraConfig, LoraTargets, LossFn, LossInputs, Model,
    Target, forward_backward,
};

fn spec() -> Spec {
    Spec { shape: test_shape(), implied_head_dim: true, new_style: false }
}

/// The test model, loaded from `model/` of a fresh temp dir (which tests may use for more).
fn model() -> (tempfile::TempDir, Arc<Model>) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    write_model(&dir, &spec(), 42);
    let m = Model::load(&dir).unwrap();
    (tmp, m)
}

fn sft(rng: &mut Rng, n: usize) -> Datum {
    Datum {
        input_tokens: tokens(rng, n, 40),
        inputs: LossInputs {
            target_tokens: tokens(rng, n, 40),
            k: 1,
            weights: Some((0..n).map(|i| if i < 2 { 0.0 } else { 1.0 }).collect()),
            logprobs: Some(vec![-3.0; n]),
            advantages: Some(rng.vec(n, 1.0)),
        },
    }
}

fn all_targets() -> Vec<Target> {
    Target::LAYER.into_iter().chain([Target::LmHead]).collect()
}

#[test]
fn invalid_inputs_are_typed_user_errors() {
    let (tmp, m) = model();
    let mut rng = Rng(1);
    let good = sft(&mut rng, 5);
    let ce = LossFn::CrossEntropy;
    let run =
        |data: &[Datum], loss: &LossFn| forward_backward(&m, None, data, loss, true).unwrap_err();
    let cases: Vec<(Vec<Datum>, LossFn, &str)> = vec![
        (vec![], ce, "no datums"),
        (vec![Datum { input_tokens: vec![], ..good.clone() }], ce, "empty"),
        (
            vec![Datum { input_tokens: vec![1, 2, 40, 3, 4], ..good.clone() }],
            ce,
            "40 is not below the vocabulary size 40",
        ),
        (
            vec![Datum {
                inputs: LossInputs { target_tokens: vec![1, 2], ..good.inputs.clone() },
                ..good.clone()
            }],
            ce,
            "target_tokens has 2 values, expected 5",
        ),
        (
            vec![Datum {
                inputs: LossInputs { weights: Some(vec![1.0]), ..good.inputs.clone() },
                ..good.clone()
            }],
            ce,
            "weights has 1 values",
        ),
        (
            vec![Datum {
                inputs: LossInputs {
                    advantages: Some(vec![0.0, f32::NAN, 0.0, 0.0, 0.0]),
                    ..good.inputs.clone()
                },
                ..good.clone()
            }],
            LossFn::ImportanceSampling,
            "advantages[1] is not a finite number",
        ),
        (
            vec![Datum {
                inputs: LossInputs { advantages: None, ..good.inputs.clone() },
                ..good.clone()
            }],
            LossFn::ImportanceSampling,
            "needs loss_fn_inputs `advantages`",
        ),
        (
            vec![Datum {
                inputs: LossInputs {
                    target_tokens: vec![1; 10],
                    k: 2,
                    weights: None,
                    ..good.inputs.clone()
                },
                ..good.clone()
            }],
            LossFn::Ppo { clip_low: 0.8, clip_high: 1.2 },
            "needs target_tokens of shape [N]",
        ),
    ];
    for (data, loss, want) in cases {
        let err = run(&data, &loss);
        assert!(err.is_user_error(), "{err}");
        assert!(err.to_string().contains(want), "`{err}` should mention `{want}`");
    }
    // An adapter made for a model of another shape is refused, not run.
    let other_dir = tmp.path().join("other");
    write_model(&other_dir, &Spec { shape: SynthSpec { inter: 20, ..test_shape() }, ..spec() }, 1);
    let other = Model::load(&other_dir).unwrap();
    let mut foreign = fresh_adapter(&other, 2, 2.0, all_targets(), 1);
    let err = forward_backward(&m, Some(&mut foreign), std::slice::from_ref(&good), &ce, false)
        .unwrap_err();
    assert!(matches!(err, EngineError::Adapter(_)), "{err}");
    assert!(m.logits(Some(&foreign), &[1, 2]).is_err());
    let err = LossFn::from_name("kl_magic", &Default::default()).unwrap_err();
    assert!(matches!(&err, EngineError::UnknownLoss(n) if n == "kl_magic") && err.is_user_error());
}

#[test]
fn loss_config_defaults_and_overrides() {
    let none = Default::default();
    assert_eq!(
        LossFn::from_name("ppo", &none).unwrap(),
        LossFn::Ppo { clip_low: 0.8, clip_high: 1.2 }
    );
    assert_eq!(
        LossFn::from_name("cispo", &none).unwrap(),
        LossFn::Cispo { clip_low: 0.0, clip_high: 4.0 }
    );
    assert_eq!(LossFn::from_name("dro", &none).unwrap(), LossFn::Dro { beta: 0.1 });
    let cfg =
        [("clip_low_threshold".to_string(), 0.5), ("clip_high_threshold".to_string(), 2.0)].into();
    assert_eq!(
        LossFn::from_name("ppo", &cfg).unwrap(),
        LossFn::Ppo { clip_low: 0.5, clip_high: 2.0 }
    );
}

#[test]
fn outputs_follow_the_loss_formulas() {
    let (_tmp, m) = model();
    let mut rng = Rng(2);
    let data = vec![sft(&mut rng, 6), sft(&mut rng, 3)];
    let ad = fresh_adapter(&m, 2, 4.0, all_targets(), 1);
    let ce =
        forward_backward(&m, Some(&mut ad.clone()), &data, &LossFn::CrossEntropy, true).unwrap();
    let mut sum = 0.0f64;
    for (d, o) in data.iter().zip(&ce.per_datum) {
        assert_eq!(o.logprobs.len(), d.inputs.target_tokens.len());
        for ((lp, w), el) in
            o.logprobs.iter().zip(d.inputs.weights.as_ref().unwrap()).zip(&o.elementwise_loss)
        {
            assert!(*lp < 0.0);
            assert!((el - (-w * lp)).abs() < 1e-6);
            sum += (-w * lp) as f64;
        }
    }
    assert!((ce.loss_sum - sum).abs() < 1e-4);
    // CISPO from the same logprobs: −Σ clamp(exp(lp − slp), 0, 4)·A·lp.
    let cispo =
        forward_backward(&m, None, &data, &LossFn::Cispo { clip_low: 0.0, clip_high: 4.0 }, true)
            .unwrap();
    let mut want = 0.0f64;
    for (d, o) in data.iter().zip(&cispo.per_datum) {
        for (i, lp) in o.logprobs.iter().enumerate() {
            let r = ((lp - d.inputs.logprobs.as_ref().unwrap()[i]) as f64).exp().clamp(0.0, 4.0);
            want -= r * d.inputs.advantages.as_ref().unwrap()[i] as f64 * *lp as f64;
        }
    }
    assert!((cispo.loss_sum - want).abs() < 1e-4 * want.abs().max(1.0));
    // A fresh adapter (B = 0) leaves the base model's outputs unchanged.
    let base = forward_backward(&m, None, &data, &LossFn::CrossEntropy, true).unwrap();
    assert_eq!(base.per_datum, ce.per_datum);
}

#[test]
fn gradients_accumulate_until_the_optimizer_step() {
    let (_tmp, m) = model();
    let mut rng = Rng(3);
    let data = vec![sft(&mut rng, 5), sft(&mut rng, 4)];
    let mut ad = fresh_adapter(&m, 2, 2.0, vec![Target::Q, Target::V, Target::LmHead], 5);
    forward_backward(&m, Some(&mut ad), &data, &LossFn::CrossEntropy, true).unwrap();
    assert!(
        ad.gradients().values().all(|g| g.data().iter().all(|v| *v == 0.0)),
        "forward_only must not accumulate"
    );
    forward_backward(&m, Some(&mut ad), &data, &LossFn::CrossEntropy, false).unwrap();
    let once = ad.gradients();
    assert!(once.values().any(|g| g.data().iter().any(|v| *v != 0.0)));
    forward_backward(&m, Some(&mut ad), &data, &LossFn::CrossEntropy, false).unwrap();
    for (k, g2) in ad.gradients() {
        for (a, b) in g2.data().iter().zip(once[&k].data()) {
            assert!((a - 2.0 * b).abs() <= 1e-6 * b.abs().max(1.0), "{k}");
        }
    }
    let metrics = ad.optim_step(&AdamParams { learning_rate: 1e-3, ..Default::default() }).unwrap();
    assert_eq!(metrics.step, 1);
    assert!(metrics.grad_norm > 0.0);
    assert!(
        ad.gradients().values().all(|g| g.data().iter().all(|v| *v == 0.0)),
        "step must zero the grads"
    );
}

/// Sets every gradient of the adapter to `f(index)` and returns a copy of the weights.
fn set_grads(ad: &mut Adapter, f: &dyn Fn(usize) -> f32) {
    for (_, p) in ad.pairs_mut() {
        p.a.g.iter_mut().enumerate().for_each(|(i, g)| *g = f(i));
        p.b.g.iter_mut().enumerate().for_each(|(i, g)| *g = f(i + 1));
    }
}

#[test]
fn adamw_matches_hand_derived_steps() {
    let (_tmp, m) = model();
    let fresh = || fresh_adapter(&m, 1, 1.0, vec![Target::O], 3);
    let mut ad = fresh();
    let w0 = ad.tensors();
    // Step 1: m̂ = g, v̂ = g², so the update is lr·g/(|g|+eps) after decay p·(1 − lr·wd).
    let (lr, wd, eps) = (0.1, 0.5, 1.0);
    set_grads(&mut ad, &|i| if i.is_multiple_of(2) { 3.0 } else { -1.0 });
    let p = AdamParams {
        learning_rate: lr,
        beta1: 0.9,
        beta2: 0.99,
        eps,
        weight_decay: wd,
        grad_clip_norm: 0.0,
    };
    ad.optim_step(&p).unwrap();
    let step = |g: f64| lr * g / (g.abs() + eps);
    for (k, t) in ad.tensors() {
        let is_b = k.contains("lora_B");
        for (i, (w, w0)) in t.data().iter().zip(w0[&k].data()).enumerate() {
            let g = if (i + is_b as usize).is_multiple_of(2) { 3.0 } else { -1.0 };
            let want = *w0 as f64 * (1.0 - lr * wd) - step(g);
            assert!((*w as f64 - want).abs() < 1e-6, "{k}[{i}]: {w} vs {want}");
        }
    }
    // Global-norm clipping: all grads 2.0 over n entries → norm 2√n, clipped to 1.
    let mut ad = fresh();
    let n: usize = ad.tensors().values().map(|t| t.len()).sum();
    set_grads(&mut ad, &|_| 2.0);
    let clip = AdamParams { weight_decay: 0.0, grad_clip_norm: 1.0, ..p };
    let metrics = ad.optim_step(&clip).unwrap();
    assert!((metrics.grad_norm - 2.0 * (n as f64).sqrt()).abs() < 1e-6);
    let g = 2.0 / (2.0 * (n as f64).sqrt());
    for (k, t) in ad.tensors() {
        for (w, w0) in t.data().iter().zip(w0[&k].data()) {
            assert!((*w as f64 - (*w0 as f64 - step(g))).abs() < 1e-5, "{k}");
        }
    }
    let err = ad.optim_step(&AdamParams { beta1: 1.5, ..p }).unwrap_err();
    assert!(err.is_user_error());
}

#[test]
fn lora_init_is_seeded_and_peft_shaped() {
    let (_tmp, m) = model();
    let cfg =
        LoraConfig::from_tinker(4, 8.0, LoraTargets { train_mlp: false, ..LoraTargets::ALL }, 7);
    assert_eq!(cfg.targets, vec![Target::Q, Target::K, Target::V, Target::O, Target::LmHead]);
    let a = Adapter::new(&m, &cfg).unwrap();
    let b = Adapter::new(&m, &cfg).unwrap();
    let c = Adapter::new(&m, &LoraConfig { seed: 8, ..cfg.clone() }).unwrap();
    assert_eq!(a.tensors(), b.tensors());
    assert_ne!(a.tensors(), c.tensors());
    assert_eq!(a.scaling(), 2.0);
    let t = a.tensors();
    assert_eq!(t.len(), 2 * (4 * 2 + 1));
    let qa = &t["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"];
    assert_eq!(qa.shape(), &[4, 16]);
    let bound = 1.0 / 16f32.sqrt();
    assert!(qa.data().iter().all(|v| v.abs() <= bound));
    assert!(qa.data().iter().any(|v| v.abs() > bound * 0.5), "A should spread over its range");
    let hb = &t["base_model.model.lm_head.lora_B.weight"];
    assert_eq!(hb.shape(), &[40, 4]);
    assert!(hb.data().iter().all(|v| *v == 0.0));
    assert!(Adapter::new(&m, &LoraConfig { rank: 0, ..cfg }).unwrap_err().is_user_error());
}

#[test]
fn peft_and_training_state_round_trip() {
    let (tmp, m) = model();
    let mut rng = Rng(9);
    let data = vec![sft(&mut rng, 6)];
    let mut ad = fresh_adapter(&m, 3, 6.0, vec![Target::K, Target::Up, Target::Down], 2);
    ad.set_base_model("Qwen/Qwen2.5-0.5B");
    let p = AdamParams { learning_rate: 1e-2, ..Default::default() };
    forward_backward(&m, Some(&mut ad), &data, &LossFn::CrossEntropy, false).unwrap();
    ad.optim_step(&p).unwrap();

    let dir = tmp.path().join("ckpt");
    ad.save_state(&dir).unwrap();
    let cfg_json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg_json["peft_type"], "LORA");
    assert_eq!(cfg_json["task_type"], "CAUSAL_LM");
    assert_eq!(cfg_json["r"], 3);
    assert_eq!(cfg_json["lora_alpha"], 6.0);
    assert_eq!(cfg_json["base_model_name_or_path"], "Qwen/Qwen2.5-0.5B");
    assert_eq!(cfg_json["target_modules"], serde_json::json!(["k_proj", "up_proj", "down_proj"]));

    let weights_only = Adapter::load_peft(&dir, &m).unwrap();
    assert_eq!(weights_only.tensors(), ad.tensors());
    assert_eq!(weights_only.step(), 0);
    let mut restored = Adapter::load_state(&dir, &m).unwrap();
    assert_eq!(restored.step(), 1);
    // One more identical step from the original and from the restored state.
    for a in [&mut ad, &mut restored] {
        forward_backward(&m, Some(a), &data, &LossFn::CrossEntropy, false).unwrap();
        a.optim_step(&p).unwrap();
    }
    assert_eq!(restored.tensors(), ad.tensors());
    // A missing tensor is named.
    let mut only = ad.tensors();
    only.remove("base_model.model.model.layers.0.mlp.up_proj.lora_B.weight");
    twinkle::engine::weights::save_f32(&dir.join("adapter_model.safetensors"), &only).unwrap();
    let err = Adapter::load_peft(&dir, &m).unwrap_err();
    assert!(err.to_string().contains("layers.0.mlp.up_proj.lora_B.weight"), "{err}");
}

#[test]
fn repeated_runs_are_bitwise_identical() {
    let (_tmp, m) = model();
    let mut rng = Rng(4);
    let data = vec![sft(&mut rng, 7), sft(&mut rng, 12), sft(&mut rng, 2)];
    let cfg = LoraConfig { rank: 2, alpha: 2.0, targets: all_targets(), seed: 9 };
    let run = || {
        let mut ad = Adapter::new(&m, &cfg).unwrap();
        let out =
            forward_backward(&m, Some(&mut ad), &data, &LossFn::ImportanceSampling, false).unwrap();
        ad.optim_step(&AdamParams { learning_rate: 1e-2, ..Default::default() }).unwrap();
        let out2 =
            forward_backward(&m, Some(&mut ad), &data, &LossFn::CrossEntropy, false).unwrap();
        (out, out2, ad.gradients(), ad.tensors())
    };
    assert_eq!(run(), run());
}
