//! Model loading: the HF `config.json` fields the engine reads, the per-architecture files
//! (`qwen2`, `qwen3`, `llama`) that turn them into one decoder description, and the weights.

mod llama;
mod qwen2;
mod qwen3;

use std::path::Path;
use std::sync::Arc;

use serde::Deserialize;
use serde_json::Value;

use super::error::{EngineError, Result};
use super::tensor::Tensor;
use super::weight::Weight;
use super::weights::WeightStore;

/// What the server needs to know about a loaded model.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// HF architecture name, e.g. `Qwen2ForCausalLM`.
    pub arch: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f64,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// End-of-sequence ids (generation_config.json, else config.json).
    pub eos_token_ids: Vec<u32>,
    pub bos_token_id: Option<u32>,
    /// Storage dtype named by the checkpoint (`float32`, `bfloat16`, ...); compute is f32. The
    /// base matrices are held in the dtype of each stored tensor ([`Model::weight_bytes`]).
    pub dtype: String,
    /// q/k/v projections carry a bias (Qwen2).
    pub qkv_bias: bool,
    /// Per-head RMSNorm on q and k before rope (Qwen3).
    pub qk_norm: bool,
    /// Rotary inverse frequencies (`head_dim/2`), with any rope scaling applied.
    pub inv_freq: Vec<f64>,
}

/// The `config.json` fields read by any supported architecture.
#[derive(Debug, Deserialize)]
pub(crate) struct HfConfig {
    #[serde(default)]
    architectures: Vec<String>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_parameters: Option<Value>,
    rope_scaling: Option<Value>,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    torch_dtype: Option<String>,
    dtype: Option<String>,
    eos_token_id: Option<Value>,
    bos_token_id: Option<Value>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    hidden_act: Option<String>,
    use_sliding_window: Option<bool>,
}

/// Architecture-specific switches chosen by the `models/<arch>.rs` files.
pub(crate) struct ArchFlags {
    pub qkv_bias: bool,
    pub qk_norm: bool,
}

fn ids(v: &Option<Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a.iter().filter_map(|x| x.as_u64()).map(|x| x as u32).collect(),
        _ => Vec::new(),
    }
}

impl HfConfig {
    /// Builds the common config; `flags` come from the architecture file.
    pub(crate) fn to_model_config(&self, arch: &str, flags: ArchFlags) -> Result<ModelConfig> {
        let heads = self.num_attention_heads;
        if heads == 0 || self.hidden_size == 0 || self.vocab_size == 0 {
            return Err(EngineError::Config(
                "hidden_size, num_attention_heads and vocab_size must be > 0".into(),
            ));
        }
        let kv = self.num_key_value_heads.unwrap_or(heads);
        if kv == 0 || !heads.is_multiple_of(kv) {
            return Err(EngineError::Config(format!(
                "num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv})"
            )));
        }
        let head_dim = self.head_dim.unwrap_or(self.hidden_size / heads);
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
            return Err(EngineError::Config(format!("head_dim {head_dim} must be even and > 0")));
        }
        if let Some(act) = self.hidden_act.as_deref().filter(|a| *a != "silu") {
            return Err(EngineError::Config(format!(
                "hidden_act `{act}` is not supported (only silu)"
            )));
        }
        if self.use_sliding_window == Some(true) {
            return Err(EngineError::Config("use_sliding_window = true is not supported".into()));
        }
        if self.mlp_bias == Some(true) {
            return Err(EngineError::Config("mlp_bias = true is not supported".into()));
        }
        // Newer configs nest rope settings in `rope_parameters`; classic ones use top-level
        // `rope_theta` and `rope_scaling`.
        let params = self.rope_parameters.as_ref().or(self.rope_scaling.as_ref());
        let theta = self
            .rope_theta
            .or_else(|| params.and_then(|p| p.get("rope_theta")).and_then(|t| t.as_f64()))
            .unwrap_or(10000.0);
        let inv_freq = rope_inv_freq(theta, head_dim, params)?;
        Ok(ModelConfig {
            arch: arch.to_string(),
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_layers: self.num_hidden_layers,
            num_heads: heads,
            num_kv_heads: kv,
            head_dim,
            rms_norm_eps: self.rms_norm_eps.unwrap_or(1e-6) as f32,
            rope_theta: theta,
            max_position_embeddings: self.max_position_embeddings.unwrap_or(4096),
            tie_word_embeddings: self.tie_word_embeddings.unwrap_or(false),
            eos_token_ids: ids(&self.eos_token_id),
            bos_token_id: ids(&self.bos_token_id).first().copied(),
            dtype: self
                .torch_dtype
                .clone()
                .or(self.dtype.clone())
                .unwrap_or_else(|| "float32".into()),
            qkv_bias: flags.qkv_bias || self.attention_bias == Some(true),
            qk_norm: flags.qk_norm,
            inv_freq,
        })
    }
}

/// `theta^(-2i/d)`, with Llama-3 frequency scaling when the config asks for it.
fn rope_inv_freq(theta: f64, head_dim: usize, params: Option<&Value>) -> Result<Vec<f64>> {
    let base: Vec<f64> =
        (0..head_dim / 2).map(|i| 1.0 / theta.powf((2 * i) as f64 / head_dim as f64)).collect();
    let kind = params
        .and_then(|p| p.get("rope_type").or_else(|| p.get("type")))
        .and_then(|t| t.as_str())
        .unwrap_or("default");
    match kind {
        "default" => Ok(base),
        "llama3" => {
            let get = |k: &str| params.and_then(|p| p.get(k)).and_then(|v| v.as_f64());
            let (Some(factor), Some(lo), Some(hi), Some(old)) = (
                get("factor"),
                get("low_freq_factor"),
                get("high_freq_factor"),
                get("original_max_position_embeddings"),
            ) else {
                return Err(EngineError::Config("llama3 rope scaling needs factor, low_freq_factor, high_freq_factor, original_max_position_embeddings".into()));
            };
            let (lo_wl, hi_wl) = (old / lo, old / hi);
            Ok(base
                .into_iter()
                .map(|f| {
                    let wl = 2.0 * std::f64::consts::PI / f;
                    if wl > lo_wl {
                        f / factor
                    } else if wl < hi_wl {
                        f
                    } else {
                        let s = (old / wl - lo) / (hi - lo);
                        (1.0 - s) * f / factor + s * f
                    }
                })
                .collect())
        }
        other => Err(EngineError::Config(format!("unsupported rope scaling type `{other}`"))),
    }
}

/// A linear layer with an HF `[out, in]` weight and optional bias.
#[derive(Debug)]
pub(crate) struct Linear {
    pub w: Weight,
    pub b: Option<Vec<f32>>,
}

impl Linear {
    pub fn out_dim(&self) -> usize {
        self.w.dim(0)
    }
    pub fn in_dim(&self) -> usize {
        self.w.dim(1)
    }
}

#[derive(Debug)]
pub(crate) struct LayerWeights {
    pub input_norm: Vec<f32>,
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub o: Linear,
    pub q_norm: Option<Vec<f32>>,
    pub k_norm: Option<Vec<f32>>,
    pub post_norm: Vec<f32>,
    pub gate: Linear,
    pub up: Linear,
    pub down: Linear,
}

impl Linear {
    fn into_f32(self) -> Linear {
        Linear { w: self.w.into_f32(), b: self.b }
    }
}

impl LayerWeights {
    fn linears(&self) -> [&Linear; 7] {
        [&self.q, &self.k, &self.v, &self.o, &self.gate, &self.up, &self.down]
    }

    /// f32 values held besides the matrices: norms and biases.
    fn small_f32(&self) -> usize {
        let opt = |v: &Option<Vec<f32>>| v.as_ref().map_or(0, Vec::len);
        self.input_norm.len()
            + self.post_norm.len()
            + opt(&self.q_norm)
            + opt(&self.k_norm)
            + self.linears().iter().map(|l| opt(&l.b)).sum::<usize>()
    }
}

/// A loaded decoder-only model (frozen). The matrices keep the checkpoint's dtype (f32 or
/// bf16, see [`Weight`]); norms and biases are f32; compute is f32.
#[derive(Debug)]
pub struct Model {
    pub(crate) config: ModelConfig,
    pub(crate) embed: Weight,
    pub(crate) layers: Vec<LayerWeights>,
    pub(crate) final_norm: Vec<f32>,
    /// `None` when tied to `embed`.
    pub(crate) lm_head: Option<Weight>,
}

impl Model {
    /// Loads a Hugging Face model directory (config.json, generation_config.json, safetensors).
    pub fn load(dir: &Path) -> Result<Arc<Model>> {
        Ok(Arc::new(Model::load_owned(dir)?))
    }

    fn load_owned(dir: &Path) -> Result<Model> {
        let cfg_path = dir.join("config.json");
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| EngineError::io(&cfg_path, e))?;
        let hf: HfConfig = serde_json::from_str(&text)
            .map_err(|e| EngineError::Json { path: cfg_path.clone(), message: e.to_string() })?;
        let arch = hf.architectures.first().cloned().unwrap_or_default();
        let mut config = match arch.as_str() {
            qwen2::ARCH => qwen2::config(&hf)?,
            qwen3::ARCH => qwen3::config(&hf)?,
            llama::ARCH => llama::config(&hf)?,
            _ => return Err(EngineError::UnsupportedArchitecture(arch)),
        };
        let gen_path = dir.join("generation_config.json");
        if let Ok(gen_text) = std::fs::read_to_string(&gen_path) {
            let g: Value = serde_json::from_str(&gen_text).map_err(|e| EngineError::Json {
                path: gen_path.clone(),
                message: e.to_string(),
            })?;
            let eos = ids(&g.get("eos_token_id").cloned());
            if !eos.is_empty() {
                config.eos_token_ids = eos;
            }
        }
        let mut store = WeightStore::load_dir(dir)?;
        Model::from_store(config, &mut store)
    }

    /// Like [`Model::load`] but with every matrix converted to f32 first: the reference the
    /// bf16-resident path is checked against (bitwise), and a way to trade memory for speed.
    pub fn load_f32(dir: &Path) -> Result<Arc<Model>> {
        Ok(Arc::new(Model::load_owned(dir)?.into_f32()))
    }

    /// The same model with every matrix held as f32.
    pub fn into_f32(self) -> Model {
        let Model { config, embed, layers, final_norm, lm_head } = self;
        let layers = layers
            .into_iter()
            .map(|l| LayerWeights {
                q: l.q.into_f32(),
                k: l.k.into_f32(),
                v: l.v.into_f32(),
                o: l.o.into_f32(),
                gate: l.gate.into_f32(),
                up: l.up.into_f32(),
                down: l.down.into_f32(),
                ..l
            })
            .collect();
        Model {
            config,
            embed: embed.into_f32(),
            layers,
            final_norm,
            lm_head: lm_head.map(Weight::into_f32),
        }
    }

    /// Bytes of host memory the weights occupy (matrices in their held dtype, plus the f32
    /// norms and biases).
    pub fn weight_bytes(&self) -> usize {
        let mats: usize = self
            .layers
            .iter()
            .flat_map(|l| l.linears())
            .map(|l| l.w.bytes())
            .chain([self.embed.bytes(), self.lm_head.as_ref().map_or(0, Weight::bytes)])
            .sum();
        let small: usize =
            self.layers.iter().map(LayerWeights::small_f32).sum::<usize>() + self.final_norm.len();
        mats + 4 * small
    }

    /// Builds a model from named tensors (HF names) and a config; used by `load` and by tests
    /// that make random models in memory.
    pub fn from_store(config: ModelConfig, store: &mut WeightStore) -> Result<Model> {
        let c = &config;
        let (h, v, i) = (c.hidden_size, c.vocab_size, c.intermediate_size);
        let (qd, kvd) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
        let vec1 =
            |s: &mut WeightStore, n: &str, len: usize| s.take(n, &[len]).map(Tensor::into_data);
        let linear =
            |s: &mut WeightStore, p: &str, out: usize, inp: usize, bias: bool| -> Result<Linear> {
                let w = s.take_weight(&format!("{p}.weight"), out, inp)?;
                let b = if bias { Some(vec1(s, &format!("{p}.bias"), out)?) } else { None };
                Ok(Linear { w, b })
            };
        let embed = store.take_weight("model.embed_tokens.weight", v, h)?;
        let mut layers = Vec::with_capacity(c.num_layers);
        for l in 0..c.num_layers {
            let p = format!("model.layers.{l}");
            let a = format!("{p}.self_attn");
            let (q_norm, k_norm) = if c.qk_norm {
                (
                    Some(vec1(store, &format!("{a}.q_norm.weight"), c.head_dim)?),
                    Some(vec1(store, &format!("{a}.k_norm.weight"), c.head_dim)?),
                )
            } else {
                (None, None)
            };
            layers.push(LayerWeights {
                input_norm: vec1(store, &format!("{p}.input_layernorm.weight"), h)?,
                q: linear(store, &format!("{a}.q_proj"), qd, h, c.qkv_bias)?,
                k: linear(store, &format!("{a}.k_proj"), kvd, h, c.qkv_bias)?,
                v: linear(store, &format!("{a}.v_proj"), kvd, h, c.qkv_bias)?,
                o: linear(store, &format!("{a}.o_proj"), h, qd, false)?,
                q_norm,
                k_norm,
                post_norm: vec1(store, &format!("{p}.post_attention_layernorm.weight"), h)?,
                gate: linear(store, &format!("{p}.mlp.gate_proj"), i, h, false)?,
                up: linear(store, &format!("{p}.mlp.up_proj"), i, h, false)?,
                down: linear(store, &format!("{p}.mlp.down_proj"), h, i, false)?,
            });
        }
        let final_norm = vec1(store, "model.norm.weight", h)?;
        // Some tied checkpoints still store lm_head.weight (a copy); untied ones must.
        let lm_head = if c.tie_word_embeddings {
            None
        } else {
            Some(store.take_weight("lm_head.weight", v, h)?)
        };
        Ok(Model { config, embed, layers, final_norm, lm_head })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The `[vocab, hidden]` output projection (the embedding when tied).
    pub(crate) fn head_weight(&self) -> &Weight {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: Value) -> Result<ModelConfig> {
        let hf: HfConfig =
            serde_json::from_value(v).map_err(|e| EngineError::Config(e.to_string()))?;
        llama::config(&hf)
    }

    fn base() -> Value {
        serde_json::json!({
            "architectures": ["LlamaForCausalLM"], "vocab_size": 10, "hidden_size": 32,
            "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
            "num_key_value_heads": 1, "head_dim": 128, "rope_theta": 500000.0,
        })
    }

    #[test]
    fn llama3_rope_scaling_follows_the_wavelength_bands() {
        let mut v = base();
        v["rope_scaling"] = serde_json::json!({"rope_type": "llama3", "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
        let c = parse(v).unwrap();
        let plain: Vec<f64> = (0..64).map(|i| 500000f64.powf(-(2.0 * i as f64) / 128.0)).collect();
        // Wavelength 2π/f: below 8192/4 unchanged, above 8192/1 divided by the factor,
        // in between a blend of the two.
        for (i, (&got, &f)) in c.inv_freq.iter().zip(&plain).enumerate() {
            let wl = 2.0 * std::f64::consts::PI / f;
            if wl < 2048.0 {
                assert!((got - f).abs() <= 1e-15 * f, "{i}");
            } else if wl > 8192.0 {
                assert!((got - f / 8.0).abs() <= 1e-15 * f, "{i}");
            } else {
                assert!(got > f / 8.0 && got < f, "{i}");
            }
        }
        assert!(plain.iter().any(|f| 2.0 * std::f64::consts::PI / f > 8192.0));
    }

    #[test]
    fn config_fields_and_rejections() {
        let c = parse(base()).unwrap();
        assert_eq!((c.head_dim, c.num_kv_heads, c.rope_theta), (128, 1, 500000.0));
        assert!(!c.tie_word_embeddings && !c.qkv_bias && !c.qk_norm);
        let mut v = base();
        v["rope_scaling"] = serde_json::json!({"rope_type": "yarn", "factor": 4.0});
        assert!(parse(v).unwrap_err().to_string().contains("yarn"));
        let mut v = base();
        v["num_key_value_heads"] = serde_json::json!(3);
        assert!(parse(v).unwrap_err().to_string().contains("multiple"));
        let mut v = base();
        v["hidden_act"] = serde_json::json!("gelu");
        assert!(parse(v).unwrap_err().to_string().contains("gelu"));
    }
}
