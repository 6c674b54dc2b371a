//! Matrix products against frozen base weights ([`Weight`]), f32 or bf16.
//!
//! f32 weights go straight to the backend's `gemm` product (no copy). bf16 weights are converted
//! a panel at a time into an f32 scratch buffer and the same product runs on the panel, writing
//! its block of output columns in place. The panels split only the product's output dimension,
//! never its reduction dimension, so every output element sums the same terms in the same order
//! as a product against the whole converted matrix: the results are bit-identical (bf16 → f32 is
//! exact) while only one panel of f32 is ever resident.

use rayon::prelude::*;

use super::backend::{MatMul, backend};
use crate::engine::weight::Weight;

/// Target size of one converted panel in f32 elements (4 MiB): large enough that the product on
/// a panel runs as efficiently as on the whole matrix, small enough to stay cache-friendly.
const PANEL_ELEMS: usize = 1 << 20;
/// Panel widths are multiples of this, so panels start on the same SIMD-lane and micro-kernel
/// boundaries of the output as the whole-matrix product does.
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
    match w.as_f32() {
        Some(wf) => {
            let mm = MatMul { accumulate, ..MatMul::linear(rows, w.cols(), w.rows()) };
            backend().matmul(out, x, wf, mm);
        }
        None => xwt_panels(out, x, rows, w, accumulate, panel_width(w.cols())),
    }
}

/// `out[rows, k] (+)= dy[rows, n] · W` for `W` `[n, k]` (the input gradient of `xwt`).
pub(crate) fn xw(out: &mut [f32], dy: &[f32], rows: usize, w: &Weight, accumulate: bool) {
    match w.as_f32() {
        Some(wf) => backend().matmul(out, dy, wf, xw_shape(rows, w.rows(), w.cols(), accumulate)),
        None => xw_panels(out, dy, rows, w, accumulate, panel_width(w.rows())),
    }
}

fn xw_shape(m: usize, k: usize, n: usize, accumulate: bool) -> MatMul {
    MatMul { m, k, n, trans_a: false, trans_b: false, accumulate }
}

/// `xwt` over row panels of `W` (each panel is a block of output columns).
fn xwt_panels(out: &mut [f32], x: &[f32], rows: usize, w: &Weight, acc: bool, width: usize) {
    let (n, k) = (w.rows(), w.cols());
    if rows == 0 || n == 0 {
        return;
    }
    let width = width.max(1);
    let mut buf = vec![0.0f32; width.min(n) * k];
    for r0 in (0..n).step_by(width) {
        let r1 = (r0 + width).min(n);
        w.rows_f32(r0, r1, &mut buf);
        let mm = MatMul { accumulate: acc, ..MatMul::linear(rows, k, r1 - r0) };
        backend().matmul_ld(&mut out[r0..rows * n], n, x, &buf, mm);
    }
}

/// `xw` over column panels of `W` (each panel is a block of output columns).
fn xw_panels(out: &mut [f32], dy: &[f32], rows: usize, w: &Weight, acc: bool, width: usize) {
    let (n, k) = (w.rows(), w.cols());
    if rows == 0 || k == 0 {
        return;
    }
    let width = width.max(1);
    let mut buf = vec![0.0f32; width.min(k) * n];
    for c0 in (0..k).step_by(width) {
        let c1 = (c0 + width).min(k);
        w.cols_f32(c0, c1, &mut buf);
        backend().matmul_ld(&mut out[c0..rows * k], k, dy, &buf, xw_shape(rows, n, c1 - c0, acc));
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

    /// Panels of any width — aligned or not, with a ragged last panel, above and below the
    /// backend's parallel threshold — give exactly the whole-matrix product.
    #[test]
    fn bf16_panels_match_the_whole_matrix_bitwise() {
        for &(rows, n, k) in &[(1, 300, 96), (3, 200, 1100), (37, 513, 160), (130, 257, 700)] {
            let (wb, wf) = pair(n, k, (rows * n + k) as u64);
            let x = SynthRng(7).vec(rows * k, 1.0);
            let dy = SynthRng(8).vec(rows * n, 1.0);
            for acc in [false, true] {
                let base_y = SynthRng(9).vec(rows * n, 1.0);
                let mut want = base_y.clone();
                xwt(&mut want, &x, rows, &wf, acc);
                let base_dx = SynthRng(10).vec(rows * k, 1.0);
                let mut want_dx = base_dx.clone();
                xw(&mut want_dx, &dy, rows, &wf, acc);
                for width in [1, 48, 64, 100, 128, panel_width(k), 4096] {
                    let mut got = base_y.clone();
                    xwt_panels(&mut got, &x, rows, &wb, acc, width);
                    assert_eq!(got, want, "xwt rows {rows} n {n} k {k} width {width} acc {acc}");
                    let mut got = base_dx.clone();
                    xw_panels(&mut got, &dy, rows, &wb, acc, width);
                    assert_eq!(got, want_dx, "xw rows {rows} n {n} k {k} width {width} acc {acc}");
                }
            }
            let ids = [0u32, (n - 1) as u32, 5];
            assert_eq!(gather_rows(&wb, &ids), gather_rows(&wf, &ids));
        }
    }
}
