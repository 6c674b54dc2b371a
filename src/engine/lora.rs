//! LoRA adapters: per-client low-rank deltas `scaling · B·A·x` on the projection layers and
//! optionally lm_head, with f32 master weights, gradients and Adam moments; PEFT-format I/O.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{Value, json};

use super::error::{EngineError, Result};
use super::models::{Model, ModelConfig};
use super::tensor::Tensor;
use super::weights;

/// A module that can carry a LoRA delta.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Target {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
    LmHead,
}

impl Target {
    /// The seven per-layer targets, in index order.
    pub const LAYER: [Target; 7] =
        [Target::Q, Target::K, Target::V, Target::O, Target::Gate, Target::Up, Target::Down];

    /// PEFT / HF module name.
    pub fn name(self) -> &'static str {
        match self {
            Target::Q => "q_proj",
            Target::K => "k_proj",
            Target::V => "v_proj",
            Target::O => "o_proj",
            Target::Gate => "gate_proj",
            Target::Up => "up_proj",
            Target::Down => "down_proj",
            Target::LmHead => "lm_head",
        }
    }

    pub fn from_name(name: &str) -> Option<Target> {
        Target::LAYER.into_iter().chain([Target::LmHead]).find(|t| t.name() == name)
    }

    fn layer_index(self) -> usize {
        match self {
            Target::Q => 0,
            Target::K => 1,
            Target::V => 2,
            Target::O => 3,
            Target::Gate => 4,
            Target::Up => 5,
            Target::Down => 6,
            Target::LmHead => 7,
        }
    }

    /// `(in, out)` feature sizes of this module.
    fn dims(self, c: &ModelConfig) -> (usize, usize) {
        let (h, i) = (c.hidden_size, c.intermediate_size);
        let (qd, kvd) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
        match self {
            Target::Q => (h, qd),
            Target::K | Target::V => (h, kvd),
            Target::O => (qd, h),
            Target::Gate | Target::Up => (h, i),
            Target::Down => (i, h),
            Target::LmHead => (h, c.vocab_size),
        }
    }

    /// HF module path of this target in layer `layer`.
    fn module_path(self, layer: usize) -> String {
        match self {
            Target::Q | Target::K | Target::V | Target::O => {
                format!("model.layers.{layer}.self_attn.{}", self.name())
            }
            Target::Gate | Target::Up | Target::Down => {
                format!("model.layers.{layer}.mlp.{}", self.name())
            }
            Target::LmHead => "lm_head".to_string(),
        }
    }
}

/// Shape of a new adapter.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f32,
    pub targets: Vec<Target>,
    /// Seed of the A-matrix initialisation.
    pub seed: u64,
}

impl LoraConfig {
    /// Tinker's switches: attention = q,k,v,o; mlp = gate,up,down; unembed = lm_head.
    pub fn from_tinker(
        rank: usize,
        alpha: f32,
        attn: bool,
        mlp: bool,
        unembed: bool,
        seed: u64,
    ) -> Self {
        let mut targets = Vec::new();
        if attn {
            targets.extend([Target::Q, Target::K, Target::V, Target::O]);
        }
        if mlp {
            targets.extend([Target::Gate, Target::Up, Target::Down]);
        }
        if unembed {
            targets.push(Target::LmHead);
        }
        LoraConfig { rank, alpha, targets, seed }
    }
}

/// One LoRA module: `a` `[r, in]`, `b` `[out, r]`, their accumulated gradients and Adam moments.
#[derive(Debug, Clone)]
pub struct LoraPair {
    pub a: Tensor,
    pub b: Tensor,
    pub grad_a: Vec<f32>,
    pub grad_b: Vec<f32>,
    pub m_a: Vec<f32>,
    pub v_a: Vec<f32>,
    pub m_b: Vec<f32>,
    pub v_b: Vec<f32>,
}

impl LoraPair {
    fn new(a: Tensor, b: Tensor) -> Self {
        let (na, nb) = (a.len(), b.len());
        LoraPair {
            a,
            b,
            grad_a: vec![0.0; na],
            grad_b: vec![0.0; nb],
            m_a: vec![0.0; na],
            v_a: vec![0.0; na],
            m_b: vec![0.0; nb],
            v_b: vec![0.0; nb],
        }
    }

    pub fn rank(&self) -> usize {
        self.a.dim(0)
    }
}

/// splitmix64: a tiny seeded generator for the A initialisation (reproducible across runs).
struct SplitMix(u64);

impl SplitMix {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [-bound, bound).
    fn uniform(&mut self, bound: f32) -> f32 {
        let u = (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
        (2.0 * u - 1.0) * bound
    }
}

/// A per-client adapter.
#[derive(Debug, Clone)]
pub struct Adapter {
    config: LoraConfig,
    scaling: f32,
    /// `layers[l][Target::layer_index]`.
    layers: Vec<[Option<LoraPair>; 7]>,
    lm_head: Option<LoraPair>,
    /// Optimizer steps taken.
    pub(crate) step: u64,
    base_model: String,
    /// Shape signature of the model it was built for (see `model_signature`).
    signature: [usize; 6],
}

/// An adapter's identity without its tensors (LoRA configuration, scaling, base model name):
/// what an application keeps next to a device-resident adapter to rebuild a host copy when a
/// checkpoint is written.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterShape {
    config: LoraConfig,
    scaling: f32,
    base_model: String,
}

impl AdapterShape {
    /// A host adapter of this shape for `mc` with zeroed tensors (to download into).
    pub fn materialize(&self, mc: &ModelConfig) -> Result<Adapter> {
        let mut a = Adapter::build(mc, &self.config, false)?;
        a.scaling = self.scaling;
        a.base_model = self.base_model.clone();
        Ok(a)
    }

    pub fn config(&self) -> &LoraConfig {
        &self.config
    }
}

/// The model dimensions an adapter's tensors depend on.
fn model_signature(c: &ModelConfig) -> [usize; 6] {
    [
        c.num_layers,
        c.hidden_size,
        c.intermediate_size,
        c.num_heads * c.head_dim,
        c.num_kv_heads * c.head_dim,
        c.vocab_size,
    ]
}

const CONFIG_FILE: &str = "adapter_config.json";
const WEIGHTS_FILE: &str = "adapter_model.safetensors";
const OPTIM_FILE: &str = "optimizer.safetensors";
const OPTIM_META: &str = "optimizer_state.json";

impl Adapter {
    /// A fresh adapter: A ~ U(±1/√in) (PEFT's kaiming_uniform with a=√5), B = 0.
    pub fn new(model: &Model, cfg: &LoraConfig) -> Result<Adapter> {
        Self::for_config(model.config(), cfg)
    }

    /// [`Adapter::new`] from the model's configuration alone (runtimes that keep no host copy
    /// of the weights).
    pub fn for_config(mc: &ModelConfig, cfg: &LoraConfig) -> Result<Adapter> {
        Self::build(mc, cfg, true)
    }

    fn build(mc: &ModelConfig, cfg: &LoraConfig, init: bool) -> Result<Adapter> {
        if cfg.rank == 0 {
            return Err(EngineError::InvalidInput("LoRA rank must be > 0".into()));
        }
        if cfg.targets.is_empty() {
            return Err(EngineError::InvalidInput("LoRA needs at least one target module".into()));
        }
        let mut rng = SplitMix(cfg.seed);
        let mut make = |t: Target| {
            let (inp, out) = t.dims(mc);
            let bound = 1.0 / (inp as f32).sqrt();
            let a: Vec<f32> = if init {
                (0..cfg.rank * inp).map(|_| rng.uniform(bound)).collect()
            } else {
                vec![0.0; cfg.rank * inp]
            };
            LoraPair::new(
                Tensor::from_parts(vec![cfg.rank, inp], a),
                Tensor::zeros(vec![out, cfg.rank]),
            )
        };
        let mut layers = Vec::with_capacity(mc.num_layers);
        for _ in 0..mc.num_layers {
            let mut slots: [Option<LoraPair>; 7] = Default::default();
            for t in Target::LAYER {
                if cfg.targets.contains(&t) {
                    slots[t.layer_index()] = Some(make(t));
                }
            }
            layers.push(slots);
        }
        let lm_head = cfg.targets.contains(&Target::LmHead).then(|| make(Target::LmHead));
        Ok(Adapter {
            scaling: cfg.alpha / cfg.rank as f32,
            config: cfg.clone(),
            layers,
            lm_head,
            step: 0,
            base_model: String::new(),
            signature: model_signature(mc),
        })
    }

    /// This adapter's identity without its tensors (see [`AdapterShape`]).
    pub fn shape(&self) -> AdapterShape {
        AdapterShape {
            config: self.config.clone(),
            scaling: self.scaling,
            base_model: self.base_model.clone(),
        }
    }

    /// All accumulated gradients as one vector (per module of [`Self::pairs`], `lora_A` then
    /// `lora_B`): the layout data parallelism reduces.
    pub fn grads_flat(&self) -> Vec<f32> {
        let mut out = Vec::new();
        for (_, p) in self.pairs() {
            out.extend_from_slice(&p.grad_a);
            out.extend_from_slice(&p.grad_b);
        }
        out
    }

    /// Number of trainable values (all A and B entries): the length of [`Self::grads_flat`].
    pub fn num_params(&self) -> usize {
        self.pairs().iter().map(|(_, p)| p.a.len() + p.b.len()).sum()
    }

    /// Replaces the accumulated gradients with `grads` (layout of [`Self::grads_flat`]).
    pub fn set_grads_flat(&mut self, grads: &[f32]) -> Result<()> {
        let total = self.num_params();
        if grads.len() != total {
            return Err(EngineError::Adapter(format!(
                "{} gradient values for an adapter of {total} parameters",
                grads.len()
            )));
        }
        // Lengths come from the parameters, not the gradient buffers: restoring a snapshot
        // also repairs buffers a failed job left in any state.
        let mut off = 0;
        for (_, p) in self.pairs_mut() {
            let (na, nb) = (p.a.len(), p.b.len());
            for (g, n) in [(&mut p.grad_a, na), (&mut p.grad_b, nb)] {
                g.clear();
                g.extend_from_slice(&grads[off..off + n]);
                off += n;
            }
        }
        Ok(())
    }

    /// Errors unless this adapter was built for a model of `model`'s shape.
    pub fn check_compatible(&self, model: &Model) -> Result<()> {
        self.check_fits(model.config())
    }

    /// [`Self::check_compatible`] against a model configuration.
    pub fn check_fits(&self, mc: &ModelConfig) -> Result<()> {
        if self.signature != model_signature(mc) {
            return Err(EngineError::Adapter(format!(
                "adapter was built for a model of another shape (layers, hidden, intermediate, q, kv, vocab = {:?}; this model {:?})",
                self.signature,
                model_signature(mc)
            )));
        }
        Ok(())
    }

    pub fn config(&self) -> &LoraConfig {
        &self.config
    }

    /// `alpha / r` (or `alpha / √r` for rsLoRA adapters).
    pub fn scaling(&self) -> f32 {
        self.scaling
    }

    /// Optimizer steps taken so far.
    pub fn step(&self) -> u64 {
        self.step
    }

    /// Sets the `base_model_name_or_path` written to adapter_config.json.
    pub fn set_base_model(&mut self, name: &str) {
        self.base_model = name.to_string();
    }

    pub(crate) fn layer(&self, layer: usize, t: Target) -> Option<&LoraPair> {
        self.layers.get(layer).and_then(|s| s[t.layer_index()].as_ref())
    }

    pub(crate) fn layer_mut(&mut self, layer: usize, t: Target) -> Option<&mut LoraPair> {
        self.layers.get_mut(layer).and_then(|s| s[t.layer_index()].as_mut())
    }

    pub(crate) fn lm_head(&self) -> Option<&LoraPair> {
        self.lm_head.as_ref()
    }

    pub(crate) fn lm_head_mut(&mut self) -> Option<&mut LoraPair> {
        self.lm_head.as_mut()
    }

    /// Every module with its PEFT key prefix (`base_model.model.<path>`), in a fixed order.
    pub fn pairs(&self) -> Vec<(String, &LoraPair)> {
        let mut v = Vec::new();
        for (l, slots) in self.layers.iter().enumerate() {
            for t in Target::LAYER {
                if let Some(p) = &slots[t.layer_index()] {
                    v.push((format!("base_model.model.{}", t.module_path(l)), p));
                }
            }
        }
        if let Some(p) = &self.lm_head {
            v.push(("base_model.model.lm_head".to_string(), p));
        }
        v
    }

    /// Mutable counterpart of `pairs` (same order).
    pub fn pairs_mut(&mut self) -> Vec<(String, &mut LoraPair)> {
        let mut v = Vec::new();
        for (l, slots) in self.layers.iter_mut().enumerate() {
            for (t, slot) in Target::LAYER.into_iter().zip(slots.iter_mut()) {
                if let Some(p) = slot {
                    v.push((format!("base_model.model.{}", t.module_path(l)), p));
                }
            }
        }
        if let Some(p) = &mut self.lm_head {
            v.push(("base_model.model.lm_head".to_string(), p));
        }
        v
    }

    /// Clears accumulated gradients.
    pub fn zero_grad(&mut self) {
        for (_, p) in self.pairs_mut() {
            // Resized to the parameters' lengths (a no-op unless a failed job broke them).
            let (na, nb) = (p.a.len(), p.b.len());
            p.grad_a.clear();
            p.grad_a.resize(na, 0.0);
            p.grad_b.clear();
            p.grad_b.resize(nb, 0.0);
        }
    }

    /// Gradients by PEFT tensor key (`...lora_A.weight`), for tests and diagnostics.
    pub fn gradients(&self) -> BTreeMap<String, Tensor> {
        let mut out = BTreeMap::new();
        for (k, p) in self.pairs() {
            out.insert(
                format!("{k}.lora_A.weight"),
                Tensor::from_parts(p.a.shape().to_vec(), p.grad_a.clone()),
            );
            out.insert(
                format!("{k}.lora_B.weight"),
                Tensor::from_parts(p.b.shape().to_vec(), p.grad_b.clone()),
            );
        }
        out
    }

    /// Weights by PEFT tensor key.
    pub fn tensors(&self) -> BTreeMap<String, Tensor> {
        let mut out = BTreeMap::new();
        for (k, p) in self.pairs() {
            out.insert(format!("{k}.lora_A.weight"), p.a.clone());
            out.insert(format!("{k}.lora_B.weight"), p.b.clone());
        }
        out
    }

    /// Loads a PEFT LoRA directory (adapter_config.json + adapter_model.safetensors).
    pub fn load_peft(dir: &Path, model: &Model) -> Result<Adapter> {
        Self::load_peft_for(dir, model.config())
    }

    /// [`Self::load_peft`] for a model configuration.
    pub fn load_peft_for(dir: &Path, mc: &ModelConfig) -> Result<Adapter> {
        let cfg_path = dir.join(CONFIG_FILE);
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| EngineError::io(&cfg_path, e))?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| EngineError::Json { path: cfg_path.clone(), message: e.to_string() })?;
        let bad = |m: String| EngineError::Adapter(format!("{}: {m}", cfg_path.display()));
        if v.get("peft_type").and_then(Value::as_str).is_some_and(|t| t != "LORA") {
            return Err(bad("peft_type must be LORA".into()));
        }
        if v.get("use_dora").and_then(Value::as_bool) == Some(true) {
            return Err(bad("DoRA adapters are not supported".into()));
        }
        for k in ["rank_pattern", "alpha_pattern"] {
            if v.get(k).and_then(Value::as_object).is_some_and(|o| !o.is_empty()) {
                return Err(bad(format!("`{k}` is not supported")));
            }
        }
        let rank =
            v.get("r").and_then(Value::as_u64).ok_or_else(|| bad("missing `r`".into()))? as usize;
        let alpha = v.get("lora_alpha").and_then(Value::as_f64).unwrap_or(rank as f64) as f32;
        let names: Vec<String> = match v.get("target_modules") {
            Some(Value::Array(a)) => {
                a.iter().filter_map(|x| x.as_str().map(String::from)).collect()
            }
            Some(Value::String(s)) => vec![s.clone()],
            _ => return Err(bad("missing `target_modules`".into())),
        };
        let mut targets = Vec::new();
        for n in &names {
            targets.push(
                Target::from_name(n)
                    .ok_or_else(|| bad(format!("unsupported target module `{n}`")))?,
            );
        }
        targets.sort_unstable();
        let rslora = v.get("use_rslora").and_then(Value::as_bool) == Some(true);
        let mut tensors = weights::load_f32(&dir.join(WEIGHTS_FILE))?;
        let config = LoraConfig { rank, alpha, targets: targets.clone(), seed: 0 };
        let mut adapter = Adapter::for_config(mc, &config)?;
        if rslora {
            adapter.scaling = alpha / (rank as f32).sqrt();
        }
        adapter.base_model =
            v.get("base_model_name_or_path").and_then(Value::as_str).unwrap_or("").to_string();
        for (key, p) in adapter.pairs_mut() {
            for (suffix, dst) in [("lora_A", &mut p.a), ("lora_B", &mut p.b)] {
                let name = format!("{key}.{suffix}.weight");
                let t = tensors
                    .remove(&name)
                    .ok_or_else(|| EngineError::Adapter(format!("missing tensor `{name}`")))?;
                if t.shape() != dst.shape() {
                    return Err(EngineError::TensorShape {
                        name,
                        got: t.shape().to_vec(),
                        expected: dst.shape().to_vec(),
                    });
                }
                *dst = t;
            }
        }
        Ok(adapter)
    }

    /// Writes a PEFT LoRA directory that PEFT and vLLM can load.
    pub fn save_peft(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| EngineError::io(dir, e))?;
        let targets: Vec<&str> = self.config.targets.iter().map(|t| t.name()).collect();
        let cfg = json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": self.config.rank,
            "lora_alpha": self.config.alpha,
            "target_modules": targets,
            "base_model_name_or_path": self.base_model,
            "bias": "none",
            "lora_dropout": 0.0,
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_lora_weights": true,
            "use_rslora": false,
            "use_dora": false,
            "modules_to_save": null,
            "layers_to_transform": null,
            "rank_pattern": {},
            "alpha_pattern": {},
        });
        let path = dir.join(CONFIG_FILE);
        let text = serde_json::to_string_pretty(&cfg)
            .map_err(|e| EngineError::Json { path: path.clone(), message: e.to_string() })?;
        std::fs::write(&path, text).map_err(|e| EngineError::io(&path, e))?;
        weights::save_f32(&dir.join(WEIGHTS_FILE), &self.tensors())
    }

    /// Saves weights (PEFT files) plus the optimizer state (Adam moments and step).
    pub fn save_state(&self, dir: &Path) -> Result<()> {
        self.save_peft(dir)?;
        let mut moments = BTreeMap::new();
        for (k, p) in self.pairs() {
            for (s, t, m, v) in [("lora_A", &p.a, &p.m_a, &p.v_a), ("lora_B", &p.b, &p.m_b, &p.v_b)]
            {
                let shape = t.shape().to_vec();
                moments.insert(
                    format!("{k}.{s}.weight.exp_avg"),
                    Tensor::new(shape.clone(), m.clone())?,
                );
                moments
                    .insert(format!("{k}.{s}.weight.exp_avg_sq"), Tensor::new(shape, v.clone())?);
            }
        }
        weights::save_f32(&dir.join(OPTIM_FILE), &moments)?;
        let path = dir.join(OPTIM_META);
        let meta = json!({ "step": self.step, "optimizer": "adamw" }).to_string();
        std::fs::write(&path, meta).map_err(|e| EngineError::io(&path, e))
    }

    /// Loads weights and, when present, the optimizer state written by `save_state`.
    pub fn load_state(dir: &Path, model: &Model) -> Result<Adapter> {
        Self::load_state_for(dir, model.config())
    }

    /// [`Self::load_state`] for a model configuration.
    pub fn load_state_for(dir: &Path, mc: &ModelConfig) -> Result<Adapter> {
        let mut adapter = Adapter::load_peft_for(dir, mc)?;
        let meta_path = dir.join(OPTIM_META);
        if !meta_path.is_file() {
            return Ok(adapter);
        }
        let text =
            std::fs::read_to_string(&meta_path).map_err(|e| EngineError::io(&meta_path, e))?;
        let meta: Value = serde_json::from_str(&text)
            .map_err(|e| EngineError::Json { path: meta_path.clone(), message: e.to_string() })?;
        adapter.step = meta.get("step").and_then(Value::as_u64).unwrap_or(0);
        let mut moments = weights::load_f32(&dir.join(OPTIM_FILE))?;
        for (k, p) in adapter.pairs_mut() {
            for (s, m, v) in
                [("lora_A", &mut p.m_a, &mut p.v_a), ("lora_B", &mut p.m_b, &mut p.v_b)]
            {
                for (suffix, dst) in [("exp_avg", m), ("exp_avg_sq", v)] {
                    let name = format!("{k}.{s}.weight.{suffix}");
                    let t = moments.remove(&name).ok_or_else(|| {
                        EngineError::Adapter(format!("optimizer state lacks `{name}`"))
                    })?;
                    if t.len() != dst.len() {
                        return Err(EngineError::Adapter(format!(
                            "optimizer tensor `{name}` has the wrong size"
                        )));
                    }
                    *dst = t.into_data();
                }
            }
        }
        Ok(adapter)
    }
}
