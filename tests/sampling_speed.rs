//! Timing of sample_token on a Qwen-sized vocabulary. Ignored by default (timings on a shared
//! machine are noisy); run with `cargo test --test sampling_speed -- --ignored --nocapture`.

use std::time::Instant;

use twinkle::engine::rng::uniform_f32;
use twinkle::engine::sampling::{SamplingParams, sample_token};

#[test]
#[ignore = "timing; run explicitly"]
fn qwen_vocab_timing() -> anyhow::Result<()> {
    let vocab = 151_936;
    // Flat: uniform logits in [-10, 10) (the worst case: the walk goes deep). Peaked: a cubed
    // spread like an LLM's, where a few tokens hold most of the mass.
    let flat: Vec<f32> = (0..vocab).map(|i| uniform_f32(1, 2, i) * 20.0 - 10.0).collect();
    let peaked: Vec<f32> = (0..vocab).map(|i| uniform_f32(1, 2, i).powi(8) * 30.0).collect();
    for (name, logits) in [("flat", &flat), ("peaked", &peaked)] {
        for (t, k, p) in
            [(0.0, -1, 1.0), (1.0, -1, 1.0), (1.0, 50, 1.0), (0.7, -1, 0.9), (1.0, 20, 0.95)]
        {
            let sp =
                SamplingParams { temperature: t, top_k: k, top_p: p, ..SamplingParams::new(1) };
            let start = Instant::now();
            let n = 20;
            for d in 0..n {
                sample_token(logits, &sp, uniform_f32(3, 0, d))?;
            }
            let per = start.elapsed().as_secs_f64() * 1e3 / n as f64;
            println!("{name}: T={t} top_k={k} top_p={p}: {per:.2} ms/token");
            // A linear-time path; a full sort per token at debug speed would take far longer.
            assert!(per < 250.0, "{name}: {per:.1} ms per token");
        }
    }
    Ok(())
}
