//! Small deterministic random models for quickstarts and tests: a Qwen3-shaped decoder with the
//! real vendored Qwen3 tokenizer (`assets/tokenizer/qwen3`, compiled into the binary), written as
//! a Hugging Face directory (`config.json`, `generation_config.json`, `model.safetensors`,
//! `tokenizer.json`, `tokenizer_config.json`).
//!
//! `generate://qwen3-tiny` names the preset [`GenOptions::qwen3_tiny`]. The weights come from the
//! one random-model generator (`engine::synth`, [`Init::Trainable`]) and depend only on the
//! options, so every machine generates the same model, and a benchmark of the same shape and
//! seed loads the same weights. Writing goes to a
//! temporary sibling directory that is renamed into place, so a reader never sees half a model
//! and two processes generating at once both end up with one complete directory.

use std::path::{Path, PathBuf};

use serde_json::json;

use super::HubError;
use crate::engine::synth::{Init, SynthSpec};
use crate::engine::weights::save_f32;

/// Preset names accepted by `generate://`.
pub const PRESETS: [&str; 1] = ["qwen3-tiny"];

/// Bumped whenever the generator's output changes, so stale caches are not reused (3: the
/// per-tensor streams of `engine::synth` replaced one splitmix64 stream).
const GENERATOR_VERSION: u32 = 3;

const TOKENIZER_JSON: &[u8] = include_bytes!("../../assets/tokenizer/qwen3/tokenizer.json");
const TOKENIZER_CONFIG: &[u8] =
    include_bytes!("../../assets/tokenizer/qwen3/tokenizer_config.json");

const ROPE_THETA: f64 = 1_000_000.0;
const RMS_NORM_EPS: f64 = 1e-6;

/// Qwen's padded embedding size (the tokenizer has 151,669 entries).
pub const QWEN3_VOCAB: usize = 151_936;

/// Shape and seed of a generated model; also the options of `twinkle generate-model`, whose
/// defaults are [`GenOptions::qwen3_tiny`].
#[derive(Debug, Clone, PartialEq, clap::Args)]
pub struct GenOptions {
    /// Architecture (only qwen3).
    #[arg(long, default_value = "qwen3")]
    pub arch: String,
    #[arg(long, default_value_t = 64)]
    pub hidden: usize,
    #[arg(long, default_value_t = 2)]
    pub layers: usize,
    #[arg(long, default_value_t = 4)]
    pub heads: usize,
    #[arg(long, default_value_t = 2)]
    pub kv_heads: usize,
    #[arg(long, default_value_t = 16)]
    pub head_dim: usize,
    #[arg(long, default_value_t = 128)]
    pub intermediate: usize,
    /// Qwen's tokenizer fixes it.
    #[arg(skip = QWEN3_VOCAB)]
    pub vocab: usize,
    #[arg(long, default_value_t = 4096)]
    pub max_position: usize,
    #[arg(long, default_value_t = 0x7769_6e6b_6c65)]
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

    /// The generator's shape for these options: Qwen3, untied lm_head, [`Init::Trainable`]
    /// (the seed is not part of it: pass `self.seed` to the generator).
    pub fn synth_spec(&self) -> SynthSpec {
        SynthSpec {
            arch: "Qwen3ForCausalLM".into(),
            vocab: self.vocab,
            hidden: self.hidden,
            inter: self.intermediate,
            layers: self.layers,
            heads: self.heads,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
            rope_theta: ROPE_THETA,
            eps: RMS_NORM_EPS,
            max_positions: self.max_position,
            tied: false,
            init: Init::Trainable,
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
        "rms_norm_eps": RMS_NORM_EPS,
        "rope_theta": ROPE_THETA,
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
    let weights = o.synth_spec().random_weights(o.seed).map_err(std::io::Error::other)?;
    save_f32(&dir.join("model.safetensors"), &weights).map_err(std::io::Error::other)
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
    // Random, not the clock: two generators of one model in one process must not share a name.
    let tmp = parent.join(format!(".{name}.tmp-{}-{}", std::process::id(), crate::ids::hex(8)));
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    /// `twinkle generate-model` with no options writes the tiny model `generate://` serves.
    #[test]
    fn command_line_defaults_are_the_tiny_model() {
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            o: GenOptions,
        }
        assert_eq!(Cli::parse_from(["generate-model"]).o, GenOptions::qwen3_tiny());
        let c = Cli::parse_from(["generate-model", "--layers", "3"]);
        assert_eq!(c.o, GenOptions { layers: 3, ..GenOptions::qwen3_tiny() });
    }
}
