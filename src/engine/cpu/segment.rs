//! Segmented LoRA linears: one base matmul over every row of a packed batch, then each
//! adapter's low-rank delta on its own rows only (several tenants share one pass over the base
//! weights). A single adapter is the one-segment case, so alone and batched runs go through the
//! same code.

use std::ops::Range;

use super::backend::{MatMul, backend};
use super::rowdot::{BaseRows, base_xwt};
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
    let be = backend();
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
    let xa = segs
        .iter()
        .map(|s| {
            let a = s.adapter?;
            let p = a.layer(layer, t)?;
            let (r0, r1) = (s.rows.start, s.rows.end);
            let (n, r) = (r1 - r0, p.rank());
            let mut xa = vec![0.0f32; n * r];
            be.matmul(&mut xa, &x[r0 * inp..r1 * inp], p.a.data(), MatMul::linear(n, inp, r));
            let scale = a.scaling();
            xa.iter_mut().for_each(|v| *v *= scale);
            let mm = MatMul::linear(n, r, out).acc();
            be.matmul(&mut y[r0 * out..r1 * out], &xa, p.b.data(), mm);
            Some(xa)
        })
        .collect();
    (y, xa)
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
    be.matmul(&mut p.grad_b, dy, xa, gb);
    let mut dyb = vec![0.0f32; rows * r];
    be.matmul(&mut dyb, dy, p.b.data(), plain(rows, out, r));
    dyb.iter_mut().for_each(|v| *v *= scale);
    let ga = MatMul { trans_a: true, accumulate: true, ..plain(r, rows, inp) };
    be.matmul(&mut p.grad_a, &dyb, x, ga);
    be.matmul(dx, &dyb, p.a.data(), plain(rows, r, inp).acc());
}
