//! Random-weight models built straight on the GPU for benchmarks: weights are generated tensor by
//! tensor on the host (the distributions of `engine::synth`) and uploaded as `T`, so a 7B shape
//! never exists as an f32 file or an f32 host copy.

use std::sync::Arc;

use rayon::prelude::*;

use super::model::{Act, CudaModel, DLayer, DLinear, R, upload};
use super::{CudaDevice, CudaError};
use crate::engine::backend::RopeTable;
use crate::engine::models::ModelConfig;
use crate::engine::synth::{SynthRng, SynthSpec};

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
        let mut rng = SynthRng(seed);
        // one seed per tensor, one stream per 1M-element chunk: parallel and reproducible
        let mut gen_t = |n: usize, scale: f32, offset: f32| -> R<cudarc::driver::CudaSlice<T>> {
            let seed = (rng.next_f32().to_bits() as u64) << 32 | rng.next_f32().to_bits() as u64;
            let mut v = vec![T::from_f32(0.0); n];
            v.par_chunks_mut(1 << 20).enumerate().for_each(|(ci, ch)| {
                let mut r = SynthRng(seed ^ (ci as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
                for x in ch {
                    *x = T::from_f32(r.next_f32() * scale + offset);
                }
            });
            upload(d, &v)
        };
        let (h, i, v, hd) = (c.hidden_size, c.intermediate_size, c.vocab_size, c.head_dim);
        let (qd, kvd) = (c.num_heads * hd, c.num_kv_heads * hd);
        let lin_scale = |inp: usize| 1.5 / (inp as f32).sqrt();
        let embed = gen_t(v * h, 0.1, 0.0)?;
        let mut layers = Vec::with_capacity(c.num_layers);
        for _ in 0..c.num_layers {
            let mut lin = |inp: usize, out: usize, bias: bool| -> R<DLinear<T>> {
                Ok(DLinear {
                    w: gen_t(out * inp, lin_scale(inp), 0.0)?,
                    b: if bias { Some(gen_t(out, 0.3, 0.0)?) } else { None },
                    inp,
                    out,
                })
            };
            let (q, k, vv, o) = (
                lin(h, qd, c.qkv_bias)?,
                lin(h, kvd, c.qkv_bias)?,
                lin(h, kvd, c.qkv_bias)?,
                lin(qd, h, false)?,
            );
            let (gate, up, down) = (lin(h, i, false)?, lin(h, i, false)?, lin(i, h, false)?);
            let qk_norm =
                if c.qk_norm { Some((gen_t(hd, 0.2, 1.0)?, gen_t(hd, 0.2, 1.0)?)) } else { None };
            layers.push(DLayer {
                input_norm: gen_t(h, 0.2, 1.0)?,
                q,
                k,
                v: vv,
                o,
                qk_norm,
                post_norm: gen_t(h, 0.2, 1.0)?,
                gate,
                up,
                down,
            });
        }
        let final_norm = gen_t(h, 0.2, 1.0)?;
        let lm_head =
            if c.tie_word_embeddings { None } else { Some(gen_t(v * h, lin_scale(h), 0.0)?) };
        let positions: Vec<u32> = (0..c.max_position_embeddings.max(1) as u32).collect();
        let rope = RopeTable::new(&positions, hd, &c.inv_freq);
        Ok(CudaModel {
            embed,
            final_norm,
            lm_head,
            cos: upload(d, &rope.cos)?,
            sin: upload(d, &rope.sin)?,
            layers,
            hdp,
            cfg: c,
            dev,
        })
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
