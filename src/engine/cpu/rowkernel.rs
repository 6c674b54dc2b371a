//! The SIMD kernels behind `rowdot`'s fixed-order products: `out[i][j] = xs[i] · wp[j, :]` with
//! every element summed in one fixed order whatever tile it falls in, so a row's results do not
//! depend on the rows computed alongside it.
//!
//! The order per element: one running sum per SIMD lane over `k` (fused multiply-adds on the
//! SIMD paths), an AVX-512 register's sixteen lanes folded to eight (`l[q] + l[q + 8]`), the
//! eight added in the fixed tree of [`lane_tree`], then the tail `k % lanes` in order. The tiles
//! only decide which elements share a weight or activation load: several rows are blocked
//! together so that one load of a weight vector feeds the multiply-adds of every row (an 8-row
//! decode pass reads the output head once, from memory, instead of once per group of rows from
//! cache), and several weight rows are blocked so that enough independent sums are in flight.
//! The lane sums of sixteen elements are reduced together by shuffles (the same additions, in
//! the same tree, as one element at a time) instead of spilling each register.

/// Tiles of at least this many rows prefetch the next tile's weight rows. Measured on the
/// output head (151,936 × 896, two Zen 5 cores): an 8-row pass took ~46-52 ms without and
/// ~25 ms with; a tile of one or two rows moves through the weight fast enough for the
/// hardware prefetcher, and its extra prefetch instructions only cost issue slots.
const PREFETCH_ROWS: usize = 4;

/// Floats summed side by side in the fixed tree (one AVX2 register).
pub(super) const LANES: usize = 8;

/// The instruction sets the kernel has a path for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Path {
    Avx512,
    Avx2,
    Portable,
}

impl Path {
    /// The widest path this CPU runs.
    pub(super) fn detect() -> Path {
        Path::available()[0]
    }

    /// Every path this CPU runs, widest first (detected once).
    pub(super) fn available() -> &'static [Path] {
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

/// `outs[i][j] = xs[i] · wp[j*k..(j+1)*k]` for `j < outs[i].len()` (all `outs` one length `m`,
/// `wp` holding at least `m` rows of `k`). The paths differ from each other in the last bits
/// (lane count, fused or not); the process uses the widest throughout.
pub(super) fn dot_rows_on(
    path: Path,
    xs: &[&[f32]],
    wp: &[f32],
    k: usize,
    outs: &mut [&mut [f32]],
) {
    let m = outs.first().map_or(0, |o| o.len());
    assert!(xs.len() == outs.len() && outs.iter().all(|o| o.len() == m), "ragged outputs");
    assert!(xs.iter().all(|x| x.len() >= k) && wp.len() >= m * k, "short inputs");
    match path {
        // SAFETY: `Path::available` lists a SIMD path only when the CPU has its instructions;
        // the kernels read only inside the slices they are given (checked just above).
        #[cfg(target_arch = "x86_64")]
        Path::Avx512 if Path::available().contains(&Path::Avx512) => unsafe {
            x86::dot_rows_avx512(xs, wp, k, outs)
        },
        // SAFETY: as above, for AVX2 and FMA.
        #[cfg(target_arch = "x86_64")]
        Path::Avx2 if Path::available().contains(&Path::Avx2) => unsafe {
            x86::dot_rows_avx2(xs, wp, k, outs)
        },
        _ => {
            for (x, out) in xs.iter().zip(outs.iter_mut()) {
                for (j, o) in out.iter_mut().enumerate() {
                    *o = dot_portable(&x[..k], &wp[j * k..(j + 1) * k]);
                }
            }
        }
    }
}

/// The fixed-order dot product without SIMD (the same order as the AVX2 lanes, unfused).
pub(super) fn dot_portable(x: &[f32], w: &[f32]) -> f32 {
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

/// The fixed tree over the eight lane sums: pairs at distance 4, then 2, then 1 (the halving
/// reduction the AVX-512 shuffles of `reduce16` perform on sixteen elements at once).
#[inline(always)]
pub(super) fn lane_tree(l: &[f32; LANES]) -> f32 {
    ((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7]))
}

/// One SIMD register of f32 lanes, as the fixed-order kernel uses it.
#[cfg(target_arch = "x86_64")]
trait Lanes {
    type V: Copy;
    /// Lanes per register (a multiple of [`LANES`]).
    const W: usize;
    /// Whether the instruction set has 32 registers (bigger tiles fit).
    const WIDE: bool;
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

    /// A hint to bring the cache line at `p` into L1 (any address: nothing is read).
    ///
    /// # Safety
    /// As [`Lanes::zero`].
    #[inline(always)]
    unsafe fn prefetch(p: *const f32) {
        // SAFETY: a prefetch reads nothing and faults on no address; SSE is baseline x86-64
        // (the trait exists on x86-64 only).
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.cast::<i8>())
        };
    }

    /// The sums of sixteen registers of lane sums: per register the lanes folded to
    /// [`LANES`] (`l[q] + l[q + 8]`) and added by [`lane_tree`].
    ///
    /// # Safety
    /// As [`Lanes::zero`].
    #[inline(always)]
    unsafe fn reduce16(acc: &[Self::V; 16]) -> [f32; 16] {
        let mut l = [0.0f32; 16];
        std::array::from_fn(|e| {
            // SAFETY: `l` holds 16 >= W floats; the instruction set is this function's contract.
            unsafe { Self::store(l.as_mut_ptr(), acc[e]) };
            let folded: [f32; LANES] =
                std::array::from_fn(|q| if Self::W > LANES { l[q] + l[q + LANES] } else { l[q] });
            lane_tree(&folded)
        })
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{Lanes, dot_rows_simd};

    pub(super) struct Avx2;
    pub(super) struct Avx512;

    /// `Lanes` for one register type from its four intrinsics.
    macro_rules! lanes {
        ($isa:ident, $feat:literal, $entry:ident, $v:ty, $w:expr, $wide:expr,
         $zero:ident, $load:ident, $fma:ident, $store:ident $(, $reduce:item)?) => {
            /// [`dot_rows_simd`] compiled for this instruction set.
            ///
            /// # Safety
            /// The CPU has the instruction set; the slices are as `dot_rows_on` checks.
            #[target_feature(enable = $feat)]
            pub(super) unsafe fn $entry(xs: &[&[f32]], wp: &[f32], k: usize, outs: &mut [&mut [f32]]) {
                // SAFETY: this function's contract.
                unsafe { dot_rows_simd::<$isa>(xs, wp, k, outs) }
            }

            impl Lanes for $isa {
                type V = $v;
                const W: usize = $w;
                const WIDE: bool = $wide;
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
                $($reduce)?
            }
        };
    }
    lanes!(
        Avx2,
        "avx2,fma",
        dot_rows_avx2,
        __m256,
        8,
        false,
        _mm256_setzero_ps,
        _mm256_loadu_ps,
        _mm256_fmadd_ps,
        _mm256_storeu_ps
    );
    lanes!(
        Avx512,
        "avx512f",
        dot_rows_avx512,
        __m512,
        16,
        true,
        _mm512_setzero_ps,
        _mm512_loadu_ps,
        _mm512_fmadd_ps,
        _mm512_storeu_ps,
        /// The halving reduction of sixteen registers at once. Each step adds, for every
        /// register, its lanes at distance 8, 4, 2, 1 (exactly the fold and [`lane_tree`] of one
        /// register: IEEE addition is commutative, and each sum has the same two operands),
        /// packing two registers' halves into one by shuffles. The registers go in transposed
        /// (`4 × 4`) order so that the sum of register `e` lands in lane `e`.
        #[inline(always)]
        unsafe fn reduce16(acc: &[__m512; 16]) -> [f32; 16] {
            // SAFETY: the caller runs on a CPU with AVX-512F; `out` holds 16 floats.
            unsafe {
                let a: [__m512; 16] = std::array::from_fn(|i| acc[(i % 4) * 4 + i / 4]);
                // Distance 8: 256-bit halves of registers 2i and 2i+1.
                let b: [__m512; 8] = std::array::from_fn(|i| {
                    let (x, y) = (a[2 * i], a[2 * i + 1]);
                    _mm512_add_ps(
                        _mm512_shuffle_f32x4::<0b01_00_01_00>(x, y),
                        _mm512_shuffle_f32x4::<0b11_10_11_10>(x, y),
                    )
                });
                // Distance 4: 128-bit quarters inside each half.
                let c: [__m512; 4] = std::array::from_fn(|i| {
                    let (x, y) = (b[2 * i], b[2 * i + 1]);
                    _mm512_add_ps(
                        _mm512_shuffle_f32x4::<0b10_00_10_00>(x, y),
                        _mm512_shuffle_f32x4::<0b11_01_11_01>(x, y),
                    )
                });
                // Distance 2, then 1: inside each 128-bit quarter.
                let d: [__m512; 2] = std::array::from_fn(|i| {
                    let (x, y) = (c[2 * i], c[2 * i + 1]);
                    _mm512_add_ps(
                        _mm512_shuffle_ps::<0b01_00_01_00>(x, y),
                        _mm512_shuffle_ps::<0b11_10_11_10>(x, y),
                    )
                });
                let e = _mm512_add_ps(
                    _mm512_shuffle_ps::<0b10_00_10_00>(d[0], d[1]),
                    _mm512_shuffle_ps::<0b11_01_11_01>(d[0], d[1]),
                );
                let mut out = [0.0f32; 16];
                _mm512_storeu_ps(out.as_mut_ptr(), e);
                out
            }
        }
    );
}

/// Rows in groups (eight, four, two or one at a time with AVX-512; four, two or one with AVX2)
/// against as many weight rows as keep sixteen (AVX-512) or eight (AVX2, four for one row)
/// sums in registers.
///
/// # Safety
/// The CPU has `S`'s instruction set; the slices are as `dot_rows_on` checks.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn dot_rows_simd<S: Lanes>(xs: &[&[f32]], wp: &[f32], k: usize, outs: &mut [&mut [f32]]) {
    let mut i = 0;
    while i < xs.len() {
        let (x, o) = (&xs[i..], &mut outs[i..]);
        // SAFETY (every arm): this function's contract.
        i += unsafe {
            match (S::WIDE, xs.len() - i) {
                (true, 8..) => cols::<S, 8, 2>(x, wp, k, o),
                (true, 4..) => cols::<S, 4, 4>(x, wp, k, o),
                (true, 2..) => cols::<S, 2, 8>(x, wp, k, o),
                (false, 4..) => cols::<S, 4, 2>(x, wp, k, o),
                (false, 2..) => cols::<S, 2, 4>(x, wp, k, o),
                // AVX2 has 16 registers: four sums for one row.
                (false, _) => cols::<S, 1, 4>(x, wp, k, o),
                // One row streams sixteen weight rows at once: with four, a one-row pass
                // reached ~60% of the memory bandwidth (~20 ms against ~13.5 ms for the head).
                _ => cols::<S, 1, 16>(x, wp, k, o),
            }
        };
    }
}

/// The first `R` rows against every weight row, `C` weight rows per tile and the last ones
/// one by one. Returns `R`.
///
/// # Safety
/// As [`dot_rows_simd`], with at least `R` rows.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn cols<S: Lanes, const R: usize, const C: usize>(
    xs: &[&[f32]],
    wp: &[f32],
    k: usize,
    outs: &mut [&mut [f32]],
) -> usize {
    let m = outs[0].len();
    let x: [&[f32]; R] = std::array::from_fn(|r| &xs[r][..k]);
    let mut j = 0;
    while j + C <= m {
        // SAFETY: this function's contract.
        unsafe { tile::<S, R, C>(&x, wp, k, j, outs) };
        j += C;
    }
    while j < m {
        // SAFETY: this function's contract.
        unsafe { tile::<S, R, 1>(&x, wp, k, j, outs) };
        j += 1;
    }
    R
}

/// `R` rows by weight rows `j..j + C`: per element one register of running sums over `k`,
/// reduced by [`Lanes::reduce16`], then the tail with fused multiply-adds.
///
/// # Safety
/// The CPU has `S`'s instruction set; `x[r].len() == k`, `wp` holds rows `..j + C` of `k`,
/// `outs` has `R` rows of more than `j + C - 1` elements.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn tile<S: Lanes, const R: usize, const C: usize>(
    x: &[&[f32]; R],
    wp: &[f32],
    k: usize,
    j: usize,
    outs: &mut [&mut [f32]],
) {
    let w = S::W;
    let full = k / w * w;
    let ws: [&[f32]; C] = std::array::from_fn(|c| &wp[(j + c) * k..(j + c + 1) * k]);
    let xp: [*const f32; R] = std::array::from_fn(|r| x[r].as_ptr());
    let wq: [*const f32; C] = std::array::from_fn(|c| ws[c].as_ptr());
    // SAFETY (all blocks below): the CPU has `S`'s instructions (this function's contract), and
    // every pointer is to `w` floats inside a slice of `k` floats (`p + w <= full <= k`).
    let mut acc = [[unsafe { S::zero() }; C]; R];
    // The next tile's weight rows are requested while this one computes: a tile of many rows
    // advances through the weight slowly, and the hardware prefetcher alone then leaves each
    // load waiting on memory. (Rows are contiguous, so `C * k` floats past row `c` is the same
    // column of the next tile; `wrapping_add` since the address may lie past the panel.)
    let ahead = C * k;
    let mut p = 0;
    while p < full {
        let wv: [S::V; C] = std::array::from_fn(|c| unsafe { S::load(wq[c].add(p)) });
        if R >= PREFETCH_ROWS {
            for q in &wq {
                unsafe { S::prefetch(q.wrapping_add(p + ahead)) };
            }
        }
        for (row, xr) in acc.iter_mut().zip(&xp) {
            let xv = unsafe { S::load(xr.add(p)) };
            for (a, wc) in row.iter_mut().zip(&wv) {
                *a = unsafe { S::fma(xv, *wc, *a) };
            }
        }
        p += w;
    }
    let mut e0 = 0;
    while e0 < R * C {
        let group: [S::V; 16] = std::array::from_fn(|q| match e0 + q {
            e if e < R * C => acc[e / C][e % C],
            _ => unsafe { S::zero() },
        });
        let sums = unsafe { S::reduce16(&group) };
        for (q, &sum) in sums.iter().enumerate().take((R * C - e0).min(16)) {
            let (r, c) = ((e0 + q) / C, (e0 + q) % C);
            let mut s = sum;
            for t in full..k {
                s = x[r][t].mul_add(ws[c][t], s);
            }
            outs[r][j + c] = s;
        }
        e0 += 16;
    }
}

#[cfg(test)]
#[path = "rowkernel_tests.rs"]
mod tests;
