//! AdamW over an adapter's LoRA tensors with Tinker's `AdamParams` (torch.optim.AdamW
//! semantics: decoupled weight decay, bias correction), optional global-norm clipping.

use serde::{Deserialize, Serialize};

use super::error::{EngineError, Result};
use super::lora::Adapter;

/// Tinker `AdamParams`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AdamParams {
    pub learning_rate: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Global L2 norm clip over all LoRA gradients; 0 = off.
    pub grad_clip_norm: f64,
}

impl Default for AdamParams {
    fn default() -> Self {
        AdamParams {
            learning_rate: 1e-4,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-12,
            weight_decay: 0.0,
            grad_clip_norm: 0.0,
        }
    }
}

/// What one optimizer step reports.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OptimMetrics {
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Step number after this step (1 for the first).
    pub step: u64,
    pub learning_rate: f64,
}

impl OptimMetrics {
    /// Metrics map for `OptimStepResponse.metrics`.
    pub fn to_map(&self) -> std::collections::BTreeMap<String, f64> {
        [
            ("grad_norm:mean".to_string(), self.grad_norm),
            ("step:max".to_string(), self.step as f64),
            ("learning_rate:mean".to_string(), self.learning_rate),
        ]
        .into()
    }
}

/// Largest accepted `learning_rate`. Adam moves each weight by about `lr` per step whatever the
/// gradient's scale, so a rate above 10 destroys any model in one step, and 1e308 overflows the
/// weights to inf; such a value is a typo or an attack, refused up front rather than
/// discovered as NaN losses on the next forward.
pub const MAX_LEARNING_RATE: f64 = 10.0;
/// Largest accepted `eps` (it only has to dominate a zero second moment).
pub const MAX_EPS: f64 = 1e6;

impl AdamParams {
    /// Every field finite and in range; the message names the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &str, v: f64, want: &str| {
            Err(EngineError::InvalidInput(format!("adam_params.{field} = {v}: {want}")))
        };
        let lr = self.learning_rate;
        if !(lr.is_finite() && (0.0..=MAX_LEARNING_RATE).contains(&lr)) {
            return bad("learning_rate", lr, &format!("must be in [0, {MAX_LEARNING_RATE}]"));
        }
        for (field, b) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&b) {
                return bad(field, b, "must be in [0, 1)");
            }
        }
        // eps = 0 divides a zero first moment by a zero second moment: NaN weights.
        if !(self.eps.is_finite() && self.eps > 0.0 && self.eps <= MAX_EPS) {
            return bad("eps", self.eps, &format!("must be in (0, {MAX_EPS:e}]"));
        }
        // Decoupled decay multiplies the weights by (1 − lr·wd): above 1 it flips their sign.
        let wd = self.weight_decay;
        if !(wd.is_finite() && wd >= 0.0 && lr * wd <= 1.0) {
            return bad(
                "weight_decay",
                wd,
                &format!("must be >= 0 with learning_rate × weight_decay <= 1 (lr = {lr})"),
            );
        }
        if !(self.grad_clip_norm.is_finite() && self.grad_clip_norm >= 0.0) {
            return bad("grad_clip_norm", self.grad_clip_norm, "must be finite and >= 0 (0: off)");
        }
        Ok(())
    }
}

/// The error of an optimizer step refused for a non-finite accumulated gradient (the same on
/// every device; nothing was changed).
pub(crate) fn non_finite_gradient(grad_norm: f64) -> EngineError {
    EngineError::NonFinite(format!(
        "optim_step: the accumulated gradient overflowed (norm {grad_norm}); \
         call zero_grad or lower the loss scale; the weights were not changed"
    ))
}

impl Adapter {
    /// Applies one AdamW step with the accumulated gradients, then zeroes them.
    pub fn optim_step(&mut self, p: &AdamParams) -> Result<OptimMetrics> {
        p.validate()?;
        let sq: f64 = self
            .pairs()
            .iter()
            .map(|(_, l)| {
                l.a.g.iter().chain(&l.b.g).map(|g| (*g as f64) * (*g as f64)).sum::<f64>()
            })
            .sum();
        let grad_norm = sq.sqrt();
        if !grad_norm.is_finite() {
            // Checked before anything moves: a step through it would make every weight NaN.
            return Err(non_finite_gradient(grad_norm));
        }
        let clip = if p.grad_clip_norm > 0.0 && grad_norm > p.grad_clip_norm {
            p.grad_clip_norm / (grad_norm + 1e-6)
        } else {
            1.0
        };
        self.step += 1;
        let t = self.step as i32;
        let bc1 = 1.0 - p.beta1.powi(t);
        let bc2 = 1.0 - p.beta2.powi(t);
        let step_size = p.learning_rate / bc1;
        let decay = 1.0 - p.learning_rate * p.weight_decay;
        for (_, l) in self.pairs_mut() {
            for (_, t) in l.named_mut() {
                let (w, g, m, v) = (t.w.data_mut(), &mut t.g, &mut t.adam.m, &mut t.adam.v);
                for i in 0..w.len() {
                    let gi = g[i] as f64 * clip;
                    let mi = p.beta1 * m[i] as f64 + (1.0 - p.beta1) * gi;
                    let vi = p.beta2 * v[i] as f64 + (1.0 - p.beta2) * gi * gi;
                    m[i] = mi as f32;
                    v[i] = vi as f32;
                    let denom = (vi.sqrt() / bc2.sqrt()) + p.eps;
                    let wi = w[i] as f64 * decay - step_size * mi / denom;
                    w[i] = wi as f32;
                }
                g.fill(0.0);
            }
        }
        Ok(OptimMetrics { grad_norm, step: self.step, learning_rate: p.learning_rate })
    }
}
