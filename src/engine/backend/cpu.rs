//! CPU backend: `gemm` for matrix products, rayon over rows/heads for the fused ops.

use rayon::prelude::*;

use super::{AttnShape, Backend, MatMul, RopeTable};

/// The CPU backend (stateless).
#[derive(Debug, Clone, Copy, Default)]
pub struct Cpu;

/// Below this many multiply-adds a product runs on the calling thread.
const PAR_THRESHOLD: usize = 1 << 18;

fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

impl Backend for Cpu {
    fn name(&self) -> &'static str {
        "cpu"
    }

    fn matmul(&self, out: &mut [f32], a: &[f32], b: &[f32], mm: MatMul) {
        let MatMul { m, k, n, trans_a, trans_b, accumulate } = mm;
        // These bounds make the raw-pointer product below sound; the engine computes every
        // shape itself, so a failure here is an engine bug, never user input.
        assert!(out.len() >= m * n && a.len() >= m * k && b.len() >= k * n, "matmul shape");
        if m == 0 || n == 0 {
            return;
        }
        if k == 0 {
            if !accumulate {
                out[..m * n].fill(0.0);
            }
            return;
        }
        let (a_rs, a_cs) = if trans_a { (1, m as isize) } else { (k as isize, 1) };
        let (b_rs, b_cs) = if trans_b { (1, k as isize) } else { (n as isize, 1) };
        let par = if m * n * k >= PAR_THRESHOLD {
            gemm::Parallelism::Rayon(rayon::current_num_threads())
        } else {
            gemm::Parallelism::None
        };
        // SAFETY: the assert above guarantees every strided access of the m×k, k×n and m×n
        // operands stays inside its slice; `out` is borrowed mutably so nothing aliases it.
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                out.as_mut_ptr(),
                1,
                n as isize,
                accumulate,
                a.as_ptr(),
                a_cs,
                a_rs,
                b.as_ptr(),
                b_cs,
                b_rs,
                1.0,
                1.0,
                false,
                false,
                false,
                par,
            );
        }
    }

    fn rmsnorm_fwd(
        &self,
        x: &[f32],
        w: &[f32],
        dim: usize,
        eps: f32,
        out: &mut [f32],
        rstd: &mut [f32],
    ) {
        out.par_chunks_mut(dim).zip(x.par_chunks(dim)).zip(rstd.par_iter_mut()).for_each(
            |((o, xr), r)| {
                let ms = xr.iter().map(|v| v * v).sum::<f32>() / dim as f32;
                let rs = 1.0 / (ms + eps).sqrt();
                *r = rs;
                for ((o, xv), wv) in o.iter_mut().zip(xr).zip(w) {
                    *o = xv * rs * wv;
                }
            },
        );
    }

    fn rmsnorm_bwd(
        &self,
        dy: &[f32],
        x: &[f32],
        w: &[f32],
        rstd: &[f32],
        dim: usize,
        dx: &mut [f32],
    ) {
        // y = w ⊙ x·r, r = (mean(x²)+eps)^-½ ⇒ dx = r·(w⊙dy) − x·r³·mean(x ⊙ w ⊙ dy).
        dx.par_chunks_mut(dim)
            .zip(dy.par_chunks(dim))
            .zip(x.par_chunks(dim))
            .zip(rstd.par_iter())
            .for_each(|(((dxr, dyr), xr), &r)| {
                let dot: f32 = dyr.iter().zip(xr).zip(w).map(|((d, xv), wv)| d * wv * xv).sum();
                let c = dot * r * r * r / dim as f32;
                for (((o, d), xv), wv) in dxr.iter_mut().zip(dyr).zip(xr).zip(w) {
                    *o = d * wv * r - xv * c;
                }
            });
    }

    fn rope(
        &self,
        x: &mut [f32],
        n_heads: usize,
        head_dim: usize,
        table: &RopeTable,
        inverse: bool,
    ) {
        let half = table.half;
        let sign = if inverse { -1.0 } else { 1.0 };
        x.par_chunks_mut(n_heads * head_dim).enumerate().for_each(|(t, row)| {
            let cos = &table.cos[t * half..(t + 1) * half];
            let sin = &table.sin[t * half..(t + 1) * half];
            for head in row.chunks_mut(head_dim) {
                let (x1, x2) = head.split_at_mut(half);
                for i in 0..half {
                    let (a, b) = (x1[i], x2[i]);
                    let s = sign * sin[i];
                    x1[i] = a * cos[i] - b * s;
                    x2[i] = b * cos[i] + a * s;
                }
            }
        });
    }

    fn swiglu_fwd(&self, g: &[f32], u: &[f32], out: &mut [f32]) {
        out.par_iter_mut().zip(g.par_iter()).zip(u.par_iter()).for_each(|((o, &gv), &uv)| {
            *o = silu(gv) * uv;
        });
    }

    fn swiglu_bwd(&self, dout: &[f32], g: &[f32], u: &[f32], dg: &mut [f32], du: &mut [f32]) {
        dg.par_iter_mut().zip(du.par_iter_mut()).enumerate().for_each(|(i, (dgv, duv))| {
            let gv = g[i];
            let sig = 1.0 / (1.0 + (-gv).exp());
            *duv = dout[i] * gv * sig;
            *dgv = dout[i] * u[i] * sig * (1.0 + gv * (1.0 - sig));
        });
    }

    fn attention_fwd(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        s: AttnShape,
        out: &mut [f32],
        lse: &mut [f32],
    ) {
        let AttnShape { n_q, n_k, n_heads, n_kv_heads, head_dim: hd } = s;
        let group = n_heads / n_kv_heads.max(1);
        let past = n_k - n_q;
        let scale = 1.0 / (hd as f32).sqrt();
        // One task per query head writes its own [n_q, hd] block; scattered afterwards so the
        // result does not depend on scheduling.
        let per_head: Vec<(Vec<f32>, Vec<f32>)> = (0..n_heads)
            .into_par_iter()
            .map(|h| {
                let kvh = h / group;
                let mut o = vec![0.0f32; n_q * hd];
                let mut l = vec![0.0f32; n_q];
                let mut scores = vec![0.0f32; n_k];
                for i in 0..n_q {
                    let qi = &q[(i * n_heads + h) * hd..][..hd];
                    let last = past + i;
                    let mut mx = f32::NEG_INFINITY;
                    for (j, sc) in scores.iter_mut().enumerate().take(last + 1) {
                        let kj = &k[(j * n_kv_heads + kvh) * hd..][..hd];
                        let d: f32 = qi.iter().zip(kj).map(|(a, b)| a * b).sum::<f32>() * scale;
                        *sc = d;
                        mx = mx.max(d);
                    }
                    let mut sum = 0.0f32;
                    let oi = &mut o[i * hd..(i + 1) * hd];
                    for (j, sc) in scores.iter().enumerate().take(last + 1) {
                        let p = (sc - mx).exp();
                        sum += p;
                        let vj = &v[(j * n_kv_heads + kvh) * hd..][..hd];
                        for (ov, vv) in oi.iter_mut().zip(vj) {
                            *ov += p * vv;
                        }
                    }
                    for ov in oi.iter_mut() {
                        *ov /= sum;
                    }
                    l[i] = mx + sum.ln();
                }
                (o, l)
            })
            .collect();
        for (h, (o, l)) in per_head.iter().enumerate() {
            for i in 0..n_q {
                out[(i * n_heads + h) * hd..][..hd].copy_from_slice(&o[i * hd..(i + 1) * hd]);
            }
            lse[h * n_q..(h + 1) * n_q].copy_from_slice(l);
        }
    }

    fn attention_bwd(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        out: &[f32],
        lse: &[f32],
        dout: &[f32],
        s: AttnShape,
        dq: &mut [f32],
        dk: &mut [f32],
        dv: &mut [f32],
    ) {
        let AttnShape { n_q, n_k, n_heads, n_kv_heads, head_dim: hd } = s;
        let group = n_heads / n_kv_heads.max(1);
        let past = n_k - n_q;
        let scale = 1.0 / (hd as f32).sqrt();
        // One task per query head computes its dq and its partial dk/dv; the partials of the
        // heads sharing a kv head are then summed in head order (deterministic, and parallel
        // even when there are only one or two kv heads).
        type Grads = (Vec<f32>, Vec<f32>, Vec<f32>);
        let per_head: Vec<Grads> = (0..n_heads)
            .into_par_iter()
            .map(|h| {
                let kvh = h / group;
                let mut dqh = vec![0.0f32; n_q * hd];
                let mut dkh = vec![0.0f32; n_k * hd];
                let mut dvh = vec![0.0f32; n_k * hd];
                for i in 0..n_q {
                    let qi = &q[(i * n_heads + h) * hd..][..hd];
                    let oi = &out[(i * n_heads + h) * hd..][..hd];
                    let doi = &dout[(i * n_heads + h) * hd..][..hd];
                    let l = lse[h * n_q + i];
                    let dsum: f32 = doi.iter().zip(oi).map(|(a, b)| a * b).sum();
                    let dqi = &mut dqh[i * hd..(i + 1) * hd];
                    for j in 0..=past + i {
                        let kj = &k[(j * n_kv_heads + kvh) * hd..][..hd];
                        let vj = &v[(j * n_kv_heads + kvh) * hd..][..hd];
                        let sc: f32 = qi.iter().zip(kj).map(|(a, b)| a * b).sum::<f32>() * scale;
                        let p = (sc - l).exp();
                        let dp: f32 = doi.iter().zip(vj).map(|(a, b)| a * b).sum();
                        let ds = p * (dp - dsum) * scale;
                        for (d, kv) in dqi.iter_mut().zip(kj) {
                            *d += ds * kv;
                        }
                        let dkj = &mut dkh[j * hd..(j + 1) * hd];
                        for (d, qv) in dkj.iter_mut().zip(qi) {
                            *d += ds * qv;
                        }
                        let dvj = &mut dvh[j * hd..(j + 1) * hd];
                        for (d, g) in dvj.iter_mut().zip(doi) {
                            *d += p * g;
                        }
                    }
                }
                (dqh, dkh, dvh)
            })
            .collect();
        dk.fill(0.0);
        dv.fill(0.0);
        for (h, (dqh, dkh, dvh)) in per_head.iter().enumerate() {
            let kvh = h / group;
            for i in 0..n_q {
                dq[(i * n_heads + h) * hd..][..hd].copy_from_slice(&dqh[i * hd..(i + 1) * hd]);
            }
            for j in 0..n_k {
                let at = (j * n_kv_heads + kvh) * hd;
                for (d, s) in dk[at..at + hd].iter_mut().zip(&dkh[j * hd..(j + 1) * hd]) {
                    *d += s;
                }
                for (d, s) in dv[at..at + hd].iter_mut().zip(&dvh[j * hd..(j + 1) * hd]) {
                    *d += s;
                }
            }
        }
    }
}
