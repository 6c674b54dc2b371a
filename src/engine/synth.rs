//! Random-weight models in the Hugging Face on-disk layout (config.json, generation_config.json,
//! model.safetensors), so benchmarks and tests go through the real loader without downloads.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::json;

use super::error::{EngineError, Result};
use super::tensor::Tensor;
use super::weights::{save_bf16, save_f32};

/// Deterministic values in [-1, 1) (a 64-bit LCG; quality is irrelevant for random weights).
#[derive(Debug, Clone)]
pub struct SynthRng(pub u64);

impl SynthRng {
    pub fn next_f32(&mut self) -> f32 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    pub fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.next_f32() * scale).collect()
    }

    /// A value in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u32) -> u32 {
        ((self.next_f32() + 1.0) * 0.5 * n as f32) as u32 % n.max(1)
    }

    /// `n` random token ids below `vocab`.
    pub fn tokens(&mut self, n: usize, vocab: usize) -> Vec<u32> {
        (0..n).map(|_| self.below(vocab as u32)).collect()
    }
}

/// Shape of a random model.
#[derive(Clone, Debug, PartialEq)]
pub struct SynthSpec {
    /// `Qwen2ForCausalLM` (q/k/v biases), `Qwen3ForCausalLM` (q/k norms) or `LlamaForCausalLM`.
    pub arch: String,
    pub vocab: usize,
    pub hidden: usize,
    pub inter: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub rope_theta: f64,
    pub eps: f64,
    pub max_positions: usize,
    pub tied: bool,
}

impl SynthSpec {
    /// Qwen2.5-0.5B's shape (config.json of Qwen/Qwen2.5-0.5B-Instruct).
    pub fn qwen2_5_0_5b() -> Self {
        SynthSpec {
            arch: "Qwen2ForCausalLM".into(),
            vocab: 151_936,
            hidden: 896,
            inter: 4864,
            layers: 24,
            heads: 14,
            kv_heads: 2,
            head_dim: 64,
            rope_theta: 1_000_000.0,
            eps: 1e-6,
            max_positions: 32_768,
            tied: true,
        }
    }

    /// Looks a named shape up (`qwen2.5-0.5b`).
    pub fn named(name: &str) -> Option<Self> {
        match name.to_ascii_lowercase().as_str() {
            "qwen2.5-0.5b" | "qwen2.5-0.5b-instruct" => Some(Self::qwen2_5_0_5b()),
            _ => None,
        }
    }

    /// The HF `config.json` for this shape (weights stored as f32).
    pub fn config_json(&self) -> serde_json::Value {
        self.config_json_as("float32")
    }

    /// The HF `config.json` naming `torch_dtype`.
    fn config_json_as(&self, torch_dtype: &str) -> serde_json::Value {
        json!({
            "architectures": [self.arch],
            "vocab_size": self.vocab,
            "hidden_size": self.hidden,
            "intermediate_size": self.inter,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_positions,
            "tie_word_embeddings": self.tied,
            "torch_dtype": torch_dtype,
            "eos_token_id": 2,
            "bos_token_id": 1,
        })
    }

    /// Random weights with HF names: linears uniform in ±1.5/√in, norms around 1, embeddings
    /// uniform in ±`embed_scale`.
    pub fn random_weights(&self, seed: u64) -> Result<BTreeMap<String, Tensor>> {
        let mut rng = SynthRng(seed);
        let (h, i, v, hd) = (self.hidden, self.inter, self.vocab, self.head_dim);
        let (qd, kvd) = (self.heads * hd, self.kv_heads * hd);
        let mut w = BTreeMap::new();
        let mut put = |name: String, shape: Vec<usize>, scale: f32, offset: f32| -> Result<()> {
            let n = shape.iter().product();
            let data = rng.vec(n, scale).into_iter().map(|x| x + offset).collect();
            w.insert(name, Tensor::new(shape, data)?);
            Ok(())
        };
        let lin = |inp: usize| 1.5 / (inp as f32).sqrt();
        put("model.embed_tokens.weight".into(), vec![v, h], 0.1, 0.0)?;
        for l in 0..self.layers {
            let p = format!("model.layers.{l}");
            put(format!("{p}.input_layernorm.weight"), vec![h], 0.2, 1.0)?;
            put(format!("{p}.post_attention_layernorm.weight"), vec![h], 0.2, 1.0)?;
            for (n, out, inp) in
                [("q_proj", qd, h), ("k_proj", kvd, h), ("v_proj", kvd, h), ("o_proj", h, qd)]
            {
                put(format!("{p}.self_attn.{n}.weight"), vec![out, inp], lin(inp), 0.0)?;
            }
            if self.arch == "Qwen2ForCausalLM" {
                for (n, out) in [("q_proj", qd), ("k_proj", kvd), ("v_proj", kvd)] {
                    put(format!("{p}.self_attn.{n}.bias"), vec![out], 0.3, 0.0)?;
                }
            }
            if self.arch == "Qwen3ForCausalLM" {
                put(format!("{p}.self_attn.q_norm.weight"), vec![hd], 0.2, 1.0)?;
                put(format!("{p}.self_attn.k_norm.weight"), vec![hd], 0.2, 1.0)?;
            }
            for (n, out, inp) in [("gate_proj", i, h), ("up_proj", i, h), ("down_proj", h, i)] {
                put(format!("{p}.mlp.{n}.weight"), vec![out, inp], lin(inp), 0.0)?;
            }
        }
        put("model.norm.weight".into(), vec![h], 0.2, 1.0)?;
        if !self.tied {
            put("lm_head.weight".into(), vec![v, h], lin(h), 0.0)?;
        }
        Ok(w)
    }

    /// Writes `config.json`, `generation_config.json` and `model.safetensors` into `dir`.
    pub fn write(&self, dir: &Path, seed: u64) -> Result<()> {
        self.write_as(dir, seed, false)
    }

    /// Like [`SynthSpec::write`], with every tensor rounded to bf16 when `bf16` (a bf16
    /// checkpoint, as most published models are).
    pub fn write_as(&self, dir: &Path, seed: u64, bf16: bool) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| EngineError::io(dir, e))?;
        let write = |name: &str, text: String| {
            let p = dir.join(name);
            std::fs::write(&p, text).map_err(|e| EngineError::io(&p, e))
        };
        let dtype = if bf16 { "bfloat16" } else { "float32" };
        write("config.json", self.config_json_as(dtype).to_string())?;
        write("generation_config.json", json!({"eos_token_id": [2]}).to_string())?;
        let weights = self.random_weights(seed)?;
        let path = dir.join("model.safetensors");
        if bf16 { save_bf16(&path, &weights) } else { save_f32(&path, &weights) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Model;

    #[test]
    fn a_written_model_loads_with_the_requested_shape() {
        let dir = std::env::temp_dir().join(format!("twinkle-synth-{}", std::process::id()));
        let spec = SynthSpec { vocab: 50, layers: 2, ..SynthSpec::qwen2_5_0_5b() };
        let spec = SynthSpec { hidden: 64, inter: 96, heads: 4, kv_heads: 2, head_dim: 16, ..spec };
        spec.write(&dir, 7).unwrap();
        let model = Model::load(&dir);
        std::fs::remove_dir_all(&dir).unwrap();
        let model = model.unwrap();
        let c = model.config();
        assert_eq!(
            (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_layers),
            (50, 64, 96, 2)
        );
        assert_eq!((c.num_heads, c.num_kv_heads, c.head_dim), (4, 2, 16));
        assert!(c.qkv_bias && c.tie_word_embeddings);
    }
}
