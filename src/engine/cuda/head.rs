//! The output head on the GPU, vocabulary-chunked: logits are produced [rows, chunk] at a time
//! in f32, merged by an online log-sum-exp, and recomputed in the backward, so
//! [tokens x vocab] never exists. Each row's lm_head LoRA is its own segment's (`SegLora`).

use std::ops::Range;

use cudarc::driver::{CudaSlice, CudaView, CudaViewMut};

use super::launch::{self as k, BLayout, LoraSegs, LoraTensor, SegCall};
use super::model::{Act, CudaModel, R, scratch, view, view_mut};
use super::workspace::Buf;

/// Vocabulary columns per head chunk.
pub(crate) const VOCAB_CHUNK: usize = 8192;
/// Rows per head block (bounds the f32 chunk buffer to ROW_BLOCK x VOCAB_CHUNK).
const ROW_BLOCK: usize = 4096;

/// What the head reads in both directions: the final hidden rows `h` [rows, hidden], their
/// targets `tg` [rows, kmax] (-1 at padding) and the lm_head LoRA table (None without one).
pub(crate) struct HeadIn<'a, T: Act> {
    pub h: &'a CudaSlice<T>,
    pub rows: usize,
    pub tg: &'a CudaSlice<i32>,
    pub kmax: usize,
    pub lora: Option<&'a LoraSegs<'a>>,
}

impl<T: Act> CudaModel<T> {
    /// Per row: lse [rows] and target logprobs [rows, kmax] (0 at padding).
    pub(crate) fn head_fwd(&self, x: &HeadIn<'_, T>) -> R<(Buf<f32>, Buf<f32>)> {
        let HeadIn { h, rows, tg, kmax, lora } = *x;
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
            let ha = self.head_shrink(&hb, r0..r0 + nr, lora)?;
            let mut m = scratch::<f32>(dev, nr)?;
            let mut s = scratch::<f32>(dev, nr)?;
            let mut tgt = scratch::<f32>(dev, nr * kmax)?;
            for v0 in (0..v).step_by(VOCAB_CHUNK) {
                let vc = VOCAB_CHUNK.min(v - v0);
                let mut lv = view_mut(&mut buf, 0, nr * vc)?;
                self.head_chunk(&mut lv, &hb, r0..r0 + nr, v0, vc, w, lora.zip(ha.as_ref()))?;
                let acc = k::XentAcc {
                    m: &mut view_mut(&mut m, 0, nr)?,
                    s: &mut view_mut(&mut s, 0, nr)?,
                    tgt: &mut view_mut(&mut tgt, 0, nr * kmax)?,
                };
                let logits = k::Logits { data: &lv.as_view(), ld: vc, cols: vc };
                k::xent_fwd::<f32>(dev, acc, logits, v0, &tb, v0 == 0)?;
            }
            let acc = k::XentAcc {
                m: &view(&m, 0, nr)?,
                s: &view(&s, 0, nr)?,
                tgt: &view(&tgt, 0, nr * kmax)?,
            };
            k::xent_finish_fwd(
                dev,
                (
                    &mut view_mut(&mut lse, r0, r0 + nr)?,
                    &mut view_mut(&mut lp, r0 * kmax, (r0 + nr) * kmax)?,
                ),
                acc,
                &tb,
            )?;
        }
        Ok((lse, lp))
    }

    /// h A^T [rows, max rank] for the lm_head LoRA of rows `rows` of the pass (None without
    /// one); `hb` holds those rows.
    pub(crate) fn head_shrink(
        &self,
        hb: &CudaView<'_, T>,
        rows: Range<usize>,
        lora: Option<&LoraSegs<'_>>,
    ) -> R<Option<Buf<f32>>> {
        let Some(ls) = lora else { return Ok(None) };
        let (nr, hs) = (rows.len(), ls.max_rank());
        let mut ha = scratch::<f32>(&self.dev, nr * hs)?;
        let call = SegCall::compact(rows, self.cfg.hidden_size, hs, 0);
        // SAFETY: the pass's table addresses its adapters' live tensors (`SegLora::new`).
        unsafe {
            k::lora_seg(
                &self.dev,
                k::SegOp::Shrink { h: &mut view_mut(&mut ha, 0, nr * hs)?, x: hb },
                ls,
                LoraTensor::A,
                &call,
            )?;
        }
        Ok(Some(ha))
    }

    /// Logits of vocabulary columns v0 .. v0 + vc for the pass's rows `rows` (held by `hb`)
    /// into `out` [rows, vc] (f32).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn head_chunk(
        &self,
        out: &mut CudaViewMut<'_, f32>,
        hb: &CudaView<'_, T>,
        rows: Range<usize>,
        v0: usize,
        vc: usize,
        w: &CudaSlice<T>,
        lora: Option<(&LoraSegs<'_>, &Buf<f32>)>,
    ) -> R<()> {
        let dev = &*self.dev;
        let (hid, nr) = (self.cfg.hidden_size, rows.len());
        let wc = view(w, v0 * hid, (v0 + vc) * hid)?;
        k::matmul::<T, f32>(dev, out, hb, &wc, BLayout::Nk, (nr, vc, hid), 1.0, 0.0)?;
        if let Some((ls, ha)) = lora {
            let hs = ls.max_rank();
            let call = SegCall::compact(rows, vc, hs, v0);
            // SAFETY: the pass's table addresses its adapters' live tensors (`SegLora::new`).
            unsafe {
                k::lora_seg::<f32>(
                    dev,
                    k::SegOp::Expand { y: out, h: &view(ha, 0, nr * hs)? },
                    ls,
                    LoraTensor::B,
                    &call,
                )?;
            }
        }
        Ok(())
    }

    /// Backward of the head: `coef` [rows, kmax] = -dLoss/dlogprob (the kernels' sign);
    /// returns dh [rows, hidden] and accumulates the lm_head LoRA gradients of the training
    /// segments.
    pub(crate) fn head_bwd(
        &self,
        x: &HeadIn<'_, T>,
        coef: &CudaSlice<f32>,
        lse: &CudaSlice<f32>,
    ) -> R<Buf<T>> {
        let HeadIn { h, rows, tg, kmax, lora } = *x;
        let dev = &*self.dev;
        let (hid, v) = (self.cfg.hidden_size, self.cfg.vocab_size);
        let w = self.head_w();
        let hs = lora.map_or(0, LoraSegs::max_rank);
        // dh: each row block is written by its first chunk's GEMM (beta = 0), then accumulated
        let mut dh = scratch::<T>(dev, rows * hid)?;
        let cap = ROW_BLOCK.min(rows) * VOCAB_CHUNK.min(v);
        let mut buf = scratch::<f32>(dev, cap)?;
        let mut dl = scratch::<T>(dev, cap)?;
        for r0 in (0..rows).step_by(ROW_BLOCK) {
            let nr = ROW_BLOCK.min(rows - r0);
            let rr = r0..r0 + nr;
            let hb = view(h, r0 * hid, (r0 + nr) * hid)?;
            let tb = view(tg, r0 * kmax, (r0 + nr) * kmax)?;
            let cb = view(coef, r0 * kmax, (r0 + nr) * kmax)?;
            let lb = view(lse, r0, r0 + nr)?;
            let ha = self.head_shrink(&hb, rr.clone(), lora)?;
            // dha sums the chunks' contributions: the first chunk's shrink writes it, the
            // others shrink into tmp and add (acc_fwd), so it needs no zero-fill. Rows of
            // segments without a lm_head LoRA are written by neither and read by nothing.
            let mut dha = scratch::<f32>(dev, nr * hs.max(1))?;
            let mut tmp = scratch::<f32>(dev, nr * hs.max(1))?;
            for v0 in (0..v).step_by(VOCAB_CHUNK) {
                let vc = VOCAB_CHUNK.min(v - v0);
                let mut lv = view_mut(&mut buf, 0, nr * vc)?;
                self.head_chunk(&mut lv, &hb, rr.clone(), v0, vc, w, lora.zip(ha.as_ref()))?;
                let rows = k::XentRows { targets: &tb, coef: &cb, lse: &lb };
                k::xent_bwd_inplace::<f32>(dev, (&mut lv, vc), (v0, vc), rows)?;
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
                if let (Some(ls), Some(ha)) = (lora, ha.as_ref()) {
                    let call = SegCall::compact(rr.clone(), vc, hs, v0);
                    let first = v0 == 0;
                    let mut tv = view_mut(if first { &mut dha } else { &mut tmp }, 0, nr * hs)?;
                    // SAFETY: the pass's table addresses its adapters' live tensors.
                    unsafe {
                        let hav = view(ha, 0, nr * hs)?;
                        k::lora_seg(
                            dev,
                            k::SegOp::Wgrad { u: &hav, v: &dlv },
                            ls,
                            LoraTensor::GradB,
                            &call,
                        )?;
                        k::lora_seg(
                            dev,
                            k::SegOp::Shrink { h: &mut tv, x: &dlv },
                            ls,
                            LoraTensor::B,
                            &call,
                        )?;
                    }
                    if !first {
                        let tv = view(&tmp, 0, nr * hs)?;
                        k::acc_fwd::<f32>(dev, &mut view_mut(&mut dha, 0, nr * hs)?, &tv)?;
                    }
                }
            }
            if let Some(ls) = lora {
                let call = SegCall::compact(rr, hid, hs, 0);
                let dhav = view(&dha, 0, nr * hs)?;
                // SAFETY: the pass's table addresses its adapters' live tensors.
                unsafe {
                    k::lora_seg(
                        dev,
                        k::SegOp::Wgrad { u: &dhav, v: &hb },
                        ls,
                        LoraTensor::GradA,
                        &call,
                    )?;
                    k::lora_seg(
                        dev,
                        k::SegOp::Expand {
                            y: &mut view_mut(&mut dh, r0 * hid, (r0 + nr) * hid)?,
                            h: &dhav,
                        },
                        ls,
                        LoraTensor::A,
                        &call,
                    )?;
                }
            }
        }
        Ok(dh)
    }
}
