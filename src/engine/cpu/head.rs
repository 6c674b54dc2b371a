//! The CPU output head: per row block the full-vocabulary logits, their log-sum-exp, the loss
//! terms and (when training) the logit gradient and `∂loss/∂h` in the same pass, without ever
//! holding the whole `[tokens × vocab]` logits matrix.

use rayon::prelude::*;

use super::backend::{MatMul, backend, exp_shift};
use super::wmatmul::{xw, xwt};
use crate::engine::lora::LoraPair;
use crate::engine::loss::LossFn;
use crate::engine::weight::Weight;

/// Memory budget of one row block of head logits (the full `[tokens × vocab]` matrix is never
/// held): 128 MB is ~220 rows of a 152k vocabulary, enough rows for an efficient product.
pub(crate) const HEAD_BLOCK_BYTES: usize = 128 << 20;
/// Upper bound on rows per head block (small vocabularies).
const HEAD_MAX_ROWS: usize = 2048;

/// The vocabulary projection: `logits = h·Wᵀ + s·(h·Aᵀ)·Bᵀ`.
pub(crate) struct Head<'a> {
    pub w: &'a Weight,
    pub lora: Option<&'a LoraPair>,
    pub scale: f32,
}

impl Head<'_> {
    fn vocab(&self) -> usize {
        self.w.dim(0)
    }

    /// `s·h·Aᵀ` for a block of rows (empty without LoRA).
    pub(super) fn xa(&self, h: &[f32], rows: usize, hidden: usize) -> Vec<f32> {
        match self.lora {
            Some(p) => {
                let r = p.rank();
                let mut xa = vec![0.0f32; rows * r];
                backend().matmul(&mut xa, h, p.a.w.data(), MatMul::linear(rows, hidden, r));
                xa.iter_mut().for_each(|v| *v *= self.scale);
                xa
            }
            None => Vec::new(),
        }
    }

    /// Logits of a block of rows into `out` `[rows, vocab]`.
    fn chunk(&self, h: &[f32], xa: &[f32], rows: usize, out: &mut [f32]) {
        xwt(out, h, rows, self.w, false);
        self.add_lora(xa, rows, out);
    }

    /// `out += xa·Bᵀ` (nothing without LoRA).
    pub(super) fn add_lora(&self, xa: &[f32], rows: usize, out: &mut [f32]) {
        if let Some(p) = self.lora {
            let mm = MatMul::linear(rows, p.rank(), self.vocab()).acc();
            backend().matmul(out, xa, p.b.w.data(), mm);
        }
    }

    /// Full logits `[rows, vocab]` (for sampling the last position and for golden checks).
    pub fn full_logits(&self, h: &[f32], rows: usize, hidden: usize) -> Vec<f32> {
        let v = self.vocab();
        let xa = self.xa(h, rows, hidden);
        let mut out = vec![0.0f32; rows * v];
        self.chunk(h, &xa, rows, &mut out);
        out
    }

    /// Rows per block so that one block of logits stays within `HEAD_BLOCK_BYTES`.
    pub fn block_rows(&self) -> usize {
        (HEAD_BLOCK_BYTES / (4 * self.vocab().max(1))).clamp(1, HEAD_MAX_ROWS)
    }

    /// One pass of the head over all rows, `block` rows at a time: logits → log-sum-exp →
    /// target log-probabilities and loss terms, and with `want_dh` the logit gradient
    /// `coef·(onehot − softmax)` and `∂loss/∂h` of the block right away (the logits are never
    /// recomputed). lm_head LoRA gradients are accumulated into `lora_grad` (`(grad_a,
    /// grad_b)`) when given and the head has LoRA. The one-tenant case of
    /// [`Self::segmented_pass`], which the engine calls; kept for the head's unit tests.
    #[cfg(test)]
    #[allow(clippy::too_many_arguments)]
    pub fn loss_pass(
        &self,
        h: &[f32],
        rows: usize,
        hidden: usize,
        tg: &HeadTargets,
        loss: &LossFn,
        want_dh: bool,
        lora_grad: Option<(&mut [f32], &mut [f32])>,
        block: usize,
    ) -> HeadOut {
        let seg =
            HeadSegment { rows: 0..rows, lora: self.lora, scale: self.scale, loss, lora_grad };
        self.segmented_pass(h, rows, hidden, tg, &mut [seg], want_dh, block)
    }

    /// [`Self::loss_pass`] over rows that belong to several tenants: the base product runs on
    /// whole blocks whatever their owners, while each segment's rows get its own lm_head LoRA,
    /// loss and LoRA gradients (`self.lora` is not used; `segs` cover `0..rows` in order).
    #[allow(clippy::too_many_arguments)]
    pub fn segmented_pass(
        &self,
        h: &[f32],
        rows: usize,
        hidden: usize,
        tg: &HeadTargets,
        segs: &mut [HeadSegment],
        want_dh: bool,
        block: usize,
    ) -> HeadOut {
        let be = backend();
        let v = self.vocab();
        let nt = tg.targets.len();
        let block = block.max(1);
        let mut out = HeadOut {
            logprobs: vec![0.0; nt],
            terms: vec![0.0; nt],
            dh: if want_dh { vec![0.0; rows * hidden] } else { Vec::new() },
        };
        let mut coef = vec![0.0f32; nt];
        let mut buf = vec![0.0f32; block.min(rows) * v];
        for r0 in (0..rows).step_by(block) {
            let nr = block.min(rows - r0);
            let hb = &h[r0 * hidden..(r0 + nr) * hidden];
            // The block's pieces: (segment, its rows inside the block, relative to r0).
            let parts: Vec<(usize, std::ops::Range<usize>)> = segs
                .iter()
                .enumerate()
                .filter_map(|(si, s)| {
                    let (a, b) = (s.rows.start.max(r0), s.rows.end.min(r0 + nr));
                    (a < b).then(|| (si, a - r0..b - r0))
                })
                .collect();
            let logits = &mut buf[..nr * v];
            xwt(logits, hb, nr, self.w, false);
            let xas: Vec<Vec<f32>> = parts
                .iter()
                .map(|(si, pr)| {
                    let one = Head { w: self.w, lora: segs[*si].lora, scale: segs[*si].scale };
                    let hp = &hb[pr.start * hidden..pr.end * hidden];
                    let xa = one.xa(hp, pr.len(), hidden);
                    one.add_lora(&xa, pr.len(), &mut logits[pr.start * v..pr.end * v]);
                    xa
                })
                .collect();
            let ptr = &tg.row_ptr[r0..=r0 + nr];
            // Target logits are read before the row is overwritten by its exponentials.
            let mut tlog = vec![0.0f32; ptr[nr] - ptr[0]];
            for i in 0..nr {
                for t in ptr[i]..ptr[i + 1] {
                    tlog[t - ptr[0]] = logits[i * v + tg.targets[t] as usize];
                }
            }
            // Per row (max, Σexp); the row keeps exp(x − max) for the softmax of the gradient.
            let stats: Vec<(f32, f32)> = logits
                .par_chunks_mut(v)
                .map(|row| {
                    let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                    let s = exp_shift(row, m);
                    (m, s)
                })
                .collect();
            for (si, pr) in &parts {
                let loss = segs[*si].loss;
                for i in pr.clone() {
                    let (m, s) = stats[i];
                    let r = r0 + i;
                    let lse = m + s.ln();
                    for t in ptr[i]..ptr[i + 1] {
                        let lp = (tlog[t - ptr[0]] - lse) as f64;
                        let (l, g) =
                            loss.term(lp, tg.weights[t] as f64, tg.slp[r] as f64, tg.adv[r] as f64);
                        out.logprobs[t] = lp as f32;
                        out.terms[t] = l;
                        coef[t] = g as f32;
                    }
                }
            }
            if !want_dh {
                continue;
            }
            // ∂loss/∂logit_j = Σ_t coef_t·(δ(j, target_t) − softmax_j).
            let coef = &coef;
            logits.par_chunks_mut(v).zip(stats.par_iter()).enumerate().for_each(
                |(i, (row, &(_, s)))| {
                    let cs: f32 = coef[ptr[i]..ptr[i + 1]].iter().sum();
                    let f = -cs / s;
                    row.iter_mut().for_each(|x| *x *= f);
                    for t in ptr[i]..ptr[i + 1] {
                        row[tg.targets[t] as usize] += coef[t];
                    }
                },
            );
            let dl: &[f32] = logits;
            let dhb = &mut out.dh[r0 * hidden..(r0 + nr) * hidden];
            xw(dhb, dl, nr, self.w, false);
            for ((si, pr), xa) in parts.iter().zip(&xas) {
                let seg = &mut segs[*si];
                let (Some(p), Some((ga, gb))) = (seg.lora, seg.lora_grad.as_mut()) else {
                    continue;
                };
                let (n, rank) = (pr.len(), p.rank());
                let dlp = &dl[pr.start * v..pr.end * v];
                let hp = &hb[pr.start * hidden..pr.end * hidden];
                let plain =
                    |m, k, n| MatMul { m, k, n, trans_a: false, trans_b: false, accumulate: false };
                be.matmul(
                    gb,
                    dlp,
                    xa,
                    MatMul { trans_a: true, accumulate: true, ..plain(v, n, rank) },
                );
                let mut dxa = vec![0.0f32; n * rank];
                be.matmul(&mut dxa, dlp, p.b.w.data(), plain(n, v, rank));
                dxa.iter_mut().for_each(|x| *x *= seg.scale);
                let ga_mm = MatMul { trans_a: true, accumulate: true, ..plain(rank, n, hidden) };
                be.matmul(ga, &dxa, hp, ga_mm);
                let dhp = &mut dhb[pr.start * hidden..pr.end * hidden];
                be.matmul(dhp, &dxa, p.a.w.data(), plain(n, rank, hidden).acc());
            }
        }
        out
    }
}

/// One tenant's rows of a [`Head::segmented_pass`]: its lm_head LoRA and scale, its loss, and
/// where its lm_head LoRA gradients accumulate (`(grad_a, grad_b)`, when it trains).
pub(crate) struct HeadSegment<'a> {
    pub rows: std::ops::Range<usize>,
    pub lora: Option<&'a LoraPair>,
    pub scale: f32,
    pub loss: &'a LossFn,
    pub lora_grad: Option<(&'a mut [f32], &'a mut [f32])>,
}

/// What the head pass needs per target (CSR over rows: row `r` owns
/// `targets[row_ptr[r]..row_ptr[r+1]]`).
pub(crate) struct HeadTargets<'a> {
    pub row_ptr: &'a [usize],
    pub targets: &'a [u32],
    /// Cross-entropy weight per target.
    pub weights: &'a [f32],
    /// Sampler logprob per row (RL losses; zeros otherwise).
    pub slp: &'a [f32],
    /// Advantage per row (RL losses; zeros otherwise).
    pub adv: &'a [f32],
}

/// The owned buffers a [`HeadTargets`] borrows, built a row at a time.
pub(crate) struct TargetRows {
    row_ptr: Vec<usize>,
    targets: Vec<u32>,
    weights: Vec<f32>,
    slp: Vec<f32>,
    adv: Vec<f32>,
}

impl TargetRows {
    /// Empty, with room for `rows` rows.
    pub fn with_rows(rows: usize) -> Self {
        let mut row_ptr = Vec::with_capacity(rows + 1);
        row_ptr.push(0);
        TargetRows {
            row_ptr,
            targets: Vec::new(),
            weights: Vec::new(),
            slp: Vec::with_capacity(rows),
            adv: Vec::with_capacity(rows),
        }
    }

    /// Appends one row: its targets, their cross-entropy weights (all 1 when `None`), and the
    /// row's sampler logprob and advantage.
    pub fn push_row(&mut self, targets: &[u32], weights: Option<&[f32]>, slp: f32, adv: f32) {
        self.targets.extend_from_slice(targets);
        match weights {
            Some(w) => self.weights.extend_from_slice(&w[..targets.len()]),
            None => self.weights.resize(self.weights.len() + targets.len(), 1.0),
        }
        self.row_ptr.push(self.targets.len());
        self.slp.push(slp);
        self.adv.push(adv);
    }

    pub fn view(&self) -> HeadTargets<'_> {
        HeadTargets {
            row_ptr: &self.row_ptr,
            targets: &self.targets,
            weights: &self.weights,
            slp: &self.slp,
            adv: &self.adv,
        }
    }
}

/// Result of `Head::loss_pass`.
pub(crate) struct HeadOut {
    /// Log-probability per target.
    pub logprobs: Vec<f32>,
    /// Loss term per target.
    pub terms: Vec<f64>,
    /// `∂loss/∂h` `[rows, hidden]` (empty without a gradient).
    pub dh: Vec<f32>,
}

#[cfg(test)]
#[path = "head_tests.rs"]
mod head_tests;
