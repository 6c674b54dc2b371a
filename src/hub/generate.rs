//! Small deterministic random models for quickstarts and tests: a Qwen3-shaped decoder with the
//! real vendored Qwen3 tokenizer (`assets/tokenizer/qwen3`, compiled into the binary), written as
//! a Hugging Face directory (`config.json`, `generation_config.json`, `model.safetensors`,
//! `tokenizer.json`, `tokenizer_config.json`).
//!
//! `generate://qwen3-tiny` names the preset [`GenOptions::qwen3_tiny`]. The weights depend only on
//! the options (seeded splitmix64), so every machine generates the same model. Writing goes to a
//! temporary sibling directory that is renamed into place, so a reader never sees half a model
//! and two processes generating at once both end up with one complete directory.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::json;

use super::HubError;
use crate::engine::Tensor;
use crate::engine::weights::save_f32;

/// Preset names accepted by `generate://`.
pub const PRESETS: [&str; 1] = ["qwen3-tiny"];

/// Bumped whenever the generator's output changes, so stale caches are not reused.
const GENERATOR_VERSION: u32 = 2;

const TOKENIZER_JSON: &[u8] = include_bytes!("../../assets/tokenizer/qwen3/tokenizer.json");
const TOKENIZER_CONFIG: &[u8] =
    include_bytes!("../../assets/tokenizer/qwen3/tokenizer_config.json");

/// Qwen's padded embedding size (the tokenizer has 151,669 entries).
pub const QWEN3_VOCAB: usize = 151_936;

/// Shape and seed of a generated model.
#[derive(Debug, Clone, PartialEq)]
pub struct GenOptions {
    /// Only `qwen3` today.
    pub arch: String,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub intermediate: usize,
    pub vocab: usize,
    pub max_position: usize,
    pub seed: u64,
}

impl GenOptions {
    /// hidden 64, 2 layers, 4 query heads sharing 2 KV heads of 16, MLP 128, untied lm_head.
    pub fn qwen3_tiny() -> Self {
        GenOptions {
            arch: "qwen3".into(),
            hidden: 64,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            head_dim: 16,
            intermediate: 128,
            vocab: QWEN3_VOCAB,
            max_position: 4096,
            seed: 0x7769_6e6b_6c65,
        }
    }

    fn validate(&self) -> Result<(), String> {
        if self.arch != "qwen3" {
            return Err(format!("arch `{}` is not supported (only qwen3)", self.arch));
        }
        let dims = [
            self.hidden,
            self.layers,
            self.heads,
            self.kv_heads,
            self.head_dim,
            self.intermediate,
            self.max_position,
        ];
        if dims.contains(&0) {
            return Err("every size must be > 0".into());
        }
        if !self.heads.is_multiple_of(self.kv_heads) {
            return Err(format!(
                "heads {} must be a multiple of kv_heads {}",
                self.heads, self.kv_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(format!("head_dim {} must be even", self.head_dim));
        }
        if self.vocab < 151_669 {
            return Err(format!(
                "vocab {} is smaller than the Qwen3 tokenizer (151669 tokens)",
                self.vocab
            ));
        }
        Ok(())
    }
}

/// splitmix64 → uniform in [-bound, bound).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn uniform(&mut self, bound: f32) -> f32 {
        let u = (self.next() >> 40) as f32 / (1u64 << 24) as f32;
        (2.0 * u - 1.0) * bound
    }
}

/// Uniform with standard deviation `std` (bound = std·√3).
fn random(rng: &mut Rng, shape: Vec<usize>, std: f32) -> Tensor {
    let n = shape.iter().product();
    let bound = std * 3f32.sqrt();
    Tensor::from_parts(shape, (0..n).map(|_| rng.uniform(bound)).collect())
}

fn ones(n: usize) -> Tensor {
    Tensor::from_parts(vec![n], vec![1.0; n])
}

/// Scales chosen so that the model trains like a real checkpoint (memorising a few pairs with
/// LoRA + AdamW at lr 1e-2 in ~30 steps). Version 1 used std 0.02 everywhere with tied
/// embeddings: the residual stream then had norm ≈ 0.02·√hidden = 0.16, so the adapters' first
/// updates swamped it (loss spikes back to ln V, plateau near ln 10 per token), and the tied
/// head capped every base logit near 0. Now embeddings have unit std (residual norm ≈ √hidden,
/// as after a real model's embedding), each linear 1/√fan_in (keeps that norm through the
/// layers), and a separate lm_head of std 0.02 keeps the first distribution near uniform.
const EMBED_STD: f32 = 1.0;
const LM_HEAD_STD: f32 = 0.02;

fn weights(o: &GenOptions) -> BTreeMap<String, Tensor> {
    let mut rng = Rng(o.seed);
    let (h, i) = (o.hidden, o.intermediate);
    let (qd, kvd) = (o.heads * o.head_dim, o.kv_heads * o.head_dim);
    let mut w = BTreeMap::new();
    w.insert(
        "model.embed_tokens.weight".to_string(),
        random(&mut rng, vec![o.vocab, h], EMBED_STD),
    );
    for l in 0..o.layers {
        let p = format!("model.layers.{l}");
        let shapes = [
            ("self_attn.q_proj", vec![qd, h]),
            ("self_attn.k_proj", vec![kvd, h]),
            ("self_attn.v_proj", vec![kvd, h]),
            ("self_attn.o_proj", vec![h, qd]),
            ("mlp.gate_proj", vec![i, h]),
            ("mlp.up_proj", vec![i, h]),
            ("mlp.down_proj", vec![h, i]),
        ];
        for (name, shape) in shapes {
            let std = 1.0 / (shape[1] as f32).sqrt();
            w.insert(format!("{p}.{name}.weight"), random(&mut rng, shape, std));
        }
        w.insert(format!("{p}.self_attn.q_norm.weight"), ones(o.head_dim));
        w.insert(format!("{p}.self_attn.k_norm.weight"), ones(o.head_dim));
        w.insert(format!("{p}.input_layernorm.weight"), ones(h));
        w.insert(format!("{p}.post_attention_layernorm.weight"), ones(h));
    }
    w.insert("model.norm.weight".to_string(), ones(h));
    w.insert("lm_head.weight".to_string(), random(&mut rng, vec![o.vocab, h], LM_HEAD_STD));
    w
}

fn config_json(o: &GenOptions) -> serde_json::Value {
    json!({
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "vocab_size": o.vocab,
        "hidden_size": o.hidden,
        "intermediate_size": o.intermediate,
        "num_hidden_layers": o.layers,
        "num_attention_heads": o.heads,
        "num_key_value_heads": o.kv_heads,
        "head_dim": o.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": o.max_position,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1_000_000.0,
        "tie_word_embeddings": false,
        "attention_bias": false,
        "use_sliding_window": false,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "torch_dtype": "float32",
        "twinkle_generated": { "version": GENERATOR_VERSION, "seed": o.seed },
    })
}

fn write_all(dir: &Path, o: &GenOptions) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let config = serde_json::to_vec_pretty(&config_json(o)).map_err(std::io::Error::other)?;
    std::fs::write(dir.join("config.json"), config)?;
    let generation = json!({"bos_token_id": 151643, "eos_token_id": [151645, 151643]});
    std::fs::write(dir.join("generation_config.json"), generation.to_string())?;
    std::fs::write(dir.join("tokenizer.json"), TOKENIZER_JSON)?;
    std::fs::write(dir.join("tokenizer_config.json"), TOKENIZER_CONFIG)?;
    save_f32(&dir.join("model.safetensors"), &weights(o)).map_err(std::io::Error::other)
}

/// Writes the model of `o` into `out` (which must not exist yet, or is left as it is when it
/// already holds a model): temp directory beside it, then rename.
pub fn generate_model(out: &Path, o: &GenOptions) -> Result<(), HubError> {
    let fail = |detail: String| HubError::Generate { path: out.to_path_buf(), detail };
    o.validate().map_err(fail)?;
    if out.join("config.json").is_file() {
        return Ok(());
    }
    let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| fail(e.to_string()))?;
    let name = out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let tmp = parent.join(format!(".{name}.tmp-{}-{nanos}", std::process::id()));
    if let Err(e) = write_all(&tmp, o) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(fail(e.to_string()));
    }
    if let Err(e) = std::fs::rename(&tmp, out) {
        let _ = std::fs::remove_dir_all(&tmp);
        // Another process won the race: its complete model is as good as ours.
        if out.join("config.json").is_file() {
            return Ok(());
        }
        return Err(fail(e.to_string()));
    }
    Ok(())
}

/// The directory of preset `name` under `root`, generated on first use.
pub fn ensure_preset(name: &str, root: &Path) -> Result<PathBuf, HubError> {
    let opts = match name {
        "qwen3-tiny" => GenOptions::qwen3_tiny(),
        other => return Err(HubError::UnknownPreset(other.to_string())),
    };
    let dir = root.join(format!("{name}-v{GENERATOR_VERSION}"));
    generate_model(&dir, &opts)?;
    Ok(dir)
}
