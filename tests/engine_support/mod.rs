//! Shared helpers of the engine integration tests: random tiny models written in the HF
//! on-disk layout, so the tests also go through the real loader.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::json;
use twinkle::engine::synth::{Init, SynthSpec};
use twinkle::engine::weights::save_f32;
use twinkle::engine::{Adapter, Datum, LoraConfig, LossInputs, Model, Target, Tensor};

/// Deterministic values in [-1, 1) for test inputs (the engine's input stream).
pub use twinkle::engine::synth::SynthRng as Rng;

/// A random test model: the generator's shape (so a test model and a benchmark model of one
/// shape and seed are the same model) and how its config.json spells it, since the loader must
/// read every spelling real checkpoints use. Reads as its shape (`spec.vocab`).
#[derive(Clone, Debug)]
pub struct Spec {
    pub shape: SynthSpec,
    /// Leave `head_dim` out of config.json, for the loader to derive as hidden / heads (which
    /// `shape.head_dim` must then equal).
    pub implied_head_dim: bool,
    /// Put rope_theta under `rope_parameters` and the dtype under `dtype` (newer configs).
    pub new_style: bool,
}

impl std::ops::Deref for Spec {
    type Target = SynthSpec;

    fn deref(&self) -> &SynthSpec {
        &self.shape
    }
}

/// What the test shapes share unless they say otherwise (`..test_shape()`): 512 positions,
/// rope θ 10⁴, eps 1e-6, untied, every tensor random ([`Init::Spread`]); the dimensions are
/// a 2-layer Qwen2 of vocab 40 with a head_dim of hidden / heads.
pub fn test_shape() -> SynthSpec {
    SynthSpec {
        arch: "Qwen2ForCausalLM".into(),
        vocab: 40,
        hidden: 16,
        inter: 24,
        layers: 2,
        heads: 4,
        kv_heads: 2,
        head_dim: 4,
        rope_theta: 10000.0,
        eps: 1e-6,
        max_positions: 512,
        tied: false,
        init: Init::Spread,
    }
}

/// Writes `config.json`, `generation_config.json` and `model.safetensors` for `spec`: the
/// generator's files, with config.json respelled as `spec` asks and two EOS ids.
pub fn write_model(dir: &Path, spec: &Spec, seed: u64) {
    std::fs::create_dir_all(dir).unwrap();
    let mut cfg = spec.shape.config_json();
    let keys = cfg.as_object_mut().unwrap();
    if spec.implied_head_dim {
        keys.remove("head_dim");
    }
    if spec.new_style {
        let theta = keys.remove("rope_theta").unwrap();
        keys.insert("rope_parameters".into(), json!({"rope_type": "default", "rope_theta": theta}));
        let dtype = keys.remove("torch_dtype").unwrap();
        keys.insert("dtype".into(), dtype);
    }
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    std::fs::write(dir.join("generation_config.json"), json!({"eos_token_id": [2, 3]}).to_string())
        .unwrap();
    save_f32(&dir.join("model.safetensors"), &random_weights(spec, seed)).unwrap();
}

/// The weights of `spec` under `seed`, from the engine's one random-model generator.
pub fn random_weights(spec: &Spec, seed: u64) -> BTreeMap<String, Tensor> {
    spec.shape.random_weights(seed).unwrap()
}

/// A LoRA of `rank` and `alpha` on `targets`, A initialised from `seed` and B zero (as every fresh
/// adapter's).
pub fn fresh_adapter(
    model: &Model,
    rank: usize,
    alpha: f32,
    targets: Vec<Target>,
    seed: u64,
) -> Adapter {
    Adapter::new(model, &LoraConfig { rank, alpha, targets, seed }).unwrap()
}

/// Fills every B matrix of `ad` with values in ±`scale` from `seed` (a fresh adapter's B is zero,
/// so it would not change the output and its A would get no gradient).
pub fn randomize_b(ad: &mut Adapter, seed: u64, scale: f32) {
    let mut rng = Rng(seed);
    for (_, p) in ad.pairs_mut() {
        let n = p.b.w.len();
        p.b.w.data_mut().copy_from_slice(&rng.vec(n, scale));
    }
}

/// A rank-4, alpha-8 LoRA on every layer target and the LM head (init `seed`), with B random
/// (see [`randomize_b`]).
pub fn full_lora(model: &Model, seed: u64, b_seed: u64, b_scale: f32) -> Adapter {
    let mut targets = Target::LAYER.to_vec();
    targets.push(Target::LmHead);
    let mut ad = fresh_adapter(model, 4, 8.0, targets, seed);
    randomize_b(&mut ad, b_seed, b_scale);
    ad
}

/// Random token ids.
pub fn tokens(rng: &mut Rng, n: usize, vocab: usize) -> Vec<u32> {
    rng.tokens(n, vocab)
}

/// Random datums of `lens` tokens: random targets, weights in [0.5, 1.5) and, with `rl`, sampler
/// logprobs and advantages too (what the policy losses read), all drawn from one seeded stream.
pub fn random_batch(seed: u64, lens: &[usize], vocab: usize, rl: bool) -> Vec<Datum> {
    let mut rng = Rng(seed);
    lens.iter()
        .map(|&n| {
            let input_tokens = rng.tokens(n, vocab);
            let target_tokens = rng.tokens(n, vocab);
            let weights = Some((0..n).map(|_| 0.5 + rng.next_f32().abs()).collect());
            let (logprobs, advantages) = if rl {
                let lp = (0..n).map(|_| -2.0 - rng.next_f32().abs()).collect();
                (Some(lp), Some(rng.vec(n, 1.0)))
            } else {
                (None, None)
            };
            let inputs = LossInputs { target_tokens, k: 1, weights, logprobs, advantages };
            Datum { input_tokens, inputs }
        })
        .collect()
}

/// A tiny generated Qwen3 (2 layers, vocab 61, GQA) in a temporary directory, for the data
/// parallel tests.
pub fn tiny_model() -> (tempfile::TempDir, std::sync::Arc<Model>) {
    let spec = SynthSpec {
        arch: "Qwen3ForCausalLM".into(),
        vocab: 61,
        hidden: 32,
        inter: 48,
        layers: 2,
        heads: 4,
        kv_heads: 2,
        head_dim: 8,
        rope_theta: 10000.0,
        eps: 1e-6,
        max_positions: 128,
        tied: false,
        init: Init::Spread,
    };
    let tmp = tempfile::tempdir().unwrap();
    spec.write(tmp.path(), 11).unwrap();
    let model = Model::load(tmp.path()).unwrap();
    (tmp, model)
}

/// Largest |a − b| relative to the largest |b| of the quantity (0 when equal).
pub fn rel(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0.0f64, |s, v| s.max(v.abs() as f64)).max(1e-30);
    a.iter().zip(b).map(|(x, y)| (*x as f64 - *y as f64).abs()).fold(0.0, f64::max) / scale
}
