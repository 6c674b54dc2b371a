//! PEFT-format files of an adapter: `adapter_config.json` + `adapter_model.safetensors` (what
//! PEFT's `save_pretrained` writes and `from_pretrained` reads), and the training state beside
//! them (`optimizer.safetensors` with Adam's moments, `optimizer_state.json` with the step).

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{Value, json};

use super::{Adapter, EngineError, LoraConfig, ModelConfig, Result, Target};
use crate::engine::models::Model;
use crate::engine::tensor::Tensor;
use crate::engine::weights;

const CONFIG_FILE: &str = "adapter_config.json";
const WEIGHTS_FILE: &str = "adapter_model.safetensors";
const OPTIM_FILE: &str = "optimizer.safetensors";
const OPTIM_META: &str = "optimizer_state.json";

impl Adapter {
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
            for (suffix, dst) in p.named_mut() {
                let dst = &mut dst.w;
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
            for (s, t) in p.named() {
                let shape = t.w.shape().to_vec();
                moments.insert(
                    format!("{k}.{s}.weight.exp_avg"),
                    Tensor::new(shape.clone(), t.adam.m.clone())?,
                );
                moments.insert(
                    format!("{k}.{s}.weight.exp_avg_sq"),
                    Tensor::new(shape, t.adam.v.clone())?,
                );
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
            for (s, t) in p.named_mut() {
                for (suffix, dst) in [("exp_avg", &mut t.adam.m), ("exp_avg_sq", &mut t.adam.v)] {
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
