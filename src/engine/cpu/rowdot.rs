//! Base-weight products for decode passes whose every output element is summed in one fixed
//! order, whatever other rows are computed alongside. A sequence decoded in one pass with other
//! tenants' sequences then gets bit for bit the activations it gets alone, so greedy and seeded
//! samples do not depend on the company a request keeps. `gemm` does not promise that: it picks
//! kernels and blocking from the product's shape (a one-row product takes another path than a
//! two-row one), so its rows change in the last bits with the batch size.
//!
//! A prompt's prefill goes row by row through the same kernel when it is short (at most
//! [`FIXED_MAX_TOKENS`] new tokens): it then shares the pass's one walk over the weights with
//! every other row. A long prompt keeps the `gemm` product, one product per sequence: alone or
//! batched, such a sequence is the same product of the same shape. Which way a sequence goes
//! depends on its own token count only, never on its company.

use std::ops::Range;

use rayon::prelude::*;

use super::rowkernel::{Path, dot_rows_on};
use super::wmatmul::xwt;
use crate::engine::weight::Weight;

/// The longest run of new tokens of one sequence that goes row by row through the fixed-order
/// kernel in a decode pass. Measured (two Xeon cores, f32, Qwen2.5-0.5B's MLP shapes, each
/// product alone): 16 rows took 0.86 ms in the kernel against 1.57 ms in `gemm` (4864 × 896)
/// and 1.10 against 1.90 (896 × 4864); at 64 rows 2.76 against 3.87 and 4.06 against 3.93;
/// from 128 rows on `gemm` wins the 896 × 4864 shape. In a pass, the kernel's rows also share
/// one walk over the weights, where each `gemm` product makes its own.
pub(crate) const FIXED_MAX_TOKENS: usize = 64;

/// Output rows of the weight (columns of the product) per parallel task.
const COLS_PER_TASK: usize = 64;

/// How a pass's rows are grouped for the base-weight products.
#[derive(Debug, Clone, Default)]
pub(crate) enum BaseRows {
    /// One `gemm` product over all rows (training and evaluation passes).
    #[default]
    Whole,
    /// Decode passes: `single` rows by the fixed-order kernel, each of `blocks` (a long
    /// prompt's new tokens) by its own `gemm` product.
    Split { single: Vec<usize>, blocks: Vec<Range<usize>> },
}

impl BaseRows {
    /// The grouping for packed sequences `(start_row, len)`: the rows of sequences of at most
    /// [`FIXED_MAX_TOKENS`] new tokens one by one, longer ones as blocks.
    pub(crate) fn for_decode(seqs: &[(usize, usize)]) -> Self {
        let short = |s: &&(usize, usize)| s.1 <= FIXED_MAX_TOKENS;
        let single = seqs.iter().filter(short).flat_map(|&(r, n)| r..r + n).collect();
        let blocks = seqs.iter().filter(|s| !short(s)).map(|&(r, n)| r..r + n).collect();
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

/// Rows `rows` of `y = x · Wᵀ`, each element summed in the fixed order of `rowkernel`.
fn xwt_fixed(y: &mut [f32], x: &[f32], rows: &[usize], w: &Weight) {
    xwt_fixed_on(Path::detect(), y, x, rows, w)
}

/// An output row's base pointer, shared by the column-block tasks (each writes its own
/// columns).
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
impl OutPtr {
    /// The address of element `i` (a method, so that closures capture the whole `OutPtr`).
    fn at(self, i: usize) -> *mut f32 {
        self.0.wrapping_add(i)
    }
}
// SAFETY: the tasks that share the pointer write pairwise disjoint elements (see its use).
unsafe impl Send for OutPtr {}
// SAFETY: as above.
unsafe impl Sync for OutPtr {}

fn xwt_fixed_on(path: Path, y: &mut [f32], x: &[f32], rows: &[usize], w: &Weight) {
    let (n, k) = (w.rows(), w.cols());
    // A row's result does not depend on the others, so a repeated row is computed once; sorted
    // and distinct rows are disjoint pieces of `y`.
    let mut rows = rows.to_vec();
    rows.sort_unstable();
    rows.dedup();
    let Some(&last) = rows.last() else { return };
    assert!(y.len() >= (last + 1) * n && x.len() >= (last + 1) * k, "rows out of range");
    let xs: Vec<&[f32]> = rows.iter().map(|&r| &x[r * k..(r + 1) * k]).collect();
    let mut ys = Vec::with_capacity(rows.len());
    let (mut rest, mut at) = (y, 0);
    for &r in &rows {
        let (row, tail) = std::mem::take(&mut rest)[(r - at) * n..].split_at_mut(n);
        ys.push(row);
        (rest, at) = (tail, r + 1);
    }
    fixed_rows_on(path, &mut ys, &xs, w);
}

/// `ys[i] = xs[i] · Wᵀ` for rows held apart (each `ys[i]` of `w.rows()` floats, each `xs[i]`
/// of `w.cols()`), every element summed in the fixed order of `rowkernel`.
pub(crate) fn xwt_fixed_rows(ys: &mut [&mut [f32]], xs: &[&[f32]], w: &Weight) {
    fixed_rows_on(Path::detect(), ys, xs, w)
}

fn fixed_rows_on(path: Path, ys: &mut [&mut [f32]], xs: &[&[f32]], w: &Weight) {
    let (n, k) = (w.rows(), w.cols());
    assert!(ys.len() == xs.len(), "{} outputs for {} inputs", ys.len(), xs.len());
    assert!(ys.iter().all(|y| y.len() == n) && xs.iter().all(|x| x.len() == k), "row length");
    if ys.is_empty() || n == 0 {
        return;
    }
    // The rows are copied to cache-line-aligned places: a tile loads every activation vector
    // once per weight vector pair, and unaligned 64-byte loads would each cost two.
    let stride = k.next_multiple_of(16);
    let mut aligned = vec![0.0f32; xs.len() * stride + 16];
    let off = aligned.as_ptr().align_offset(64).min(16);
    for (i, x) in xs.iter().enumerate() {
        let at = off + i * stride;
        aligned[at..at + k].copy_from_slice(x);
    }
    let xs: Vec<&[f32]> =
        (0..xs.len()).map(|i| &aligned[off + i * stride..off + i * stride + k]).collect();
    let outs: Vec<OutPtr> = ys.iter_mut().map(|y| OutPtr(y.as_mut_ptr())).collect();
    // Each task computes a block of columns for every row, straight into the rows.
    (0..n.div_ceil(COLS_PER_TASK)).into_par_iter().for_each_init(Vec::new, |panel, b| {
        let (j0, j1) = (b * COLS_PER_TASK, ((b + 1) * COLS_PER_TASK).min(n));
        let wp: &[f32] = match w.as_f32() {
            Some(wf) => &wf[j0 * k..j1 * k],
            None => {
                panel.resize((j1 - j0) * k, 0.0);
                w.rows_f32(j0, j1, panel);
                panel
            }
        };
        let mut outs: Vec<&mut [f32]> = outs
            .iter()
            // SAFETY: each pointer starts a distinct `&mut` row of `n` floats (checked above),
            // borrowed for this whole call; tasks' column ranges `j0..j1` are disjoint, so no
            // element is reachable from two of these slices, and nothing else touches the rows
            // meanwhile.
            .map(|p| unsafe { std::slice::from_raw_parts_mut(p.at(j0), j1 - j0) })
            .collect();
        dot_rows_on(path, &xs, wp, k, &mut outs);
    });
}

#[cfg(test)]
mod tests {
    use half::bf16;

    use super::*;
    use crate::engine::synth::SynthRng;
    use crate::engine::tensor::Tensor;

    /// A row's result is the same bits whatever rows come with it, in any position, for f32
    /// and bf16 weights, on every path this CPU runs; and it is the product to f32 rounding.
    #[test]
    fn a_row_does_not_depend_on_its_company() {
        for &(n, k) in &[(64usize, 64usize), (130, 77), (5, 3), (300, 1000)] {
            let vals = SynthRng(n as u64).vec(n * k, 1.0);
            let wf = Weight::F32(Tensor::new(vec![n, k], vals.clone()).unwrap());
            let wb = Weight::bf16(n, k, vals.iter().map(|v| bf16::from_f32(*v)).collect()).unwrap();
            let x = SynthRng(k as u64).vec(9 * k, 1.0);
            for (w, &path) in
                [&wf, &wb].into_iter().flat_map(|w| Path::available().iter().map(move |p| (w, p)))
            {
                let mut alone = vec![0.0f32; 9 * n];
                for r in 0..9 {
                    xwt_fixed_on(path, &mut alone, &x, &[r], w);
                }
                for rows in [vec![0, 1, 2, 3, 4, 5, 6, 7, 8], vec![8, 3, 5, 0, 1], vec![2, 7]] {
                    let mut together = vec![0.0f32; 9 * n];
                    xwt_fixed_on(path, &mut together, &x, &rows, w);
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

    /// Split rows: long prompts by `gemm`, short ones and single tokens by the fixed kernel,
    /// nothing left unwritten.
    #[test]
    fn split_covers_every_row() {
        let (n, k) = (40, 24);
        let long = FIXED_MAX_TOKENS + 1;
        let rows = 7 + long;
        let w = Weight::F32(Tensor::new(vec![n, k], SynthRng(3).vec(n * k, 1.0)).unwrap());
        let x = SynthRng(4).vec(rows * k, 1.0);
        let how = BaseRows::for_decode(&[(0, 1), (1, 4), (5, long), (5 + long, 1), (6 + long, 1)]);
        let BaseRows::Split { single, blocks } = &how else { panic!("not split") };
        let mut want_single: Vec<usize> = (0..5).collect();
        want_single.extend([5 + long, 6 + long]);
        assert_eq!(single, &want_single);
        assert_eq!((blocks.len(), blocks[0].clone()), (1, 5..5 + long));
        let mut got = vec![f32::NAN; rows * n];
        base_xwt(&mut got, &x, rows, &w, &how);
        let mut want = vec![0.0f32; rows * n];
        xwt(&mut want, &x, rows, &w, false);
        for (a, b) in got.iter().zip(&want) {
            assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{a} vs {b}");
        }
    }

    /// Timing of the output head's shape (Qwen2.5-0.5B: 151,936 × 896, f32) for 1 and 8 rows.
    /// Ignored by default (noisy on a shared machine); run with
    /// `cargo test --release --lib head_shape_timing -- --ignored --nocapture`.
    #[test]
    #[ignore = "timing; run explicitly"]
    fn head_shape_timing() {
        let (n, k) = (151_936, 896);
        let w = Weight::F32(Tensor::new(vec![n, k], SynthRng(1).vec(n * k, 0.05)).unwrap());
        let x = SynthRng(2).vec(8 * k + 4, 1.0);
        let x = &x[4..];
        let mut y = vec![0.0f32; 8 * n];
        for rows in [1usize, 8, 1, 8] {
            let idx: Vec<usize> = (0..rows).collect();
            let mut ms = f64::INFINITY;
            for _ in 0..10 {
                let start = std::time::Instant::now();
                xwt_fixed(&mut y, x, &idx, &w);
                ms = ms.min(start.elapsed().as_secs_f64() * 1e3);
            }
            eprintln!("{rows} rows: {ms:.2} ms");
        }
        // One thread on one cached panel: the kernel's arithmetic rate.
        let wp = SynthRng(3).vec(64 * k, 0.05);
        let mut xa = vec![0.0f32; 8 * k + 16];
        let off = xa.as_ptr().align_offset(64).min(16);
        xa[off..off + 8 * k].copy_from_slice(x);
        let x = &xa[off..];
        for rows in [1usize, 2, 4, 8] {
            let xs: Vec<&[f32]> = (0..rows).map(|r| &x[r * k..(r + 1) * k]).collect();
            let mut bufs = vec![vec![0.0f32; 64]; rows];
            let reps = 200;
            let mut s = f64::INFINITY;
            for _ in 0..10 {
                let start = std::time::Instant::now();
                for _ in 0..reps {
                    let mut outs: Vec<&mut [f32]> =
                        bufs.iter_mut().map(Vec::as_mut_slice).collect();
                    dot_rows_on(Path::detect(), &xs, &wp, k, &mut outs);
                }
                s = s.min(start.elapsed().as_secs_f64());
            }
            eprintln!(
                "cached panel, {rows} rows: {:.1} GMAC/s",
                (reps * rows * 64 * k) as f64 / s / 1e9
            );
        }
    }
}
