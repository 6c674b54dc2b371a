//! The fixed-order kernels against a scalar statement of their summation order, bit for bit.

use super::*;
use crate::engine::synth::SynthRng;

/// One element as `path` defines it, one scalar operation at a time: per lane a running sum
/// (fused on the SIMD paths), sixteen lanes folded to eight, the fixed tree, the tail in order.
fn reference(path: Path, x: &[f32], w: &[f32]) -> f32 {
    let k = x.len();
    let (lanes, fused) = match path {
        Path::Avx512 => (16, true),
        Path::Avx2 => (8, true),
        Path::Portable => (8, false),
    };
    let full = k / lanes * lanes;
    let mut l = [0.0f32; 16];
    for p in (0..full).step_by(lanes) {
        for q in 0..lanes {
            let (a, b) = (x[p + q], w[p + q]);
            l[q] = if fused { a.mul_add(b, l[q]) } else { l[q] + a * b };
        }
    }
    let folded: [f32; LANES] =
        std::array::from_fn(|q| if lanes > LANES { l[q] + l[q + LANES] } else { l[q] });
    let mut s = lane_tree(&folded);
    for q in full..k {
        s = if fused { x[q].mul_add(w[q], s) } else { s + x[q] * w[q] };
    }
    s
}

/// Every path this CPU runs, every row count 1..=12 and 17, odd and lane-multiple lengths and
/// weight-row counts: each element equals the scalar reference exactly.
#[test]
fn every_tile_matches_the_scalar_order() {
    for &(m, k) in &[(1usize, 1usize), (37, 7), (40, 16), (33, 17), (21, 33), (64, 100), (19, 896)]
    {
        let wp = SynthRng(m as u64 * 31 + k as u64).vec(m * k, 1.0);
        for rows in (1..=12).chain([17]) {
            let x: Vec<Vec<f32>> =
                (0..rows).map(|r| SynthRng(1000 + r as u64 * 7 + k as u64).vec(k, 1.0)).collect();
            let xs: Vec<&[f32]> = x.iter().map(Vec::as_slice).collect();
            for &path in Path::available() {
                let mut bufs = vec![vec![f32::NAN; m]; rows];
                let mut outs: Vec<&mut [f32]> = bufs.iter_mut().map(Vec::as_mut_slice).collect();
                dot_rows_on(path, &xs, &wp, k, &mut outs);
                for (r, got) in bufs.iter().enumerate() {
                    for (j, &g) in got.iter().enumerate() {
                        let want = reference(path, &x[r], &wp[j * k..(j + 1) * k]);
                        assert_eq!(
                            g.to_bits(),
                            want.to_bits(),
                            "{path:?} m={m} k={k} rows={rows} ({r}, {j}): {g} vs {want}"
                        );
                    }
                }
            }
        }
    }
}

/// Large and tiny magnitudes, zeros and signed zeros survive the shuffle reduction unchanged.
#[test]
fn extreme_values_match_the_scalar_order() {
    let k = 48;
    let mut rng = SynthRng(5);
    let vals = [0.0f32, -0.0, 1e30, -1e30, 1e-30, 3.0e38, -3.0e38, 1.0];
    let pick = |rng: &mut SynthRng| vals[rng.below(vals.len() as u32) as usize];
    let wp: Vec<f32> = (0..16 * k).map(|_| pick(&mut rng)).collect();
    let x: Vec<Vec<f32>> = (0..8).map(|_| (0..k).map(|_| pick(&mut rng)).collect()).collect();
    let xs: Vec<&[f32]> = x.iter().map(Vec::as_slice).collect();
    for &path in Path::available() {
        let mut bufs = vec![vec![0.0f32; 16]; 8];
        let mut outs: Vec<&mut [f32]> = bufs.iter_mut().map(Vec::as_mut_slice).collect();
        dot_rows_on(path, &xs, &wp, k, &mut outs);
        for (r, got) in bufs.iter().enumerate() {
            for (j, &g) in got.iter().enumerate() {
                let want = reference(path, &x[r], &wp[j * k..(j + 1) * k]);
                assert!(g.to_bits() == want.to_bits() || (g.is_nan() && want.is_nan()));
            }
        }
    }
}
