//! Base-weight products for decode passes whose every output element is summed in one fixed
//! order, whatever other rows are computed alongside. A sequence decoded in one pass with other
//! tenants' sequences then gets bit for bit the activations it gets alone, so greedy and seeded
//! samples do not depend on the company a request keeps. `gemm` does not promise that: it picks
//! kernels and blocking from the product's shape (a one-row product takes another path than a
//! two-row one), so its rows change in the last bits with the batch size.
//!
//! Rows of several new tokens (a prompt's prefill) keep the fast `gemm` product, one product per
//! sequence: alone or batched, such a sequence is the same product of the same shape.

use std::ops::Range;

use rayon::prelude::*;

use super::wmatmul::xwt;
use crate::engine::weight::Weight;

/// Floats summed side by side (one AVX2 register); lane sums are added in a fixed tree.
const LANES: usize = 8;
/// Output rows of the weight (columns of the product) per parallel task.
const COLS_PER_TASK: usize = 64;

/// How a pass's rows are grouped for the base-weight products.
#[derive(Debug, Clone, Default)]
pub(crate) enum BaseRows {
    /// One `gemm` product over all rows (training and evaluation passes).
    #[default]
    Whole,
    /// Decode passes: `single` rows (one new token each) by the fixed-order kernel, each of
    /// `blocks` (a sequence's several new tokens) by its own `gemm` product.
    Split { single: Vec<usize>, blocks: Vec<Range<usize>> },
}

impl BaseRows {
    /// The grouping for packed sequences `(start_row, len)`.
    pub(crate) fn for_decode(seqs: &[(usize, usize)]) -> Self {
        let single = seqs.iter().filter(|s| s.1 == 1).map(|s| s.0).collect();
        let blocks = seqs.iter().filter(|s| s.1 > 1).map(|&(r, n)| r..r + n).collect();
        BaseRows::Split { single, blocks }
    }
}

/// `y[rows, n] = x[rows, k] · Wᵀ` for `W` `[n, k]`, grouped as `how` says.
pub(crate) fn base_xwt(y: &mut [f32], x: &[f32], rows: usize, w: &Weight, how: &BaseRows) {
    let (n, k) = (w.rows(), w.cols());
    match how {
        BaseRows::Whole => xwt(y, x, rows, w, false),
        BaseRows::Split { single, blocks } => {
            for r in blocks {
                xwt(&mut y[r.start * n..r.end * n], &x[r.start * k..r.end * k], r.len(), w, false);
            }
            xwt_fixed(y, x, single, w);
        }
    }
}

/// Rows `rows` of `y = x · Wᵀ`, each element summed in the fixed order of [`dot_rows`].
fn xwt_fixed(y: &mut [f32], x: &[f32], rows: &[usize], w: &Weight) {
    let (n, k) = (w.rows(), w.cols());
    if rows.is_empty() || n == 0 {
        return;
    }
    let xs: Vec<&[f32]> = rows.iter().map(|&r| &x[r * k..(r + 1) * k]).collect();
    // Each task computes a block of columns for every row; the blocks are then scattered.
    let blocks: Vec<(usize, Vec<f32>)> = (0..n)
        .step_by(COLS_PER_TASK)
        .collect::<Vec<_>>()
        .into_par_iter()
        .map(|j0| {
            let j1 = (j0 + COLS_PER_TASK).min(n);
            let mut panel = Vec::new();
            let wp: &[f32] = match w.as_f32() {
                Some(wf) => &wf[j0 * k..j1 * k],
                None => {
                    panel.resize((j1 - j0) * k, 0.0);
                    w.rows_f32(j0, j1, &mut panel);
                    &panel
                }
            };
            let mut out = vec![0.0f32; xs.len() * (j1 - j0)];
            dot_rows(&xs, wp, k, &mut out);
            (j0, out)
        })
        .collect();
    for (j0, out) in blocks {
        let width = out.len() / xs.len();
        for (i, &r) in rows.iter().enumerate() {
            y[r * n + j0..r * n + j0 + width].copy_from_slice(&out[i * width..(i + 1) * width]);
        }
    }
}

/// `out[i, j] = xs[i] · wp[j, :]` (`wp` row-major `[m, k]`, `out` `[xs.len(), m]`). Every
/// element is the same sequence of operations whatever tile it falls in: eight running sums
/// over `k` in steps of eight, added in a fixed tree, then the tail in order.
fn dot_rows(xs: &[&[f32]], wp: &[f32], k: usize, out: &mut [f32]) {
    let m = wp.len().checked_div(k).unwrap_or_else(|| out.len() / xs.len().max(1));
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has AVX2 and FMA (checked just above); `avx2::dot_rows` reads only
        // inside the slices it is given (its loads are bounded by `k` on every row).
        unsafe { avx2::dot_rows(xs, wp, k, m, out) };
        return;
    }
    for (i, x) in xs.iter().enumerate() {
        for j in 0..m {
            out[i * m + j] = dot_portable(x, &wp[j * k..(j + 1) * k]);
        }
    }
}

/// The fixed-order dot product without SIMD (the same order as the AVX2 lanes, unfused).
fn dot_portable(x: &[f32], w: &[f32]) -> f32 {
    let k = x.len().min(w.len());
    let full = k / LANES * LANES;
    let mut l = [0.0f32; LANES];
    for (xc, wc) in x[..full].chunks_exact(LANES).zip(w[..full].chunks_exact(LANES)) {
        for q in 0..LANES {
            l[q] += xc[q] * wc[q];
        }
    }
    let mut s = lane_tree(&l);
    for q in full..k {
        s += x[q] * w[q];
    }
    s
}

/// The fixed tree over the eight lane sums.
#[inline(always)]
fn lane_tree(l: &[f32; LANES]) -> f32 {
    ((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7]))
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{LANES, lane_tree};

    /// Rows four at a time against two weight rows, then single rows against four weight
    /// rows (a one-row decode streams the weight with four loads in flight).
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot_rows(xs: &[&[f32]], wp: &[f32], k: usize, m: usize, out: &mut [f32]) {
        let mut i = 0;
        while i + 4 <= xs.len() {
            let mut j = 0;
            while j + 2 <= m {
                tile::<4, 2>(&xs[i..i + 4], wp, j, k, m, i, out);
                j += 2;
            }
            if j < m {
                tile::<4, 1>(&xs[i..i + 4], wp, j, k, m, i, out);
            }
            i += 4;
        }
        while i < xs.len() {
            let mut j = 0;
            while j + 4 <= m {
                tile::<1, 4>(&xs[i..i + 1], wp, j, k, m, i, out);
                j += 4;
            }
            while j < m {
                tile::<1, 1>(&xs[i..i + 1], wp, j, k, m, i, out);
                j += 1;
            }
            i += 1;
        }
    }

    /// `R` rows (from output row `i`) by `C` weight rows (from `j`).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    fn tile<const R: usize, const C: usize>(
        xs: &[&[f32]],
        wp: &[f32],
        j: usize,
        k: usize,
        m: usize,
        i: usize,
        out: &mut [f32],
    ) {
        let full = k / LANES * LANES;
        let ws: [&[f32]; C] = std::array::from_fn(|c| &wp[(j + c) * k..(j + c + 1) * k]);
        let mut acc = [[_mm256_setzero_ps(); C]; R];
        let mut p = 0;
        while p < full {
            let wv: [__m256; C] = std::array::from_fn(|c| {
                let lanes: &[f32; LANES] = ws[c][p..p + LANES].try_into().unwrap_or(&[0.0; LANES]);
                // SAFETY: `lanes` is eight readable floats.
                unsafe { _mm256_loadu_ps(lanes.as_ptr()) }
            });
            for (r, row) in acc.iter_mut().enumerate() {
                let lanes: &[f32; LANES] = xs[r][p..p + LANES].try_into().unwrap_or(&[0.0; LANES]);
                // SAFETY: `lanes` is eight readable floats.
                let xv = unsafe { _mm256_loadu_ps(lanes.as_ptr()) };
                for (a, w) in row.iter_mut().zip(&wv) {
                    *a = _mm256_fmadd_ps(xv, *w, *a);
                }
            }
            p += LANES;
        }
        for (r, row) in acc.iter().enumerate() {
            for (c, a) in row.iter().enumerate() {
                let mut l = [0.0f32; LANES];
                // SAFETY: `l` is eight writable floats.
                unsafe { _mm256_storeu_ps(l.as_mut_ptr(), *a) };
                let mut s = lane_tree(&l);
                for q in full..k {
                    s = xs[r][q].mul_add(ws[c][q], s);
                }
                out[(i + r) * m + j + c] = s;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use half::bf16;

    use super::*;
    use crate::engine::synth::SynthRng;
    use crate::engine::tensor::Tensor;

    /// A row's result is the same bits whatever rows come with it, in any position, for f32
    /// and bf16 weights; and it is the product to f32 rounding.
    #[test]
    fn a_row_does_not_depend_on_its_company() {
        for &(n, k) in &[(64usize, 64usize), (130, 77), (5, 3), (300, 1000)] {
            let vals = SynthRng(n as u64).vec(n * k, 1.0);
            let wf = Weight::F32(Tensor::new(vec![n, k], vals.clone()).unwrap());
            let wb = Weight::bf16(n, k, vals.iter().map(|v| bf16::from_f32(*v)).collect()).unwrap();
            let x = SynthRng(k as u64).vec(9 * k, 1.0);
            for w in [&wf, &wb] {
                let mut alone = vec![0.0f32; 9 * n];
                for r in 0..9 {
                    xwt_fixed(&mut alone, &x, &[r], w);
                }
                for rows in [vec![0, 1, 2, 3, 4, 5, 6, 7, 8], vec![8, 3, 5, 0, 1], vec![2, 7]] {
                    let mut together = vec![0.0f32; 9 * n];
                    xwt_fixed(&mut together, &x, &rows, w);
                    for &r in &rows {
                        assert_eq!(together[r * n..(r + 1) * n], alone[r * n..(r + 1) * n]);
                    }
                }
                let mut want = vec![0.0f32; 9 * n];
                xwt(&mut want, &x, 9, w, false);
                for (a, b) in alone.iter().zip(&want) {
                    assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{a} vs {b}");
                }
            }
        }
    }

    /// Split rows: blocks by `gemm`, singles by the fixed kernel, nothing left unwritten.
    #[test]
    fn split_covers_every_row() {
        let (n, k) = (40, 24);
        let w = Weight::F32(Tensor::new(vec![n, k], SynthRng(3).vec(n * k, 1.0)).unwrap());
        let x = SynthRng(4).vec(7 * k, 1.0);
        let how = BaseRows::for_decode(&[(0, 1), (1, 4), (5, 1), (6, 1)]);
        let mut got = vec![f32::NAN; 7 * n];
        base_xwt(&mut got, &x, 7, &w, &how);
        let mut want = vec![0.0f32; 7 * n];
        xwt(&mut want, &x, 7, &w, false);
        for (a, b) in got.iter().zip(&want) {
            assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{a} vs {b}");
        }
    }
}
