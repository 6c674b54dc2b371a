//! Matrix products against frozen base weights ([`Weight`]), f32 or bf16.
//!
//! An f32 weight is one backend `gemm` product on the whole matrix (the fastest shape for the
//! `gemm` crate). A bf16 weight is split into panels along the product's output dimension (never
//! its reduction dimension); each panel is converted into an f32 scratch buffer (bf16 → f32 is
//! exact) and is one product writing its block of output columns in place, so only one panel of
//! f32 is ever resident. `gemm` picks its kernel and blocking from the product's shape, so a
//! bf16-held model agrees with the same checkpoint converted to f32 to f32 rounding, not
//! bitwise; with the same panel widths both dtypes give identical bits (the unit tests run
//! both through the panels to check the conversion exactly). Panels for f32 too would cost
//! 5–25 % of the f32 training step (measured on the 4-layer 0.5B shape).

use rayon::prelude::*;

use super::backend::{MatMul, Strides, backend};
use crate::engine::weight::Weight;

/// Target size of one panel in f32 elements (4 MiB): large enough that the product on a panel
/// runs as efficiently as on the whole matrix, small enough to stay cache-friendly.
const PANEL_ELEMS: usize = 1 << 20;
/// Panel widths are multiples of this (SIMD- and micro-kernel-friendly).
const PANEL_ALIGN: usize = 64;
/// Bounds on the panel width (rows of `W` for `x·Wᵀ`, columns for `dy·W`).
const PANEL_MIN: usize = 64;
const PANEL_MAX: usize = 512;

/// Panel width for a product whose reduction dimension is `k`.
fn panel_width(k: usize) -> usize {
    (PANEL_ELEMS / k.max(1)).clamp(PANEL_MIN, PANEL_MAX) / PANEL_ALIGN * PANEL_ALIGN
}

/// `out[rows, n] (+)= x[rows, k] · Wᵀ` for `W` `[n, k]` (a linear layer / the output head).
pub(crate) fn xwt(out: &mut [f32], x: &[f32], rows: usize, w: &Weight, accumulate: bool) {
    let width = if w.is_bf16() { panel_width(w.cols()) } else { w.rows() };
    xwt_panels(out, x, rows, w, accumulate, width);
}

/// `out[rows, k] (+)= dy[rows, n] · W` for `W` `[n, k]` (the input gradient of `xwt`).
pub(crate) fn xw(out: &mut [f32], dy: &[f32], rows: usize, w: &Weight, accumulate: bool) {
    let width = if w.is_bf16() { panel_width(w.rows()) } else { w.cols() };
    xw_panels(out, dy, rows, w, accumulate, width);
}

/// `xwt` over row panels of `W` (each panel is a block of output columns).
fn xwt_panels(out: &mut [f32], x: &[f32], rows: usize, w: &Weight, acc: bool, width: usize) {
    let (n, k) = (w.rows(), w.cols());
    if rows == 0 || n == 0 {
        return;
    }
    let width = width.max(1);
    let mut buf = if w.is_bf16() { vec![0.0f32; width.min(n) * k] } else { Vec::new() };
    for r0 in (0..n).step_by(width) {
        let r1 = (r0 + width).min(n);
        let panel: &[f32] = match w.as_f32() {
            Some(wf) => &wf[r0 * k..r1 * k],
            None => {
                w.rows_f32(r0, r1, &mut buf);
                &buf
            }
        };
        let mm = MatMul { accumulate: acc, ..MatMul::linear(rows, k, r1 - r0) };
        let ld = Strides { out: n, b: k };
        backend().matmul_ld(&mut out[r0..rows * n], x, panel, mm, ld);
    }
}

/// `xw` over column panels of `W` (each panel is a block of output columns).
fn xw_panels(out: &mut [f32], dy: &[f32], rows: usize, w: &Weight, acc: bool, width: usize) {
    let (n, k) = (w.rows(), w.cols());
    if rows == 0 || k == 0 {
        return;
    }
    let width = width.max(1);
    let mut buf = if w.is_bf16() { vec![0.0f32; (width + 1).min(k) * n] } else { Vec::new() };
    let mut c0 = 0;
    while c0 < k {
        // A one-column panel would be contiguous in both strides for bf16 but not for f32, and
        // `gemm` picks a different kernel for it; so a last column joins the panel before it.
        let c1 = if k - c0 == width + 1 { k } else { (c0 + width).min(k) };
        // An f32 panel is read in place with the weight's row stride.
        let (panel, ld_b): (&[f32], usize) = match w.as_f32() {
            Some(wf) => (&wf[c0..], k),
            None => {
                w.cols_f32(c0, c1, &mut buf);
                (&buf, c1 - c0)
            }
        };
        let mm =
            MatMul { m: rows, k: n, n: c1 - c0, trans_a: false, trans_b: false, accumulate: acc };
        backend().matmul_ld(&mut out[c0..rows * k], dy, panel, mm, Strides { out: k, b: ld_b });
        c0 = c1;
    }
}

/// Rows `ids` of `W` as f32 `[ids.len(), cols]` (an embedding lookup; ids already validated).
pub(crate) fn gather_rows(w: &Weight, ids: &[u32]) -> Vec<f32> {
    let c = w.cols();
    let mut x = vec![0.0f32; ids.len() * c];
    if c > 0 {
        x.par_chunks_mut(c).zip(ids.par_iter()).for_each(|(dst, &t)| w.row_f32(t as usize, dst));
    }
    x
}

#[cfg(test)]
mod tests {
    use half::bf16;

    use super::*;
    use crate::engine::synth::SynthRng;
    use crate::engine::tensor::Tensor;

    fn pair(n: usize, k: usize, seed: u64) -> (Weight, Weight) {
        let vals: Vec<bf16> =
            SynthRng(seed).vec(n * k, 1.0).into_iter().map(bf16::from_f32).collect();
        let f = vals.iter().map(|v| v.to_f32()).collect();
        (Weight::bf16(n, k, vals).unwrap(), Weight::F32(Tensor::new(vec![n, k], f).unwrap()))
    }

    /// For any panel width — aligned or not, with a ragged last panel, above and below the
    /// backend's parallel threshold — a bf16 weight gives exactly the f32 weight's result.
    #[test]
    fn bf16_panels_match_f32_panels_bitwise() {
        for &(rows, n, k) in
            &[(1, 300, 96), (3, 200, 1100), (37, 513, 160), (130, 257, 700), (5, 70, 129)]
        {
            let (wb, wf) = pair(n, k, (rows * n + k) as u64);
            let x = SynthRng(7).vec(rows * k, 1.0);
            let dy = SynthRng(8).vec(rows * n, 1.0);
            for acc in [false, true] {
                let base_y = SynthRng(9).vec(rows * n, 1.0);
                let base_dx = SynthRng(10).vec(rows * k, 1.0);
                for width in [2, 48, 64, 95, 100, 128, panel_width(k), 4096] {
                    let (mut want, mut got) = (base_y.clone(), base_y.clone());
                    xwt_panels(&mut want, &x, rows, &wf, acc, width);
                    xwt_panels(&mut got, &x, rows, &wb, acc, width);
                    assert_eq!(got, want, "xwt rows {rows} n {n} k {k} width {width} acc {acc}");
                    let (mut want, mut got) = (base_dx.clone(), base_dx.clone());
                    xw_panels(&mut want, &dy, rows, &wf, acc, width);
                    xw_panels(&mut got, &dy, rows, &wb, acc, width);
                    assert_eq!(got, want, "xw rows {rows} n {n} k {k} width {width} acc {acc}");
                }
            }
            // A single panel is exactly the plain whole-matrix product.
            let mut want = vec![0.0f32; rows * n];
            backend().matmul(&mut want, &x, wf.as_f32().unwrap(), MatMul::linear(rows, k, n));
            let mut got = vec![0.0f32; rows * n];
            xwt_panels(&mut got, &x, rows, &wb, false, n);
            assert_eq!(got, want);
            let ids = [0u32, (n - 1) as u32, 5];
            assert_eq!(gather_rows(&wb, &ids), gather_rows(&wf, &ids));
        }
    }
}
