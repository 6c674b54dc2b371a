//! Unit tests of `engine::sampling` (the pick against a full-sort reading of its definition).
use super::*;
use crate::engine::synth::SynthRng;

/// Steps 3-5 as the module docs state them, by a full sort of every candidate.
fn by_definition(logits: &[f32], p: &SamplingParams, u: f32) -> u32 {
    let Ok(Some(draw)) = p.draw(u) else { return u32::MAX };
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let mut c: Vec<Candidate> = logits
        .iter()
        .enumerate()
        .map(|(t, &x)| {
            let q = token_weight((f64::from(x) - f64::from(max)) * draw.inv_t);
            (canonical_key(x, t as u32), q)
        })
        .collect();
    c.sort_unstable();
    let k = if draw.top_k > 0 { (draw.top_k as usize).min(c.len()) } else { c.len() };
    let sums: Vec<u128> = c[..k]
        .iter()
        .scan(0u128, |s, x| {
            *s += u128::from(x.1);
            Some(*s)
        })
        .collect();
    let w = sums[k - 1];
    let n = sums.iter().position(|&s| s << 24 >= u128::from(draw.top_p24) * w).unwrap_or(0);
    let target = (u128::from(draw.m) * sums[n]) >> 24;
    candidate_token(c[sums.iter().position(|&s| s > target).unwrap_or(0)])
}

/// The bucketed pass picks the token of the definition: flat and peaked rows, ties, masked
/// tokens, one huge bucket, several temperatures, top-p and top-k, draws across `[0, 1)`.
#[test]
fn picks_follow_the_definition() {
    let mut rng = SynthRng(21);
    let flat = rng.vec(3001, 8.0);
    let peaked: Vec<f32> = rng.vec(3001, 1.0).iter().map(|x| x.powi(8) * 30.0).collect();
    let mut ties: Vec<f32> = rng.vec(3001, 1.0).iter().map(|x| (x * 4.0).round()).collect();
    ties[7] = f32::NEG_INFINITY;
    ties[8] = -0.0;
    let same = vec![1.5f32; 2500];
    for logits in [&flat, &peaked, &ties, &same] {
        for (t, k, p) in
            [(1.0, -1, 1.0), (0.7, -1, 0.9), (2.5, -1, 0.5), (1.0, 50, 0.95), (1.0, -1, 1e-9)]
        {
            let sp =
                SamplingParams { temperature: t, top_k: k, top_p: p, ..SamplingParams::new(1) };
            for d in 0..40 {
                let u = (d as f32 + rng.next_f32().abs()) / 40.0;
                let (got, _) = sample_token(logits, &sp, u.min(0.999_999)).unwrap();
                assert_eq!(got, by_definition(logits, &sp, u.min(0.999_999)), "T={t} p={p}");
            }
        }
    }
}
