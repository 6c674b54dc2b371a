//! The decoder stack on the GPU: one layer's forward (training with saved activations, prefill
//! into a KV cache, or single-token decode) and its explicit backward, step for step the same as
//! `engine::transformer` (same recomputed tensors, same order of accumulation).
//!
//! Every tensor here is a workspace [`Buf`] (see `workspace.rs`). The residual stream is never
//! copied: a block's output projection writes `a W^T + x` (a its input) into a fresh buffer,
//! x being the GEMM's separate C input (`linear.rs`); that buffer becomes the new `x`, so the
//! old `x` is kept as the saved block input without a copy or an extra pass.

use cudarc::driver::{CudaSlice, CudaView};

use super::CudaError;
use super::decode::CudaKvCache;
use super::launch as k;
use super::launch::{LoraSegs, RopeDst, RopeIn};
use super::linear::{DLinear, Part};
use super::model::{Act, CudaModel, R, scratch, slot, upload_ws, view, view_mut};
use super::segment::SegLora;
use super::workspace::Buf;
use crate::engine::lora::Target;

/// Packed rows of several sequences on the device.
pub(crate) struct Pack {
    pub rows: usize,
    pub ids: Buf<i32>,
    pub pos: Buf<i32>,
    /// Prefix sums of the sequence lengths [B + 1].
    pub cu: Buf<i32>,
    pub max_len: usize,
}

impl Pack {
    /// Uploads already validated tokens (`< vocab`) with their positions.
    pub fn new<T: Act>(
        m: &CudaModel<T>,
        tokens: &[u32],
        seqs: &[(usize, usize)],
        positions: &[u32],
    ) -> R<Pack> {
        let rows = tokens.len();
        if rows == 0 || positions.len() != rows {
            return Err(CudaError::Shape {
                kernel: "pack",
                msg: format!("{rows} tokens with {} positions", positions.len()),
            });
        }
        let to_i32 = |v: u32, what: &str| {
            i32::try_from(v).map_err(|_| CudaError::Shape {
                kernel: "pack",
                msg: format!("{what} {v} exceeds i32"),
            })
        };
        let dev = &*m.dev;
        // converted and uploaded in one go: the i32 copies are only staging
        let up = |v: &[u32], what: &str| {
            let v = v.iter().map(|&t| to_i32(t, what)).collect::<R<Vec<_>>>()?;
            upload_ws(dev, &v)
        };
        let (ids, pos) = (up(tokens, "token")?, up(positions, "position")?);
        let mut cu = Vec::with_capacity(seqs.len() + 1);
        cu.push(0i32);
        for &(start, len) in seqs {
            cu.push(to_i32((start + len) as u32, "row")?);
        }
        let max_len = seqs.iter().map(|s| s.1).max().unwrap_or(0);
        Ok(Pack { rows, ids, pos, cu: upload_ws(dev, &cu)?, max_len })
    }
}

/// How attention sees keys and values.
pub(crate) enum KvMode<'a, T: Act> {
    /// Packed causal attention over the rows themselves (training, forward-only).
    Train,
    /// As `Train`, and the keys / values are written to the cache at `slots` [rows].
    Prefill { slots: &'a CudaSlice<i32>, cache: &'a mut CudaKvCache<T> },
    /// One row per sequence, in groups of consecutive rows that each have their own cache
    /// (several requests decoding in one pass).
    Decode(Vec<DecodeGroup<'a, T>>),
}

/// The per-row indices of a decode group, on the host (`Vec<i32>`, built per step) or the
/// device (`Buf<i32>`): each row is appended to its cache at `slots`, then attends to its cached
/// context (`table` = the sequence's cache block, `ctx` = its length after the append).
pub(crate) struct DecodeRows<V> {
    pub slots: V,
    pub table: V,
    pub ctx: V,
}

impl<V> DecodeRows<V> {
    pub fn parts(&self) -> [&V; 3] {
        [&self.slots, &self.table, &self.ctx]
    }

    pub fn parts_mut(&mut self) -> [&mut V; 3] {
        [&mut self.slots, &mut self.table, &mut self.ctx]
    }
}

impl DecodeRows<Vec<i32>> {
    pub fn upload(&self, dev: &super::CudaDevice) -> R<DecodeRows<Buf<i32>>> {
        Ok(DecodeRows {
            slots: upload_ws(dev, &self.slots)?,
            table: upload_ws(dev, &self.table)?,
            ctx: upload_ws(dev, &self.ctx)?,
        })
    }
}

/// One cache's rows of a decode pass (`max_ctx`: the longest context after the append, which
/// sizes the decode kernel's split count).
pub(crate) struct DecodeGroup<'a, T: Act> {
    pub rows: std::ops::Range<usize>,
    pub idx: DecodeRows<Buf<i32>>,
    pub max_ctx: usize,
    pub cache: &'a mut CudaKvCache<T>,
}

/// (the q|k|v projection: the q/k norms' input, q's rstd, k's rstd).
type QkPre<T> = (Buf<T>, Buf<f32>, Buf<f32>);

/// Activations one layer keeps for its backward (the normed inputs and the SwiGLU output are
/// recomputed, as on the CPU).
pub(crate) struct LayerSave<T: Act> {
    x_in: Buf<T>,
    rstd1: Buf<f32>,
    /// LoRA intermediates x A^T per target (`Target::LAYER` order).
    h: [Option<Buf<f32>>; 7],
    /// Input and statistics of Qwen3-style q/k norms.
    qk_pre: Option<QkPre<T>>,
    /// Post-rope q, k, v with the head dim padded to `hdp`.
    qp: Buf<T>,
    kp: Buf<T>,
    vp: Buf<T>,
    /// Attention output, padded [rows, heads, hdp].
    outp: Buf<T>,
    /// The same unpadded [rows, heads * head_dim]; `None` when head_dim needs no padding
    /// (every real model), where `outp` already is that tensor.
    attn: Option<Buf<T>>,
    lse: Buf<f32>,
    x_mid: Buf<T>,
    rstd2: Buf<f32>,
    /// The fused gate|up projection [rows, 2 * inter].
    gu: Buf<T>,
}

impl<T: Act> LayerSave<T> {
    /// The unpadded attention output (the o projection's input).
    fn attn(&self) -> &CudaSlice<T> {
        self.attn.as_ref().unwrap_or(&self.outp)
    }
}

/// Result of the stack: final normed hidden states and what the backward needs.
pub(crate) struct StackOut<T: Act> {
    pub h_final: Buf<T>,
    x_final: Buf<T>,
    rstd_final: Buf<f32>,
    saves: Vec<LayerSave<T>>,
}

impl<T: Act> CudaModel<T> {
    /// Pads the head dim to `hdp` (moves `x` through unchanged when no padding is needed).
    fn pad_owned(&self, x: Buf<T>, rows_heads: usize) -> R<Buf<T>> {
        Ok(self.pad(&x, rows_heads)?.unwrap_or(x))
    }

    /// Embedding, every layer, final norm.
    pub(crate) fn stack_fwd(
        &self,
        p: &Pack,
        lora: &SegLora,
        kv: &mut KvMode<'_, T>,
        save: bool,
    ) -> R<StackOut<T>> {
        let h = self.cfg.hidden_size;
        let mut x = scratch::<T>(&self.dev, p.rows * h)?;
        k::embedding_fwd(
            &self.dev,
            &mut view_mut(&mut x, 0, p.rows * h)?,
            (&self.embed.as_view(), h),
            &view(&p.ids, 0, p.rows)?,
        )?;
        let mut saves = Vec::new();
        for l in 0..self.layers.len() {
            let (x_out, s) = self.layer_fwd(l, x, p, lora, kv, save)?;
            x = x_out;
            saves.extend(s);
        }
        let (h_final, rstd_final) = self.rmsnorm(&view(&x, 0, p.rows * h)?, &self.final_norm)?;
        Ok(StackOut { h_final, x_final: x, rstd_final, saves })
    }

    /// Backward through the stack from `dh_final`, accumulating the LoRA gradients of the
    /// training segments of `lora`.
    pub(crate) fn stack_bwd(
        &self,
        st: &StackOut<T>,
        dh_final: &Buf<T>,
        p: &Pack,
        lora: &SegLora,
    ) -> R<()> {
        let n = p.rows * self.cfg.hidden_size;
        if st.saves.len() != self.layers.len() {
            return Err(CudaError::Shape {
                kernel: "stack_bwd",
                msg: "the forward did not save activations".into(),
            });
        }
        let mut dx = self.rmsnorm_bwd(
            &view(dh_final, 0, n)?,
            &view(&st.x_final, 0, n)?,
            &self.final_norm,
            &st.rstd_final,
        )?;
        for (l, s) in st.saves.iter().enumerate().rev() {
            self.layer_bwd(l, s, &mut dx, p, lora)?;
        }
        Ok(())
    }

    /// A projection with one LoRA (`x_proj` [rows, lin.inp]) added onto the residual stream `x`
    /// [rows, hidden] in a fresh buffer (C != D in the GEMM): `x` stays intact for the backward
    /// without a copy or a separate residual pass. Returns the new stream and the LoRA's
    /// intermediate.
    fn residual_fwd(
        &self,
        x_proj: &CudaView<'_, T>,
        x: &Buf<T>,
        rows: usize,
        lin: &DLinear<T>,
        lora: Option<LoraSegs<'_>>,
    ) -> R<(Buf<T>, Option<Buf<f32>>)> {
        let residual = view(x, 0, rows * self.cfg.hidden_size)?;
        let (y, [h]) =
            self.lin_fwd(x_proj, rows, lin, [Part::new(lora.as_ref(), 0)], Some(&residual))?;
        Ok((y, h))
    }

    /// One layer on the residual stream `x`; returns the new stream (and the saved activations
    /// when `save`).
    fn layer_fwd(
        &self,
        l: usize,
        x: Buf<T>,
        p: &Pack,
        lora: &SegLora,
        kv: &mut KvMode<'_, T>,
        save: bool,
    ) -> R<(Buf<T>, Option<LayerSave<T>>)> {
        let dev = &*self.dev;
        let lw = &self.layers[l];
        let rows = p.rows;
        let (hid, hd, nh, nkv, hdp) = self.layer_dims();
        let m = |t: Target| lora.module(Some(l), t);

        let (h1, rstd1) = self.rmsnorm(&view(&x, 0, rows * hid)?, &lw.input_norm)?;
        let h1v = view(&h1, 0, rows * hid)?;
        // one GEMM (and one bias add) for q, k and v; each LoRA adds into its column window
        let (wq, wkv, wqkv) = (nh * hd, nkv * hd, lw.qkv.out);
        let nqkv = rows * wqkv;
        let (mq, mk, mv) = (m(Target::Q)?, m(Target::K)?, m(Target::V)?);
        let parts = [
            Part::new(mq.as_ref(), 0),
            Part::new(mk.as_ref(), wq),
            Part::new(mv.as_ref(), wq + wkv),
        ];
        let (qkv, [hq, hk, hv]) = self.lin_fwd(&h1v, rows, &lw.qkv, parts, None)?;
        // Qwen3's q/k norms read their heads of the projection in place
        let normed = match &lw.qk_norm {
            Some((qn, kn)) => Some((
                self.rmsnorm_heads(&view(&qkv, 0, nqkv)?, wqkv, rows, nh, qn)?,
                self.rmsnorm_heads(&view(&qkv, wq, nqkv)?, wqkv, rows, nkv, kn)?,
            )),
            None => None,
        };
        // RoPE on q and k, v copied, in one launch: the attention inputs, head-padded
        let (nq, nk) = (rows * nh * hdp, rows * nkv * hdp);
        let mut qp = scratch::<T>(dev, nq)?;
        let mut kp = scratch::<T>(dev, nk)?;
        let mut vp = scratch::<T>(dev, nk)?;
        {
            let vi = view(&qkv, wq + wkv, nqkv)?;
            let (qi, ki, ld) = match &normed {
                Some(((qo, _), (ko, _))) => {
                    (view(qo, 0, rows * wq)?, view(ko, 0, rows * wkv)?, [wq, wkv, wqkv])
                }
                None => (view(&qkv, 0, nqkv)?, view(&qkv, wq, nqkv)?, [wqkv; 3]),
            };
            let inp = RopeIn { t: [&qi, &ki, &vi], ld };
            let (mut qo, mut ko) = (view_mut(&mut qp, 0, nq)?, view_mut(&mut kp, 0, nk)?);
            let mut vo = view_mut(&mut vp, 0, nk)?;
            let holds = [[(0, nh * hdp, 0)], [(1, nkv * hdp, 0)], [(2, nkv * hdp, 0)]];
            let mut out = [
                RopeDst { buf: &mut qo, holds: &holds[0] },
                RopeDst { buf: &mut ko, holds: &holds[1] },
                RopeDst { buf: &mut vo, holds: &holds[2] },
            ];
            self.rope(k::RopeDir::Forward, &mut out, &inp, &p.pos, rows, (hd, hdp))?;
        }
        // the norms' backward needs their input: the projection itself
        let qk_pre = normed.map(|((_, q_rstd), (_, k_rstd))| (qkv, q_rstd, k_rstd));
        // both written completely by the attention kernel (lse only by the training /
        // prefill kernel; decode never reads it)
        let mut outp = scratch::<T>(dev, nq)?;
        let mut lse = scratch::<f32>(dev, rows * nh)?;
        let (qv, kv_, vv) = (view(&qp, 0, nq)?, view(&kp, 0, nk)?, view(&vp, 0, nk)?);
        match kv {
            KvMode::Train | KvMode::Prefill { .. } => {
                k::attention_fwd(
                    dev,
                    &mut view_mut(&mut outp, 0, nq)?,
                    &mut view_mut(&mut lse, 0, rows * nh)?,
                    k::Qkv { q: &qv, k: &kv_, v: &vv },
                    &p.cu.as_view(),
                    &self.attn_shape(p.max_len),
                )?;
                if let KvMode::Prefill { slots, cache } = kv {
                    cache.append(dev, l, &view(slots, 0, rows)?, &kv_, &vv, nkv * hdp)?;
                }
            }
            KvMode::Decode(groups) => {
                for g in groups.iter_mut() {
                    let (r, nr) = (g.rows.clone(), g.rows.len());
                    let (q0, q1) = (r.start * nh * hdp, r.end * nh * hdp);
                    let (k0, k1) = (r.start * nkv * hdp, r.end * nkv * hdp);
                    let block = g.cache.max_len();
                    let (kc, vc) = g.cache.append(
                        dev,
                        l,
                        &view(&g.idx.slots, 0, nr)?,
                        &view(&kp, k0, k1)?,
                        &view(&vp, k0, k1)?,
                        nkv * hdp,
                    )?;
                    let shape = self.decode_shape(block, g.max_ctx);
                    // the splits' partial softmax states (phase 1 writes each one the combine reads)
                    let nws = k::decode_workspace_len(nr, &shape);
                    let mut ws = scratch::<f32>(dev, nws)?;
                    k::decode_attention_fwd(
                        dev,
                        &mut view_mut(&mut outp, q0, q1)?,
                        &mut view_mut(&mut ws, 0, nws)?,
                        &view(&qp, q0, q1)?,
                        k::Kv { k: &kc.as_view(), v: &vc.as_view() },
                        &view(&g.idx.table, 0, nr)?,
                        &view(&g.idx.ctx, 0, nr)?,
                        &shape,
                    )?;
                }
            }
        }
        let attn = self.unpad(&outp, rows * nh)?;
        // x_mid = x_in + o
        let o_in = view(attn.as_ref().map_or(&*outp, |a| &**a), 0, rows * nh * hd)?;
        let (o, ho) = self.residual_fwd(&o_in, &x, rows, &lw.o, m(Target::O)?)?;
        let (x_in, x) = (x, o);

        let (h2, rstd2) = self.rmsnorm(&view(&x, 0, rows * hid)?, &lw.post_norm)?;
        let h2v = view(&h2, 0, rows * hid)?;
        let inter = lw.inter();
        // one GEMM for gate and up; each LoRA adds into its half of the row
        let (mg, mu) = (m(Target::Gate)?, m(Target::Up)?);
        let parts = [Part::new(mg.as_ref(), 0), Part::new(mu.as_ref(), inter)];
        let (gu, [hg, hu]) = self.lin_fwd(&h2v, rows, &lw.gate_up, parts, None)?;
        let mut act = scratch::<T>(dev, rows * inter)?;
        k::swiglu_fwd(
            dev,
            &mut view_mut(&mut act, 0, rows * inter)?,
            &view(&gu, 0, 2 * rows * inter)?,
            inter,
        )?;
        let down_in = view(&act, 0, rows * inter)?;
        let (d, hdn) = self.residual_fwd(&down_in, &x, rows, &lw.down, m(Target::Down)?)?;
        let (x_mid, x) = (x, d);
        if !save {
            return Ok((x, None));
        }
        let saved = LayerSave {
            x_in,
            rstd1,
            h: [hq, hk, hv, ho, hg, hu, hdn],
            qk_pre,
            qp,
            kp,
            vp,
            outp,
            attn,
            lse,
            x_mid,
            rstd2,
            gu,
        };
        Ok((x, Some(saved)))
    }

    /// (hidden, head_dim, heads, kv_heads, padded head_dim): the sizes both layer passes use.
    fn layer_dims(&self) -> (usize, usize, usize, usize, usize) {
        let c = &self.cfg;
        (c.hidden_size, c.head_dim, c.num_heads, c.num_kv_heads, self.hdp)
    }

    /// dx += the input gradient, from `dh`, of a block's RMSNorm `norm` = (its saved input,
    /// weight, rstd); `n` = rows * hidden. The residual path's gradient is already in dx.
    fn add_norm_bwd(
        &self,
        dx: &mut Buf<T>,
        dh: &Buf<T>,
        norm: (&Buf<T>, &CudaSlice<T>, &Buf<f32>),
        n: usize,
    ) -> R<()> {
        let (x, w, rstd) = norm;
        let t = self.rmsnorm_bwd(&view(dh, 0, n)?, &view(x, 0, n)?, w, rstd)?;
        k::acc_fwd(&self.dev, &mut view_mut(dx, 0, n)?, &view(&t, 0, n)?)
    }

    fn layer_bwd(
        &self,
        l: usize,
        s: &LayerSave<T>,
        dx: &mut Buf<T>,
        p: &Pack,
        lora: &SegLora,
    ) -> R<()> {
        let dev = &*self.dev;
        let lw = &self.layers[l];
        let rows = p.rows;
        let (hid, hd, nh, nkv, hdp) = self.layer_dims();
        let inter = lw.inter();
        let hs = |t: Target| s.h[slot(t)].as_ref();
        let nh_ = rows * hid;

        // MLP block: x_out = x_mid + down(swiglu(gate(h2), up(h2))), gate|up one fused linear.
        let ni = rows * inter;
        let guv = view(&s.gu, 0, 2 * ni)?;
        let mut act = scratch::<T>(dev, ni)?;
        k::swiglu_fwd(dev, &mut view_mut(&mut act, 0, ni)?, &guv, inter)?;
        let (h2, _) = self.rmsnorm(&view(&s.x_mid, 0, nh_)?, &lw.post_norm)?;
        let h2v = view(&h2, 0, nh_)?;
        let mut dact = scratch::<T>(dev, ni)?;
        self.lin_bwd(
            &view(dx, 0, nh_)?,
            &view(&act, 0, ni)?,
            rows,
            &lw.down,
            [(Part::new(lora.module(Some(l), Target::Down)?.as_ref(), 0), hs(Target::Down))],
            &mut view_mut(&mut dact, 0, ni)?,
            false,
        )?;
        // dgate and dup side by side, as gate and up were: one GEMM against [W_gate; W_up]
        let mut dgu = scratch::<T>(dev, 2 * ni)?;
        k::swiglu_bwd(dev, &mut view_mut(&mut dgu, 0, 2 * ni)?, &view(&dact, 0, ni)?, &guv, inter)?;
        let (mg, mu) = (lora.module(Some(l), Target::Gate)?, lora.module(Some(l), Target::Up)?);
        let parts = [
            (Part::new(mg.as_ref(), 0), hs(Target::Gate)),
            (Part::new(mu.as_ref(), inter), hs(Target::Up)),
        ];
        let mut dh2 = scratch::<T>(dev, nh_)?;
        self.lin_bwd(
            &view(&dgu, 0, 2 * ni)?,
            &h2v,
            rows,
            &lw.gate_up,
            parts,
            &mut view_mut(&mut dh2, 0, nh_)?,
            false,
        )?;
        self.add_norm_bwd(dx, &dh2, (&s.x_mid, &lw.post_norm, &s.rstd2), nh_)?;

        // Attention block: x_mid = x_in + o(attn(rope(q), rope(k), v)).
        let mut dattn = scratch::<T>(dev, rows * nh * hd)?;
        self.lin_bwd(
            &view(dx, 0, nh_)?,
            &view(s.attn(), 0, rows * nh * hd)?,
            rows,
            &lw.o,
            [(Part::new(lora.module(Some(l), Target::O)?.as_ref(), 0), hs(Target::O))],
            &mut view_mut(&mut dattn, 0, rows * nh * hd)?,
            false,
        )?;
        let dattn_p = self.pad_owned(dattn, rows * nh)?;
        let (nq, nk) = (rows * nh * hdp, rows * nkv * hdp);
        // dq/dk/dv and delta are written completely; the launcher zeroes dq_acc itself
        let mut dqp = scratch::<T>(dev, nq)?;
        let mut dkp = scratch::<T>(dev, nk)?;
        let mut dvp = scratch::<T>(dev, nk)?;
        let mut dq_acc = scratch::<f32>(dev, nq)?;
        let mut delta = scratch::<f32>(dev, rows * nh)?;
        let grads = k::Qkv {
            q: &mut view_mut(&mut dqp, 0, nq)?,
            k: &mut view_mut(&mut dkp, 0, nk)?,
            v: &mut view_mut(&mut dvp, 0, nk)?,
        };
        let (q, kk, v) = (view(&s.qp, 0, nq)?, view(&s.kp, 0, nk)?, view(&s.vp, 0, nk)?);
        k::attention_bwd(
            dev,
            grads,
            &mut view_mut(&mut dq_acc, 0, nq)?,
            &mut view_mut(&mut delta, 0, rows * nh)?,
            &view(&dattn_p, 0, nq)?,
            k::Qkv { q: &q, k: &kk, v: &v },
            (&view(&s.outp, 0, nq)?, &view(&s.lse, 0, rows * nh)?),
            &p.cu.as_view(),
            &self.attn_shape(p.max_len),
        )?;
        drop(dq_acc);
        // The gradients land in one [rows, q|k|v] buffer for one GEMM: RoPE's backward
        // (unpadding on the way) writes v, and q and k, in their windows; for Qwen3 q and k go
        // through the q/k norms' backward first, which then writes their windows.
        let (wq, wkv, wqkv) = (nh * hd, nkv * hd, lw.qkv.out);
        let nqkv = rows * wqkv;
        let mut dqkv = scratch::<T>(dev, nqkv)?;
        {
            let (dqv, dkv, dvv) = (view(&dqp, 0, nq)?, view(&dkp, 0, nk)?, view(&dvp, 0, nk)?);
            let inp = RopeIn { t: [&dqv, &dkv, &dvv], ld: [nh * hdp, nkv * hdp, nkv * hdp] };
            let dir = k::RopeDir::Backward;
            match (&lw.qk_norm, &s.qk_pre) {
                (Some((qn, kn)), Some((qkv, q_rstd, k_rstd))) => {
                    let mut dq = scratch::<T>(dev, rows * wq)?;
                    let mut dk = scratch::<T>(dev, rows * wkv)?;
                    {
                        let mut a = view_mut(&mut dq, 0, rows * wq)?;
                        let mut b = view_mut(&mut dk, 0, rows * wkv)?;
                        let mut c = view_mut(&mut dqkv, 0, nqkv)?;
                        let holds = [[(0, wq, 0)], [(1, wkv, 0)], [(2, wqkv, wq + wkv)]];
                        let mut out = [
                            RopeDst { buf: &mut a, holds: &holds[0] },
                            RopeDst { buf: &mut b, holds: &holds[1] },
                            RopeDst { buf: &mut c, holds: &holds[2] },
                        ];
                        self.rope(dir, &mut out, &inp, &p.pos, rows, (hdp, hd))?;
                    }
                    let norms = [(0, wq, &dq, nh, qn, q_rstd), (wq, wkv, &dk, nkv, kn, k_rstd)];
                    for (off, w, d, heads, nw, rstd) in norms {
                        self.rmsnorm_heads_bwd(
                            &mut view_mut(&mut dqkv, off, nqkv)?,
                            &view(d, 0, rows * w)?,
                            &view(qkv, off, nqkv)?,
                            (wqkv, rows, heads),
                            nw,
                            rstd,
                        )?;
                    }
                }
                _ => {
                    let mut c = view_mut(&mut dqkv, 0, nqkv)?;
                    let holds = [(0, wqkv, 0), (1, wqkv, wq), (2, wqkv, wq + wkv)];
                    let mut out = [RopeDst { buf: &mut c, holds: &holds }];
                    self.rope(dir, &mut out, &inp, &p.pos, rows, (hdp, hd))?;
                }
            }
        }
        drop((dqp, dkp, dvp));
        let (h1, _) = self.rmsnorm(&view(&s.x_in, 0, nh_)?, &lw.input_norm)?;
        let h1v = view(&h1, 0, nh_)?;
        let md = |t: Target| lora.module(Some(l), t);
        let (mq, mk, mv) = (md(Target::Q)?, md(Target::K)?, md(Target::V)?);
        let parts = [
            (Part::new(mq.as_ref(), 0), hs(Target::Q)),
            (Part::new(mk.as_ref(), wq), hs(Target::K)),
            (Part::new(mv.as_ref(), wq + wkv), hs(Target::V)),
        ];
        let mut dh1 = scratch::<T>(dev, nh_)?;
        self.lin_bwd(
            &view(&dqkv, 0, nqkv)?,
            &h1v,
            rows,
            &lw.qkv,
            parts,
            &mut view_mut(&mut dh1, 0, nh_)?,
            false,
        )?;
        if l > 0 {
            self.add_norm_bwd(dx, &dh1, (&s.x_in, &lw.input_norm, &s.rstd1), nh_)?;
        }
        Ok(())
    }
}
