//! Shared helpers of the engine integration tests: random tiny models written in the HF
//! on-disk layout, so the tests also go through the real loader.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::json;
use twinkle::engine::Tensor;
use twinkle::engine::weights::save_f32;

/// Deterministic values in [-1, 1).
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> f32 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    pub fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.next() * scale).collect()
    }
    pub fn below(&mut self, n: u32) -> u32 {
        ((self.next() + 1.0) * 0.5 * n as f32) as u32 % n
    }
}

/// Shape of a random test model.
#[derive(Clone, Debug)]
pub struct Spec {
    pub arch: &'static str,
    pub vocab: usize,
    pub hidden: usize,
    pub inter: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    /// Written as explicit `head_dim` when Some.
    pub head_dim: Option<usize>,
    pub rope_theta: f64,
    pub eps: f64,
    pub tied: bool,
    /// Put rope_theta under `rope_parameters` and the dtype under `dtype` (newer configs).
    pub new_style: bool,
}

impl Spec {
    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden / self.heads)
    }
}

/// Writes `config.json`, `generation_config.json` and `model.safetensors` for `spec`.
pub fn write_model(dir: &Path, spec: &Spec, seed: u64) {
    std::fs::create_dir_all(dir).unwrap();
    let mut cfg = json!({
        "architectures": [spec.arch],
        "vocab_size": spec.vocab,
        "hidden_size": spec.hidden,
        "intermediate_size": spec.inter,
        "num_hidden_layers": spec.layers,
        "num_attention_heads": spec.heads,
        "num_key_value_heads": spec.kv_heads,
        "rms_norm_eps": spec.eps,
        "max_position_embeddings": 512,
        "tie_word_embeddings": spec.tied,
        "eos_token_id": 2,
        "bos_token_id": 1,
    });
    if let Some(hd) = spec.head_dim {
        cfg["head_dim"] = json!(hd);
    }
    if spec.new_style {
        cfg["rope_parameters"] = json!({"rope_type": "default", "rope_theta": spec.rope_theta});
        cfg["dtype"] = json!("float32");
    } else {
        cfg["rope_theta"] = json!(spec.rope_theta);
        cfg["torch_dtype"] = json!("float32");
    }
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    std::fs::write(dir.join("generation_config.json"), json!({"eos_token_id": [2, 3]}).to_string())
        .unwrap();
    save_f32(&dir.join("model.safetensors"), &random_weights(spec, seed)).unwrap();
}

pub fn random_weights(spec: &Spec, seed: u64) -> BTreeMap<String, Tensor> {
    let mut rng = Rng(seed);
    let hd = spec.head_dim();
    let (h, i, v) = (spec.hidden, spec.inter, spec.vocab);
    let (qd, kvd) = (spec.heads * hd, spec.kv_heads * hd);
    let mut w = BTreeMap::new();
    let mut put = |name: String, shape: Vec<usize>, scale: f32, offset: f32, rng: &mut Rng| {
        let n = shape.iter().product();
        let data = rng.vec(n, scale).into_iter().map(|x| x + offset).collect();
        w.insert(name, Tensor::new(shape, data).unwrap());
    };
    put("model.embed_tokens.weight".into(), vec![v, h], 1.0, 0.0, &mut rng);
    let lin_scale = |inp: usize| 1.5 / (inp as f32).sqrt();
    for l in 0..spec.layers {
        let p = format!("model.layers.{l}");
        put(format!("{p}.input_layernorm.weight"), vec![h], 0.2, 1.0, &mut rng);
        put(format!("{p}.post_attention_layernorm.weight"), vec![h], 0.2, 1.0, &mut rng);
        for (n, out, inp) in
            [("q_proj", qd, h), ("k_proj", kvd, h), ("v_proj", kvd, h), ("o_proj", h, qd)]
        {
            put(format!("{p}.self_attn.{n}.weight"), vec![out, inp], lin_scale(inp), 0.0, &mut rng);
        }
        if spec.arch == "Qwen2ForCausalLM" {
            for (n, out) in [("q_proj", qd), ("k_proj", kvd), ("v_proj", kvd)] {
                put(format!("{p}.self_attn.{n}.bias"), vec![out], 0.3, 0.0, &mut rng);
            }
        }
        if spec.arch == "Qwen3ForCausalLM" {
            put(format!("{p}.self_attn.q_norm.weight"), vec![hd], 0.2, 1.0, &mut rng);
            put(format!("{p}.self_attn.k_norm.weight"), vec![hd], 0.2, 1.0, &mut rng);
        }
        for (n, out, inp) in [("gate_proj", i, h), ("up_proj", i, h), ("down_proj", h, i)] {
            put(format!("{p}.mlp.{n}.weight"), vec![out, inp], lin_scale(inp), 0.0, &mut rng);
        }
    }
    put("model.norm.weight".into(), vec![h], 0.2, 1.0, &mut rng);
    if !spec.tied {
        put("lm_head.weight".into(), vec![v, h], lin_scale(h), 0.0, &mut rng);
    }
    w
}

/// Random token ids.
pub fn tokens(rng: &mut Rng, n: usize, vocab: usize) -> Vec<u32> {
    (0..n).map(|_| rng.below(vocab as u32)).collect()
}
