//! Parity of the device loss-term kernel (`loss_term_fwd`, used by every training step) with the
//! engine's CPU definition `LossFn::term`, for every `LossFn` variant, including the branch
//! edges (PPO / CISPO ratios at and beyond the clip bounds, zero and negative advantages and
//! weights) and padded targets (-1) of a [N, K] batch.

use anyhow::Result;
use twinkle::engine::LossFn;
use twinkle::engine::cuda::launch as k;
use twinkle::engine::cuda::{CudaDevice, loss_term_reference};

use super::Rng;

/// Every variant, with the clip bounds and beta of the engine's defaults and some others.
const LOSSES: [LossFn; 8] = [
    LossFn::CrossEntropy,
    LossFn::ImportanceSampling,
    LossFn::Ppo { clip_low: 0.8, clip_high: 1.2 },
    LossFn::Ppo { clip_low: 0.5, clip_high: 3.0 },
    LossFn::Cispo { clip_low: 0.0, clip_high: 4.0 },
    LossFn::Cispo { clip_low: 0.9, clip_high: 1.1 },
    LossFn::Dro { beta: 0.1 },
    LossFn::Dro { beta: 2.0 },
];

pub fn loss_terms(dev: &CudaDevice) -> Result<()> {
    let s = dev.stream();
    let (n, kt) = (300usize, 2usize);
    let mut rng = Rng(0x5eed_1055);
    // logprobs in [-8, 0]; the sampler's differ by up to +-1 (ratios e^-1 .. e), and some rows
    // sit exactly on a ratio of 1 or on the PPO / CISPO clip edges
    let lp: Vec<f32> = (0..n * kt).map(|_| (-8.0 * rng.uniform()) as f32).collect();
    let mut slp: Vec<f32> = (0..n).map(|r| lp[r * kt] + rng.vec(1, 1.0)[0] as f32).collect();
    for (r, edge) in
        [(0, 0.0f64), (1, 1.2f64.ln()), (2, 0.8f64.ln()), (3, 4.0f64.ln()), (4, 1.1f64.ln())]
    {
        slp[r] = (lp[r * kt] as f64 - edge) as f32;
    }
    let mut adv: Vec<f32> = rng.vec(n, 2.0).into_iter().map(|x| x as f32).collect();
    adv[5] = 0.0;
    let mut weights: Vec<f32> = rng.vec(n * kt, 1.5).into_iter().map(|x| x as f32).collect();
    weights[6] = 0.0;
    // every third row has one real target: its second column is padding
    let targets: Vec<i32> =
        (0..n * kt).map(|i| if i % kt == 1 && (i / kt) % 3 == 0 { -1 } else { 7 }).collect();

    let (lp_d, slp_d, adv_d) = (s.clone_htod(&lp)?, s.clone_htod(&slp)?, s.clone_htod(&adv)?);
    let (w_d, t_d) = (s.clone_htod(&weights)?, s.clone_htod(&targets)?);
    // The kernel on the batch above into an output of `out_len` (2 * n * kt fits); what it
    // wrote, downloaded: the terms and logprobs, and the coefficients.
    let run = |out_len: usize, loss: &LossFn| -> Result<(Vec<f64>, Vec<f32>)> {
        let mut out = s.alloc_zeros::<f64>(out_len)?;
        let mut coef = s.alloc_zeros::<f32>(n * kt)?;
        let outs = (&mut out.as_view_mut(), &mut coef.as_view_mut());
        let per_target = (&t_d.as_view(), &w_d.as_view());
        let rl = k::RlInputs { sampler_logprob: &slp_d.as_view(), advantages: &adv_d.as_view() };
        k::loss_term_fwd(dev, outs, &lp_d.as_view(), per_target, rl, loss)?;
        Ok((s.clone_dtoh(&out)?, s.clone_dtoh(&coef)?))
    };
    for loss in &LOSSES {
        let (out, coef) = run(2 * n * kt, loss)?;
        let mut worst = 0.0f64;
        for i in 0..n * kt {
            let r = i / kt;
            let (want_l, want_g, want_lp) = if targets[i] < 0 {
                (0.0, 0.0, 0.0)
            } else {
                let (l, g) = loss_term_reference(
                    loss,
                    lp[i] as f64,
                    weights[i] as f64,
                    slp[r] as f64,
                    adv[r] as f64,
                );
                (l, g, lp[i] as f64)
            };
            // f64 on both sides: only exp's last-ulp differences remain
            let err = (out[i] - want_l).abs() / want_l.abs().max(1.0);
            worst = worst.max(err);
            assert!(err < 1e-12, "{loss:?} term [{i}]: {} vs {want_l}", out[i]);
            assert_eq!(out[n * kt + i], want_lp, "{loss:?} logprob [{i}]");
            // the coefficient is -dLoss/dlogprob rounded to f32 on both sides
            let want_c = -(want_g as f32);
            assert!(
                (coef[i] - want_c).abs() <= 1e-6 * want_c.abs().max(1.0),
                "{loss:?} coef [{i}]: {} vs {want_c}",
                coef[i]
            );
        }
        eprintln!("  loss_term {}: worst relative term error {worst:.2e}", loss.name());
    }

    // shapes are checked, not trusted
    let err = run(2 * n * kt - 1, &LossFn::CrossEntropy);
    assert!(err.is_err(), "a short output buffer must be refused");
    Ok(())
}
