//! LoRA adapters: per-client low-rank deltas `scaling · B·A·x` on the projection layers and
//! optionally lm_head, with f32 master weights, gradients and Adam moments; PEFT-format files in
//! `io.rs`.

use std::collections::BTreeMap;

use super::error::{EngineError, Result};
use super::models::{Model, ModelConfig};
use super::rng::SplitMix64;
use super::tensor::Tensor;

mod io;

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
    pub fn dims(self, c: &ModelConfig) -> (usize, usize) {
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

/// Largest LoRA rank a model application accepts.
pub const MAX_RANK: usize = 128;

impl LoraConfig {
    /// The one check of an adapter's settings, run by the server before it queues a
    /// create_model, by the model application and by the engine (`max_rank` = the served
    /// bound; the engine alone passes none): rank in `1..=max_rank`, a finite alpha > 0 and at
    /// least one target module. Messages name Tinker's `lora_config` fields.
    pub fn check(&self, max_rank: usize) -> Result<()> {
        let bad = |m: String| Err(EngineError::InvalidInput(m));
        if self.rank == 0 || self.rank > max_rank {
            let range =
                if max_rank == usize::MAX { "> 0".into() } else { format!("in 1..={max_rank}") };
            return bad(format!("lora_config.rank: {} must be {range}", self.rank));
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return bad(format!("lora_config.alpha: must be > 0, got {}", self.alpha));
        }
        if self.targets.is_empty() {
            return bad(
                "lora_config: train_attn, train_mlp and train_unembed are all false: nothing to \
                 train (at least one must be true)"
                    .into(),
            );
        }
        Ok(())
    }

    /// An adapter of `rank` and `alpha` on the modules `train` switches on.
    pub fn from_tinker(rank: usize, alpha: f32, train: LoraTargets, seed: u64) -> Self {
        LoraConfig { rank, alpha, targets: train.modules(), seed }
    }
}

/// Which groups of modules an adapter trains, as Tinker's `lora_config` switches them (the
/// Twinkle protocol's `target_modules` map onto the same groups). One value travels from the
/// request through the run record and the internal hop to [`LoraConfig::from_tinker`]; each
/// switch is true when left out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LoraTargets {
    /// lm_head.
    #[serde(default = "switched_on")]
    pub train_unembed: bool,
    /// gate, up and down.
    #[serde(default = "switched_on")]
    pub train_mlp: bool,
    /// q, k, v and o.
    #[serde(default = "switched_on")]
    pub train_attn: bool,
}

fn switched_on() -> bool {
    true
}

impl LoraTargets {
    /// Every module: Tinker's default.
    pub const ALL: LoraTargets =
        LoraTargets { train_unembed: true, train_mlp: true, train_attn: true };

    /// PEFT's `target_modules="all-linear"`: every linear of every layer, not the head.
    pub const ALL_LINEAR: LoraTargets = LoraTargets { train_unembed: false, ..LoraTargets::ALL };

    /// The modules switched on, attention first.
    pub fn modules(self) -> Vec<Target> {
        let mut targets = Vec::new();
        if self.train_attn {
            targets.extend([Target::Q, Target::K, Target::V, Target::O]);
        }
        if self.train_mlp {
            targets.extend([Target::Gate, Target::Up, Target::Down]);
        }
        if self.train_unembed {
            targets.push(Target::LmHead);
        }
        targets
    }
}

impl Default for LoraTargets {
    fn default() -> Self {
        LoraTargets::ALL
    }
}

/// One LoRA matrix and its training state: weights, accumulated gradient and Adam moments
/// (the host side of the CUDA runtime's `GpuTensor`).
#[derive(Debug, Clone)]
pub struct LoraTensor {
    /// f32 master weights.
    pub w: Tensor,
    /// Accumulated gradient.
    pub g: Vec<f32>,
    pub adam: AdamMoments,
}

/// Adam's running moments of one matrix, one value per weight.
#[derive(Debug, Clone)]
pub struct AdamMoments {
    /// First moment (`exp_avg`).
    pub m: Vec<f32>,
    /// Second moment (`exp_avg_sq`).
    pub v: Vec<f32>,
}

/// Weights with a zero gradient and zero moments.
impl From<Tensor> for LoraTensor {
    fn from(w: Tensor) -> Self {
        let n = w.len();
        LoraTensor { w, g: vec![0.0; n], adam: AdamMoments { m: vec![0.0; n], v: vec![0.0; n] } }
    }
}

/// One LoRA module: `a` `[r, in]` and `b` `[out, r]`.
#[derive(Debug, Clone)]
pub struct LoraPair {
    pub a: LoraTensor,
    pub b: LoraTensor,
}

impl LoraPair {
    /// `a` and `b` with zero gradients and moments.
    pub(crate) fn new(a: Tensor, b: Tensor) -> Self {
        LoraPair { a: a.into(), b: b.into() }
    }

    pub fn rank(&self) -> usize {
        self.a.w.dim(0)
    }

    /// The two matrices with their PEFT names (`lora_A`, `lora_B`).
    pub fn named(&self) -> [(&'static str, &LoraTensor); 2] {
        [("lora_A", &self.a), ("lora_B", &self.b)]
    }

    /// [`Self::named`], mutable.
    pub fn named_mut(&mut self) -> [(&'static str, &mut LoraTensor); 2] {
        [("lora_A", &mut self.a), ("lora_B", &mut self.b)]
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
        cfg.check(usize::MAX)?;
        let mut rng = SplitMix64(cfg.seed);
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
            for (_, t) in p.named() {
                out.extend_from_slice(&t.g);
            }
        }
        out
    }

    /// Number of trainable values (all A and B entries): the length of [`Self::grads_flat`].
    pub fn num_params(&self) -> usize {
        self.pairs().iter().map(|(_, p)| p.a.w.len() + p.b.w.len()).sum()
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
            for (_, t) in p.named_mut() {
                let n = t.w.len();
                t.g.clear();
                t.g.extend_from_slice(&grads[off..off + n]);
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
            for (_, t) in p.named_mut() {
                // Resized to the parameters' length (a no-op unless a failed job broke it).
                t.g.clear();
                t.g.resize(t.w.len(), 0.0);
            }
        }
    }

    /// Gradients by PEFT tensor key (`...lora_A.weight`), for tests and diagnostics.
    pub fn gradients(&self) -> BTreeMap<String, Tensor> {
        let mut out = BTreeMap::new();
        for (k, p) in self.pairs() {
            for (s, t) in p.named() {
                let grad = Tensor::from_parts(t.w.shape().to_vec(), t.g.clone());
                out.insert(format!("{k}.{s}.weight"), grad);
            }
        }
        out
    }

    /// Weights by PEFT tensor key.
    pub fn tensors(&self) -> BTreeMap<String, Tensor> {
        let mut out = BTreeMap::new();
        for (k, p) in self.pairs() {
            for (s, t) in p.named() {
                out.insert(format!("{k}.{s}.weight"), t.w.clone());
            }
        }
        out
    }
}
