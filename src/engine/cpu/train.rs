//! The CPU orchestration of a batch over a model and an optional adapter: `forward_backward`
//! (packed batch, loss, gradient accumulation) — also for several tenants' adapters in one
//! pass over the base weights (`forward_backward_many`, `forward_many`) — full logits, and
//! cached decoding.

use std::ops::Range;

use super::backend::RopeTable;
use super::backend::profile::{Kind, span};
use super::head::{Head, HeadSegment, TargetRows};
use super::segment::{Segment, SegmentMut};
use super::transformer::Packed;
use crate::engine::batch::{
    EvalGroup, FwdBwdOutput, TrainGroup, check_tokens, pack, run_checked, validate,
};
use crate::engine::error::{EngineError, Result};
use crate::engine::lora::Adapter;
use crate::engine::loss::{Datum, DatumOutput, LossFn};
use crate::engine::models::Model;

/// How a call uses the adapter.
enum AdapterUse<'a> {
    Base,
    Read(&'a Adapter),
    Train(&'a mut Adapter),
}

impl AdapterUse<'_> {
    fn get(&self) -> Option<&Adapter> {
        match self {
            AdapterUse::Base => None,
            AdapterUse::Read(a) => Some(a),
            AdapterUse::Train(a) => Some(a),
        }
    }
}

/// One group of a call: an adapter use, its datums and its loss.
struct Job<'a> {
    adapter: AdapterUse<'a>,
    data: &'a [Datum],
    loss: &'a LossFn,
}

/// Forward (and unless `forward_only`, backward) over a batch. Gradients are ADDED to the
/// adapter's accumulated gradients; `optim_step` applies and clears them. Without an adapter the
/// base model is evaluated and `forward_only` is implied.
pub fn forward_backward(
    model: &Model,
    adapter: Option<&mut Adapter>,
    data: &[Datum],
    loss: &LossFn,
    forward_only: bool,
) -> Result<FwdBwdOutput> {
    let adapter = match adapter {
        None => AdapterUse::Base,
        Some(a) if forward_only => AdapterUse::Read(a),
        Some(a) => AdapterUse::Train(a),
    };
    run_one(model, Job { adapter, data, loss })
}

/// Forward only (logprobs and loss, no gradients) with a shared adapter borrow.
pub fn forward(
    model: &Model,
    adapter: Option<&Adapter>,
    data: &[Datum],
    loss: &LossFn,
) -> Result<FwdBwdOutput> {
    let adapter = adapter.map_or(AdapterUse::Base, AdapterUse::Read);
    run_one(model, Job { adapter, data, loss })
}

/// [`forward_backward`] of several tenants at once: ONE pass over the base weights for all
/// their rows, each group's LoRA applied to its own rows only, each group's loss (kind and
/// parameters its own) and gradients (ADDED to its adapter) as if it ran alone. One result per
/// group, in order: a group with invalid input fails alone and the others still run.
///
/// What is shared and what is not: the base matmuls (and their input-gradient products) run
/// over all groups' rows at once; `gemm` picks its blocking from the product's shape, so a
/// row's result agrees with its alone value to f32 rounding, not bitwise (measured ≤ 2e-6
/// relative on the tests' models), and so does the output head, whose row blocks span groups
/// (each block's rows take their own group's lm_head LoRA and loss). Attention (per sequence),
/// norms and RoPE (per row) and the layers' LoRA products (per group) have exactly the shapes
/// of an alone run.
pub fn forward_backward_many(
    model: &Model,
    groups: &mut [TrainGroup<'_, Adapter>],
) -> Vec<Result<FwdBwdOutput>> {
    let jobs = groups
        .iter_mut()
        .map(|g| Job { adapter: AdapterUse::Train(g.adapter), data: g.data, loss: g.loss })
        .collect();
    run_many(model, jobs)
}

/// [`forward`] of several tenants at once (see [`forward_backward_many`]).
pub fn forward_many(model: &Model, groups: &[EvalGroup<'_, Adapter>]) -> Vec<Result<FwdBwdOutput>> {
    let jobs = groups
        .iter()
        .map(|g| Job {
            adapter: g.adapter.map_or(AdapterUse::Base, AdapterUse::Read),
            data: g.data,
            loss: g.loss,
        })
        .collect();
    run_many(model, jobs)
}

fn run_one(model: &Model, job: Job) -> Result<FwdBwdOutput> {
    run_many(model, vec![job])
        .pop()
        .unwrap_or_else(|| Err(EngineError::InvalidInput("the batch produced no result".into())))
}

/// Validates each group on its own (a bad one gets its error), then runs the valid ones
/// together.
fn run_many(model: &Model, jobs: Vec<Job>) -> Vec<Result<FwdBwdOutput>> {
    let check = |job: &Job| {
        validate(model.config(), job.data, job.loss)
            .and_then(|()| job.adapter.get().map_or(Ok(()), |a| a.check_compatible(model)))
    };
    run_checked(jobs, check, |valid| run_valid(model, valid).into_iter().map(Ok).collect())
}

/// The shared pass over validated groups: their datums packed one group after another (group
/// `g` owns one contiguous row range), the decoder stack once over all rows with segmented
/// LoRA, one blocked pass of the output head over all rows (per-group lm_head LoRA and loss),
/// then one backward over all rows when any group trains.
fn run_valid(model: &Model, mut jobs: Vec<Job>) -> Vec<FwdBwdOutput> {
    if jobs.is_empty() {
        return Vec::new();
    }
    let c = model.config();
    let (mut tokens, mut seqs, mut positions) = (Vec::new(), Vec::new(), Vec::new());
    let mut groups = Vec::with_capacity(jobs.len());
    for job in &jobs {
        let (t, s, p) = pack(job.data);
        let r0 = tokens.len();
        seqs.extend(s.iter().map(|&(start, n)| (start + r0, n)));
        tokens.extend(t);
        positions.extend(p);
        groups.push((r0..tokens.len(), s));
    }
    let rows = tokens.len();
    let packed = Packed {
        seqs: &seqs,
        rope: RopeTable::new(&positions, c.head_dim, &c.inv_freq),
        rows,
        base: Default::default(),
    };
    let backward = jobs.iter().any(|j| matches!(j.adapter, AdapterUse::Train(_)));
    let st = {
        let _t = span(Kind::StackForward);
        let segs: Vec<Segment> = jobs
            .iter()
            .zip(&groups)
            .map(|(j, (r, _))| Segment { rows: r.clone(), adapter: j.adapter.get() })
            .collect();
        model.forward_stack(&tokens, &packed, &segs, None, backward)
    };

    let head_span = span(Kind::Head);
    let (outs, dh) = head_pass(model, &mut jobs, &groups, &st.h_final, backward);
    drop(head_span);

    if backward {
        let _t = span(Kind::StackBackward);
        let mut segs: Vec<SegmentMut> = jobs
            .iter_mut()
            .zip(&groups)
            .map(|(j, (r, _))| SegmentMut {
                rows: r.clone(),
                adapter: match &mut j.adapter {
                    AdapterUse::Train(a) => Some(&mut **a),
                    _ => None,
                },
            })
            .collect();
        model.backward_stack(&st, &dh, &packed, &mut segs);
    }
    outs
}

/// A group's row range in the packed batch, and its datums' `(start, len)` counted from the
/// group's first row.
type GroupRows = (Range<usize>, Vec<(usize, usize)>);

/// The output head over all groups' rows in one blocked pass (each group's rows with its own
/// lm_head LoRA and loss): per-group outputs and, when `want_dh`, `∂loss/∂h` of every row.
fn head_pass(
    model: &Model,
    jobs: &mut [Job],
    groups: &[GroupRows],
    h: &[f32],
    want_dh: bool,
) -> (Vec<FwdBwdOutput>, Vec<f32>) {
    let hidden = model.config().hidden_size;
    let rows = h.len() / hidden.max(1);
    // Targets in CSR form, with the loss inputs alongside (weight per target, sampler logprob
    // and advantage per row).
    let mut csr = TargetRows::with_rows(rows);
    for d in jobs.iter().flat_map(|j| j.data) {
        let k = d.inputs.k.max(1);
        for p in 0..d.input_tokens.len() {
            let span = p * k..(p + 1) * k;
            csr.push_row(
                &d.inputs.target_tokens[span.clone()],
                d.inputs.weights.as_ref().map(|w| &w[span]),
                d.inputs.logprobs.as_ref().map_or(0.0, |v| v[p]),
                d.inputs.advantages.as_ref().map_or(0.0, |v| v[p]),
            );
        }
    }
    let tg = csr.view();
    // Gradients of lm_head's LoRA are taken out while the head borrows the adapters.
    let mut taken: Vec<Option<(Vec<f32>, Vec<f32>)>> = jobs
        .iter_mut()
        .map(|j| match &mut j.adapter {
            AdapterUse::Train(ad) => {
                ad.lm_head_mut().map(|p| (std::mem::take(&mut p.a.g), std::mem::take(&mut p.b.g)))
            }
            _ => None,
        })
        .collect();
    // They go back even when the pass unwinds: an adapter left with empty gradient buffers
    // fails every later batch (a shape mismatch in the head's matmul).
    let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut segs: Vec<HeadSegment> = jobs
            .iter()
            .zip(groups)
            .zip(taken.iter_mut())
            .map(|((j, (r, _)), g)| {
                let ad = j.adapter.get();
                HeadSegment {
                    rows: r.clone(),
                    lora: ad.and_then(|a| a.lm_head()),
                    scale: ad.map_or(0.0, |a| a.scaling()),
                    loss: j.loss,
                    lora_grad: g.as_mut().map(|(a, b)| (a.as_mut_slice(), b.as_mut_slice())),
                }
            })
            .collect();
        let head = head_of(model, None);
        let block = head.block_rows();
        head.segmented_pass(h, rows, hidden, &tg, &mut segs, want_dh, block)
    }));
    for (j, g) in jobs.iter_mut().zip(taken) {
        if let (AdapterUse::Train(ad), Some((ga, gb))) = (&mut j.adapter, g)
            && let Some(p) = ad.lm_head_mut()
        {
            p.a.g = ga;
            p.b.g = gb;
        }
    }
    let head_out = out.unwrap_or_else(|panic| std::panic::resume_unwind(panic));

    let mut outs = Vec::with_capacity(jobs.len());
    for (j, (r, local)) in jobs.iter().zip(groups) {
        let mut per_datum = Vec::with_capacity(j.data.len());
        let mut loss_sum = 0.0f64;
        for (d, &(start, n)) in j.data.iter().zip(local) {
            let k = d.inputs.k.max(1);
            let (t0, t1) = (tg.row_ptr[r.start + start], tg.row_ptr[r.start + start + n]);
            let mut elem = vec![0.0f32; n];
            for (p, e) in elem.iter_mut().enumerate() {
                for &l in &head_out.terms[t0 + p * k..t0 + (p + 1) * k] {
                    *e += l as f32;
                    loss_sum += l;
                }
            }
            per_datum.push(DatumOutput {
                logprobs: head_out.logprobs[t0..t1].to_vec(),
                elementwise_loss: elem,
            });
        }
        outs.push(FwdBwdOutput { per_datum, loss_sum });
    }
    (outs, head_out.dh)
}

pub(super) fn head_of<'a>(model: &'a Model, adapter: Option<&'a Adapter>) -> Head<'a> {
    Head {
        w: model.head_weight(),
        lora: adapter.and_then(|a| a.lm_head()),
        scale: adapter.map(|a| a.scaling()).unwrap_or(0.0),
    }
}

impl Model {
    /// Full logits `[len, vocab]` of one sequence (materialised: for tests and tooling, not
    /// for training batches).
    pub fn logits(&self, adapter: Option<&Adapter>, tokens: &[u32]) -> Result<Vec<f32>> {
        check_tokens("tokens", 0, tokens, self.config.vocab_size)?;
        if let Some(a) = adapter {
            a.check_compatible(self)?;
        }
        if tokens.is_empty() {
            return Err(EngineError::InvalidInput("no tokens".into()));
        }
        let positions: Vec<u32> = (0..tokens.len() as u32).collect();
        let seqs = [(0, tokens.len())];
        let packed = Packed {
            seqs: &seqs,
            rope: RopeTable::new(&positions, self.config.head_dim, &self.config.inv_freq),
            rows: tokens.len(),
            base: Default::default(),
        };
        let segs = [Segment { rows: 0..tokens.len(), adapter }];
        let st = self.forward_stack(tokens, &packed, &segs, None, false);
        Ok(head_of(self, adapter).full_logits(&st.h_final, tokens.len(), self.config.hidden_size))
    }

    /// Log-probability of each next token of one sequence: entry `i` is
    /// `log p(tokens[i+1] | tokens[..=i])` (`len − 1` values; chunked, no full logits).
    pub fn sequence_logprobs(&self, adapter: Option<&Adapter>, tokens: &[u32]) -> Result<Vec<f32>> {
        if tokens.len() < 2 {
            return Ok(Vec::new());
        }
        let n = tokens.len() - 1;
        let datum = Datum {
            input_tokens: tokens[..n].to_vec(),
            inputs: crate::engine::loss::LossInputs {
                target_tokens: tokens[1..].to_vec(),
                k: 1,
                ..Default::default()
            },
        };
        let out = forward(self, adapter, &[datum], &LossFn::CrossEntropy)?;
        Ok(out.per_datum.into_iter().next().map(|d| d.logprobs).unwrap_or_default())
    }
}
