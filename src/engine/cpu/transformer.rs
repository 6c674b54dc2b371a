//! The decoder stack shared by all architectures: forward (training, forward-only, or cached
//! decoding) and the explicit layer-local backward that accumulates LoRA gradients.

use rayon::prelude::*;

use super::backend::{AttnShape, Qkv, RopeTable, backend};
use super::kv_cache::KvCache;
use super::rowdot::BaseRows;
use super::segment::{SegXa, Segment, SegmentMut, lin_bwd, lin_fwd};
use super::wmatmul::gather_rows;
use crate::engine::lora::Target;
use crate::engine::models::{Linear, Model};

/// Packed rows of several sequences: `(start_row, len)` per sequence, plus one position per row.
pub(crate) struct Packed<'a> {
    pub seqs: &'a [(usize, usize)],
    pub rope: RopeTable,
    pub rows: usize,
    /// How the base-weight products group the rows.
    pub base: BaseRows,
}

/// Input gradient `dx` of layer `l`'s linears that all read `x` (q/k/v, or gate/up), from their
/// output gradients `outs` (dy, linear, target): the first writes dx, the others add to it; LoRA
/// gradients accumulate into each segment's adapter as in [`lin_bwd`].
fn shared_input_bwd(
    outs: &[(&[f32], &Linear, Target)],
    x: &[f32],
    s: &LayerSave,
    rows: usize,
    segs: &mut [SegmentMut],
    l: usize,
    dx: &mut [f32],
) {
    for (i, &(dy, lin, t)) in outs.iter().enumerate() {
        lin_bwd(dy, x, &s.xa[idx(t)], rows, lin, segs, l, t, dx, i > 0);
    }
}

/// Activations one layer keeps for its backward. The normed inputs `h1`/`h2` and the SwiGLU
/// output are cheap to recompute, so they are not kept.
pub(crate) struct LayerSave {
    x_in: Vec<f32>,
    rstd1: Vec<f32>,
    /// Per target, per segment (see [`SegXa`]).
    xa: [SegXa; 7],
    q_pre: Vec<f32>,
    q_rstd: Vec<f32>,
    k_pre: Vec<f32>,
    k_rstd: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    attn: Vec<f32>,
    lse: Vec<Vec<f32>>,
    x_mid: Vec<f32>,
    rstd2: Vec<f32>,
    g: Vec<f32>,
    u: Vec<f32>,
}

/// Result of the decoder stack: final normed hidden states and what backward needs.
pub(crate) struct StackOut {
    pub h_final: Vec<f32>,
    x_final: Vec<f32>,
    rstd_final: Vec<f32>,
    saves: Vec<LayerSave>,
}

fn idx(t: Target) -> usize {
    Target::LAYER.iter().position(|&x| x == t).unwrap_or(0)
}

impl Model {
    /// Causal attention of every packed sequence (`seqs` = (first row, rows)) over its own
    /// rows, or with `cache` = (caches, layer) over its cache (the new rows already appended):
    /// the attention output [rows, heads · head_dim] and each sequence's log-sum-exps. The
    /// sequences run side by side (each one's heads in parallel inside): a decode pass of many
    /// one-row sequences is then one parallel region, not one per sequence.
    fn attend(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        seqs: &[(usize, usize)],
        cache: Option<(&[KvCache], usize)>,
    ) -> (Vec<f32>, Vec<Vec<f32>>) {
        let c = &self.config;
        let (hd, nh, nkv) = (c.head_dim, c.num_heads, c.num_kv_heads);
        let total: usize = seqs.iter().map(|s| s.1).sum();
        let mut attn = vec![0.0f32; total * nh * hd];
        // each sequence's own rows of the output (sequences are packed in order)
        let mut outs = Vec::with_capacity(seqs.len());
        let mut rest = attn.as_mut_slice();
        for &(_, len) in seqs {
            let (mine, tail) = rest.split_at_mut(len * nh * hd);
            outs.push(mine);
            rest = tail;
        }
        let lses = outs
            .into_par_iter()
            .zip(seqs.par_iter().enumerate())
            .map(|(out, (si, &(start, len)))| {
                let be = backend();
                let qs = &q[start * nh * hd..(start + len) * nh * hd];
                let mut lse = vec![0.0f32; nh * len];
                let kv = start * nkv * hd..(start + len) * nkv * hd;
                // (a sequence without a cache, which the callers never pass, attends to its rows)
                let (ks, vs, n_k) = match cache.and_then(|(cs, l)| Some((cs.get(si)?, l))) {
                    Some((c, l)) => (&c.k[l][..], &c.v[l][..], c.k[l].len() / (nkv * hd)),
                    None => (&k[kv.clone()], &v[kv], len),
                };
                let s = AttnShape { n_q: len, n_k, n_heads: nh, n_kv_heads: nkv, head_dim: hd };
                be.attention_fwd(Qkv { q: qs, k: ks, v: vs }, s, out, &mut lse);
                lse
            })
            .collect();
        (attn, lses)
    }

    /// Embedding lookup of already-validated token ids.
    fn embed_rows(&self, tokens: &[u32]) -> Vec<f32> {
        gather_rows(&self.embed, tokens)
    }

    /// Runs the decoder stack on packed rows, each segment's rows with its own adapter. With
    /// `caches` (one per sequence), keys/values are appended and attention covers the cached
    /// past; with `save`, activations are kept.
    pub(crate) fn forward_stack(
        &self,
        tokens: &[u32],
        packed: &Packed,
        segs: &[Segment],
        mut caches: Option<&mut [KvCache]>,
        save: bool,
    ) -> StackOut {
        let be = backend();
        let c = &self.config;
        let rows = packed.rows;
        let (h, hd, nh, nkv) = (c.hidden_size, c.head_dim, c.num_heads, c.num_kv_heads);
        let mut x = self.embed_rows(tokens);
        let mut saves = Vec::new();
        for (l, lw) in self.layers.iter().enumerate() {
            let mut h1 = vec![0.0f32; rows * h];
            let mut rstd1 = vec![0.0f32; rows];
            be.rmsnorm_fwd(&x, &lw.input_norm, h, c.rms_norm_eps, &mut h1, &mut rstd1);
            let (mut q, xa_q) = lin_fwd(&h1, rows, &lw.q, segs, (l, Target::Q), &packed.base);
            let (mut k, xa_k) = lin_fwd(&h1, rows, &lw.k, segs, (l, Target::K), &packed.base);
            let (v, xa_v) = lin_fwd(&h1, rows, &lw.v, segs, (l, Target::V), &packed.base);
            let (mut q_pre, mut q_rstd, mut k_pre, mut k_rstd) = (vec![], vec![], vec![], vec![]);
            if let (Some(qn), Some(kn)) = (&lw.q_norm, &lw.k_norm) {
                q_rstd = vec![0.0; rows * nh];
                k_rstd = vec![0.0; rows * nkv];
                q_pre = std::mem::replace(&mut q, vec![0.0; rows * nh * hd]);
                k_pre = std::mem::replace(&mut k, vec![0.0; rows * nkv * hd]);
                be.rmsnorm_fwd(&q_pre, qn, hd, c.rms_norm_eps, &mut q, &mut q_rstd);
                be.rmsnorm_fwd(&k_pre, kn, hd, c.rms_norm_eps, &mut k, &mut k_rstd);
            }
            be.rope(&mut q, nh, hd, &packed.rope, false);
            be.rope(&mut k, nkv, hd, &packed.rope, false);
            if let Some(cs) = caches.as_deref_mut() {
                // the new keys and values join each sequence's cache first: its attention
                // covers the cached past and these rows
                for (cache, &(start, len)) in cs.iter_mut().zip(packed.seqs) {
                    cache.k[l].extend_from_slice(&k[start * nkv * hd..(start + len) * nkv * hd]);
                    cache.v[l].extend_from_slice(&v[start * nkv * hd..(start + len) * nkv * hd]);
                }
            }
            let (attn, lses) =
                self.attend(&q, &k, &v, packed.seqs, caches.as_deref().map(|cs| (cs, l)));
            let (o, xa_o) = lin_fwd(&attn, rows, &lw.o, segs, (l, Target::O), &packed.base);
            let x_in = if save { x.clone() } else { Vec::new() };
            x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
            let mut h2 = vec![0.0f32; rows * h];
            let mut rstd2 = vec![0.0f32; rows];
            be.rmsnorm_fwd(&x, &lw.post_norm, h, c.rms_norm_eps, &mut h2, &mut rstd2);
            let (g, xa_g) = lin_fwd(&h2, rows, &lw.gate, segs, (l, Target::Gate), &packed.base);
            let (u, xa_u) = lin_fwd(&h2, rows, &lw.up, segs, (l, Target::Up), &packed.base);
            let mut act = vec![0.0f32; g.len()];
            be.swiglu_fwd(&g, &u, &mut act);
            let (d, xa_d) = lin_fwd(&act, rows, &lw.down, segs, (l, Target::Down), &packed.base);
            let x_mid = if save { x.clone() } else { Vec::new() };
            x.iter_mut().zip(&d).for_each(|(a, b)| *a += b);
            if save {
                saves.push(LayerSave {
                    x_in,
                    rstd1,
                    xa: [xa_q, xa_k, xa_v, xa_o, xa_g, xa_u, xa_d],
                    q_pre,
                    q_rstd,
                    k_pre,
                    k_rstd,
                    q,
                    k,
                    v,
                    attn,
                    lse: lses,
                    x_mid,
                    rstd2,
                    g,
                    u,
                });
            }
        }
        if let Some(cs) = caches {
            for (cache, &(_, len)) in cs.iter_mut().zip(packed.seqs) {
                cache.len += len;
            }
        }
        let mut h_final = vec![0.0f32; rows * h];
        let mut rstd_final = vec![0.0f32; rows];
        be.rmsnorm_fwd(&x, &self.final_norm, h, c.rms_norm_eps, &mut h_final, &mut rstd_final);
        StackOut { h_final, x_final: x, rstd_final, saves }
    }

    /// Backward through the stack from `dh_final` (gradient w.r.t. the final normed hidden
    /// states), accumulating each segment's LoRA gradients into its adapter (`segs`: the
    /// forward's segments, in order).
    pub(crate) fn backward_stack(
        &self,
        st: &StackOut,
        dh_final: &[f32],
        packed: &Packed,
        segs: &mut [SegmentMut],
    ) {
        let be = backend();
        let c = &self.config;
        let rows = packed.rows;
        let (h, hd, nh, nkv) = (c.hidden_size, c.head_dim, c.num_heads, c.num_kv_heads);
        let mut dx = vec![0.0f32; rows * h];
        be.rmsnorm_bwd(dh_final, &st.x_final, &self.final_norm, &st.rstd_final, h, &mut dx);
        for (l, (lw, s)) in self.layers.iter().zip(&st.saves).enumerate().rev() {
            let xa = |t: Target| &s.xa[idx(t)][..];
            let mut rstd_scratch = vec![0.0f32; rows];
            let mut act = vec![0.0f32; s.g.len()];
            be.swiglu_fwd(&s.g, &s.u, &mut act);
            let mut h2 = vec![0.0f32; rows * h];
            be.rmsnorm_fwd(&s.x_mid, &lw.post_norm, h, c.rms_norm_eps, &mut h2, &mut rstd_scratch);
            // MLP block: x_out = x_mid + down(swiglu(gate(h2), up(h2))).
            let mut dact = vec![0.0f32; act.len()];
            lin_bwd(
                &dx,
                &act,
                xa(Target::Down),
                rows,
                &lw.down,
                segs,
                l,
                Target::Down,
                &mut dact,
                false,
            );
            let (mut dg, mut du) = (vec![0.0f32; s.g.len()], vec![0.0f32; s.u.len()]);
            be.swiglu_bwd(&dact, &s.g, &s.u, &mut dg, &mut du);
            let mut dh2 = vec![0.0f32; rows * h];
            let outs = [(&dg[..], &lw.gate, Target::Gate), (&du[..], &lw.up, Target::Up)];
            shared_input_bwd(&outs, &h2, s, rows, segs, l, &mut dh2);
            let mut tmp = vec![0.0f32; rows * h];
            be.rmsnorm_bwd(&dh2, &s.x_mid, &lw.post_norm, &s.rstd2, h, &mut tmp);
            dx.iter_mut().zip(&tmp).for_each(|(a, b)| *a += b);
            // Attention block: x_mid = x_in + o(attn(rope(q), rope(k), v)).
            let mut dattn = vec![0.0f32; s.attn.len()];
            lin_bwd(
                &dx,
                &s.attn,
                xa(Target::O),
                rows,
                &lw.o,
                segs,
                l,
                Target::O,
                &mut dattn,
                false,
            );
            let mut dq = vec![0.0f32; s.q.len()];
            let mut dk = vec![0.0f32; s.k.len()];
            let mut dv = vec![0.0f32; s.v.len()];
            for (si, &(start, len)) in packed.seqs.iter().enumerate() {
                let (qr, kr) = (
                    start * nh * hd..(start + len) * nh * hd,
                    start * nkv * hd..(start + len) * nkv * hd,
                );
                let shape =
                    AttnShape { n_q: len, n_k: len, n_heads: nh, n_kv_heads: nkv, head_dim: hd };
                let x = Qkv { q: &s.q[qr.clone()], k: &s.k[kr.clone()], v: &s.v[kr.clone()] };
                be.attention_bwd(
                    x,
                    &s.attn[qr.clone()],
                    &s.lse[si],
                    &dattn[qr.clone()],
                    shape,
                    &mut dq[qr],
                    &mut dk[kr.clone()],
                    &mut dv[kr],
                );
            }
            be.rope(&mut dq, nh, hd, &packed.rope, true);
            be.rope(&mut dk, nkv, hd, &packed.rope, true);
            if let (Some(qn), Some(kn)) = (&lw.q_norm, &lw.k_norm) {
                let mut t = vec![0.0f32; dq.len()];
                be.rmsnorm_bwd(&dq, &s.q_pre, qn, &s.q_rstd, hd, &mut t);
                dq = t;
                let mut t = vec![0.0f32; dk.len()];
                be.rmsnorm_bwd(&dk, &s.k_pre, kn, &s.k_rstd, hd, &mut t);
                dk = t;
            }
            let mut h1 = vec![0.0f32; rows * h];
            be.rmsnorm_fwd(&s.x_in, &lw.input_norm, h, c.rms_norm_eps, &mut h1, &mut rstd_scratch);
            let mut dh1 = vec![0.0f32; rows * h];
            let outs = [
                (&dq[..], &lw.q, Target::Q),
                (&dk[..], &lw.k, Target::K),
                (&dv[..], &lw.v, Target::V),
            ];
            shared_input_bwd(&outs, &h1, s, rows, segs, l, &mut dh1);
            if l > 0 {
                be.rmsnorm_bwd(&dh1, &s.x_in, &lw.input_norm, &s.rstd1, h, &mut tmp);
                dx.iter_mut().zip(&tmp).for_each(|(a, b)| *a += b);
            }
        }
    }
}
