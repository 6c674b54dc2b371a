//! The fused-projection layouts: RoPE and the q/k RMSNorm reading their heads from the fused
//! [rows, q|k|v] projection (column windows of wider rows) and writing into the fused gradient
//! give bit-identical results to the same kernels on compact tensors, never touch the columns
//! outside their windows, pad and unpad the head dim on the way (padding written as zeros,
//! never read), and refuse overlapping outputs; SwiGLU on the fused gate|up projection.

use anyhow::Result;
use cudarc::driver::CudaSlice;
use twinkle::engine::cuda::launch::{self as k, RopeDst, RopeIn, RopeShape, RowMap};
use twinkle::engine::cuda::{CudaDevice, CudaError};

use super::super::{Rng, TestT, close, down, rt, up, up32, upi};

/// Rows `n`; q, k, v heads; head dim (padded to `hdp`); the fused row: q | k | v | 8 spare.
const N: usize = 5;
const HQ: usize = 4;
const HKV: usize = 2;
const HD: usize = 24;
const HDP: usize = 32;
const LD: usize = (HQ + 2 * HKV) * HD + 8;
/// First column of q, k and v in a fused row.
const OFF: [usize; 3] = [0, HQ * HD, (HQ + HKV) * HD];
const HEADS: [usize; 3] = [HQ, HKV, HKV];

/// Tensor `t`'s [N, heads, hd] values out of a fused [N, LD] buffer.
fn extract(fused: &[f64], t: usize) -> Vec<f64> {
    let w = HEADS[t] * HD;
    (0..N).flat_map(|r| fused[r * LD + OFF[t]..r * LD + OFF[t] + w].to_vec()).collect()
}

/// [N, heads, HD] -> [N, heads, hs] (padding filled by `pad`), or back for hs < the source's.
fn reshape(x: &[f64], heads: usize, from: usize, to: usize, pad: f64) -> Vec<f64> {
    (0..N * heads)
        .flat_map(|i| (0..to).map(move |c| if c < from.min(to) { x[i * from + c] } else { pad }))
        .collect()
}

pub fn layouts<T: TestT>(dev: &CudaDevice) -> Result<()> {
    let s = dev.stream();
    let mut r = Rng(29);
    let fused = rt::<T>(&r.vec(N * LD, 1.0));
    let p = 16;
    let half = HD / 2;
    let (cos, sin): (Vec<f64>, Vec<f64>) = (0..p * half)
        .map(|i| {
            let ang = (i / half) as f64 * 10000f64.powf(-(2.0 * (i % half) as f64) / HD as f64);
            ((ang as f32).cos() as f64, (ang as f32).sin() as f64)
        })
        .unzip();
    let pos = [3, 0, 15, 7, 7];
    let (dc, dsn, dp) = (up32(s, &cos)?, up32(s, &sin)?, upi(s, &pos)?);
    let tables = (&dc.as_view(), &dsn.as_view(), &dp.as_view());
    let shape = |hs| RopeShape { n: N, heads: (HQ, HKV), hd: HD, hs };
    let d_fused = up::<T>(s, &fused)?;
    let compact: Vec<Vec<f64>> = (0..3).map(|t| extract(&fused, t)).collect();
    let d_compact = compact.iter().map(|v| up::<T>(s, v)).collect::<Result<Vec<_>>>()?;

    // Runs RoPE from `inp` into three compact outputs of head stride `hs_o`.
    let split = |dir, inp: &RopeIn<'_, '_, T>, hs: (usize, usize)| -> Result<Vec<Vec<f64>>> {
        let mut outs: Vec<CudaSlice<T>> =
            HEADS.iter().map(|&h| Ok(s.alloc_zeros::<T>(N * h * hs.1)?)).collect::<Result<_>>()?;
        let [o0, o1, o2] = &mut outs[..] else { unreachable!() };
        let (mut a, mut b, mut c) = (o0.as_view_mut(), o1.as_view_mut(), o2.as_view_mut());
        let holds = [0, 1, 2].map(|t| [(t, HEADS[t] * hs.1, 0)]);
        let mut out = [
            RopeDst { buf: &mut a, holds: &holds[0] },
            RopeDst { buf: &mut b, holds: &holds[1] },
            RopeDst { buf: &mut c, holds: &holds[2] },
        ];
        k::rope(dev, dir, &mut out, inp, tables, &shape(hs))?;
        outs.iter().map(|o| down(s, o)).collect()
    };

    // forward: windows of the fused projection -> padded attention inputs, against compact
    // -> compact: the same values, and zeros in the padding
    let fv = d_fused.as_view();
    let windows: Vec<_> = OFF.iter().map(|&o| fv.slice(o..)).collect();
    let inp = RopeIn { t: [&windows[0], &windows[1], &windows[2]], ld: [LD; 3] };
    let padded = split(k::RopeDir::Forward, &inp, (HD, HDP))?;
    let cv: Vec<_> = d_compact.iter().map(|d| d.as_view()).collect();
    let inp_c = RopeIn { t: [&cv[0], &cv[1], &cv[2]], ld: HEADS.map(|h| h * HD) };
    let plain = split(k::RopeDir::Forward, &inp_c, (HD, HD))?;
    for t in 0..3 {
        let want = reshape(&plain[t], HEADS[t], HD, HDP, 0.0);
        assert_eq!(padded[t], want, "rope fwd: fused window in, padded out (tensor {t})");
    }

    // backward: padded gradients (junk in the padding, which must not be read) -> the fused
    // gradient's windows, against compact -> compact
    let grads: Vec<Vec<f64>> = HEADS.iter().map(|&h| rt::<T>(&r.vec(N * h * HD, 1.0))).collect();
    let junk = rt::<T>(&r.vec(N * LD, 5.0));
    let gp: Vec<CudaSlice<T>> = (0..3)
        .map(|t| up::<T>(s, &reshape(&grads[t], HEADS[t], HD, HDP, 9.0)))
        .collect::<Result<_>>()?;
    let gpv: Vec<_> = gp.iter().map(|d| d.as_view()).collect();
    let inp = RopeIn { t: [&gpv[0], &gpv[1], &gpv[2]], ld: HEADS.map(|h| h * HDP) };
    let mut d_out = up::<T>(s, &junk)?;
    {
        let mut ov = d_out.as_view_mut();
        let holds = [0, 1, 2].map(|t| (t, LD, OFF[t]));
        let mut out = [RopeDst { buf: &mut ov, holds: &holds }];
        k::rope(dev, k::RopeDir::Backward, &mut out, &inp, tables, &shape((HDP, HD)))?;
    }
    let gc = grads.iter().map(|v| up::<T>(s, v)).collect::<Result<Vec<_>>>()?;
    let gcv: Vec<_> = gc.iter().map(|d| d.as_view()).collect();
    let inp_c = RopeIn { t: [&gcv[0], &gcv[1], &gcv[2]], ld: HEADS.map(|h| h * HD) };
    let plain = split(k::RopeDir::Backward, &inp_c, (HD, HD))?;
    let got = down(s, &d_out)?;
    for (t, want) in plain.iter().enumerate() {
        assert_eq!(&extract(&got, t), want, "rope bwd: padded in, fused window out ({t})");
    }
    let spare: Vec<usize> =
        (0..N).flat_map(|r| (OFF[2] + HKV * HD..LD).map(move |c| r * LD + c)).collect();
    assert!(spare.iter().all(|&i| got[i] == junk[i]), "rope bwd wrote outside its windows");

    // overlapping windows in one output buffer are refused before any launch
    {
        let mut ov = d_out.as_view_mut();
        let holds = [(0, LD, 0), (1, LD, OFF[1] - 1), (2, LD, OFF[2])];
        let mut out = [RopeDst { buf: &mut ov, holds: &holds }];
        let bad = k::rope(dev, k::RopeDir::Backward, &mut out, &inp, tables, &shape((HDP, HD)));
        anyhow::ensure!(bad.is_err(), "overlapping rope outputs were accepted");
    }

    // q/k RMSNorm over the heads of the fused projection vs over compact rows
    let w = up::<T>(s, &rt::<T>(&r.vec(HD, 1.0)))?;
    for t in 0..2 {
        let (rows, map) = (N * HEADS[t], Some(RowMap { per: HEADS[t], ld: LD }));
        let run_fwd = |x: &cudarc::driver::CudaView<'_, T>, map| -> Result<(Vec<f64>, Vec<f64>)> {
            let (mut o, mut rs) = (s.alloc_zeros::<T>(rows * HD)?, s.alloc_zeros::<f32>(rows)?);
            let (mut ov, mut rv) = (o.as_view_mut(), rs.as_view_mut());
            k::rmsnorm_fwd(dev, &mut ov, &mut rv, x, map, &w.as_view(), 1e-6)?;
            Ok((down(s, &o)?, down(s, &rs)?))
        };
        let strided = run_fwd(&fv.slice(OFF[t]..), map)?;
        let plain = run_fwd(&d_compact[t].as_view(), None)?;
        assert_eq!(strided, plain, "rmsnorm fwd over fused heads (tensor {t})");
        let rstd = up32(s, &strided.1)?;
        let dy = up::<T>(s, &rt::<T>(&r.vec(rows * HD, 1.0)))?;
        let mut dx_f = up::<T>(s, &junk)?;
        let mut dx_c = s.alloc_zeros::<T>(rows * HD)?;
        {
            let (rv, wv, dyv) = (rstd.as_view(), w.as_view(), dy.as_view());
            let mut whole = dx_f.as_view_mut();
            let mut dxv = whole.slice_mut(OFF[t]..);
            k::rmsnorm_bwd(dev, &mut dxv, &dyv, &fv.slice(OFF[t]..), map, &wv, &rv)?;
            let cx = d_compact[t].as_view();
            k::rmsnorm_bwd(dev, &mut dx_c.as_view_mut(), &dyv, &cx, None, &wv, &rv)?;
        }
        let got = down(s, &dx_f)?;
        assert_eq!(extract(&got, t), down(s, &dx_c)?, "rmsnorm bwd into fused heads ({t})");
        let mut outside = got.clone();
        let mut want = junk.clone();
        for r0 in 0..N {
            let cols = r0 * LD + OFF[t]..r0 * LD + OFF[t] + HEADS[t] * HD;
            outside[cols.clone()].fill(0.0);
            want[cols].fill(0.0);
        }
        assert_eq!(outside, want, "rmsnorm bwd wrote outside its window ({t})");
    }
    Ok(())
}

/// SwiGLU on the fused gate|up projection: row r holds gate at r*2I + j and up at r*2I + I + j;
/// the backward writes dgate|dup in the same layout (I = 432: the vector path; I = 37: scalars).
pub fn swiglu<T: TestT>(dev: &CudaDevice) -> Result<()> {
    let s = dev.stream();
    let mut r = Rng(31);
    for (rows, inter) in [(7, 432), (5, 37)] {
        let m = rows * inter;
        let (ga, u, go) =
            (rt::<T>(&r.vec(m, 4.0)), rt::<T>(&r.vec(m, 2.0)), rt::<T>(&r.vec(m, 1.0)));
        let gu: Vec<f64> = (0..rows)
            .flat_map(|i| {
                let row = i * inter..(i + 1) * inter;
                ga[row.clone()].iter().chain(&u[row]).copied().collect::<Vec<_>>()
            })
            .collect();
        let (dgu_in, dgo) = (up::<T>(s, &gu)?, up::<T>(s, &go)?);
        let mut o = s.alloc_zeros::<T>(m)?;
        k::swiglu_fwd(dev, &mut o.as_view_mut(), &dgu_in.as_view(), inter)?;
        let mut dgu = s.alloc_zeros::<T>(2 * m)?;
        k::swiglu_bwd(dev, &mut dgu.as_view_mut(), &dgo.as_view(), &dgu_in.as_view(), inter)?;
        let sig = |x: f64| 1.0 / (1.0 + (-x).exp());
        let wo: Vec<f64> = (0..m).map(|i| ga[i] * sig(ga[i]) * u[i]).collect();
        let wdgu: Vec<f64> = (0..rows)
            .flat_map(|r0| {
                let row = r0 * inter..(r0 + 1) * inter;
                let dg = row
                    .clone()
                    .map(|i| go[i] * u[i] * sig(ga[i]) * (1.0 + ga[i] * (1.0 - sig(ga[i]))));
                let du = row.map(|i| go[i] * ga[i] * sig(ga[i]));
                dg.chain(du).collect::<Vec<_>>()
            })
            .collect();
        close("swiglu", &down(s, &o)?, &wo, T::TOL);
        close("swiglu dgate|dup", &down(s, &dgu)?, &wdgu, T::TOL);
        // a buffer that is not [rows, 2 * inter] is refused
        let bad = k::swiglu_fwd(dev, &mut o.as_view_mut(), &dgo.as_view(), inter);
        assert!(matches!(bad, Err(CudaError::Shape { .. })), "{bad:?}");
    }
    Ok(())
}
