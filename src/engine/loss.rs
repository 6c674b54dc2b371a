//! Losses (all SUMMED over tokens and datums): the loss functions with their per-token term and
//! derivative (one definition for every device), and the batch types (`Datum`, `DatumOutput`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::error::{EngineError, Result};

/// A loss function with its configuration.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LossFn {
    /// `−Σ w · lp` (weights may be negative; `[N,K]` targets allowed).
    CrossEntropy,
    /// `−Σ exp(lp − lp_sampler) · A`.
    ImportanceSampling,
    /// `−Σ min(r·A, clamp(r, low, high)·A)`, absolute ratio bounds.
    Ppo { clip_low: f64, clip_high: f64 },
    /// `−Σ stopgrad(clamp(r, low, high)) · A · lp`.
    Cispo { clip_low: f64, clip_high: f64 },
    /// `−Σ [lp·A − ½·β·(lp − lp_sampler)²]`.
    Dro { beta: f64 },
}

impl LossFn {
    /// Parses a Tinker loss name and its numeric `loss_fn_config`, refusing unknown keys and
    /// out-of-range values (a user error naming the field): the per-token term assumes them,
    /// e.g. `f64::clamp` panics when the low clip bound exceeds the high one.
    pub fn from_name(name: &str, config: &BTreeMap<String, f64>) -> Result<LossFn> {
        let known: &[&str] = match name {
            "cross_entropy" | "importance_sampling" => &[],
            "ppo" | "cispo" => &["clip_low_threshold", "clip_high_threshold"],
            "dro" => &["beta"],
            other => return Err(EngineError::UnknownLoss(other.to_string())),
        };
        if let Some(key) = config.keys().find(|k| !known.contains(&k.as_str())) {
            let accepted = if known.is_empty() { "none".to_string() } else { known.join(", ") };
            return Err(EngineError::LossConfig {
                field: key.clone(),
                message: format!("unknown key for loss `{name}` (accepted: {accepted})"),
            });
        }
        let get = |k: &str, d: f64| -> Result<f64> {
            let v = config.get(k).copied().unwrap_or(d);
            if !v.is_finite() {
                return Err(EngineError::LossConfig {
                    field: k.into(),
                    message: format!("{v} is not a finite number"),
                });
            }
            Ok(v)
        };
        Ok(match name {
            "cross_entropy" => LossFn::CrossEntropy,
            "importance_sampling" => LossFn::ImportanceSampling,
            "ppo" | "cispo" => {
                let (dl, dh) = if name == "ppo" { (0.8, 1.2) } else { (0.0, 4.0) };
                let (clip_low, clip_high) =
                    clip_bounds(get("clip_low_threshold", dl)?, get("clip_high_threshold", dh)?)?;
                if name == "ppo" {
                    LossFn::Ppo { clip_low, clip_high }
                } else {
                    LossFn::Cispo { clip_low, clip_high }
                }
            }
            _ => {
                let beta = get("beta", 0.1)?;
                if beta < 0.0 {
                    return Err(EngineError::LossConfig {
                        field: "beta".into(),
                        message: format!("{beta} is negative; the penalty weight must be >= 0"),
                    });
                }
                LossFn::Dro { beta }
            }
        })
    }

    pub fn name(&self) -> &'static str {
        match self {
            LossFn::CrossEntropy => "cross_entropy",
            LossFn::ImportanceSampling => "importance_sampling",
            LossFn::Ppo { .. } => "ppo",
            LossFn::Cispo { .. } => "cispo",
            LossFn::Dro { .. } => "dro",
        }
    }

    /// Whether the loss reads sampler logprobs and advantages.
    pub fn is_rl(&self) -> bool {
        !matches!(self, LossFn::CrossEntropy)
    }

    /// One target's loss term and its derivative w.r.t. `lp`. `w` is the cross-entropy weight;
    /// `slp`/`adv` the sampler logprob and advantage (RL losses).
    pub(crate) fn term(&self, lp: f64, w: f64, slp: f64, adv: f64) -> (f64, f64) {
        match *self {
            LossFn::CrossEntropy => (-w * lp, -w),
            LossFn::ImportanceSampling => {
                let r = (lp - slp).exp();
                (-r * adv, -r * adv)
            }
            LossFn::Ppo { clip_low, clip_high } => {
                let r = (lp - slp).exp();
                let unclipped = r * adv;
                let clipped = r.clamp(clip_low, clip_high) * adv;
                if unclipped <= clipped {
                    (-unclipped, -unclipped)
                } else {
                    // The clamped branch is constant in lp wherever it is the smaller one.
                    (-clipped, 0.0)
                }
            }
            LossFn::Cispo { clip_low, clip_high } => {
                let r = (lp - slp).exp().clamp(clip_low, clip_high);
                (-r * adv * lp, -r * adv)
            }
            LossFn::Dro { beta } => {
                let d = lp - slp;
                (-(lp * adv - 0.5 * beta * d * d), -(adv - beta * d))
            }
        }
    }
}

/// Importance-ratio clip bounds: ratios are positive, so `0 <= low <= high` (and `high > 0`).
fn clip_bounds(low: f64, high: f64) -> Result<(f64, f64)> {
    if low < 0.0 {
        return Err(EngineError::LossConfig {
            field: "clip_low_threshold".into(),
            message: format!("{low} is negative; ratio bounds must be >= 0"),
        });
    }
    if high <= 0.0 || low > high {
        return Err(EngineError::LossConfig {
            field: "clip_high_threshold".into(),
            message: format!(
                "{high} must be > 0 and >= clip_low_threshold ({low}): the bounds are [low, high]"
            ),
        });
    }
    Ok((low, high))
}

/// Per-datum inputs of a loss, aligned with the datum's `N` input positions.
///
/// The serde form is the internal hop's datum (`crate::protocol::internal`): the engine's type
/// travels as is, so the one validation ([`super::batch::check_batch`]) serves every caller.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LossInputs {
    /// `N·k` target ids (row-major `[N, k]`).
    pub target_tokens: Vec<u32>,
    /// Targets per position (1 for the usual `[N]` shape; 0 reads as 1).
    #[serde(default = "one")]
    pub k: usize,
    /// Cross-entropy weights, `N·k` (all ones when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weights: Option<Vec<f32>>,
    /// Sampler logprobs `[N]` (RL losses).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<Vec<f32>>,
    /// Advantages `[N]` (RL losses).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advantages: Option<Vec<f32>>,
}

fn one() -> usize {
    1
}

/// One training example: `input_tokens[i]` predicts `inputs.target_tokens[i]`. On the wire:
/// `{"tokens": [...], "target_tokens": [...], "k": 1, "weights": [...], ...}`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Datum {
    #[serde(rename = "tokens")]
    pub input_tokens: Vec<u32>,
    #[serde(flatten)]
    pub inputs: LossInputs,
}

/// Per-datum outputs.
#[derive(Debug, Clone, PartialEq)]
pub struct DatumOutput {
    /// Target log-probabilities, shape of `target_tokens` (`N·k`).
    pub logprobs: Vec<f32>,
    /// Loss per position `[N]` (summed over the k targets).
    pub elementwise_loss: Vec<f32>,
}

#[cfg(test)]
mod tests {
    use super::LossFn;

    fn close(a: (f64, f64), b: (f64, f64)) -> bool {
        (a.0 - b.0).abs() < 1e-12 && (a.1 - b.1).abs() < 1e-12
    }

    #[test]
    fn bad_configs_name_the_field() {
        let cfg = |kv: &[(&str, f64)]| kv.iter().map(|(k, v)| (k.to_string(), *v)).collect();
        let msg = |name: &str, kv: &[(&str, f64)]| {
            LossFn::from_name(name, &cfg(kv)).unwrap_err().to_string()
        };
        let swapped = [("clip_low_threshold", 5.0), ("clip_high_threshold", 0.1)];
        for name in ["ppo", "cispo"] {
            let m = msg(name, &swapped);
            assert!(m.contains("clip_high_threshold") && m.contains("clip_low_threshold"), "{m}");
            let m = msg(name, &[("clip_low_threshold", -0.5)]);
            assert!(m.contains("loss_fn_config.clip_low_threshold"), "{m}");
            let m = msg(name, &[("clip_high_threshold", f64::INFINITY)]);
            assert!(m.contains("clip_high_threshold") && m.contains("finite"), "{m}");
        }
        assert!(msg("dro", &[("beta", -1.0)]).contains("loss_fn_config.beta"));
        assert!(msg("dro", &[("beta", f64::NAN)]).contains("loss_fn_config.beta"));
        let m = msg("ppo", &[("clip_ratio", 0.2)]);
        assert!(m.contains("loss_fn_config.clip_ratio") && m.contains("clip_low_threshold"), "{m}");
        assert!(msg("cross_entropy", &[("beta", 0.1)]).contains("loss_fn_config.beta"));
        // Equal bounds are a valid (degenerate) clip range.
        let eq = [("clip_low_threshold", 1.0), ("clip_high_threshold", 1.0)];
        assert!(LossFn::from_name("ppo", &cfg(&eq)).is_ok());
    }

    #[test]
    fn terms_match_hand_derived_values() {
        // (loss term, ∂term/∂lp) with lp, weight, sampler lp, advantage.
        assert!(close(LossFn::CrossEntropy.term(-2.0, 0.5, 0.0, 0.0), (1.0, -0.5)));
        assert!(close(LossFn::CrossEntropy.term(-2.0, -1.0, 0.0, 0.0), (-2.0, 1.0)));
        assert!(close(LossFn::ImportanceSampling.term(-1.0, 0.0, -1.0, 2.0), (-2.0, -2.0)));
        let ppo = LossFn::Ppo { clip_low: 0.8, clip_high: 1.2 };
        let l15 = 1.5f64.ln();
        // r = 1.5, A = +1: min(1.5, 1.2) = 1.2 from the clipped (constant) branch.
        assert!(close(ppo.term(l15, 0.0, 0.0, 1.0), (-1.2, 0.0)));
        // r = 1.5, A = −1: min(−1.5, −1.2) = −1.5, unclipped: ∂(r·A)/∂lp = r·A.
        assert!(close(ppo.term(l15, 0.0, 0.0, -1.0), (1.5, 1.5)));
        // Inside the range both branches agree.
        assert!(close(ppo.term(0.0, 0.0, 0.0, 3.0), (-3.0, -3.0)));
        let cispo = LossFn::Cispo { clip_low: 0.0, clip_high: 4.0 };
        // r = e^{ln 5} = 5 → clamped to 4, stop-gradient: term −4·A·lp.
        assert!(close(
            cispo.term(5f64.ln() - 1.0, 0.0, -1.0, 1.0),
            (-4.0 * (5f64.ln() - 1.0), -4.0)
        ));
        let dro = LossFn::Dro { beta: 0.1 };
        // −(lp·A − ½β(lp − slp)²) = −(−1 − 0.05) = 1.05; ∂ = −(A − β(lp − slp)) = −0.9.
        assert!(close(dro.term(-1.0, 0.0, -2.0, 1.0), (1.05, -0.9)));
    }
}
