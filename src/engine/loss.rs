//! Losses (all SUMMED over tokens and datums) and the vocabulary-chunked output head: target
//! log-probabilities through an online log-sum-exp, and its backward, without ever holding the
//! whole `[tokens × vocab]` logits matrix.

use std::collections::BTreeMap;

use rayon::prelude::*;

use super::backend::{MatMul, backend};
use super::error::{EngineError, Result};
use super::lora::LoraPair;
use super::tensor::Tensor;

/// Vocabulary columns per chunk.
pub(crate) const VOCAB_CHUNK: usize = 8192;
/// Rows per block of the head (bounds the chunk buffer to ROW_BLOCK × VOCAB_CHUNK floats).
pub(crate) const ROW_BLOCK: usize = 1024;

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
    /// Parses a Tinker loss name and its numeric `loss_fn_config`.
    pub fn from_name(name: &str, config: &BTreeMap<String, f64>) -> Result<LossFn> {
        let get = |k: &str, d: f64| config.get(k).copied().unwrap_or(d);
        Ok(match name {
            "cross_entropy" => LossFn::CrossEntropy,
            "importance_sampling" => LossFn::ImportanceSampling,
            "ppo" => LossFn::Ppo {
                clip_low: get("clip_low_threshold", 0.8),
                clip_high: get("clip_high_threshold", 1.2),
            },
            "cispo" => LossFn::Cispo {
                clip_low: get("clip_low_threshold", 0.0),
                clip_high: get("clip_high_threshold", 4.0),
            },
            "dro" => LossFn::Dro { beta: get("beta", 0.1) },
            other => return Err(EngineError::UnknownLoss(other.to_string())),
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

/// Per-datum inputs of a loss, aligned with the datum's `N` input positions.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LossInputs {
    /// `N·k` target ids (row-major `[N, k]`).
    pub target_tokens: Vec<u32>,
    /// Targets per position (1 for the usual `[N]` shape).
    pub k: usize,
    /// Cross-entropy weights, `N·k` (all ones when absent).
    pub weights: Option<Vec<f32>>,
    /// Sampler logprobs `[N]` (RL losses).
    pub logprobs: Option<Vec<f32>>,
    /// Advantages `[N]` (RL losses).
    pub advantages: Option<Vec<f32>>,
}

/// One training example: `input_tokens[i]` predicts `inputs.target_tokens[i]`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Datum {
    pub input_tokens: Vec<u32>,
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

/// The vocabulary projection: `logits = h·Wᵀ + s·(h·Aᵀ)·Bᵀ`.
pub(crate) struct Head<'a> {
    pub w: &'a Tensor,
    pub lora: Option<&'a LoraPair>,
    pub scale: f32,
}

impl Head<'_> {
    fn vocab(&self) -> usize {
        self.w.dim(0)
    }

    /// `s·h·Aᵀ` for a block of rows (empty without LoRA).
    fn xa(&self, h: &[f32], rows: usize, hidden: usize) -> Vec<f32> {
        match self.lora {
            Some(p) => {
                let r = p.rank();
                let mut xa = vec![0.0f32; rows * r];
                backend().matmul(&mut xa, h, p.a.data(), MatMul::linear(rows, hidden, r));
                xa.iter_mut().for_each(|v| *v *= self.scale);
                xa
            }
            None => Vec::new(),
        }
    }

    /// Logits of columns `v0..v1` for a block of rows into `out` `[rows, v1−v0]`.
    #[allow(clippy::too_many_arguments)]
    fn chunk(
        &self,
        h: &[f32],
        xa: &[f32],
        rows: usize,
        hidden: usize,
        v0: usize,
        v1: usize,
        out: &mut [f32],
    ) {
        let be = backend();
        let c = v1 - v0;
        be.matmul(
            out,
            h,
            &self.w.data()[v0 * hidden..v1 * hidden],
            MatMul::linear(rows, hidden, c),
        );
        if let Some(p) = self.lora {
            let r = p.rank();
            be.matmul(out, xa, &p.b.data()[v0 * r..v1 * r], MatMul::linear(rows, r, c).acc());
        }
    }

    /// Full logits `[rows, vocab]` (for sampling the last position and for golden checks).
    pub fn full_logits(&self, h: &[f32], rows: usize, hidden: usize) -> Vec<f32> {
        let v = self.vocab();
        let xa = self.xa(h, rows, hidden);
        let mut out = vec![0.0f32; rows * v];
        self.chunk(h, &xa, rows, hidden, 0, v, &mut out);
        out
    }

    /// Per row: log-sum-exp over the vocabulary and the logits of its targets
    /// (`targets[row_ptr[r]..row_ptr[r+1]]`), computed chunk by chunk.
    pub fn lse_and_targets(
        &self,
        h: &[f32],
        rows: usize,
        hidden: usize,
        row_ptr: &[usize],
        targets: &[u32],
    ) -> (Vec<f32>, Vec<f32>) {
        let v = self.vocab();
        let mut lse = vec![0.0f32; rows];
        let mut tlog = vec![0.0f32; targets.len()];
        for r0 in (0..rows).step_by(ROW_BLOCK) {
            let nr = ROW_BLOCK.min(rows - r0);
            let hb = &h[r0 * hidden..(r0 + nr) * hidden];
            let xa = self.xa(hb, nr, hidden);
            let mut mx = vec![f32::NEG_INFINITY; nr];
            let mut sum = vec![0.0f32; nr];
            let mut buf = vec![0.0f32; nr * VOCAB_CHUNK.min(v)];
            for v0 in (0..v).step_by(VOCAB_CHUNK) {
                let v1 = (v0 + VOCAB_CHUNK).min(v);
                let c = v1 - v0;
                let chunk = &mut buf[..nr * c];
                self.chunk(hb, &xa, nr, hidden, v0, v1, chunk);
                chunk.par_chunks(c).zip(mx.par_iter_mut()).zip(sum.par_iter_mut()).for_each(
                    |((row, m), s)| {
                        let cm = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                        let nm = m.max(cm);
                        let acc: f32 = row.iter().map(|x| (x - nm).exp()).sum();
                        *s = *s * (*m - nm).exp() + acc;
                        *m = nm;
                    },
                );
                for i in 0..nr {
                    let r = r0 + i;
                    for t in row_ptr[r]..row_ptr[r + 1] {
                        let id = targets[t] as usize;
                        if (v0..v1).contains(&id) {
                            tlog[t] = chunk[i * c + id - v0];
                        }
                    }
                }
            }
            for i in 0..nr {
                lse[r0 + i] = mx[i] + sum[i].ln();
            }
        }
        (lse, tlog)
    }

    /// Backward: given `coef[t] = ∂loss/∂lp[t]` per target, returns `∂loss/∂h` and accumulates
    /// the lm_head LoRA gradients into `lora_grad` (when the head has LoRA).
    /// `∂lp[t]/∂logit_j = δ(j, target_t) − softmax_j`.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        h: &[f32],
        rows: usize,
        hidden: usize,
        row_ptr: &[usize],
        targets: &[u32],
        coef: &[f32],
        lse: &[f32],
        mut lora_grad: Option<(&mut Vec<f32>, &mut Vec<f32>)>,
    ) -> Vec<f32> {
        let be = backend();
        let v = self.vocab();
        let mut dh = vec![0.0f32; rows * hidden];
        for r0 in (0..rows).step_by(ROW_BLOCK) {
            let nr = ROW_BLOCK.min(rows - r0);
            let hb = &h[r0 * hidden..(r0 + nr) * hidden];
            let xa = self.xa(hb, nr, hidden);
            let rank = self.lora.map(|p| p.rank()).unwrap_or(0);
            let mut dxa = vec![0.0f32; nr * rank];
            let csum: Vec<f32> =
                (0..nr).map(|i| coef[row_ptr[r0 + i]..row_ptr[r0 + i + 1]].iter().sum()).collect();
            let mut buf = vec![0.0f32; nr * VOCAB_CHUNK.min(v)];
            let dhb = &mut dh[r0 * hidden..(r0 + nr) * hidden];
            for v0 in (0..v).step_by(VOCAB_CHUNK) {
                let v1 = (v0 + VOCAB_CHUNK).min(v);
                let c = v1 - v0;
                let chunk = &mut buf[..nr * c];
                self.chunk(hb, &xa, nr, hidden, v0, v1, chunk);
                chunk.par_chunks_mut(c).enumerate().for_each(|(i, row)| {
                    let (l, cs) = (lse[r0 + i], csum[i]);
                    row.iter_mut().for_each(|x| *x = -cs * (*x - l).exp());
                });
                for i in 0..nr {
                    let r = r0 + i;
                    for t in row_ptr[r]..row_ptr[r + 1] {
                        let id = targets[t] as usize;
                        if (v0..v1).contains(&id) {
                            chunk[i * c + id - v0] += coef[t];
                        }
                    }
                }
                let w = &self.w.data()[v0 * hidden..v1 * hidden];
                be.matmul(
                    dhb,
                    chunk,
                    w,
                    MatMul {
                        m: nr,
                        k: c,
                        n: hidden,
                        trans_a: false,
                        trans_b: false,
                        accumulate: true,
                    },
                );
                if let (Some(p), Some((_, gb))) = (self.lora, lora_grad.as_mut()) {
                    let gbc = &mut gb[v0 * rank..v1 * rank];
                    be.matmul(
                        gbc,
                        chunk,
                        &xa,
                        MatMul {
                            m: c,
                            k: nr,
                            n: rank,
                            trans_a: true,
                            trans_b: false,
                            accumulate: true,
                        },
                    );
                    be.matmul(
                        &mut dxa,
                        chunk,
                        &p.b.data()[v0 * rank..v1 * rank],
                        MatMul {
                            m: nr,
                            k: c,
                            n: rank,
                            trans_a: false,
                            trans_b: false,
                            accumulate: true,
                        },
                    );
                }
            }
            if let (Some(p), Some((ga, _))) = (self.lora, lora_grad.as_mut()) {
                dxa.iter_mut().for_each(|x| *x *= self.scale);
                be.matmul(
                    ga,
                    &dxa,
                    hb,
                    MatMul {
                        m: rank,
                        k: nr,
                        n: hidden,
                        trans_a: true,
                        trans_b: false,
                        accumulate: true,
                    },
                );
                be.matmul(
                    dhb,
                    &dxa,
                    p.a.data(),
                    MatMul {
                        m: nr,
                        k: rank,
                        n: hidden,
                        trans_a: false,
                        trans_b: false,
                        accumulate: true,
                    },
                );
            }
        }
        dh
    }
}

#[cfg(test)]
mod tests {
    use super::LossFn;

    fn close(a: (f64, f64), b: (f64, f64)) -> bool {
        (a.0 - b.0).abs() < 1e-12 && (a.1 - b.1).abs() < 1e-12
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
