//! bf16 checkpoints stay bf16 in memory: about half the resident bytes of the f32 equivalent,
//! and every result (logits, loss, LoRA gradients) bit-identical to the same checkpoint loaded
//! with all matrices converted to f32 first. The shape is large enough that the weights are
//! split into several conversion panels.

mod engine_support;

use engine_support::full_lora;
use twinkle::engine::synth::{SynthRng, SynthSpec};
use twinkle::engine::{Adapter, Datum, LossFn, LossInputs, Model, forward_backward};

fn spec() -> SynthSpec {
    SynthSpec {
        vocab: 1500,
        hidden: 128,
        inter: 1100,
        layers: 2,
        heads: 4,
        kv_heads: 2,
        head_dim: 32,
        tied: false,
        ..SynthSpec::qwen2_5_0_5b()
    }
}

fn adapter(model: &Model) -> Adapter {
    full_lora(model, 3, 11, 0.3)
}

#[test]
fn bf16_checkpoint_is_held_in_bf16_with_the_f32_results() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = spec();
    spec.write_as(tmp.path(), 5, true).unwrap();
    let bf = Model::load(tmp.path()).unwrap();
    let f32m = Model::load_f32(tmp.path()).unwrap();
    assert_eq!(bf.config().dtype, "bfloat16");
    assert_eq!(bf.config(), f32m.config());

    // Matrices at 2 bytes a value; only the f32 norms and biases keep the ratio above ½.
    let (b, f) = (bf.weight_bytes(), f32m.weight_bytes());
    let ratio = b as f64 / f as f64;
    assert!((0.5..0.505).contains(&ratio), "bf16 {b} B vs f32 {f} B");

    let mut rng = SynthRng(21);
    let toks = rng.tokens(37, spec.vocab);
    close("base logits", &bf.logits(None, &toks).unwrap(), &f32m.logits(None, &toks).unwrap());

    let data: Vec<Datum> = [29usize, 13]
        .iter()
        .map(|&n| Datum {
            input_tokens: rng.tokens(n, spec.vocab),
            inputs: LossInputs {
                target_tokens: rng.tokens(n, spec.vocab),
                k: 1,
                weights: Some(vec![1.0; n]),
                logprobs: None,
                advantages: None,
            },
        })
        .collect();
    let (mut ab, mut af) = (adapter(&bf), adapter(&f32m));
    close("adapted logits", &adapted_logits(&bf, &ab), &adapted_logits(&f32m, &af));
    let ob = forward_backward(&bf, Some(&mut ab), &data, &LossFn::CrossEntropy, false).unwrap();
    let of = forward_backward(&f32m, Some(&mut af), &data, &LossFn::CrossEntropy, false).unwrap();
    assert!(
        (ob.loss_sum - of.loss_sum).abs() <= 1e-5 * of.loss_sum.abs(),
        "loss {} vs {}",
        ob.loss_sum,
        of.loss_sum
    );
    let (gb, gf) = (ab.gradients(), af.gradients());
    assert_eq!(gb.len(), gf.len());
    for (name, g) in &gb {
        close(name, g.data(), gf[name].data());
    }
}

/// Logits with `ad` applied.
fn adapted_logits(model: &Model, ad: &Adapter) -> Vec<f32> {
    let toks: Vec<u32> = (0..9).map(|i| i * 7 % model.config().vocab_size as u32).collect();
    model.logits(Some(ad), &toks).unwrap()
}

/// The bf16-held model computes on exactly the f32 values of its weights; only the products'
/// blocking differs (panels for bf16, whole matrices for f32), so results agree to f32 rounding:
/// every element within 1e-5 of the tensor's largest magnitude (a wrong conversion or panel
/// offset is off by O(1)). NaN anywhere fails.
fn close(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}");
    let scale = want.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    assert!(scale > 0.0, "{what} is all zeros: the comparison would prove nothing");
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        assert!((a - b).abs() <= 1e-5 * scale, "{what}[{i}]: {a} vs {b} (scale {scale})");
    }
}
