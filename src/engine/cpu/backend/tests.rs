//! Fused kernels vs slow references built from primitives, and backward passes vs central
//! finite differences.

use super::*;
use crate::engine::cpu::test_util::rand_vec;

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum()
}

/// Central difference of `f` at every coordinate of `x`.
fn numeric_grad(x: &[f32], f: &dyn Fn(&[f32]) -> f64) -> Vec<f32> {
    let h = 1e-2f32;
    (0..x.len())
        .map(|i| {
            let mut xp = x.to_vec();
            xp[i] += h;
            let mut xm = x.to_vec();
            xm[i] -= h;
            ((f(&xp) - f(&xm)) / (2.0 * h as f64)) as f32
        })
        .collect()
}

fn assert_close_rel(got: &[f32], want: &[f32], rel: f32) {
    let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-6);
    let err = max_abs_diff(got, want);
    assert!(err <= rel * scale, "max err {err} > {rel} × {scale}");
}

#[test]
fn matmul_matches_naive_for_all_layouts() {
    let (m, k, n) = (7, 5, 9);
    let a = rand_vec(m * k, 1);
    let b = rand_vec(k * n, 2);
    for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
        let get_a = |i: usize, p: usize| if ta { a[p * m + i] } else { a[i * k + p] };
        let get_b = |p: usize, j: usize| if tb { b[j * k + p] } else { b[p * n + j] };
        let mut want = vec![0.5f32; m * n];
        for i in 0..m {
            for j in 0..n {
                want[i * n + j] += (0..k).map(|p| get_a(i, p) * get_b(p, j)).sum::<f32>();
            }
        }
        let mut got = vec![0.5f32; m * n];
        let mm = MatMul { m, k, n, trans_a: ta, trans_b: tb, accumulate: true };
        backend().matmul(&mut got, &a, &b, mm);
        assert!(max_abs_diff(&got, &want) < 1e-5, "layout {ta} {tb}");
        let mut fresh = vec![9.0f32; m * n];
        backend().matmul(&mut fresh, &a, &b, MatMul { accumulate: false, ..mm });
        let want0: Vec<f32> = want.iter().map(|v| v - 0.5).collect();
        assert!(max_abs_diff(&fresh, &want0) < 1e-5);
    }
}

fn rmsnorm_slow(x: &[f32], w: &[f32], dim: usize, eps: f32) -> Vec<f32> {
    x.chunks(dim)
        .flat_map(|r| {
            let ms = r.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / dim as f64;
            let inv = 1.0 / (ms + eps as f64).sqrt();
            r.iter().zip(w).map(move |(v, wv)| (*v as f64 * inv * *wv as f64) as f32)
        })
        .collect()
}

#[test]
fn rmsnorm_matches_slow_and_finite_differences() {
    let (rows, dim, eps) = (3, 8, 1e-6);
    let x = rand_vec(rows * dim, 3);
    let w = rand_vec(dim, 4);
    let mut out = vec![0.0; rows * dim];
    let mut rstd = vec![0.0; rows];
    backend().rmsnorm_fwd(&x, &w, dim, eps, &mut out, &mut rstd);
    assert!(max_abs_diff(&out, &rmsnorm_slow(&x, &w, dim, eps)) < 1e-6);
    let dy = rand_vec(rows * dim, 5);
    let mut dx = vec![0.0; rows * dim];
    backend().rmsnorm_bwd(&dy, &x, &w, &rstd, dim, &mut dx);
    let num = numeric_grad(&x, &|xs| dot(&rmsnorm_slow(xs, &w, dim, eps), &dy));
    assert_close_rel(&dx, &num, 2e-3);
}

#[test]
fn rope_matches_complex_rotation_and_inverts() {
    let (rows, heads, hd) = (4, 2, 8);
    let positions = [0u32, 3, 7, 100];
    let inv_freq: Vec<f64> =
        (0..hd / 2).map(|i| 10000f64.powf(-2.0 * i as f64 / hd as f64)).collect();
    let table = RopeTable::new(&positions, hd, &inv_freq);
    let x = rand_vec(rows * heads * hd, 6);
    let mut y = x.clone();
    backend().rope(&mut y, heads, hd, &table, false);
    for (t, &pos) in positions.iter().enumerate() {
        for h in 0..heads {
            for i in 0..hd / 2 {
                let base = (t * heads + h) * hd;
                let ang = pos as f64 * inv_freq[i];
                let (re, im) = (x[base + i] as f64, x[base + i + hd / 2] as f64);
                let (c, s) = (ang.cos(), ang.sin());
                assert!((y[base + i] as f64 - (re * c - im * s)).abs() < 1e-5);
                assert!((y[base + i + hd / 2] as f64 - (im * c + re * s)).abs() < 1e-5);
            }
        }
    }
    backend().rope(&mut y, heads, hd, &table, true);
    assert!(max_abs_diff(&x, &y) < 1e-5);
}

#[test]
fn swiglu_backward_matches_finite_differences() {
    let n = 12;
    let g = rand_vec(n, 7).iter().map(|v| v * 3.0).collect::<Vec<_>>();
    let u = rand_vec(n, 8);
    let dout = rand_vec(n, 9);
    let mut out = vec![0.0; n];
    backend().swiglu_fwd(&g, &u, &mut out);
    for i in 0..n {
        let want = g[i] as f64 / (1.0 + (-(g[i] as f64)).exp()) * u[i] as f64;
        assert!((out[i] as f64 - want).abs() < 1e-6);
    }
    let (mut dg, mut du) = (vec![0.0; n], vec![0.0; n]);
    backend().swiglu_bwd(&dout, &g, &u, &mut dg, &mut du);
    let f = |gs: &[f32], us: &[f32]| {
        let mut o = vec![0.0; n];
        backend().swiglu_fwd(gs, us, &mut o);
        dot(&o, &dout)
    };
    assert_close_rel(&dg, &numeric_grad(&g, &|gs| f(gs, &u)), 2e-3);
    assert_close_rel(&du, &numeric_grad(&u, &|us| f(&g, us)), 2e-3);
}

/// Attention composed of primitives: full masked score matrix, softmax, weighted sum (f64).
fn attention_slow(q: &[f32], k: &[f32], v: &[f32], s: AttnShape) -> Vec<f32> {
    let AttnShape { n_q, n_k, n_heads, n_kv_heads, head_dim: hd } = s;
    let past = n_k - n_q;
    let mut out = vec![0.0f32; n_q * n_heads * hd];
    for h in 0..n_heads {
        let kvh = h * n_kv_heads / n_heads;
        for i in 0..n_q {
            let scores: Vec<f64> = (0..n_k)
                .map(|j| {
                    if j > past + i {
                        f64::NEG_INFINITY
                    } else {
                        dot(
                            &q[(i * n_heads + h) * hd..][..hd],
                            &k[(j * n_kv_heads + kvh) * hd..][..hd],
                        ) / (hd as f64).sqrt()
                    }
                })
                .collect();
            let mx = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = scores.iter().map(|s| (s - mx).exp()).collect();
            let z: f64 = e.iter().sum();
            for d in 0..hd {
                let val: f64 =
                    (0..n_k).map(|j| e[j] / z * v[(j * n_kv_heads + kvh) * hd + d] as f64).sum();
                out[(i * n_heads + h) * hd + d] = val as f32;
            }
        }
    }
    out
}

/// One fused attention forward of `s` on random q, k, v (seeds `seed`, +1, +2).
struct AttnRun {
    s: AttnShape,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    out: Vec<f32>,
    lse: Vec<f32>,
}

impl AttnRun {
    fn new(s: AttnShape, seed: u64) -> Self {
        let q = rand_vec(s.n_q * s.n_heads * s.head_dim, seed);
        let k = rand_vec(s.n_k * s.n_kv_heads * s.head_dim, seed + 1);
        let v = rand_vec(s.n_k * s.n_kv_heads * s.head_dim, seed + 2);
        let mut out = vec![0.0; q.len()];
        let mut lse = vec![0.0; s.n_heads * s.n_q];
        backend().attention_fwd(Qkv { q: &q, k: &k, v: &v }, s, &mut out, &mut lse);
        AttnRun { s, q, k, v, out, lse }
    }

    /// Largest difference between the fused output and the slow reference.
    fn fwd_error(&self) -> f32 {
        max_abs_diff(&self.out, &attention_slow(&self.q, &self.k, &self.v, self.s))
    }

    /// The fused backward of `dot(out, dout)` (dout from `seed`) against central finite
    /// differences of the slow reference.
    fn check_bwd(&self, seed: u64) {
        let AttnRun { s, q, k, v, out, lse } = self;
        let dout = rand_vec(q.len(), seed);
        let (mut dq, mut dk, mut dv) = (vec![0.0; q.len()], vec![0.0; k.len()], vec![0.0; v.len()]);
        let x = Qkv { q, k, v };
        backend().attention_bwd(x, out, lse, &dout, *s, &mut dq, &mut dk, &mut dv);
        let f = |q: &[f32], k: &[f32], v: &[f32]| dot(&attention_slow(q, k, v, *s), &dout);
        assert_close_rel(&dq, &numeric_grad(q, &|x| f(x, k, v)), 2e-3);
        assert_close_rel(&dk, &numeric_grad(k, &|x| f(q, x, v)), 2e-3);
        assert_close_rel(&dv, &numeric_grad(v, &|x| f(q, k, x)), 2e-3);
    }
}

#[test]
fn attention_matches_slow_and_finite_differences() {
    for (n_q, n_k) in [(5, 5), (2, 6)] {
        let run = AttnRun::new(AttnShape { n_q, n_k, n_heads: 4, n_kv_heads: 2, head_dim: 4 }, 10);
        assert!(run.fwd_error() < 1e-5);
        run.check_bwd(13);
    }
}

#[test]
fn tiled_attention_matches_slow_across_query_tiles() {
    // Shapes spanning several query tiles (training, and queries that are the last n_q of n_k
    // positions as in cached decoding), GQA and plain multi-head.
    let qb = super::cpu::Q_BLOCK;
    for (n_q, n_k, nh, nkv) in
        [(2 * qb + 3, 2 * qb + 3, 4, 2), (qb + 5, 3 * qb, 3, 3), (1, qb + 9, 4, 1)]
    {
        let s = AttnShape { n_q, n_k, n_heads: nh, n_kv_heads: nkv, head_dim: 8 };
        assert!(AttnRun::new(s, 20).fwd_error() < 1e-5, "{n_q} {n_k}");
    }
}

#[test]
fn tiled_attention_backward_matches_finite_differences_across_tiles() {
    let n = super::cpu::Q_BLOCK + 3;
    let s = AttnShape { n_q: n, n_k: n, n_heads: 2, n_kv_heads: 1, head_dim: 2 };
    AttnRun::new(s, 30).check_bwd(33);
}

#[test]
fn fast_exp_is_accurate_over_the_softmax_range() {
    let mut worst = 0.0f64;
    for i in 0..=200_000 {
        let x = -87.0 + 175.0 * i as f64 / 200_000.0;
        let got = super::cpu::fast_exp(x as f32) as f64;
        let want = (x as f32 as f64).exp();
        worst = worst.max((got - want).abs() / want);
    }
    assert!(worst < 5e-7, "relative error {worst}");
    // The vectorised row version agrees and returns the sum.
    let mut row: Vec<f32> = (0..37).map(|i| i as f32 * 0.37 - 9.0).collect();
    let want: Vec<f64> = row.iter().map(|x| ((*x - 3.0) as f64).exp()).collect();
    let s = exp_shift(&mut row, 3.0);
    for (g, w) in row.iter().zip(&want) {
        assert!((*g as f64 - w).abs() <= 5e-7 * w, "{g} vs {w}");
    }
    assert!((s as f64 - want.iter().sum::<f64>()).abs() < 1e-5 * s as f64);
}
