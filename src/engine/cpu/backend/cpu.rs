//! CPU backend: `gemm` for matrix products, rayon over rows/heads for the fused ops.

use rayon::prelude::*;

use super::profile::{Kind, span};
use super::{AttnShape, MatMul, Qkv, RopeTable, Strides};

/// The CPU backend (stateless).
#[derive(Debug, Clone, Copy, Default)]
pub struct Cpu;

/// Below this many multiply-adds a product runs on the calling thread.
const PAR_THRESHOLD: usize = 1 << 18;

/// Elements per parallel task of the element-wise kernels (big enough to amortise scheduling).
const ELEM_CHUNK: usize = 1 << 14;

/// What both attention passes derive from the shape.
struct AttnGeom {
    /// Query heads per kv head.
    group: usize,
    /// Cached positions before the queries.
    past: usize,
    /// Softmax scale, 1/sqrt(head_dim).
    scale: f32,
    /// Row strides of q (and out, dout) and of k / v.
    q_rs: usize,
    kv_rs: usize,
}

impl AttnGeom {
    fn of(s: AttnShape) -> Self {
        let hd = s.head_dim;
        AttnGeom {
            group: s.n_heads / s.n_kv_heads.max(1),
            past: s.n_k - s.n_q,
            scale: 1.0 / (hd as f32).sqrt(),
            q_rs: s.n_heads * hd,
            kv_rs: s.n_kv_heads * hd,
        }
    }
}

/// The kernels. All tensors are row-major f32 slices; shapes are given explicitly and checked by
/// the implementation (a mismatch is a programming error inside the engine, not user input).
impl Cpu {
    /// `out (+)= op(a) · op(b)`, `out` and `b` contiguous.
    pub fn matmul(&self, out: &mut [f32], a: &[f32], b: &[f32], mm: MatMul) {
        let ld = Strides { out: mm.n, b: if mm.trans_b { mm.k } else { mm.n } };
        self.matmul_ld(out, a, b, mm, ld)
    }

    /// `out (+)= op(a) · op(b)` where `out` and the stored `b` are blocks of wider row-major
    /// matrices (row strides in `ld`): the weight panels of `cpu::wmatmul`.
    pub fn matmul_ld(&self, out: &mut [f32], a: &[f32], b: &[f32], mm: MatMul, ld: Strides) {
        let _t = span(Kind::Matmul);
        let MatMul { m, k, n, trans_a, trans_b, accumulate } = mm;
        if m == 0 || n == 0 {
            return;
        }
        // These bounds make the raw-pointer product below sound; the engine computes every
        // shape itself, so a failure here is an engine bug, never user input.
        let (ld_out, ld_b) = (ld.out, ld.b);
        let (b_rows, b_cols) = if trans_b { (n, k) } else { (k, n) };
        assert!(
            ld_out >= n
                && out.len() >= (m - 1) * ld_out + n
                && a.len() >= m * k
                && ld_b >= b_cols
                && (b_rows == 0 || b.len() >= (b_rows - 1) * ld_b + b_cols),
            "matmul shape"
        );
        if k == 0 {
            if !accumulate {
                out.chunks_mut(ld_out).take(m).for_each(|r| r[..n].fill(0.0));
            }
            return;
        }
        let (a_rs, a_cs) = if trans_a { (1, m as isize) } else { (k as isize, 1) };
        let (b_rs, b_cs) = if trans_b { (1, ld_b as isize) } else { (ld_b as isize, 1) };
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
                ld_out as isize,
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

    /// RMSNorm over rows of width `dim`: `out = x / sqrt(mean(x²) + eps) * w`; saves `rstd` per row.
    pub fn rmsnorm_fwd(
        &self,
        x: &[f32],
        w: &[f32],
        dim: usize,
        eps: f32,
        out: &mut [f32],
        rstd: &mut [f32],
    ) {
        let _t = span(Kind::Norm);
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

    /// Gradient of `rmsnorm_fwd` w.r.t. `x` (the weight is frozen).
    pub fn rmsnorm_bwd(
        &self,
        dy: &[f32],
        x: &[f32],
        w: &[f32],
        rstd: &[f32],
        dim: usize,
        dx: &mut [f32],
    ) {
        let _t = span(Kind::Norm);
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

    /// Rotary embedding in place on `x` `[rows, n_heads, head_dim]` (rotate-half layout), row
    /// `t` using table row `t`. `inverse` rotates by the negative angle (the backward pass).
    pub fn rope(
        &self,
        x: &mut [f32],
        n_heads: usize,
        head_dim: usize,
        table: &RopeTable,
        inverse: bool,
    ) {
        let _t = span(Kind::Rope);
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

    /// `out = silu(g) * u`.
    pub fn swiglu_fwd(&self, g: &[f32], u: &[f32], out: &mut [f32]) {
        let _t = span(Kind::Swiglu);
        out.par_chunks_mut(ELEM_CHUNK)
            .zip(g.par_chunks(ELEM_CHUNK))
            .zip(u.par_chunks(ELEM_CHUNK))
            .for_each(|((o, g), u)| {
                for ((o, &gv), &uv) in o.iter_mut().zip(g).zip(u) {
                    *o = gv / (1.0 + fast_exp(-gv)) * uv;
                }
            });
    }

    /// Gradients of `swiglu_fwd` w.r.t. `g` and `u`.
    pub fn swiglu_bwd(&self, dout: &[f32], g: &[f32], u: &[f32], dg: &mut [f32], du: &mut [f32]) {
        let _t = span(Kind::Swiglu);
        dg.par_chunks_mut(ELEM_CHUNK)
            .zip(du.par_chunks_mut(ELEM_CHUNK))
            .zip(dout.par_chunks(ELEM_CHUNK))
            .zip(g.par_chunks(ELEM_CHUNK).zip(u.par_chunks(ELEM_CHUNK)))
            .for_each(|(((dg, du), dout), (g, u))| {
                for ((dgv, duv), ((&d, &gv), &uv)) in
                    dg.iter_mut().zip(du.iter_mut()).zip(dout.iter().zip(g).zip(u))
                {
                    let sig = 1.0 / (1.0 + fast_exp(-gv));
                    *duv = d * gv * sig;
                    *dgv = d * uv * sig * (1.0 + gv * (1.0 - sig));
                }
            });
    }

    /// Causal softmax attention of one sequence, scale `1/sqrt(head_dim)`, grouped-query heads.
    /// Writes `out` `[n_q, n_heads, head_dim]` and the per-row log-sum-exp `lse` `[n_heads, n_q]`.
    pub fn attention_fwd(&self, x: Qkv, s: AttnShape, out: &mut [f32], lse: &mut [f32]) {
        let _t = span(Kind::Attention);
        let Qkv { q, k, v } = x;
        let AttnShape { n_q, n_k, n_heads, head_dim: hd, .. } = s;
        let AttnGeom { group, past, scale, q_rs, kv_rs } = AttnGeom::of(s);
        // One task per query head writes its own [n_q, hd] block (scattered afterwards so the
        // result does not depend on scheduling); queries in tiles so the score buffer is
        // [Q_BLOCK, n_k], never [n_q, n_k] per head.
        let per_head: Vec<(Vec<f32>, Vec<f32>)> = (0..n_heads)
            .into_par_iter()
            .map(|h| {
                let kvh = h / group;
                let (qh, kh, vh) = (&q[h * hd..], &k[kvh * hd..], &v[kvh * hd..]);
                let mut o = vec![0.0f32; n_q * hd];
                let mut l = vec![0.0f32; n_q];
                let mut p = vec![0.0f32; Q_BLOCK.min(n_q) * n_k];
                for i0 in (0..n_q).step_by(Q_BLOCK) {
                    let bq = Q_BLOCK.min(n_q - i0);
                    let nk = past + i0 + bq;
                    let pt = &mut p[..bq * nk];
                    let t = Tile { bq, nk, hd, kv_rs };
                    // S = scale · Q_tile · K[..nk]ᵀ
                    t.against_kv(pt, mat(&qh[i0 * q_rs..], q_rs, 1), kh, scale);
                    for (i, row) in pt.chunks_mut(nk).enumerate() {
                        let valid = past + i0 + i + 1;
                        let (live, masked) = row.split_at_mut(valid);
                        let m = live.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                        let sum = exp_shift(live, m);
                        let inv = 1.0 / sum;
                        live.iter_mut().for_each(|x| *x *= inv);
                        masked.fill(0.0);
                        l[i0 + i] = m + sum.ln();
                    }
                    // O_tile = P · V[..nk]
                    t.mix_kv(&mut o[i0 * hd..], pt, vh);
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

    /// Backward of `attention_fwd` (probabilities recomputed from `lse`); overwrites dq, dk, dv.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_bwd(
        &self,
        x: Qkv,
        out: &[f32],
        lse: &[f32],
        dout: &[f32],
        s: AttnShape,
        dq: &mut [f32],
        dk: &mut [f32],
        dv: &mut [f32],
    ) {
        let _t = span(Kind::Attention);
        let Qkv { q, k, v } = x;
        let AttnShape { n_q, n_k, n_heads, n_kv_heads, head_dim: hd } = s;
        let AttnGeom { group, past, scale, q_rs, kv_rs } = AttnGeom::of(s);
        // One task per query head computes its dq and its partial dk/dv; the partials of the
        // heads sharing a kv head are then summed in head order (deterministic, and parallel
        // even when there are only one or two kv heads).
        type Grads = (Vec<f32>, Vec<f32>, Vec<f32>);
        let per_head: Vec<Grads> = (0..n_heads)
            .into_par_iter()
            .map(|h| {
                let kvh = h / group;
                let (qh, kh, vh) = (&q[h * hd..], &k[kvh * hd..], &v[kvh * hd..]);
                let (oh, doh) = (&out[h * hd..], &dout[h * hd..]);
                let mut dqh = vec![0.0f32; n_q * hd];
                let mut dkh = vec![0.0f32; n_k * hd];
                let mut dvh = vec![0.0f32; n_k * hd];
                let cap = Q_BLOCK.min(n_q) * n_k;
                let (mut p, mut dp) = (vec![0.0f32; cap], vec![0.0f32; cap]);
                for i0 in (0..n_q).step_by(Q_BLOCK) {
                    let bq = Q_BLOCK.min(n_q - i0);
                    let nk = past + i0 + bq;
                    let (pt, dpt) = (&mut p[..bq * nk], &mut dp[..bq * nk]);
                    let q_t = mat(&qh[i0 * q_rs..], q_rs, 1);
                    let do_t = mat(&doh[i0 * q_rs..], q_rs, 1);
                    let t = Tile { bq, nk, hd, kv_rs };
                    t.against_kv(pt, q_t, kh, scale);
                    // dP = dO_tile · V[..nk]ᵀ
                    t.against_kv(dpt, do_t, vh, 1.0);
                    for (i, (row, drow)) in pt.chunks_mut(nk).zip(dpt.chunks_mut(nk)).enumerate() {
                        let r = i0 + i;
                        let valid = past + r + 1;
                        let l = lse[h * n_q + r];
                        let o_r = &oh[r * q_rs..][..hd];
                        let do_r = &doh[r * q_rs..][..hd];
                        let dsum: f32 = o_r.iter().zip(do_r).map(|(a, b)| a * b).sum();
                        exp_shift(&mut row[..valid], l);
                        for (x, d) in row[..valid].iter().zip(drow[..valid].iter_mut()) {
                            *d = *x * (*d - dsum) * scale;
                        }
                        row[valid..].fill(0.0);
                        drow[valid..].fill(0.0);
                    }
                    let (pt, dst) = (&*pt, &*dpt);
                    // dQ_tile = dS · K[..nk]; dK[..nk] += dSᵀ · Q_tile; dV[..nk] += Pᵀ · dO_tile.
                    t.mix_kv(&mut dqh[i0 * hd..], dst, kh);
                    gemm_st(nk, hd, bq, &mut dkh, hd, true, mat(dst, 1, nk), q_t, 1.0);
                    gemm_st(nk, hd, bq, &mut dvh, hd, true, mat(pt, 1, nk), do_t, 1.0);
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

/// Query rows per attention tile.
pub(crate) const Q_BLOCK: usize = 64;

/// A strided read-only matrix view: element `(i, j)` is `d[i·rs + j·cs]`.
#[derive(Clone, Copy)]
struct Mat<'a> {
    d: &'a [f32],
    rs: usize,
    cs: usize,
}

fn mat(d: &[f32], rs: usize, cs: usize) -> Mat<'_> {
    Mat { d, rs, cs }
}

/// One query tile of one head: `bq` query rows against the first `nk` keys, rows `hd` wide,
/// the kv head's rows `kv_rs` apart in the packed K/V.
#[derive(Clone, Copy)]
struct Tile {
    bq: usize,
    nk: usize,
    hd: usize,
    kv_rs: usize,
}

impl Tile {
    /// `dst[bq, nk] = beta · x[bq, hd] · KV[..nk]ᵀ`: the scores from Q and K, or dP from dO
    /// and V.
    fn against_kv(self, dst: &mut [f32], x: Mat, kv: &[f32], beta: f32) {
        let Tile { bq, nk, hd, kv_rs } = self;
        gemm_st(bq, nk, hd, dst, nk, false, x, mat(kv, 1, kv_rs), beta);
    }

    /// `dst[bq, hd] = p[bq, nk] · KV[..nk]`: the output from P and V, or dQ from dS and K.
    fn mix_kv(self, dst: &mut [f32], p: &[f32], kv: &[f32]) {
        let Tile { bq, nk, hd, kv_rs } = self;
        gemm_st(bq, hd, nk, dst, hd, false, mat(p, nk, 1), mat(kv, kv_rs, 1), 1.0);
    }
}

/// Whether an `r × c` view with strides `(rs, cs)` stays inside `len` elements.
fn fits(len: usize, r: usize, c: usize, rs: usize, cs: usize) -> bool {
    r == 0 || c == 0 || (r - 1) * rs + (c - 1) * cs < len
}

/// Single-threaded strided product `dst[m,n] (+)= beta · a[m,k] · b[k,n]` (`dst` row stride
/// `dst_rs`, unit column stride): the attention tiles, already parallel over heads.
#[allow(clippy::too_many_arguments)]
fn gemm_st(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_rs: usize,
    acc: bool,
    a: Mat,
    b: Mat,
    beta: f32,
) {
    // These bounds make the raw-pointer product below sound; every shape is computed by the
    // attention code itself, so a failure is an engine bug, never user input.
    assert!(
        fits(dst.len(), m, n, dst_rs, 1)
            && fits(a.d.len(), m, k, a.rs, a.cs)
            && fits(b.d.len(), k, n, b.rs, b.cs),
        "attention gemm shape"
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !acc {
            dst.chunks_mut(dst_rs).take(m).for_each(|r| r[..n].fill(0.0));
        }
        return;
    }
    // SAFETY: `fits` above bounds every strided access of the three operands inside their
    // slices; `dst` is borrowed mutably so it aliases neither input.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            acc,
            a.d.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.d.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            1.0,
            beta,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// `exp(x)` for `x ≤ 88` to within a few ulp, branch-free so loops over it vectorise: `2ⁿ·eʳ` with
/// `n = round(x·log₂e)` and a degree-7 Taylor polynomial for `|r| ≤ ln2/2`. Inputs below −87
/// give ~1e-38 instead of a denormal or zero (harmless in a softmax sum).
#[inline(always)]
pub(crate) fn fast_exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // 1.5·2²³: adding it rounds to an integer held in the low mantissa bits.
    const MAGIC: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let t = x * LOG2E + MAGIC;
    let n = t - MAGIC;
    let ni = (t.to_bits() as i32).wrapping_sub(0x4B40_0000);
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    f32::from_bits(((ni + 127) << 23) as u32) * p
}

/// `row[j] = exp(row[j] − m)` and their sum (eight partial sums).
#[inline(always)]
fn exp_shift_body(row: &mut [f32], m: f32) -> f32 {
    let mut acc = [0.0f32; 8];
    let mut it = row.chunks_exact_mut(8);
    for c in &mut it {
        for (x, a) in c.iter_mut().zip(acc.iter_mut()) {
            *x = fast_exp(*x - m);
            *a += *x;
        }
    }
    let mut s = 0.0f32;
    for x in it.into_remainder() {
        *x = fast_exp(*x - m);
        s += *x;
    }
    s + acc.iter().sum::<f32>()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn exp_shift_avx2(row: &mut [f32], m: f32) -> f32 {
    exp_shift_body(row, m)
}

/// `row[j] = exp(row[j] − m)`, returning `Σ row[j]` (the softmax numerators of a row); uses
/// AVX2 when the CPU has it (the crate is built for baseline x86-64).
pub(crate) fn exp_shift(row: &mut [f32], m: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the features the function is compiled for were just detected on this CPU.
        return unsafe { exp_shift_avx2(row, m) };
    }
    exp_shift_body(row, m)
}
