//! Throughput probe (ignored by default; run with `cargo test --release --test engine_perf --
//! --ignored --nocapture`): one forward+backward of a Qwen2.5-0.5B-shaped slice (2 layers,
//! 32k vocabulary), reported as tokens/s and achieved GFLOP/s.

mod engine_support;

use std::time::Instant;

use engine_support::{Rng, Spec, fresh_adapter, test_shape, tokens, write_model};
use twinkle::engine::synth::SynthSpec;
use twinkle::engine::{Datum, LossFn, LossInputs, Model, Target, forward_backward};

#[test]
#[ignore]
fn forward_backward_throughput() {
    let tmp = tempfile::tempdir().unwrap();
    let shape = SynthSpec {
        vocab: 32768,
        hidden: 896,
        inter: 4864,
        heads: 14,
        head_dim: 64,
        rope_theta: 1e6,
        tied: true,
        ..test_shape()
    };
    let spec = Spec { shape, implied_head_dim: true, new_style: false };
    write_model(tmp.path(), &spec, 1);
    let model = Model::load(tmp.path()).unwrap();
    let targets = Target::LAYER.to_vec();
    let mut ad = fresh_adapter(&model, 16, 32.0, targets, 1);
    let mut rng = Rng(2);
    let data: Vec<Datum> = (0..4)
        .map(|_| Datum {
            input_tokens: tokens(&mut rng, 256, spec.vocab),
            inputs: LossInputs {
                target_tokens: tokens(&mut rng, 256, spec.vocab),
                k: 1,
                ..Default::default()
            },
        })
        .collect();
    let n_tok = 4.0 * 256.0;
    // Matmul FLOPs per token: 2·params per linear forward, ×2 with backward (dx only: the base
    // is frozen, and the head's logit gradient comes out of the same pass); attention and the
    // small LoRA products ignored.
    let per_layer = 896.0 * (896.0 + 2.0 * 128.0 + 896.0) + 3.0 * 896.0 * 4864.0;
    let fwd = 2.0 * (2.0 * per_layer + 896.0 * spec.vocab as f64);
    for _ in 0..2 {
        let t = Instant::now();
        let out =
            forward_backward(&model, Some(&mut ad), &data, &LossFn::CrossEntropy, false).unwrap();
        let s = t.elapsed().as_secs_f64();
        assert!(out.loss_sum.is_finite() && out.loss_sum > 0.0);
        println!(
            "fwd+bwd {:.0} tokens/s, ~{:.1} GFLOP/s ({} threads)",
            n_tok / s,
            2.0 * fwd * n_tok / s / 1e9,
            rayon::current_num_threads()
        );
        let t = Instant::now();
        forward_backward(&model, Some(&mut ad), &data, &LossFn::CrossEntropy, true).unwrap();
        let s = t.elapsed().as_secs_f64();
        println!("forward {:.0} tokens/s, ~{:.1} GFLOP/s", n_tok / s, fwd * n_tok / s / 1e9);
    }
}

#[test]
#[ignore]
fn matmul_layouts_throughput() {
    use twinkle::engine::backend::{MatMul, backend};
    let (m, k, n) = (1024, 896, 4096);
    let a = vec![0.5f32; m * k.max(n)];
    let b = vec![0.25f32; k * n];
    let mut out = vec![0.0f32; m * n.max(k)];
    for (name, mm) in [
        ("x·Wᵀ (linear)", MatMul::linear(m, k, n)),
        ("dy·W (dx)", MatMul { m, k: n, n: k, trans_a: false, trans_b: false, accumulate: false }),
        ("x·W", MatMul { m, k, n, trans_a: false, trans_b: false, accumulate: false }),
        (
            "dyᵀ·x (grad)",
            MatMul { m: n, k: m, n: k, trans_a: true, trans_b: false, accumulate: true },
        ),
    ] {
        let t = Instant::now();
        for _ in 0..3 {
            backend().matmul(&mut out, &a, &b, mm);
        }
        if !mm.accumulate {
            // Constant operands: every entry is k · 0.5 · 0.25.
            let want = mm.k as f32 * 0.125;
            assert!(out[..mm.m * mm.n].iter().all(|v| (v - want).abs() <= 1e-3 * want));
        }
        let s = t.elapsed().as_secs_f64() / 3.0;
        println!("{name}: {:.1} GFLOP/s", 2.0 * (mm.m * mm.k * mm.n) as f64 / s / 1e9);
    }
}
