//! `forward_backward` on the GPU with exactly the CPU engine's semantics (same validation, same
//! packing, same per-datum outputs and summed loss), and the vocabulary-chunked output head:
//! logits are produced [rows, chunk] at a time in f32, merged by an online log-sum-exp, and
//! recomputed in the backward, so [tokens x vocab] never exists.
//!
//! The per-token loss terms and their gradient coefficients are computed on the device by
//! `loss_term_fwd` (kernels/loss.cu), which implements `LossFn::term` expression for expression
//! in f64, so every loss variant means the same on both backends; [`loss_term_reference`]
//! exposes the CPU definition it is tested against. The step enqueues forward, head, loss
//! terms, head backward and stack backward back to back and synchronises once, when it
//! downloads the logprobs and loss terms at the end.

use cudarc::driver::CudaSlice;

use super::adapter::{CudaAdapter, GpuPair};
use super::launch::{self as k, BLayout, LoraLayout};
use super::layer::{KvMode, Pack};
use super::model::{
    Act, CudaModel, R, download, scratch, scratch_zeroed, upload_ws, view, view_mut,
};
use super::workspace::Buf;
use crate::engine::batch::{FwdBwdOutput, pack, validate};
use crate::engine::loss::{Datum, DatumOutput, LossFn};

/// Vocabulary columns per head chunk.
const VOCAB_CHUNK: usize = 8192;
/// Rows per head block (bounds the f32 chunk buffer to ROW_BLOCK x VOCAB_CHUNK).
const ROW_BLOCK: usize = 4096;

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
    /// Per row: lse [rows] and target logprobs [rows, kmax] (0 at padding).
    pub(crate) fn head_fwd(
        &self,
        h: &CudaSlice<T>,
        rows: usize,
        tg: &CudaSlice<i32>,
        kmax: usize,
        lora: Option<&GpuPair>,
        scale: f32,
    ) -> R<(Buf<f32>, Buf<f32>)> {
        let dev = &*self.dev;
        let (hid, v) = (self.cfg.hidden_size, self.cfg.vocab_size);
        let w = self.head_w();
        // lse / lp: written by xent_finish; buf: by each chunk's GEMM (beta = 0); m, s, tgt:
        // initialised by the first chunk's xent_fwd
        let mut lse = scratch::<f32>(dev, rows)?;
        let mut lp = scratch::<f32>(dev, rows * kmax)?;
        let cap = ROW_BLOCK.min(rows) * VOCAB_CHUNK.min(v);
        let mut buf = scratch::<f32>(dev, cap)?;
        for r0 in (0..rows).step_by(ROW_BLOCK) {
            let nr = ROW_BLOCK.min(rows - r0);
            let hb = view(h, r0 * hid, (r0 + nr) * hid)?;
            let tb = view(tg, r0 * kmax, (r0 + nr) * kmax)?;
            let ha = self.head_shrink(&hb, nr, lora)?;
            let mut m = scratch::<f32>(dev, nr)?;
            let mut s = scratch::<f32>(dev, nr)?;
            let mut tgt = scratch::<f32>(dev, nr * kmax)?;
            for v0 in (0..v).step_by(VOCAB_CHUNK) {
                let vc = VOCAB_CHUNK.min(v - v0);
                let mut lv = view_mut(&mut buf, 0, nr * vc)?;
                self.head_chunk(&mut lv, &hb, nr, v0, vc, w, lora.zip(ha.as_ref()), scale)?;
                k::xent_fwd::<f32>(
                    dev,
                    &mut view_mut(&mut m, 0, nr)?,
                    &mut view_mut(&mut s, 0, nr)?,
                    &mut view_mut(&mut tgt, 0, nr * kmax)?,
                    &lv.as_view(),
                    vc,
                    v0,
                    vc,
                    &tb,
                    v0 == 0,
                )?;
            }
            k::xent_finish_fwd(
                dev,
                &mut view_mut(&mut lse, r0, r0 + nr)?,
                &mut view_mut(&mut lp, r0 * kmax, (r0 + nr) * kmax)?,
                &view(&m, 0, nr)?,
                &view(&s, 0, nr)?,
                &view(&tgt, 0, nr * kmax)?,
                &tb,
            )?;
        }
        Ok((lse, lp))
    }

    /// h A^T [nr, r] for the lm_head LoRA (None without one).
    fn head_shrink(
        &self,
        hb: &cudarc::driver::CudaView<'_, T>,
        nr: usize,
        lora: Option<&GpuPair>,
    ) -> R<Option<Buf<f32>>> {
        let Some(p) = lora else { return Ok(None) };
        let mut ha = scratch::<f32>(&self.dev, nr * p.rank)?;
        k::lora_shrink_fwd(
            &self.dev,
            &mut view_mut(&mut ha, 0, nr * p.rank)?,
            hb,
            &p.a.as_view(),
            LoraLayout::Rows,
            p.rank,
            1.0,
        )?;
        Ok(Some(ha))
    }

    /// Logits of vocabulary columns v0 .. v0 + vc for nr rows into `out` [nr, vc] (f32).
    #[allow(clippy::too_many_arguments)]
    fn head_chunk(
        &self,
        out: &mut cudarc::driver::CudaViewMut<'_, f32>,
        hb: &cudarc::driver::CudaView<'_, T>,
        nr: usize,
        v0: usize,
        vc: usize,
        w: &CudaSlice<T>,
        lora: Option<(&GpuPair, &Buf<f32>)>,
        scale: f32,
    ) -> R<()> {
        let dev = &*self.dev;
        let hid = self.cfg.hidden_size;
        let wc = view(w, v0 * hid, (v0 + vc) * hid)?;
        k::matmul::<T, f32>(dev, out, hb, &wc, BLayout::Nk, (nr, vc, hid), 1.0, 0.0)?;
        if let Some((p, ha)) = lora {
            let r = p.rank;
            k::lora_expand_fwd::<f32>(
                dev,
                out,
                &view(ha, 0, nr * r)?,
                &view(&p.b, v0 * r, (v0 + vc) * r)?,
                LoraLayout::Cols,
                r,
                scale,
            )?;
        }
        Ok(())
    }

    /// Backward of the head: `coef` [rows, kmax] = -dLoss/dlogprob (the kernels' sign);
    /// returns dh [rows, hidden] and accumulates the lm_head LoRA gradients.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn head_bwd(
        &self,
        h: &CudaSlice<T>,
        rows: usize,
        tg: &CudaSlice<i32>,
        kmax: usize,
        coef: &CudaSlice<f32>,
        lse: &CudaSlice<f32>,
        mut lora: Option<&mut GpuPair>,
        scale: f32,
    ) -> R<Buf<T>> {
        let dev = &*self.dev;
        let (hid, v) = (self.cfg.hidden_size, self.cfg.vocab_size);
        let w = self.head_w();
        // dh: each row block is written by its first chunk's GEMM (beta = 0), then accumulated
        let mut dh = scratch::<T>(dev, rows * hid)?;
        let cap = ROW_BLOCK.min(rows) * VOCAB_CHUNK.min(v);
        let mut buf = scratch::<f32>(dev, cap)?;
        let mut dl = scratch::<T>(dev, cap)?;
        for r0 in (0..rows).step_by(ROW_BLOCK) {
            let nr = ROW_BLOCK.min(rows - r0);
            let hb = view(h, r0 * hid, (r0 + nr) * hid)?;
            let tb = view(tg, r0 * kmax, (r0 + nr) * kmax)?;
            let cb = view(coef, r0 * kmax, (r0 + nr) * kmax)?;
            let lb = view(lse, r0, r0 + nr)?;
            let ha = self.head_shrink(&hb, nr, lora.as_deref())?;
            let rank = lora.as_ref().map(|p| p.rank).unwrap_or(0);
            // dha sums the chunks' contributions (acc_fwd): the one buffer here that needs zeros
            let mut dha = scratch_zeroed::<f32>(dev, nr * rank.max(1))?;
            let mut tmp = scratch::<f32>(dev, nr * rank.max(1))?;
            for v0 in (0..v).step_by(VOCAB_CHUNK) {
                let vc = VOCAB_CHUNK.min(v - v0);
                let mut lv = view_mut(&mut buf, 0, nr * vc)?;
                self.head_chunk(
                    &mut lv,
                    &hb,
                    nr,
                    v0,
                    vc,
                    w,
                    lora.as_deref().zip(ha.as_ref()),
                    scale,
                )?;
                k::xent_bwd_inplace::<f32>(dev, &mut lv, vc, v0, vc, &tb, &cb, &lb)?;
                let mut dv = view_mut(&mut dl, 0, nr * vc)?;
                T::cast_from_f32(dev, &mut dv, &lv.as_view())?;
                let dlv = dv.as_view();
                let beta = if v0 == 0 { 0.0 } else { 1.0 };
                k::matmul::<T, T>(
                    dev,
                    &mut view_mut(&mut dh, r0 * hid, (r0 + nr) * hid)?,
                    &dlv,
                    &view(w, v0 * hid, (v0 + vc) * hid)?,
                    BLayout::Kn,
                    (nr, hid, vc),
                    1.0,
                    beta,
                )?;
                if let (Some(p), Some(ha)) = (lora.as_deref_mut(), ha.as_ref()) {
                    let r = p.rank;
                    let GpuPair { b, gb, .. } = p;
                    k::lora_wgrad_bwd(
                        dev,
                        &mut view_mut(gb, v0 * r, (v0 + vc) * r)?,
                        &view(ha, 0, nr * r)?,
                        &dlv,
                        LoraLayout::Cols,
                        r,
                        scale,
                    )?;
                    let mut tv = view_mut(&mut tmp, 0, nr * r)?;
                    k::lora_shrink_fwd(
                        dev,
                        &mut tv,
                        &dlv,
                        &view(b, v0 * r, (v0 + vc) * r)?,
                        LoraLayout::Cols,
                        r,
                        scale,
                    )?;
                    k::acc_fwd::<f32>(dev, &mut view_mut(&mut dha, 0, nr * r)?, &tv.as_view())?;
                }
            }
            if let Some(p) = lora.as_deref_mut() {
                let r = p.rank;
                let GpuPair { a, ga, .. } = p;
                let dhav = view(&dha, 0, nr * r)?;
                k::lora_wgrad_bwd(
                    dev,
                    &mut ga.as_view_mut(),
                    &dhav,
                    &hb,
                    LoraLayout::Rows,
                    r,
                    1.0,
                )?;
                k::lora_expand_fwd(
                    dev,
                    &mut view_mut(&mut dh, r0 * hid, (r0 + nr) * hid)?,
                    &dhav,
                    &a.as_view(),
                    LoraLayout::Rows,
                    r,
                    1.0,
                )?;
            }
        }
        Ok(dh)
    }

    fn targets(&self, data: &[Datum]) -> R<Targets> {
        let kmax = data.iter().map(|d| d.inputs.k.max(1)).max().unwrap_or(1);
        let rows: usize = data.iter().map(|d| d.input_tokens.len()).sum();
        let mut tg = Vec::with_capacity(rows * kmax);
        let mut weights = Vec::with_capacity(rows * kmax);
        let (mut slp, mut adv) = (Vec::with_capacity(rows), Vec::with_capacity(rows));
        for d in data {
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
    let out = match adapter {
        Some(a) if !forward_only => fwd_bwd(model, None, Some(a), data, loss),
        Some(a) => fwd_bwd(model, Some(&*a), None, data, loss),
        None => fwd_bwd(model, None, None, data, loss),
    };
    model.dev.ws().end_pass();
    out
}

/// Forward only (logprobs and losses, no gradients) with a shared adapter borrow.
pub fn forward_only<T: Act>(
    model: &CudaModel<T>,
    adapter: Option<&CudaAdapter>,
    data: &[Datum],
    loss: &LossFn,
) -> R<FwdBwdOutput> {
    let out = fwd_bwd(model, adapter, None, data, loss);
    model.dev.ws().end_pass();
    out
}

/// `read`: an adapter used without gradients; `train`: one that receives them (at most one of
/// the two is given).
fn fwd_bwd<T: Act>(
    model: &CudaModel<T>,
    read: Option<&CudaAdapter>,
    train: Option<&mut CudaAdapter>,
    data: &[Datum],
    loss: &LossFn,
) -> R<FwdBwdOutput> {
    validate(model.config(), data, loss)?;
    let dev = &*model.dev;
    let (tokens, seqs, positions) = pack(data);
    let rows = tokens.len();
    let p = Pack::new(model, &tokens, &seqs, &positions)?;
    let tg = model.targets(data)?;
    let kmax = tg.kmax;
    let nk = rows * kmax;
    let backward = train.is_some();
    let adapter: Option<&CudaAdapter> = read.or(train.as_deref());
    let st = model.stack_fwd(&p, adapter, &mut KvMode::Train, backward)?;
    let scale = adapter.map(|a| a.scaling).unwrap_or(0.0);
    let head_lora = adapter.and_then(|a| a.lm_head.as_ref());
    let (lse, lp_dev) = model.head_fwd(&st.h_final, rows, &tg.dev, kmax, head_lora, scale)?;
    // loss terms (then logprobs) in f64, and the head backward's coefficients, on the device
    let mut terms = scratch::<f64>(dev, 2 * nk)?;
    let mut coef = scratch::<f32>(dev, nk)?;
    k::loss_term_fwd(
        dev,
        &mut view_mut(&mut terms, 0, 2 * nk)?,
        &mut view_mut(&mut coef, 0, nk)?,
        &view(&lp_dev, 0, nk)?,
        &view(&tg.dev, 0, nk)?,
        &view(&tg.weights, 0, nk)?,
        &view(&tg.slp, 0, rows)?,
        &view(&tg.adv, 0, rows)?,
        loss,
    )?;
    if let Some(ad) = train {
        let dh = model.head_bwd(
            &st.h_final,
            rows,
            &tg.dev,
            kmax,
            &coef,
            &lse,
            ad.lm_head.as_mut(),
            scale,
        )?;
        model.stack_bwd(&st, &dh, &p, ad)?;
    }
    // the step's one synchronisation: a pageable download waits for all the work queued above
    let host = download(dev, &view(&terms, 0, 2 * nk)?)?;
    let (term, lp) = host.split_at(nk);

    let mut per_datum = Vec::with_capacity(data.len());
    let mut loss_sum = 0.0f64;
    for (d, &(start, n)) in data.iter().zip(&seqs) {
        let kd = d.inputs.k.max(1);
        let mut lps = Vec::with_capacity(n * kd);
        let mut elem = vec![0.0f32; n];
        for (pos, e) in elem.iter_mut().enumerate() {
            let r = start + pos;
            for j in 0..kd {
                let l = term[r * kmax + j];
                *e += l as f32;
                loss_sum += l;
                lps.push(lp[r * kmax + j] as f32);
            }
        }
        per_datum.push(DatumOutput { logprobs: lps, elementwise_loss: elem });
    }
    Ok(FwdBwdOutput { per_datum, loss_sum })
}
