//! Segmented LoRA linears: one base matmul over every row of a packed batch, then each
//! adapter's low-rank delta on its own rows only (several tenants share one pass over the base
//! weights). A single adapter is the one-segment case, so alone and batched runs go through the
//! same code.

use std::ops::Range;

use rayon::prelude::*;

use super::backend::{MatMul, backend};
use super::rowdot::{BaseRows, base_xwt};
use super::rowkernel::{Path, dot_rows_on};
use super::wmatmul::xw;
use crate::engine::lora::{Adapter, LoraPair, Target};
use crate::engine::models::Linear;

/// Rows `rows` of a packed batch use `adapter`'s LoRA (`None`: the base model alone).
#[derive(Clone, Debug)]
pub(crate) struct Segment<'a> {
    pub rows: Range<usize>,
    pub adapter: Option<&'a Adapter>,
}

/// A segment in the backward: its adapter, when it is being trained, accumulates the
/// gradients of its rows (`None`: rows that only pass their input gradient through the base).
pub(crate) struct SegmentMut<'a> {
    pub rows: Range<usize>,
    pub adapter: Option<&'a mut Adapter>,
}

/// Per segment, `s·x·Aᵀ` of its rows (`None` where the segment's adapter has no LoRA on this
/// module): what the backward of a segmented linear needs.
pub(crate) type SegXa = Vec<Option<Vec<f32>>>;

/// `y = x·Wᵀ (+ b)` over all `rows`, plus `s·(x·Aᵀ)·Bᵀ` on each segment's rows with that
/// segment's adapter (module `t` of layer `layer`).
pub(crate) fn lin_fwd(
    x: &[f32],
    rows: usize,
    lin: &Linear,
    segs: &[Segment],
    (layer, t): (usize, Target),
    base: &BaseRows,
) -> (Vec<f32>, SegXa) {
    let (inp, out) = (lin.in_dim(), lin.out_dim());
    let mut y = vec![0.0f32; rows * out];
    base_xwt(&mut y, x, rows, &lin.w, base);
    if let Some(b) = &lin.b {
        for r in y.chunks_mut(out) {
            for (v, bv) in r.iter_mut().zip(b) {
                *v += bv;
            }
        }
    }
    // each segment's LoRA on its own rows of y (segments are disjoint row ranges in order)
    let mut parts = Vec::with_capacity(segs.len());
    let mut rest = y.as_mut_slice();
    let mut at = 0;
    for s in segs {
        // (the engine builds segments in row order inside the pass; the clamps only keep a
        // broken layout from panicking)
        let skip = (s.rows.start.saturating_sub(at) * out).min(rest.len());
        let (_, tail) = std::mem::take(&mut rest).split_at_mut(skip);
        let (mine, tail) = tail.split_at_mut((s.rows.len() * out).min(tail.len()));
        parts.push((s, mine));
        (rest, at) = (tail, at.max(s.rows.end));
    }
    let one = |(s, ys): (&Segment, &mut [f32])| {
        if ys.len() != s.rows.len() * out || s.rows.end > rows {
            return None;
        }
        let a = s.adapter?;
        let p = a.layer(layer, t)?;
        Some(seg_lora_fwd(x, ys, p, a.scaling(), &s.rows, (inp, out), base))
    };
    // a decode pass's segments are a tenant's few rows each: they run side by side
    let xa = match base {
        BaseRows::Split { .. } => parts.into_par_iter().map(one).collect(),
        BaseRows::Whole => parts.into_iter().map(one).collect(),
    };
    (y, xa)
}

/// One segment's `xa = s·x·Aᵀ` on its rows `seg` and `y += xa·Bᵀ` (`y` holding the segment's
/// rows only); returns xa [rows, r].
/// Rows go the way the base product takes them (`base`): a training pass as one `gemm`
/// product; in a decode pass each long prompt's block as its own product and the other rows
/// through the fixed-order row kernel, so that a decoded row's LoRA, like its base product,
/// does not depend on the rows alongside it, and a pass of many one-row segments costs a few
/// small loops rather than two `gemm` dispatches per tenant and linear.
fn seg_lora_fwd(
    x: &[f32],
    y: &mut [f32],
    p: &LoraPair,
    scale: f32,
    seg: &Range<usize>,
    (inp, out): (usize, usize),
    base: &BaseRows,
) -> Vec<f32> {
    let r = p.rank();
    let mut xa = vec![0.0f32; seg.len() * r];
    // The `gemm` product of rows `rows` (inside `seg`).
    let mut product = |rows: Range<usize>, xa: &mut [f32]| {
        let be = backend();
        let (n, i0) = (rows.len(), rows.start - seg.start);
        let xa = &mut xa[i0 * r..(i0 + n) * r];
        be.matmul(
            xa,
            &x[rows.start * inp..rows.end * inp],
            p.a.w.data(),
            MatMul::linear(n, inp, r),
        );
        xa.iter_mut().for_each(|v| *v *= scale);
        let mm = MatMul::linear(n, r, out).acc();
        be.matmul(&mut y[i0 * out..(i0 + n) * out], xa, p.b.w.data(), mm);
    };
    let BaseRows::Split { single, blocks } = base else {
        product(seg.clone(), &mut xa);
        return xa;
    };
    // both lists ascend (they come from the packed sequences in order)
    let inside = |first: usize| first >= seg.start && first < seg.end;
    let from = blocks.partition_point(|b| b.start < seg.start);
    for b in blocks[from..].iter().take_while(|b| inside(b.start)) {
        product(b.clone(), &mut xa);
    }
    let from = single.partition_point(|&i| i < seg.start);
    let mine: Vec<usize> = single[from..].iter().copied().take_while(|&i| inside(i)).collect();
    if mine.is_empty() {
        return xa;
    }
    let path = Path::detect();
    let xs: Vec<&[f32]> = mine.iter().map(|&i| &x[i * inp..(i + 1) * inp]).collect();
    let mut h = vec![0.0f32; mine.len() * r];
    let mut outs: Vec<&mut [f32]> = h.chunks_mut(r).collect();
    dot_rows_on(path, &xs, p.a.w.data(), inp, &mut outs);
    h.iter_mut().for_each(|v| *v *= scale);
    let hs: Vec<&[f32]> = h.chunks(r).collect();
    let mut d = vec![0.0f32; mine.len() * out];
    let mut outs: Vec<&mut [f32]> = d.chunks_mut(out).collect();
    dot_rows_on(path, &hs, p.b.w.data(), r, &mut outs);
    for ((&i, hi), di) in mine.iter().zip(h.chunks(r)).zip(d.chunks(out)) {
        let i0 = i - seg.start;
        xa[i0 * r..(i0 + 1) * r].copy_from_slice(hi);
        y[i0 * out..(i0 + 1) * out].iter_mut().zip(di).for_each(|(v, dv)| *v += dv);
    }
    xa
}

/// Backward of [`lin_fwd`]: `dx (+)= dy·W` over all rows, then per segment its LoRA gradients
/// and `dx += s·(dy·B)·A` on its rows. `segs` are the forward's segments, in the same order.
#[allow(clippy::too_many_arguments)]
pub(crate) fn lin_bwd(
    dy: &[f32],
    x: &[f32],
    xa: &[Option<Vec<f32>>],
    rows: usize,
    lin: &Linear,
    segs: &mut [SegmentMut],
    layer: usize,
    t: Target,
    dx: &mut [f32],
    accumulate: bool,
) {
    let (inp, out) = (lin.in_dim(), lin.out_dim());
    xw(dx, dy, rows, &lin.w, accumulate);
    for (s, xa) in segs.iter_mut().zip(xa) {
        let (Some(xa), Some(a)) = (xa, s.adapter.as_deref_mut()) else { continue };
        let scale = a.scaling();
        let Some(p) = a.layer_mut(layer, t) else { continue };
        let (r0, r1) = (s.rows.start, s.rows.end);
        let dims = (r1 - r0, inp, out);
        lora_bwd(&dy[r0 * out..r1 * out], &x[r0 * inp..r1 * inp], xa, p, scale, dims, {
            &mut dx[r0 * inp..r1 * inp]
        });
    }
}

/// One segment's LoRA backward (`dims` = rows, in, out): `grad_B += dyᵀ·xa`,
/// `grad_A += s·(dy·B)ᵀ·x`, `dx += s·(dy·B)·A`.
fn lora_bwd(
    dy: &[f32],
    x: &[f32],
    xa: &[f32],
    p: &mut LoraPair,
    scale: f32,
    (rows, inp, out): (usize, usize, usize),
    dx: &mut [f32],
) {
    let be = backend();
    let r = p.rank();
    let plain = |m, k, n| MatMul { m, k, n, trans_a: false, trans_b: false, accumulate: false };
    let gb = MatMul { trans_a: true, accumulate: true, ..plain(out, rows, r) };
    be.matmul(&mut p.b.g, dy, xa, gb);
    let mut dyb = vec![0.0f32; rows * r];
    be.matmul(&mut dyb, dy, p.b.w.data(), plain(rows, out, r));
    dyb.iter_mut().for_each(|v| *v *= scale);
    let ga = MatMul { trans_a: true, accumulate: true, ..plain(r, rows, inp) };
    be.matmul(&mut p.a.g, &dyb, x, ga);
    be.matmul(dx, &dyb, p.a.w.data(), plain(rows, r, inp).acc());
}
