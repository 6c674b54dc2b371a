//! The cuBLASLt launcher (`matmul_lt`) against the unfused sequence it replaces in the layer
//! forward: `matmul` (beta 0), then `bias_add_fwd`, then `acc_fwd` of the residual. Only the
//! rounding points differ (the fused epilogue rounds D once), so f32 agrees to a few ulps and
//! bf16 within its tolerance (f32 tolerance 1e-5 of the largest value); the residual C is read and left exactly as it was; operands at an
//! offset of one element (less than the 256-byte alignment cuBLASLt assumes by default) work.

use anyhow::Result;
use twinkle::engine::cuda::CudaDevice;
use twinkle::engine::cuda::launch::{self as k, BLayout};

use super::super::{Rng, TestT, close_scaled, down, rt, up};

pub fn against_unfused<T: TestT>(dev: &CudaDevice) -> Result<()> {
    let s = dev.stream();
    let mut r = Rng(71);
    let (m, n, kk) = (33, 20, 70);
    // one spare element in front of every operand, so the offset-1 views stay in bounds
    let a = rt::<T>(&r.vec(m * kk + 1, 1.0));
    let w = rt::<T>(&r.vec(n * kk + 1, 1.0));
    let b = rt::<T>(&r.vec(n, 1.0));
    let c = rt::<T>(&r.vec(m * n + 1, 1.0));
    let (da, dw, db, dc) = (up::<T>(s, &a)?, up::<T>(s, &w)?, up::<T>(s, &b)?, up::<T>(s, &c)?);
    // f32 differs from the unfused chain by where it rounds (and, on a GPU, by the algorithm's
    // summation order): a few ulps of the largest value
    let tol = if T::IS_BF16 { T::TOL } else { (1e-5, 1e-5) };
    for off in [0, 1] {
        let (av, wv) = (da.slice(off..off + m * kk), dw.slice(off..off + n * kk));
        let cv = dc.slice(off..off + m * n);
        for (bias, res) in [(false, false), (true, false), (false, true), (true, true)] {
            let name = format!("matmul_lt off {off} bias {bias} residual {res}");
            let mut want = s.alloc_zeros::<T>(m * n)?;
            let mut wv_mut = want.as_view_mut();
            k::matmul::<T, T>(dev, &mut wv_mut, &av, &wv, BLayout::Nk, (m, n, kk), 1.0, 0.0)?;
            if bias {
                k::bias_add_fwd(dev, &mut wv_mut, &db.as_view())?;
            }
            if res {
                k::acc_fwd(dev, &mut wv_mut, &cv)?;
            }
            let mut got = s.alloc_zeros::<T>(m * n + 1)?;
            let mut gv = got.slice_mut(off..off + m * n);
            let bv = db.as_view();
            let (bo, co) = (bias.then_some(&bv), res.then_some(&cv));
            k::matmul_lt::<T>(dev, &mut gv, &av, &wv, bo, co, (m, n, kk))?;
            let got = down(s, &got)?;
            close_scaled(&name, &got[off..off + m * n], &down(s, &want)?, tol);
            // the output's spare element is not written
            let spare = if off == 0 { got[m * n] } else { got[0] };
            anyhow::ensure!(spare == 0.0, "{name}: wrote outside D");
        }
    }
    anyhow::ensure!(down(s, &dc)? == c, "the residual C was modified");
    // shapes are checked before anything is enqueued
    let mut d = s.alloc_zeros::<T>(m * n)?;
    let short = db.slice(0..n - 1);
    let err = k::matmul_lt::<T>(
        dev,
        &mut d.as_view_mut(),
        &da.slice(0..m * kk),
        &dw.slice(0..n * kk),
        Some(&short),
        None,
        (m, n, kk),
    );
    anyhow::ensure!(err.is_err(), "a bias of n - 1 elements was accepted");
    Ok(())
}
