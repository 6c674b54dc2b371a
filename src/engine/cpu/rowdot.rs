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

/// Rows `rows` of `y = x · Wᵀ`, each element summed in the fixed order of [`dot_rows_on`].
fn xwt_fixed(y: &mut [f32], x: &[f32], rows: &[usize], w: &Weight) {
    xwt_fixed_on(Path::detect(), y, x, rows, w)
}

fn xwt_fixed_on(path: Path, y: &mut [f32], x: &[f32], rows: &[usize], w: &Weight) {
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
            dot_rows_on(path, &xs, wp, k, &mut out);
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
/// element is the same sequence of operations whatever tile it falls in: one running sum per
/// SIMD lane over `k`, the lanes added in a fixed tree, then the tail in order. The widest
/// path the CPU has is used throughout the process (paths differ in the last bits from each
/// other, never from themselves).
/// The instruction sets the kernel has a path for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    Avx512,
    Avx2,
    Portable,
}

impl Path {
    /// The widest path this CPU runs.
    fn detect() -> Path {
        Path::available()[0]
    }

    /// Every path this CPU runs, widest first (detected once).
    fn available() -> &'static [Path] {
        static PATHS: std::sync::OnceLock<Vec<Path>> = std::sync::OnceLock::new();
        PATHS.get_or_init(Path::probe)
    }

    fn probe() -> Vec<Path> {
        let mut out = Vec::new();
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                out.push(Path::Avx512);
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                out.push(Path::Avx2);
            }
        }
        out.push(Path::Portable);
        out
    }
}

fn dot_rows_on(path: Path, xs: &[&[f32]], wp: &[f32], k: usize, out: &mut [f32]) {
    let m = wp.len().checked_div(k).unwrap_or_else(|| out.len() / xs.len().max(1));
    match path {
        // SAFETY: `Path::available` lists a SIMD path only when the CPU has its instructions;
        // the kernels read only inside the slices they are given (loads bounded by `k`).
        #[cfg(target_arch = "x86_64")]
        Path::Avx512 if Path::available().contains(&Path::Avx512) => unsafe {
            x86::dot_rows_avx512(xs, wp, k, m, out)
        },
        // SAFETY: as above, for AVX2 and FMA.
        #[cfg(target_arch = "x86_64")]
        Path::Avx2 if Path::available().contains(&Path::Avx2) => unsafe {
            x86::dot_rows_avx2(xs, wp, k, m, out)
        },
        _ => {
            for (i, x) in xs.iter().enumerate() {
                for j in 0..m {
                    out[i * m + j] = dot_portable(x, &wp[j * k..(j + 1) * k]);
                }
            }
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

/// One SIMD register of f32 lanes, as the fixed-order kernel uses it.
#[cfg(target_arch = "x86_64")]
trait Lanes {
    type V: Copy;
    /// Lanes per register (a multiple of [`LANES`]).
    const W: usize;
    /// Tile shapes (rows, weight rows): for groups of four rows, and for single rows.
    const COLS4: usize;
    /// # Safety
    /// The CPU has the instruction set of the implementation.
    unsafe fn zero() -> Self::V;
    /// # Safety
    /// As [`Lanes::zero`]; `p` points at `W` readable floats.
    unsafe fn load(p: *const f32) -> Self::V;
    /// # Safety
    /// As [`Lanes::zero`].
    unsafe fn fma(x: Self::V, w: Self::V, acc: Self::V) -> Self::V;
    /// # Safety
    /// As [`Lanes::zero`]; `p` points at `W` writable floats.
    unsafe fn store(p: *mut f32, v: Self::V);
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{Lanes, dot_rows_simd};

    pub(super) struct Avx2;
    pub(super) struct Avx512;

    /// `Lanes` for one register type from its four intrinsics.
    macro_rules! lanes {
        ($isa:ident, $feat:literal, $entry:ident, $v:ty, $w:expr, $cols4:expr,
         $zero:ident, $load:ident, $fma:ident, $store:ident) => {
            /// [`dot_rows_simd`] compiled for this instruction set.
            ///
            /// # Safety
            /// The CPU has the instruction set.
            #[target_feature(enable = $feat)]
            pub(super) unsafe fn $entry(
                xs: &[&[f32]],
                wp: &[f32],
                k: usize,
                m: usize,
                out: &mut [f32],
            ) {
                // SAFETY: this function's contract.
                unsafe { dot_rows_simd::<$isa>(xs, wp, k, m, out) }
            }

            impl Lanes for $isa {
                type V = $v;
                const W: usize = $w;
                const COLS4: usize = $cols4;
                #[inline(always)]
                unsafe fn zero() -> $v {
                    // SAFETY: the caller runs on a CPU with this instruction set.
                    unsafe { $zero() }
                }
                #[inline(always)]
                unsafe fn load(p: *const f32) -> $v {
                    // SAFETY: the caller's contract (`W` readable floats, the instruction set).
                    unsafe { $load(p) }
                }
                #[inline(always)]
                unsafe fn fma(x: $v, w: $v, acc: $v) -> $v {
                    // SAFETY: the caller runs on a CPU with this instruction set.
                    unsafe { $fma(x, w, acc) }
                }
                #[inline(always)]
                unsafe fn store(p: *mut f32, v: $v) {
                    // SAFETY: the caller's contract (`W` writable floats, the instruction set).
                    unsafe { $store(p, v) }
                }
            }
        };
    }
    lanes!(
        Avx2,
        "avx2,fma",
        dot_rows_avx2,
        __m256,
        8,
        2,
        _mm256_setzero_ps,
        _mm256_loadu_ps,
        _mm256_fmadd_ps,
        _mm256_storeu_ps
    );
    // Four weight rows for groups of four rows: 16 accumulators of the 32 registers.
    lanes!(
        Avx512,
        "avx512f",
        dot_rows_avx512,
        __m512,
        16,
        4,
        _mm512_setzero_ps,
        _mm512_loadu_ps,
        _mm512_fmadd_ps,
        _mm512_storeu_ps
    );
}

/// Rows four at a time against `S::COLS4` weight rows, then single rows against four weight
/// rows (a one-row decode streams the weight with four loads in flight), edges one by one.
///
/// # Safety
/// The CPU has `S`'s instruction set.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn dot_rows_simd<S: Lanes>(xs: &[&[f32]], wp: &[f32], k: usize, m: usize, out: &mut [f32]) {
    let mut i = 0;
    while i < xs.len() {
        let four = xs.len() - i >= 4;
        let rows = if four { 4 } else { 1 };
        let mut j = 0;
        while j < m {
            let cols = if four { S::COLS4 } else { 4 };
            let at = Tile { i, j, k, m };
            // SAFETY: this function's contract.
            unsafe {
                match (four, m - j >= cols) {
                    (true, true) if cols == 4 => tile::<S, 4, 4>(&xs[i..i + rows], wp, at, out),
                    (true, true) => tile::<S, 4, 2>(&xs[i..i + rows], wp, at, out),
                    (true, false) => tile::<S, 4, 1>(&xs[i..i + rows], wp, at, out),
                    (false, true) => tile::<S, 1, 4>(&xs[i..i + rows], wp, at, out),
                    (false, false) => tile::<S, 1, 1>(&xs[i..i + rows], wp, at, out),
                }
            }
            j += if m - j >= cols { cols } else { 1 };
        }
        i += rows;
    }
}

/// Where a tile sits: output row `i`, weight row `j`, reduction length `k`, `m` weight rows.
#[derive(Clone, Copy)]
struct Tile {
    i: usize,
    j: usize,
    k: usize,
    m: usize,
}

/// `R` rows by `C` weight rows: per element one register of running sums over `k`, its lanes
/// folded to [`LANES`] and added by [`lane_tree`], then the tail with fused multiply-adds.
///
/// # Safety
/// The CPU has `S`'s instruction set.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn tile<S: Lanes, const R: usize, const C: usize>(
    xs: &[&[f32]],
    wp: &[f32],
    Tile { i, j, k, m }: Tile,
    out: &mut [f32],
) {
    let w = S::W;
    let full = k / w * w;
    let ws: [&[f32]; C] = std::array::from_fn(|c| &wp[(j + c) * k..(j + c + 1) * k]);
    // SAFETY (all blocks below): the CPU has `S`'s instructions (this function's contract), and
    // every pointer is to `w` floats inside a slice (`p + w <= full <= k`).
    let mut acc = [[unsafe { S::zero() }; C]; R];
    let mut p = 0;
    while p < full {
        let wv: [S::V; C] = std::array::from_fn(|c| unsafe { S::load(ws[c][p..p + w].as_ptr()) });
        for (r, row) in acc.iter_mut().enumerate() {
            let xv = unsafe { S::load(xs[r][p..p + w].as_ptr()) };
            for (a, wc) in row.iter_mut().zip(&wv) {
                *a = unsafe { S::fma(xv, *wc, *a) };
            }
        }
        p += w;
    }
    let mut l = [0.0f32; 16];
    for (r, row) in acc.iter().enumerate() {
        for (c, a) in row.iter().enumerate() {
            unsafe { S::store(l[..w].as_mut_ptr(), *a) };
            let folded: [f32; LANES] =
                std::array::from_fn(|q| if w > LANES { l[q] + l[q + LANES] } else { l[q] });
            let mut s = lane_tree(&folded);
            for q in full..k {
                s = xs[r][q].mul_add(ws[c][q], s);
            }
            out[(i + r) * m + j + c] = s;
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
