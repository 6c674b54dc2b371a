//! Random-weight models built straight on the GPU for benchmarks: weights are generated tensor by
//! tensor on the host by `engine::synth` (the same per-tensor streams as the CPU benchmark and
//! the `generate://` models, so one seed gives one model on both) and uploaded as `T`, so a 7B
//! shape never exists as an f32 file or an f32 host copy.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::linear::DLinear;
use super::model::{Act, CudaModel, DLayer, R, upload};
use super::{CudaDevice, CudaError};
use crate::engine::models::ModelConfig;
use crate::engine::synth::{Init, SynthSpec, TensorPlan, fill_tensor};

/// Shapes known to the GPU benchmark: `engine::synth`'s names plus larger Qwen2.5 shapes, and
/// `tiny` (the benchmarks' code paths at a size the CPU execution layer runs in seconds).
pub fn bench_shape(name: &str) -> Option<SynthSpec> {
    if let Some(s) = SynthSpec::named(name) {
        return Some(s);
    }
    match name.to_ascii_lowercase().as_str() {
        "tiny" => Some(SynthSpec {
            arch: "Qwen2ForCausalLM".into(),
            vocab: 1024,
            hidden: 128,
            inter: 256,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            head_dim: 32,
            rope_theta: 1_000_000.0,
            eps: 1e-6,
            max_positions: 4096,
            tied: false,
            init: Init::Spread,
        }),
        "qwen2.5-7b" | "qwen2.5-7b-instruct" => Some(SynthSpec {
            arch: "Qwen2ForCausalLM".into(),
            vocab: 152_064,
            hidden: 3584,
            inter: 18_944,
            layers: 28,
            heads: 28,
            kv_heads: 4,
            head_dim: 128,
            rope_theta: 1_000_000.0,
            eps: 1e-6,
            max_positions: 32_768,
            tied: false,
            init: Init::Spread,
        }),
        _ => None,
    }
}

/// The engine config of a synthetic shape (as `Model::load` would build from its config.json).
pub fn spec_config(s: &SynthSpec) -> ModelConfig {
    let inv_freq = (0..s.head_dim / 2)
        .map(|i| 1.0 / s.rope_theta.powf((2 * i) as f64 / s.head_dim as f64))
        .collect();
    ModelConfig {
        arch: s.arch.clone(),
        vocab_size: s.vocab,
        hidden_size: s.hidden,
        intermediate_size: s.inter,
        num_layers: s.layers,
        num_heads: s.heads,
        num_kv_heads: s.kv_heads,
        head_dim: s.head_dim,
        rms_norm_eps: s.eps as f32,
        rope_theta: s.rope_theta,
        max_position_embeddings: s.max_positions,
        tie_word_embeddings: s.tied,
        eos_token_ids: vec![2],
        bos_token_id: Some(1),
        dtype: "float32".into(),
        qkv_bias: s.arch == "Qwen2ForCausalLM",
        qk_norm: s.arch == "Qwen3ForCausalLM",
        inv_freq,
    }
}

/// The host values of one tensor of a synthetic model as `T`: exactly what
/// [`CudaModel::synthetic`] uploads, and for `f32` exactly the CPU benchmark's tensor of that
/// name (`SynthSpec::random_weights`).
pub fn host_tensor<T: Act>(plan: &TensorPlan, seed: u64) -> Vec<T> {
    let mut v = vec![T::from_f32(0.0); plan.numel()];
    fill_tensor(seed, plan, &mut v, T::from_f32);
    v
}

impl<T: Act> CudaModel<T> {
    /// A random-weight model of shape `spec` on `dev` (for benchmarks; not a trained model).
    pub fn synthetic(dev: Arc<CudaDevice>, spec: &SynthSpec, seed: u64) -> R<Self> {
        let c = spec_config(spec);
        let hdp = c.head_dim.div_ceil(32) * 32;
        if hdp > 256 || !c.num_heads.is_multiple_of(c.num_kv_heads.max(1)) {
            return Err(CudaError::Shape {
                kernel: "CudaModel::synthetic",
                msg: format!("unsupported shape {spec:?}"),
            });
        }
        let d = &*dev;
        let plans: BTreeMap<String, TensorPlan> =
            spec.tensors().into_iter().map(|p| (p.name.clone(), p)).collect();
        let gen_host = |name: String| -> R<Vec<T>> {
            let plan = plans.get(&name).ok_or_else(|| CudaError::Shape {
                kernel: "CudaModel::synthetic",
                msg: format!("the synthetic shape has no tensor {name}"),
            })?;
            Ok(host_tensor::<T>(plan, seed))
        };
        let gen_t = |name: String| upload(d, &gen_host(name)?);
        let (h, i, hd) = (c.hidden_size, c.intermediate_size, c.head_dim);
        let qd = c.num_heads * hd;
        let embed = gen_t("model.embed_tokens.weight".into())?;
        let mut layers = Vec::with_capacity(c.num_layers);
        for l in 0..c.num_layers {
            let p = format!("model.layers.{l}");
            let lin = |name: &str, inp: usize, out: usize, bias: bool| -> R<DLinear<T>> {
                Ok(DLinear {
                    w: gen_t(format!("{p}.{name}.weight"))?,
                    b: if bias { Some(gen_t(format!("{p}.{name}.bias"))?) } else { None },
                    inp,
                    out,
                })
            };
            // q, k, v and gate, up stacked into one linear each, as `CudaModel::new` does
            let host = |name: &str, bias: bool| -> R<(Vec<T>, Option<Vec<T>>)> {
                let b = if bias { Some(gen_host(format!("{p}.{name}.bias"))?) } else { None };
                Ok((gen_host(format!("{p}.{name}.weight"))?, b))
            };
            let qkv = DLinear::stacked(
                d,
                h,
                &[
                    host("self_attn.q_proj", c.qkv_bias)?,
                    host("self_attn.k_proj", c.qkv_bias)?,
                    host("self_attn.v_proj", c.qkv_bias)?,
                ],
            )?;
            let o = lin("self_attn.o_proj", qd, h, false)?;
            let gate_up = DLinear::stacked(
                d,
                h,
                &[host("mlp.gate_proj", false)?, host("mlp.up_proj", false)?],
            )?;
            let down = lin("mlp.down_proj", i, h, false)?;
            let qk_norm = if c.qk_norm {
                Some((
                    gen_t(format!("{p}.self_attn.q_norm.weight"))?,
                    gen_t(format!("{p}.self_attn.k_norm.weight"))?,
                ))
            } else {
                None
            };
            layers.push(DLayer {
                input_norm: gen_t(format!("{p}.input_layernorm.weight"))?,
                qkv,
                o,
                qk_norm,
                post_norm: gen_t(format!("{p}.post_attention_layernorm.weight"))?,
                gate_up,
                down,
            });
        }
        let final_norm = gen_t("model.norm.weight".into())?;
        let lm_head =
            if c.tie_word_embeddings { None } else { Some(gen_t("lm_head.weight".into())?) };
        CudaModel::assemble(dev, c, hdp, embed, layers, final_norm, lm_head)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Model;
    use crate::engine::cuda::{CudaAdapter, CudaKvCache};

    #[test]
    fn spec_config_matches_what_the_loader_builds() {
        for arch in ["Qwen2ForCausalLM", "Qwen3ForCausalLM"] {
            let spec = SynthSpec {
                arch: arch.into(),
                vocab: 48,
                hidden: 32,
                inter: 40,
                layers: 2,
                heads: 4,
                kv_heads: 2,
                head_dim: 8,
                rope_theta: 10_000.0,
                eps: 1e-6,
                max_positions: 64,
                tied: arch == "Qwen3ForCausalLM",
                init: Init::Spread,
            };
            let dir = std::env::temp_dir()
                .join(format!("twinkle-cuda-spec-{}-{arch}", std::process::id()));
            spec.write(&dir, 3).unwrap();
            let model = Model::load(&dir).unwrap();
            let _ = std::fs::remove_dir_all(&dir);
            assert_eq!(model.config(), &spec_config(&spec), "{arch}");
        }
        assert_eq!(bench_shape("qwen2.5-7b").map(|s| s.hidden), Some(3584));
        assert_eq!(bench_shape("Qwen2.5-0.5B").map(|s| s.layers), Some(24));
        assert!(bench_shape("gpt-9").is_none());
    }

    #[test]
    fn device_types_can_move_to_worker_threads() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<CudaModel<half::bf16>>();
        send_sync::<CudaModel<f32>>();
        send_sync::<CudaAdapter>();
        send_sync::<CudaKvCache<half::bf16>>();
    }
}
