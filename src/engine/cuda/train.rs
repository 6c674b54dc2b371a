//! `forward_backward` on the GPU with exactly the CPU engine's semantics (same validation, same
//! packing, same per-datum outputs and summed loss) — also for several tenants' groups in one
//! pass over the base weights (`forward_backward_many`, `forward_many`): the groups' datums are
//! packed one group after another, every base GEMM and the output head run once over all rows,
//! and each row gets its own group's LoRA through the segmented kernels (`SegLora`), its own
//! loss and, when training, its own adapter's gradients.
//!
//! The per-token loss terms and their gradient coefficients are computed on the device by
//! `loss_term_fwd` (kernels/loss.cu), which implements `LossFn::term` expression for expression
//! in f64, so every loss variant means the same on both backends; [`loss_term_reference`]
//! exposes the CPU definition it is tested against. A pass enqueues forward, head, loss terms,
//! head backward and stack backward back to back and synchronises once, when it downloads the
//! logprobs and loss terms at the end.

use std::ops::Range;

use super::CudaError;
use super::adapter::CudaAdapter;
use super::head::HeadIn;
use super::launch as k;
use super::layer::{KvMode, Pack};
use super::model::{Act, CudaModel, R, download, scratch, upload_ws, view, view_mut};
use super::segment::{SegLora, SegSpec};
use super::workspace::Buf;
use crate::engine::batch::{EvalGroup, FwdBwdOutput, TrainGroup, pack, run_checked, validate};
use crate::engine::loss::{Datum, DatumOutput, LossFn};

/// Targets of a batch as a dense [rows, kmax] matrix, -1 where a datum has fewer than kmax,
/// with the loss inputs the CPU engine would use (weight 1, sampler logprob and advantage 0
/// where a datum has none).
struct Targets {
    kmax: usize,
    dev: Buf<i32>,
    /// [rows, kmax]
    weights: Buf<f32>,
    /// [rows]
    slp: Buf<f32>,
    adv: Buf<f32>,
}

/// `LossFn::term` (the engine's CPU definition of one target's loss term and its derivative),
/// for checking the device kernel `loss_term_fwd` against it.
pub fn loss_term_reference(loss: &LossFn, lp: f64, w: f64, slp: f64, adv: f64) -> (f64, f64) {
    loss.term(lp, w, slp, adv)
}

impl<T: Act> CudaModel<T> {
    /// The targets of the groups' datums, packed in order.
    fn targets(&self, groups: &[Job<'_>]) -> R<Targets> {
        let data = || groups.iter().flat_map(|g| g.data);
        let kmax = data().map(|d| d.inputs.k.max(1)).max().unwrap_or(1);
        let rows: usize = data().map(|d| d.input_tokens.len()).sum();
        let mut tg = Vec::with_capacity(rows * kmax);
        let mut weights = Vec::with_capacity(rows * kmax);
        let (mut slp, mut adv) = (Vec::with_capacity(rows), Vec::with_capacity(rows));
        for d in data() {
            let kd = d.inputs.k.max(1);
            let per_row = |v: &Option<Vec<f32>>, p: usize| v.as_ref().map(|v| v[p]).unwrap_or(0.0);
            for p in 0..d.input_tokens.len() {
                for j in 0..kmax {
                    let i = p * kd + j;
                    let (t, w) = if j < kd {
                        let w = d.inputs.weights.as_ref().map(|w| w[i]).unwrap_or(1.0);
                        (d.inputs.target_tokens[i] as i32, w)
                    } else {
                        (-1, 0.0)
                    };
                    tg.push(t);
                    weights.push(w);
                }
                slp.push(per_row(&d.inputs.logprobs, p));
                adv.push(per_row(&d.inputs.advantages, p));
            }
        }
        let dev = &*self.dev;
        Ok(Targets {
            kmax,
            dev: upload_ws(dev, &tg)?,
            weights: upload_ws(dev, &weights)?,
            slp: upload_ws(dev, &slp)?,
            adv: upload_ws(dev, &adv)?,
        })
    }
}

/// One group of a pass: its datums and loss, the adapter it reads (None: the base model), and
/// whether that adapter takes the gradients.
struct Job<'a> {
    data: &'a [Datum],
    loss: &'a LossFn,
    adapter: Option<&'a CudaAdapter>,
    train: bool,
}

/// Forward (and unless `forward_only`, backward) over a batch, on the GPU. Same contract as
/// `engine::forward_backward`: gradients are ADDED to the adapter's accumulated gradients;
/// without an adapter the base model is evaluated and `forward_only` is implied.
pub fn forward_backward<T: Act>(
    model: &CudaModel<T>,
    adapter: Option<&mut CudaAdapter>,
    data: &[Datum],
    loss: &LossFn,
    forward_only: bool,
) -> R<FwdBwdOutput> {
    let train = adapter.is_some() && !forward_only;
    let job = Job { data, loss, adapter: adapter.map(|a| &*a), train };
    one(run_many(model, vec![job]))
}

/// Forward only (logprobs and losses, no gradients) with a shared adapter borrow.
pub fn forward_only<T: Act>(
    model: &CudaModel<T>,
    adapter: Option<&CudaAdapter>,
    data: &[Datum],
    loss: &LossFn,
) -> R<FwdBwdOutput> {
    one(run_many(model, vec![Job { data, loss, adapter, train: false }]))
}

/// [`forward_backward`] of several tenants' groups (distinct adapters) in one pass over the base
/// weights: one result per group, in order, each as if it ran alone (to f32 rounding: the
/// shared GEMMs see more rows); a group with invalid input fails alone. The gradients of a
/// group are accumulated only by the shared pass; when that pass fails, every group gets the
/// error (a device error, which `DataParallel` answers by re-running each group alone after
/// putting its gradients back).
pub fn forward_backward_many<T: Act>(
    model: &CudaModel<T>,
    groups: &mut [TrainGroup<'_, CudaAdapter>],
) -> Vec<R<FwdBwdOutput>> {
    // the `&mut` borrows of the groups outlive the pass: the gradients written through the
    // table's addresses belong to adapters nobody else holds meanwhile
    let jobs = groups
        .iter()
        .map(|g| Job { data: g.data, loss: g.loss, adapter: Some(&*g.adapter), train: true })
        .collect();
    run_many(model, jobs)
}

/// [`forward_only`] of several groups in one pass (see [`forward_backward_many`]).
pub fn forward_many<T: Act>(
    model: &CudaModel<T>,
    groups: &[EvalGroup<'_, CudaAdapter>],
) -> Vec<R<FwdBwdOutput>> {
    let jobs =
        groups.iter().map(|g| Job { data: g.data, loss: g.loss, adapter: g.adapter, train: false });
    run_many(model, jobs.collect())
}

fn one(mut results: Vec<R<FwdBwdOutput>>) -> R<FwdBwdOutput> {
    results.pop().unwrap_or_else(|| Err(shape("the pass produced no result")))
}

fn shape(msg: &str) -> CudaError {
    CudaError::Shape { kernel: "forward_backward", msg: msg.into() }
}

/// Validates each group on its own (a bad one gets its error), runs the valid ones in one pass,
/// and hands the pass's error to each of them if it fails.
fn run_many<T: Act>(model: &CudaModel<T>, jobs: Vec<Job<'_>>) -> Vec<R<FwdBwdOutput>> {
    let check = |job: &Job<'_>| validate(model.config(), job.data, job.loss);
    run_checked(jobs, check, |valid| {
        let _pass = model.dev.ws().pass();
        match run_valid(model, &valid) {
            Ok(outs) => outs.into_iter().map(Ok).collect(),
            Err(e) => e.for_each_group(valid.len()).into_iter().map(Err).collect(),
        }
    })
}

/// The shared pass over validated groups (group `g` owns one contiguous row range).
fn run_valid<T: Act>(model: &CudaModel<T>, jobs: &[Job<'_>]) -> R<Vec<FwdBwdOutput>> {
    let dev = &*model.dev;
    let (mut tokens, mut seqs, mut positions) = (Vec::new(), Vec::new(), Vec::new());
    let mut ranges: Vec<Range<usize>> = Vec::with_capacity(jobs.len());
    let mut group_seqs = Vec::with_capacity(jobs.len());
    for job in jobs {
        let (t, s, p) = pack(job.data);
        let r0 = tokens.len();
        let s: Vec<(usize, usize)> = s.iter().map(|&(start, n)| (start + r0, n)).collect();
        seqs.extend_from_slice(&s);
        tokens.extend(t);
        positions.extend(p);
        ranges.push(r0..tokens.len());
        group_seqs.push(s);
    }
    let rows = tokens.len();
    let p = Pack::new(model, &tokens, &seqs, &positions)?;
    let specs: Vec<SegSpec> = jobs
        .iter()
        .zip(&ranges)
        .map(|(j, r)| SegSpec { rows: r.clone(), adapter: j.adapter, train: j.train })
        .collect();
    let lora = SegLora::new(model, &specs)?;
    let tg = model.targets(jobs)?;
    let kmax = tg.kmax;
    let nk = rows * kmax;
    let backward = jobs.iter().any(|j| j.train);
    let st = model.stack_fwd(&p, &lora, &mut KvMode::Train, backward)?;
    let head = lora.head()?;
    let hx = HeadIn { h: &st.h_final, rows, tg: &tg.dev, kmax, lora: head.as_ref() };
    let (lse, lp_dev) = model.head_fwd(&hx)?;
    // loss terms (then logprobs) in f64, and the head backward's coefficients, on the device;
    // each group's rows with its own loss
    let mut terms = scratch::<f64>(dev, 2 * nk)?;
    let mut coef = scratch::<f32>(dev, nk)?;
    for (job, r) in jobs.iter().zip(&ranges) {
        let (a, b) = (r.start * kmax, r.end * kmax);
        // group g's part of `terms` is [its loss terms | its logprobs], at 2a .. 2b
        let (slp, adv) = (view(&tg.slp, r.start, r.end)?, view(&tg.adv, r.start, r.end)?);
        k::loss_term_fwd(
            dev,
            (&mut view_mut(&mut terms, 2 * a, 2 * b)?, &mut view_mut(&mut coef, a, b)?),
            &view(&lp_dev, a, b)?,
            (&view(&tg.dev, a, b)?, &view(&tg.weights, a, b)?),
            k::RlInputs { sampler_logprob: &slp, advantages: &adv },
            job.loss,
        )?;
    }
    if backward {
        let dh = model.head_bwd(&hx, &coef, &lse)?;
        model.stack_bwd(&st, &dh, &p, &lora)?;
    }
    // the pass's one synchronisation: a pageable download waits for all the work queued above
    let host = download(dev, &view(&terms, 0, 2 * nk)?)?;
    let outs = jobs.iter().zip(&ranges).zip(&group_seqs).map(|((job, r), s)| {
        let (term, lp) = host[2 * r.start * kmax..2 * r.end * kmax].split_at(r.len() * kmax);
        outputs(job.data, s, r.start, kmax, (term, lp))
    });
    Ok(outs.collect())
}

/// One group's per-datum outputs and summed loss from its loss terms and logprobs [rows, kmax]
/// (its sequences start at pass row `r0` and on).
fn outputs(
    data: &[Datum],
    seqs: &[(usize, usize)],
    r0: usize,
    kmax: usize,
    (term, lp): (&[f64], &[f64]),
) -> FwdBwdOutput {
    let mut per_datum = Vec::with_capacity(data.len());
    let mut loss_sum = 0.0f64;
    for (d, &(start, n)) in data.iter().zip(seqs) {
        let kd = d.inputs.k.max(1);
        let mut lps = Vec::with_capacity(n * kd);
        let mut elem = vec![0.0f32; n];
        for (pos, e) in elem.iter_mut().enumerate() {
            let r = start - r0 + pos;
            for j in 0..kd {
                let l = term[r * kmax + j];
                *e += l as f32;
                loss_sum += l;
                lps.push(lp[r * kmax + j] as f32);
            }
        }
        per_datum.push(DatumOutput { logprobs: lps, elementwise_loss: elem });
    }
    FwdBwdOutput { per_datum, loss_sum }
}
