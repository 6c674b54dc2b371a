//! The one random-model generator: random-weight models in the Hugging Face on-disk layout
//! (config.json, generation_config.json, model.safetensors), so benchmarks and tests go through
//! the real loader without downloads. The CPU benchmark, the GPU benchmark (which builds each
//! tensor on the host and uploads it), the `generate://` quickstart models and the test helpers
//! all draw their weights here, so one seed and one shape give the same weights everywhere.
//!
//! Every tensor has its own counter-based stream: value `i` of tensor `name` under `seed` is
//! Philox draw `i` of stream `fnv1a64(name)` keyed by `seed` (the layout of [`super::rng`]), then
//! mapped to the tensor's [`Dist`]. A tensor can therefore be produced alone, in any order and
//! in parallel chunks, and the whole model equals the tensor-by-tensor one bit for bit.

use std::collections::BTreeMap;
use std::path::Path;

use rayon::prelude::*;
use serde_json::json;

use super::error::{EngineError, Result};
use super::rng::{philox4x32_10, u32_to_unit_f32};
use super::tensor::Tensor;
use super::weights::{save_bf16, save_f32};

/// Deterministic values in [-1, 1) for test and benchmark *inputs* (token ids, adapter values):
/// a 64-bit LCG, sequential on purpose so a test reads as one stream. Model weights come from
/// [`SynthSpec::random_weights`] / [`tensor_values`], never from this.
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

/// How a shape's weights are distributed (the stream is the same for both: see the module docs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Init {
    /// Benchmarks and tests: every tensor random, norms included (1 ± 0.2), biases ± 0.3,
    /// linears ± 1.5/√fan_in, embeddings ± 0.1, so a kernel that dropped or misread any tensor
    /// changes the output.
    #[default]
    Spread,
    /// The `generate://` quickstart models, scaled to train like a real checkpoint (memorising a
    /// few pairs with LoRA + AdamW at lr 1e-2 in ~30 steps): embeddings of unit std (residual
    /// norm ≈ √hidden, as after a real model's embedding), each linear of std 1/√fan_in (keeps
    /// that norm through the layers), lm_head of std 0.02 (the first distribution is near
    /// uniform), norms exactly 1 and biases 0. Std 0.02 everywhere with tied embeddings, tried
    /// first, left a residual of norm 0.16 that the adapters' first updates swamped.
    Trainable,
}

/// One tensor's distribution: uniform in `offset ± bound` (the constant `offset` when `bound`
/// is 0).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Dist {
    pub bound: f32,
    pub offset: f32,
}

impl Dist {
    fn uniform(bound: f32) -> Self {
        Dist { bound, offset: 0.0 }
    }

    /// Uniform with standard deviation `std` (bound = std·√3).
    fn uniform_std(std: f32) -> Self {
        Dist::uniform(std * 3f32.sqrt())
    }

    fn around(offset: f32, bound: f32) -> Self {
        Dist { bound, offset }
    }

    fn constant(value: f32) -> Self {
        Dist { bound: 0.0, offset: value }
    }

    /// The value of one 32-bit draw.
    pub fn sample(&self, word: u32) -> f32 {
        (2.0 * u32_to_unit_f32(word) - 1.0) * self.bound + self.offset
    }
}

/// One named tensor of a random model: its HF name, shape and distribution.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorPlan {
    pub name: String,
    pub shape: Vec<usize>,
    pub dist: Dist,
}

impl TensorPlan {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// The Philox stream of tensor `name`: FNV-1a 64 of its bytes (stable across builds and
/// platforms, unlike the standard library's hashers).
pub fn tensor_stream(name: &str) -> u64 {
    name.bytes()
        .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

/// Values per parallel chunk (a multiple of 4: one Philox block gives four values).
const CHUNK: usize = 1 << 16;

/// Fills `out` with the values of `plan` under `seed`, converted by `conv` (the GPU benchmark
/// stores bf16 straight away, so a 7B shape never has an f32 host copy). `out.len()` must be
/// `plan.numel()`; value `i` depends only on `(seed, plan.name, i)`.
pub fn fill_tensor<T: Send>(
    seed: u64,
    plan: &TensorPlan,
    out: &mut [T],
    conv: impl Fn(f32) -> T + Sync,
) {
    debug_assert_eq!(out.len(), plan.numel());
    let stream = tensor_stream(&plan.name);
    let key = [seed as u32, (seed >> 32) as u32];
    let (s0, s1) = (stream as u32, (stream >> 32) as u32);
    out.par_chunks_mut(CHUNK).enumerate().for_each(|(ci, chunk)| {
        let first_block = (ci * CHUNK / 4) as u64;
        for (bi, quad) in chunk.chunks_mut(4).enumerate() {
            let block = first_block + bi as u64;
            let words = philox4x32_10([block as u32, (block >> 32) as u32, s0, s1], key);
            for (x, w) in quad.iter_mut().zip(words) {
                *x = conv(plan.dist.sample(w));
            }
        }
    });
}

/// The f32 values of `plan` under `seed`.
pub fn tensor_values(seed: u64, plan: &TensorPlan) -> Vec<f32> {
    let mut v = vec![0.0; plan.numel()];
    fill_tensor(seed, plan, &mut v, |x| x);
    v
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
    pub init: Init,
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
            init: Init::Spread,
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

    /// Every tensor of this shape with its HF name, shape and distribution (see [`Init`]).
    pub fn tensors(&self) -> Vec<TensorPlan> {
        let (h, i, v, hd) = (self.hidden, self.inter, self.vocab, self.head_dim);
        let (qd, kvd) = (self.heads * hd, self.kv_heads * hd);
        let spread = self.init == Init::Spread;
        let norm = if spread { Dist::around(1.0, 0.2) } else { Dist::constant(1.0) };
        let bias = if spread { Dist::uniform(0.3) } else { Dist::constant(0.0) };
        let lin = |inp: usize| {
            if spread {
                Dist::uniform(1.5 / (inp as f32).sqrt())
            } else {
                Dist::uniform_std(1.0 / (inp as f32).sqrt())
            }
        };
        let embed = if spread { Dist::uniform(0.1) } else { Dist::uniform_std(1.0) };
        let head = if spread { lin(h) } else { Dist::uniform_std(0.02) };
        let mut out = Vec::new();
        let mut put = |name: String, shape: Vec<usize>, dist: Dist| {
            out.push(TensorPlan { name, shape, dist });
        };
        put("model.embed_tokens.weight".into(), vec![v, h], embed);
        for l in 0..self.layers {
            let p = format!("model.layers.{l}");
            put(format!("{p}.input_layernorm.weight"), vec![h], norm);
            put(format!("{p}.post_attention_layernorm.weight"), vec![h], norm);
            for (n, out, inp) in
                [("q_proj", qd, h), ("k_proj", kvd, h), ("v_proj", kvd, h), ("o_proj", h, qd)]
            {
                put(format!("{p}.self_attn.{n}.weight"), vec![out, inp], lin(inp));
            }
            if self.arch == "Qwen2ForCausalLM" {
                for (n, out) in [("q_proj", qd), ("k_proj", kvd), ("v_proj", kvd)] {
                    put(format!("{p}.self_attn.{n}.bias"), vec![out], bias);
                }
            }
            if self.arch == "Qwen3ForCausalLM" {
                put(format!("{p}.self_attn.q_norm.weight"), vec![hd], norm);
                put(format!("{p}.self_attn.k_norm.weight"), vec![hd], norm);
            }
            for (n, out, inp) in [("gate_proj", i, h), ("up_proj", i, h), ("down_proj", h, i)] {
                put(format!("{p}.mlp.{n}.weight"), vec![out, inp], lin(inp));
            }
        }
        put("model.norm.weight".into(), vec![h], norm);
        if !self.tied {
            put("lm_head.weight".into(), vec![v, h], head);
        }
        out
    }

    /// The plan of tensor `name`, if this shape has one.
    pub fn tensor(&self, name: &str) -> Option<TensorPlan> {
        self.tensors().into_iter().find(|t| t.name == name)
    }

    /// Random weights with HF names, each drawn from its own stream (see the module docs).
    pub fn random_weights(&self, seed: u64) -> Result<BTreeMap<String, Tensor>> {
        let mut w = BTreeMap::new();
        for plan in self.tensors() {
            let data = tensor_values(seed, &plan);
            w.insert(plan.name, Tensor::new(plan.shape, data)?);
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
    use crate::engine::rng::philox_u32;

    fn small(arch: &str, init: Init) -> SynthSpec {
        let spec = SynthSpec {
            arch: arch.into(),
            vocab: 50,
            layers: 2,
            tied: false,
            init,
            ..SynthSpec::qwen2_5_0_5b()
        };
        SynthSpec { hidden: 64, inter: 96, heads: 4, kv_heads: 2, head_dim: 16, ..spec }
    }

    #[test]
    fn value_i_is_draw_i_of_the_tensors_stream_across_chunks() {
        let plan = TensorPlan {
            name: "model.embed_tokens.weight".into(),
            shape: vec![3, CHUNK + 5],
            dist: Dist::around(0.5, 0.25),
        };
        let seed = 0xfeed_f00d_1234_5678;
        let v = tensor_values(seed, &plan);
        let stream = tensor_stream(&plan.name);
        for i in [0, 1, 3, 4, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK + 7, v.len() - 1] {
            assert_eq!(
                v[i].to_bits(),
                plan.dist.sample(philox_u32(seed, stream, i as u64)).to_bits(),
                "{i}"
            );
        }
        assert!(v.iter().all(|x| (0.25..0.75).contains(x)));
    }

    #[test]
    fn a_tensor_alone_equals_the_same_tensor_of_the_whole_model() {
        for arch in ["Qwen2ForCausalLM", "Qwen3ForCausalLM"] {
            for init in [Init::Spread, Init::Trainable] {
                let spec = small(arch, init);
                let all = spec.random_weights(9).unwrap();
                assert_eq!(all.len(), spec.tensors().len());
                for name in ["model.layers.1.mlp.down_proj.weight", "lm_head.weight"] {
                    let alone = tensor_values(9, &spec.tensor(name).unwrap());
                    assert_eq!(all[name].data(), &alone[..], "{arch} {name}");
                }
            }
        }
    }

    #[test]
    fn streams_differ_by_tensor_and_seed() {
        let spec = small("Qwen2ForCausalLM", Init::Spread);
        let (a, b) = (spec.random_weights(1).unwrap(), spec.random_weights(2).unwrap());
        let q = "model.layers.0.self_attn.q_proj.weight";
        let k = "model.layers.0.self_attn.k_proj.weight";
        assert_ne!(a[q].data(), b[q].data());
        assert_ne!(a[q].data()[..8], a[k].data()[..8]);
        assert_ne!(tensor_stream(q), tensor_stream(k));
    }

    #[test]
    fn trainable_norms_are_one_and_biases_zero() {
        let w = small("Qwen2ForCausalLM", Init::Trainable).random_weights(4).unwrap();
        assert!(w["model.norm.weight"].data().iter().all(|&x| x == 1.0));
        assert!(w["model.layers.0.self_attn.q_proj.bias"].data().iter().all(|&x| x == 0.0));
        let head_bound = 0.02 * 3f32.sqrt();
        assert!(w["lm_head.weight"].data().iter().all(|x| x.abs() <= head_bound));
        let spread = small("Qwen2ForCausalLM", Init::Spread).random_weights(4).unwrap();
        assert!(spread["model.norm.weight"].data().iter().any(|&x| x != 1.0));
    }

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
