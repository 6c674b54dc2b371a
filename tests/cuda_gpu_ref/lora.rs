//! The segmented LoRA kernels against a naive f64 reference: three segments of one call with
//! different ranks and scales, one of them without a LoRA (its rows must come out untouched),
//! the forward (shrink, expand), the backward (shrink on dy, expand into dx, both weight
//! gradients), the same on column windows of wider rows (a fused projection's layout), a call
//! on a row window (`row_off`) and one on a column window of B (`col0`, as the output head's
//! vocabulary chunks use it).

use anyhow::Result;
use cudarc::driver::{CudaSlice, DevicePtr};
use twinkle::engine::cuda::CudaDevice;
use twinkle::engine::cuda::launch::{self as k, LoraSegs, LoraTensor, SegCall};

use super::super::{Rng, TestT, close_scaled, down, rt, up, up32};

/// One segment of the test call: rows, and (rank, scale) when it has a LoRA.
struct Seg {
    rows: std::ops::Range<usize>,
    lora: Option<(usize, f64)>,
}

/// A segment's host tensors.
struct Host {
    a: Vec<f64>,
    b: Vec<f64>,
}

pub fn segmented<T: TestT>(dev: &CudaDevice) -> Result<()> {
    let s = dev.stream();
    let mut r = Rng(17);
    let (n, kin, jout, hs) = (37, 96, 80, 8);
    let segs = [
        Seg { rows: 0..13, lora: Some((8, 2.0)) },
        Seg { rows: 13..20, lora: None },
        Seg { rows: 20..37, lora: Some((4, 0.5)) },
    ];
    let host: Vec<Option<Host>> = segs
        .iter()
        .map(|g| g.lora.map(|(rk, _)| Host { a: r.vec(rk * kin, 0.5), b: r.vec(jout * rk, 0.5) }))
        .collect();
    let x = rt::<T>(&r.vec(n * kin, 1.0));
    let y0 = rt::<T>(&r.vec(n * jout, 1.0));
    let dy = rt::<T>(&r.vec(n * jout, 1.0));
    let seg_of = |row: usize| segs.iter().position(|g| g.rows.contains(&row)).unwrap_or(0);

    // naive references; h / dh only where the row's segment has rank > k
    let (mut h, mut dh) = (vec![0.0; n * hs], vec![0.0; n * hs]);
    let (mut y, mut dx) = (y0.clone(), vec![0.0; n * kin]);
    let mut grads: Vec<(Vec<f64>, Vec<f64>)> = host
        .iter()
        .map(|hst| {
            hst.as_ref().map_or((vec![], vec![]), |t| (vec![0.0; t.a.len()], vec![0.0; t.b.len()]))
        })
        .collect();
    let mut valid = vec![false; n * hs];
    for row in 0..n {
        let si = seg_of(row);
        let (Some((rk, sc)), Some(t)) = (segs[si].lora, host[si].as_ref()) else { continue };
        for kk in 0..rk {
            valid[row * hs + kk] = true;
            h[row * hs + kk] = (0..kin).map(|j| x[row * kin + j] * t.a[kk * kin + j]).sum();
            dh[row * hs + kk] =
                sc * (0..jout).map(|o| dy[row * jout + o] * t.b[o * rk + kk]).sum::<f64>();
        }
        for o in 0..jout {
            y[row * jout + o] +=
                sc * (0..rk).map(|kk| h[row * hs + kk] * t.b[o * rk + kk]).sum::<f64>();
        }
        for i in 0..kin {
            dx[row * kin + i] = (0..rk).map(|kk| dh[row * hs + kk] * t.a[kk * kin + i]).sum();
        }
        let (ga, gb) = &mut grads[si];
        for kk in 0..rk {
            for i in 0..kin {
                ga[kk * kin + i] += dh[row * hs + kk] * x[row * kin + i];
            }
            for o in 0..jout {
                gb[o * rk + kk] += sc * dy[row * jout + o] * h[row * hs + kk];
            }
        }
    }

    // device tensors and the table (A, B, dA, dB, rank, scale bits per segment)
    let mut dev_t: Vec<Option<[CudaSlice<f32>; 4]>> = Vec::new();
    for t in &host {
        dev_t.push(match t {
            Some(t) => Some([
                up32(s, &t.a)?,
                up32(s, &t.b)?,
                s.alloc_zeros::<f32>(t.a.len())?,
                s.alloc_zeros::<f32>(t.b.len())?,
            ]),
            None => None,
        });
    }
    let mut tab = Vec::new();
    for (g, d) in segs.iter().zip(&dev_t) {
        match (g.lora, d) {
            (Some((rk, sc)), Some(d)) => {
                tab.extend(d.iter().map(|b| b.device_ptr(s).0));
                tab.extend([rk as u64, u64::from((sc as f32).to_bits())]);
            }
            _ => tab.extend([0u64; 6]),
        }
    }
    let bounds = [0usize, 13, 20, 37];
    let ranks: Vec<usize> = segs.iter().map(|g| g.lora.map_or(0, |l| l.0)).collect();
    let tab_d = s.clone_htod(&tab)?;
    let seg_d = s.clone_htod(&bounds.iter().map(|&b| b as i32).collect::<Vec<_>>())?;
    let ls = LoraSegs {
        tab: tab_d.as_view(),
        seg: seg_d.as_view(),
        bounds: &bounds,
        ranks: &ranks,
        dims: (kin, jout),
    };
    let call = |dim| SegCall::compact(0..n, dim, hs, 0);
    let pick = |v: &[f64]| v.iter().zip(&valid).filter(|p| *p.1).map(|p| *p.0).collect::<Vec<_>>();

    let (dx_in, dy_in) = (up::<T>(s, &x)?, up::<T>(s, &dy)?);
    let mut gh = s.alloc_zeros::<f32>(n * hs)?;
    let mut gy = up::<T>(s, &y0)?;
    let mut gdh = s.alloc_zeros::<f32>(n * hs)?;
    let mut gdx = s.alloc_zeros::<T>(n * kin)?;
    let (ci, co) = (call(kin), call(jout));
    // SAFETY (every `run` below): the table addresses the live tensors of `dev_t`, with the
    // ranks and dims of `ls`.
    fn run<T: TestT>(
        dev: &CudaDevice,
        ls: &LoraSegs<'_>,
        op: k::SegOp<'_, '_, '_, T>,
        w: LoraTensor,
        c: &SegCall,
    ) -> Result<()> {
        unsafe { k::lora_seg(dev, op, ls, w, c) }?;
        Ok(())
    }
    /// Forward (h = x A^T, y += s h B^T) and backward (dh = s dy B, dx += dh A, dA += dh^T x,
    /// dB += s dy^T h) of the segmented LoRA, A's side over `ci` and B's over `co`.
    fn pass<T: TestT>(
        dev: &CudaDevice,
        ls: &LoraSegs<'_>,
        (x, dy): (&CudaSlice<T>, &CudaSlice<T>),
        (h, y): (&mut CudaSlice<f32>, &mut CudaSlice<T>),
        (dh, dx): (&mut CudaSlice<f32>, &mut CudaSlice<T>),
        (ci, co): (&SegCall, &SegCall),
    ) -> Result<()> {
        use k::SegOp::{Expand, Shrink, Wgrad};
        let (xv, dyv) = (x.as_view(), dy.as_view());
        run(dev, ls, Shrink { h: &mut h.as_view_mut(), x: &xv }, LoraTensor::A, ci)?;
        run(dev, ls, Expand { y: &mut y.as_view_mut(), h: &h.as_view() }, LoraTensor::B, co)?;
        run(dev, ls, Shrink { h: &mut dh.as_view_mut(), x: &dyv }, LoraTensor::B, co)?;
        run(dev, ls, Expand { y: &mut dx.as_view_mut(), h: &dh.as_view() }, LoraTensor::A, ci)?;
        run(dev, ls, Wgrad { u: &dh.as_view(), v: &xv }, LoraTensor::GradA, ci)?;
        run(dev, ls, Wgrad { u: &h.as_view(), v: &dyv }, LoraTensor::GradB, co)
    }
    pass(dev, &ls, (&dx_in, &dy_in), (&mut gh, &mut gy), (&mut gdh, &mut gdx), (&ci, &co))?;
    close_scaled("seg lora h", &pick(&down(s, &gh)?), &pick(&h), T::TOL);
    // rows 13..20 have no LoRA: y keeps y0 there, dx stays 0, exactly
    close_scaled("seg lora y", &down(s, &gy)?, &y, T::TOL);
    let gy_h = down(s, &gy)?;
    assert_eq!(
        &gy_h[13 * jout..20 * jout],
        &y0[13 * jout..20 * jout],
        "a row without LoRA changed"
    );
    close_scaled("seg lora dh", &pick(&down(s, &gdh)?), &pick(&dh), T::TOL);
    close_scaled("seg lora dx", &down(s, &gdx)?, &dx, T::TOL);
    for (si, d) in dev_t.iter().enumerate() {
        let Some(d) = d else { continue };
        close_scaled("seg lora dA", &down(s, &d[2])?, &grads[si].0, T::TOL);
        close_scaled("seg lora dB", &down(s, &d[3])?, &grads[si].1, T::TOL);
    }

    // the same calls on column windows of wider rows (a fused projection's layout: x and dx
    // at columns 3.. of rows kin + 7 wide, y and dy at columns 4.. of rows jout + 9 wide) give
    // bit-identical results and leave the other columns alone
    let grads1: Vec<Option<[Vec<f64>; 2]>> = dev_t
        .iter()
        .map(|d| d.as_ref().map(|d| Ok::<_, anyhow::Error>([down(s, &d[2])?, down(s, &d[3])?])))
        .map(Option::transpose)
        .collect::<Result<_>>()?;
    let (kw, ko, jw, jo) = (kin + 7, 3, jout + 9, 4);
    let embed = |src: &[f64], dim: usize, ld: usize, off: usize, junk: &[f64]| -> Vec<f64> {
        let mut out = junk.to_vec();
        for i in 0..n {
            out[i * ld + off..i * ld + off + dim].copy_from_slice(&src[i * dim..(i + 1) * dim]);
        }
        out
    };
    let (junk_k, junk_j) = (rt::<T>(&r.vec(n * kw, 3.0)), rt::<T>(&r.vec(n * jw, 3.0)));
    let xw_h = embed(&x, kin, kw, ko, &junk_k);
    let dxw_h = embed(&vec![0.0; n * kin], kin, kw, ko, &junk_k);
    let (yw_h, dyw_h) = (embed(&y0, jout, jw, jo, &junk_j), embed(&dy, jout, jw, jo, &junk_j));
    let (xw, dyw) = (up::<T>(s, &xw_h)?, up::<T>(s, &dyw_h)?);
    let (mut yw_d, mut dxw) = (up::<T>(s, &yw_h)?, up::<T>(s, &dxw_h)?);
    let (mut gh2, mut gdh2) = (s.alloc_zeros::<f32>(n * hs)?, s.alloc_zeros::<f32>(n * hs)?);
    let (wi, wo) = (call(kin).window(kw, ko), call(jout).window(jw, jo));
    pass(dev, &ls, (&xw, &dyw), (&mut gh2, &mut yw_d), (&mut gdh2, &mut dxw), (&wi, &wo))?;
    let pick_bits = |v: Vec<f64>| pick(&v).iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(pick_bits(down(s, &gh2)?), pick_bits(down(s, &gh)?), "windowed shrink (h)");
    assert_eq!(pick_bits(down(s, &gdh2)?), pick_bits(down(s, &gdh)?), "windowed shrink (dh)");
    let (yw_out, dxw_out) = (down(s, &yw_d)?, down(s, &dxw)?);
    assert_eq!(yw_out, embed(&down(s, &gy)?, jout, jw, jo, &junk_j), "windowed expand (y)");
    assert_eq!(dxw_out, embed(&down(s, &gdx)?, kin, kw, ko, &junk_k), "windowed expand (dx)");
    // one row tile per segment: each gradient element got one atomic add per pass, so the
    // windowed pass doubled the compact pass's gradients exactly
    for (d, g1) in dev_t.iter().zip(&grads1) {
        let (Some(d), Some(g1)) = (d, g1) else { continue };
        for (t, g) in [(&d[2], &g1[0]), (&d[3], &g1[1])] {
            let twice: Vec<f64> = g.iter().map(|v| 2.0 * v).collect();
            assert_eq!(down(s, t)?, twice, "windowed weight gradient");
        }
    }
    // a window past its row is refused
    let past = call(jout).window(jw, jw - jout + 1);
    // SAFETY: refused before any launch.
    let refused = unsafe {
        let (h, x) = (&mut gh2.as_view_mut(), &dyw.as_view());
        k::lora_seg(dev, k::SegOp::Shrink { h, x }, &ls, LoraTensor::B, &past)
    };
    anyhow::ensure!(refused.is_err(), "a window past its row was accepted");

    // a window of rows 9..30 (spans all three segments) and of columns 16..48 of B
    let (w0, w1, c0, c1) = (9usize, 30usize, 16usize, 48usize);
    let nw = w1 - w0;
    let hwin: Vec<f64> =
        (0..nw * hs).map(|i| if valid[w0 * hs + i] { h[w0 * hs + i] } else { 0.0 }).collect();
    let mut yw = s.alloc_zeros::<f32>(nw * (c1 - c0))?;
    let hw = up32(s, &hwin)?;
    let wcall = SegCall::compact(w0..w1, c1 - c0, hs, c0);
    // SAFETY: as above.
    unsafe {
        k::lora_seg::<f32>(
            dev,
            k::SegOp::Expand { y: &mut yw.as_view_mut(), h: &hw.as_view() },
            &ls,
            LoraTensor::B,
            &wcall,
        )?;
    }
    let mut want = vec![0.0; nw * (c1 - c0)];
    for (i, row) in (w0..w1).enumerate() {
        let si = seg_of(row);
        let (Some((rk, sc)), Some(t)) = (segs[si].lora, host[si].as_ref()) else { continue };
        for (j, o) in (c0..c1).enumerate() {
            want[i * (c1 - c0) + j] =
                sc * (0..rk).map(|kk| hwin[i * hs + kk] * t.b[o * rk + kk]).sum::<f64>();
        }
    }
    close_scaled("seg lora window", &down(s, &yw)?, &want, (1e-5, 1e-6));

    // a bad call is an error, not a launch: rows past the segments
    let bad = SegCall::compact(0..n + 1, kin, hs, 0);
    let mut big = s.alloc_zeros::<f32>((n + 1) * hs)?;
    let xb = s.alloc_zeros::<T>((n + 1) * kin)?;
    // SAFETY: refused before any launch.
    let refused = unsafe {
        k::lora_seg(
            dev,
            k::SegOp::Shrink { h: &mut big.as_view_mut(), x: &xb.as_view() },
            &ls,
            LoraTensor::A,
            &bad,
        )
    };
    anyhow::ensure!(refused.is_err(), "rows past the segments were accepted");
    Ok(())
}
