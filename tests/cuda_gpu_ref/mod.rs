//! Parity checks (GPU vs naive f64 CPU references) for attention, decode, LoRA, losses, AdamW
//! and sampling; included by tests/cuda_gpu.rs, which owns the harness.

pub mod decode;
pub mod epilogue;
pub mod fused;
pub mod graphs;
pub mod lora;
pub mod loss_terms;
pub mod many;
pub mod model;
pub mod runtime;
pub mod sampling;

use anyhow::Result;
use twinkle::engine::CachedGroup;
use twinkle::engine::cuda::CudaDevice;
use twinkle::engine::cuda::launch::{self as k, AdamStep, AttentionShape, LossVariant};

use super::{Rng, TestT, close, close_rms, close_scaled, down, rt, up, up32, upi};

/// One shared decode pass's groups: request `r` (of those `active` keeps) feeds `ins[r]`, one
/// token per sequence, to slots `seqs[r]` of its cache with its adapter.
pub fn decode_groups<'a, A, C>(
    ads: &'a [A],
    caches: &'a mut [C],
    seqs: &'a [Vec<usize>],
    ins: &'a [Vec<&'a [u32]>],
    active: impl Fn(usize) -> bool,
) -> Vec<CachedGroup<'a, A, C>> {
    caches
        .iter_mut()
        .enumerate()
        .filter(|(r, _)| active(*r))
        .map(|(r, cache)| CachedGroup {
            adapter: Some(&ads[r]),
            cache,
            slots: &seqs[r],
            tokens: &ins[r],
        })
        .collect()
}

/// Reference causal GQA attention for one packed batch: returns (out, lse, dq, dk, dv).
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
fn attention_ref(
    q: &[f64],
    kk: &[f64],
    v: &[f64],
    dout: &[f64],
    cu: &[i32],
    hq: usize,
    hkv: usize,
    hd: usize,
    scale: f64,
) -> (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
    let t = q.len() / (hq * hd);
    let (mut out, mut lse) = (vec![0.0; q.len()], vec![0.0; t * hq]);
    let (mut dq, mut dk, mut dv) = (vec![0.0; q.len()], vec![0.0; kk.len()], vec![0.0; v.len()]);
    let qi = |tok: usize, h: usize| (tok * hq + h) * hd;
    let ki = |tok: usize, h: usize| (tok * hkv + h) * hd;
    for b in 0..cu.len() - 1 {
        let (s0, s1) = (cu[b] as usize, cu[b + 1] as usize);
        for h in 0..hq {
            let g = h / (hq / hkv);
            for i in s0..s1 {
                let sc: Vec<f64> = (s0..=i)
                    .map(|j| {
                        scale * (0..hd).map(|d| q[qi(i, h) + d] * kk[ki(j, g) + d]).sum::<f64>()
                    })
                    .collect();
                let m = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = sc.iter().map(|s| (s - m).exp()).sum();
                let p: Vec<f64> = sc.iter().map(|s| (s - m).exp() / z).collect();
                lse[i * hq + h] = m + z.ln();
                for d in 0..hd {
                    out[qi(i, h) + d] = (s0..=i).map(|j| p[j - s0] * v[ki(j, g) + d]).sum();
                }
                let dp: Vec<f64> = (s0..=i)
                    .map(|j| (0..hd).map(|d| dout[qi(i, h) + d] * v[ki(j, g) + d]).sum())
                    .collect();
                let pdp: f64 = p.iter().zip(&dp).map(|(a, b)| a * b).sum();
                for j in s0..=i {
                    let ds = p[j - s0] * (dp[j - s0] - pdp);
                    for d in 0..hd {
                        dq[qi(i, h) + d] += scale * ds * kk[ki(j, g) + d];
                        dk[ki(j, g) + d] += scale * ds * q[qi(i, h) + d];
                        dv[ki(j, g) + d] += p[j - s0] * dout[qi(i, h) + d];
                    }
                }
            }
        }
    }
    (out, lse, dq, dk, dv)
}

pub fn attention<T: TestT>(dev: &CudaDevice, hd: usize) -> Result<()> {
    // lengths 5, 33 (crosses a 32-key tile), 17, 0
    attention_packed::<T>(dev, hd, &[0, 5, 38, 55, 55], (4, 2))
}

/// Sequences long enough for several tiles of every flash kernel (64-row query and key blocks,
/// 32-key / 32-query inner tiles): lengths 150, 5, 64 (exactly one block), 0 and 81, with a GQA
/// group of 4.
pub fn attention_long<T: TestT>(dev: &CudaDevice, hd: usize) -> Result<()> {
    attention_packed::<T>(dev, hd, &[0, 150, 155, 219, 219, 300], (8, 2))
}

fn attention_packed<T: TestT>(
    dev: &CudaDevice,
    hd: usize,
    cu: &[i32],
    (hq, hkv): (usize, usize),
) -> Result<()> {
    let s = dev.stream();
    let mut r = Rng(hd as u64 + 3 + cu.len() as u64);
    let t = *cu.last().unwrap_or(&0) as usize;
    let max_seqlen = cu.windows(2).map(|w| (w[1] - w[0]) as usize).max().unwrap_or(0);
    let scale = 1.0 / (hd as f64).sqrt();
    let q = rt::<T>(&r.vec(t * hq * hd, 1.0));
    let kk = rt::<T>(&r.vec(t * hkv * hd, 1.0));
    let v = rt::<T>(&r.vec(t * hkv * hd, 1.0));
    let dout = rt::<T>(&r.vec(t * hq * hd, 1.0));
    let (wo, wl, wdq, wdk, wdv) = attention_ref(&q, &kk, &v, &dout, cu, hq, hkv, hd, scale);
    let (dq_, dk_, dv_, dd_, dcu) =
        (up::<T>(s, &q)?, up::<T>(s, &kk)?, up::<T>(s, &v)?, up::<T>(s, &dout)?, upi(s, cu)?);
    let shape = AttentionShape {
        q_heads: hq,
        kv_heads: hkv,
        head_dim: hd,
        max_seqlen,
        scale: scale as f32,
    };
    let mut out = s.alloc_zeros::<T>(q.len())?;
    let mut lse = s.alloc_zeros::<f32>(t * hq)?;
    let (qv, kv, vv, cuv) = (dq_.as_view(), dk_.as_view(), dv_.as_view(), dcu.as_view());
    let qkv = k::Qkv { q: &qv, k: &kv, v: &vv };
    k::attention_fwd(dev, &mut out.as_view_mut(), &mut lse.as_view_mut(), qkv, &cuv, &shape)?;
    close_scaled(&format!("attention out hd{hd}"), &down(s, &out)?, &wo, T::TOL);
    close(&format!("attention lse hd{hd}"), &down(s, &lse)?, &wl, (1e-4, 1e-4));
    let (mut gq, mut gk, mut gv) =
        (s.alloc_zeros::<T>(q.len())?, s.alloc_zeros::<T>(kk.len())?, s.alloc_zeros::<T>(v.len())?);
    let (mut acc, mut delta) = (s.alloc_zeros::<f32>(q.len())?, s.alloc_zeros::<f32>(t * hq)?);
    let grads =
        k::Qkv { q: &mut gq.as_view_mut(), k: &mut gk.as_view_mut(), v: &mut gv.as_view_mut() };
    let (acc, delta) = (&mut acc.as_view_mut(), &mut delta.as_view_mut());
    let fwd = (&out.as_view(), &lse.as_view());
    k::attention_bwd(dev, grads, acc, delta, &dd_.as_view(), qkv, fwd, &cuv, &shape)?;
    let (gq, gk, gv) = (down(s, &gq)?, down(s, &gk)?, down(s, &gv)?);
    close_scaled(&format!("attention dq hd{hd}"), &gq, &wdq, T::TOL);
    close_scaled(&format!("attention dk hd{hd}"), &gk, &wdk, T::TOL);
    close_scaled(&format!("attention dv hd{hd}"), &gv, &wdv, T::TOL);
    // the error as a whole: bf16 rounding (inputs, P and dS in the tensor-core products,
    // outputs) averages out, a systematic error of 1% does not
    let o = down(s, &out)?;
    for (name, g, w) in [("out", &o, &wo), ("dq", &gq, &wdq), ("dk", &gk, &wdk), ("dv", &gv, &wdv)]
    {
        close_rms(&format!("attention {name} hd{hd}"), g, w, T::RMS_TOL);
    }
    Ok(())
}

pub fn xent<T: TestT>(dev: &CudaDevice) -> Result<()> {
    let s = dev.stream();
    let mut r = Rng(23);
    let (n, vocab, ld, kt) = (6, 300, 128, 2);
    let logits = rt::<T>(&r.vec(n * vocab, 4.0));
    let targets: Vec<i32> = vec![0, 299, 128, 127, 5, -1, 200, 200, 42, 7, 256, 1];
    let coef = r.vec(n * kt, 1.0);
    let (mut lse, mut lp, mut grad) = (vec![0.0; n], vec![0.0; n * kt], vec![0.0; n * vocab]);
    for i in 0..n {
        let row = &logits[i * vocab..(i + 1) * vocab];
        let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        lse[i] = m + row.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
        for kk in 0..kt {
            let t = targets[i * kt + kk];
            if t >= 0 {
                lp[i * kt + kk] = row[t as usize] - lse[i];
                grad[i * vocab + t as usize] -= coef[i * kt + kk];
            }
        }
        let csum: f64 =
            (0..kt).filter(|&kk| targets[i * kt + kk] >= 0).map(|kk| coef[i * kt + kk]).sum();
        for v in 0..vocab {
            grad[i * vocab + v] += csum * (row[v] - lse[i]).exp();
        }
    }
    let (dt, dcoef) = (upi(s, &targets)?, up32(s, &coef)?);
    let (mut m, mut sm, mut tg) =
        (s.alloc_zeros::<f32>(n)?, s.alloc_zeros::<f32>(n)?, s.alloc_zeros::<f32>(n * kt)?);
    let mut chunks = Vec::new();
    for (ci, v0) in (0..vocab).step_by(ld).enumerate() {
        let vc = ld.min(vocab - v0);
        let mut buf = vec![0.0; n * ld];
        for i in 0..n {
            buf[i * ld..i * ld + vc].copy_from_slice(&logits[i * vocab + v0..i * vocab + v0 + vc]);
        }
        let d = up::<T>(s, &buf)?;
        let (mv, sv, tv) = (&mut m.as_view_mut(), &mut sm.as_view_mut(), &mut tg.as_view_mut());
        let logits = k::Logits { data: &d.as_view(), ld, cols: vc };
        k::xent_fwd(dev, k::XentAcc { m: mv, s: sv, tgt: tv }, logits, v0, &dt.as_view(), ci == 0)?;
        chunks.push((v0, vc, d));
    }
    let (mut glse, mut glp) = (s.alloc_zeros::<f32>(n)?, s.alloc_zeros::<f32>(n * kt)?);
    let acc = k::XentAcc { m: &m.as_view(), s: &sm.as_view(), tgt: &tg.as_view() };
    let outs = (&mut glse.as_view_mut(), &mut glp.as_view_mut());
    k::xent_finish_fwd(dev, outs, acc, &dt.as_view())?;
    close("xent lse", &down(s, &glse)?, &lse, (1e-5, 1e-4));
    close("xent logprob", &down(s, &glp)?, &lp, (1e-5, 1e-4));
    // what both backward variants read besides the logits
    let (dtv, dcoefv, glsev) = (dt.as_view(), dcoef.as_view(), glse.as_view());
    let rows = k::XentRows { targets: &dtv, coef: &dcoefv, lse: &glsev };
    for (idx, (v0, vc, mut d)) in chunks.into_iter().enumerate() {
        let got = if idx == 0 {
            let mut out = s.alloc_zeros::<T>(n * ld)?;
            let (o, dv) = (&mut out.as_view_mut(), &d.as_view());
            k::xent_bwd(dev, (o, ld), k::Logits { data: dv, ld, cols: vc }, v0, rows)?;
            down(s, &out)?
        } else {
            k::xent_bwd_inplace(dev, (&mut d.as_view_mut(), ld), (v0, vc), rows)?;
            down(s, &d)?
        };
        for i in 0..n {
            close_scaled(
                &format!("xent dlogits row {i} chunk {idx}"),
                &got[i * ld..i * ld + vc],
                &grad[i * vocab + v0..i * vocab + v0 + vc],
                T::TOL,
            );
        }
    }
    Ok(())
}

/// (logprob, sampler logprob, advantage) -> (objective, d objective / d logprob).
type Objective = fn(f64, f64, f64) -> (f64, f64);

pub fn losses(dev: &CudaDevice) -> Result<()> {
    let s = dev.stream();
    let lp = [-1.0, -0.5, -2.0, -0.1, -3.0];
    let slp = [-1.2, -0.5, -1.0, -0.9, -2.0];
    let adv = [1.0, -1.0, 2.0, -0.5, 0.0];
    let w = [1.0, 1.0, 0.5, 1.0, 2.0];
    let (dl, ds, da, dw) = (up32(s, &lp)?, up32(s, &slp)?, up32(s, &adv)?, up32(s, &w)?);
    let cases: [(LossVariant, Objective); 4] = [
        (LossVariant::ImportanceSampling, |l, s, a| {
            let r = (l - s).exp();
            (r * a, r * a)
        }),
        (LossVariant::Ppo { clip_low: 0.8, clip_high: 1.2 }, |l, s, a| {
            let r = (l - s).exp();
            let (un, cl) = (r * a, r.clamp(0.8, 1.2) * a);
            (un.min(cl), if un <= cl || (0.8..=1.2).contains(&r) { r * a } else { 0.0 })
        }),
        (LossVariant::Cispo { clip_low: 0.0, clip_high: 4.0 }, |l, s, a| {
            let rc = (l - s).exp().clamp(0.0, 4.0);
            (rc * a * l, rc * a)
        }),
        (LossVariant::Dro { beta: 0.1 }, |l, s, a| {
            (l * a - 0.05 * (l - s) * (l - s), a - 0.1 * (l - s))
        }),
    ];
    for (variant, f) in cases {
        let (mut loss, mut coef) = (s.alloc_zeros::<f32>(5)?, s.alloc_zeros::<f32>(5)?);
        let outs = (&mut loss.as_view_mut(), &mut coef.as_view_mut());
        let rl = k::RlInputs { sampler_logprob: &ds.as_view(), advantages: &da.as_view() };
        k::loss_fwd(dev, outs, &dl.as_view(), rl, Some(&dw.as_view()), variant)?;
        let want: Vec<(f64, f64)> = (0..5).map(|i| f(lp[i], slp[i], adv[i])).collect();
        close(
            &format!("{variant:?} loss"),
            &down(s, &loss)?,
            &want.iter().enumerate().map(|(i, o)| -o.0 * w[i]).collect::<Vec<_>>(),
            (1e-5, 1e-6),
        );
        close(
            &format!("{variant:?} coef"),
            &down(s, &coef)?,
            &want.iter().enumerate().map(|(i, o)| o.1 * w[i]).collect::<Vec<_>>(),
            (1e-5, 1e-6),
        );
    }
    Ok(())
}

pub fn adamw(dev: &CudaDevice) -> Result<()> {
    let s = dev.stream();
    let mut r = Rng(31);
    let n = 1001; // vector body + scalar tail
    let mut p = r.vec(n, 1.0);
    let (mut m, mut v) = (vec![0.0; n], vec![0.0; n]);
    let (dp, mut dm, mut dv) = (up32(s, &p)?, s.alloc_zeros::<f32>(n)?, s.alloc_zeros::<f32>(n)?);
    let mut dp = dp;
    for step in 1..=3u32 {
        let g = r.vec(n, 0.1);
        let dg = up32(s, &g)?;
        let h = AdamStep {
            lr: 1e-2,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
            step,
            grad_scale: 0.5,
        };
        k::adamw_fwd(
            dev,
            &mut dp.as_view_mut(),
            &dg.as_view(),
            &mut dm.as_view_mut(),
            &mut dv.as_view_mut(),
            &h,
        )?;
        let (b1, b2, lr, wd): (f64, f64, f64, f64) = (0.9, 0.95, 1e-2, 0.1);
        for i in 0..n {
            let gi = g[i] as f32 as f64 * 0.5;
            m[i] = b1 * m[i] + (1.0 - b1) * gi;
            v[i] = b2 * v[i] + (1.0 - b2) * gi * gi;
            let (mh, vh) =
                (m[i] / (1.0 - b1.powi(step as i32)), v[i] / (1.0 - b2.powi(step as i32)));
            p[i] = p[i] * (1.0 - lr * wd) - lr * mh / (vh.sqrt() + 1e-8);
        }
    }
    close("adamw p", &down(s, &dp)?, &p, (1e-5, 1e-6));
    close("adamw m", &down(s, &dm)?, &m, (1e-5, 1e-7));
    close("adamw v", &down(s, &dv)?, &v, (1e-4, 1e-9));
    Ok(())
}

/// Greedy argmax (lowest index on ties, -0.0 == +0.0) and its logprob per row: the device
/// half of sampling (stochastic picks: `sampling::sample_parity`).
pub fn argmax<T: TestT>(dev: &CudaDevice) -> Result<()> {
    let s = dev.stream();
    let mut r = Rng(41);
    // (row, hand-derived argmax)
    let mut rows: Vec<(Vec<f64>, Option<usize>)> = vec![
        (vec![1.0, 3.0, 3.0, 2.0], Some(1)),
        (vec![-0.0, 0.0, -1.0], Some(0)),
        (vec![0.0, -0.0, -1.0], Some(0)),
        (vec![-5.0], Some(0)),
        (vec![-2.0, -1.0, -1.0, -3.0], Some(1)),
    ];
    for vocab in [1000usize, 50_000, 151_936] {
        rows.push((r.vec(vocab, 6.0), None));
    }
    for (ri, (l, expect)) in rows.iter().enumerate() {
        let l = rt::<T>(l);
        let want = (0..l.len()).fold(0, |b, i| if l[i] > l[b] { i } else { b });
        if let Some(e) = expect {
            assert_eq!(want, *e, "reference disagrees with hand-derived row {ri}");
        }
        let mx = l[want];
        let lp = -l.iter().map(|x| (x - mx).exp()).sum::<f64>().ln();
        let dl = up::<T>(s, &l)?;
        let mut out = s.alloc_zeros::<i32>(1)?;
        let mut dlp = s.alloc_zeros::<f32>(1)?;
        let (dl, n) = (dl.as_view(), l.len());
        let picks = k::Picks { token: &mut out.as_view_mut(), logprob: &mut dlp.as_view_mut() };
        k::argmax_fwd(dev, picks, k::Logits { data: &dl, ld: n, cols: n })?;
        assert_eq!(s.clone_dtoh(&out)?[0] as usize, want, "row {ri}");
        close("argmax logprob", &[s.clone_dtoh(&dlp)?[0] as f64], &[lp], (1e-6, 1e-6));
    }
    Ok(())
}
