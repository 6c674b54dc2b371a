//! Kernel-vs-CPU parity tests for every CUDA kernel (f32 and bf16). The CPU references here are
//! deliberately naive (f64, straight from the math), independent of the engine's CPU backend.
//! Without a GPU each test prints why it skips and passes; `TWINKLE_REQUIRE_GPU=1` makes a
//! missing GPU a failure (set it in GPU sessions).

use std::sync::Arc;

use anyhow::{Context, Result};
use cudarc::driver::{CudaSlice, CudaStream};
use twinkle::engine::cuda::launch::{self as k, Dtype};
use twinkle::engine::cuda::{CudaDevice, CudaError, bf16};

// ---------- harness ----------

/// `f(dev, &mut out.as_view_mut().., &inp.as_view().., rest..)`: a kernel launch on whole
/// buffers, the ones it writes first, then the ones it reads, then its other arguments.
macro_rules! launch {
    ($f:path, $dev:expr, mut [$($o:expr),+], [$($i:expr),*] $(, $rest:expr)* $(,)?) => {
        $f($dev, $(&mut $o.as_view_mut(),)+ $(&$i.as_view(),)* $($rest),*)
    };
}

fn device(test: &str) -> Option<CudaDevice> {
    match CudaDevice::new(0) {
        Ok(d) => Some(d),
        Err(e) => {
            let required = std::env::var("TWINKLE_REQUIRE_GPU").is_ok_and(|v| v == "1");
            assert!(!required, "TWINKLE_REQUIRE_GPU=1 but no GPU: {e}");
            eprintln!("SKIP {test}: no usable GPU ({e})");
            None
        }
    }
}

trait TestT: Dtype + cudarc::driver::ValidAsZeroBits {
    fn from_f(x: f64) -> Self;
    fn to_f(self) -> f64;
    /// (relative, absolute) tolerance for values of magnitude ~1.
    const TOL: (f64, f64);
    /// Tolerance on a whole tensor's relative RMS error (`close_rms`).
    const RMS_TOL: f64;
}

impl TestT for f32 {
    fn from_f(x: f64) -> Self {
        x as f32
    }
    fn to_f(self) -> f64 {
        self as f64
    }
    const TOL: (f64, f64) = (1e-4, 1e-5);
    const RMS_TOL: f64 = 2e-6;
}

impl TestT for bf16 {
    fn from_f(x: f64) -> Self {
        bf16::from_f64(x)
    }
    fn to_f(self) -> f64 {
        self.to_f64()
    }
    const TOL: (f64, f64) = (2e-2, 2e-2);
    // measured 1.4e-3 .. 2.6e-3 on the attention tests
    const RMS_TOL: f64 = 5e-3;
}

mod xorshift_support;
use xorshift_support::Rng;

/// Rounds through T, so the reference sees exactly what the GPU sees.
fn rt<T: TestT>(v: &[f64]) -> Vec<f64> {
    v.iter().map(|&x| T::from_f(x).to_f()).collect()
}

fn up<T: TestT>(s: &Arc<CudaStream>, v: &[f64]) -> Result<CudaSlice<T>> {
    Ok(s.clone_htod(&v.iter().map(|&x| T::from_f(x)).collect::<Vec<T>>())?)
}

fn up32(s: &Arc<CudaStream>, v: &[f64]) -> Result<CudaSlice<f32>> {
    up::<f32>(s, v)
}

fn upi(s: &Arc<CudaStream>, v: &[i32]) -> Result<CudaSlice<i32>> {
    Ok(s.clone_htod(v)?)
}

fn down<T: TestT>(s: &Arc<CudaStream>, d: &CudaSlice<T>) -> Result<Vec<f64>> {
    Ok(s.clone_dtoh(d)?.into_iter().map(|x| x.to_f()).collect())
}

fn close(name: &str, got: &[f64], want: &[f64], (rtol, atol): (f64, f64)) {
    assert_eq!(got.len(), want.len(), "{name}: length");
    let mut worst = (0.0, 0usize);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let excess = (g - w).abs() - (atol + rtol * w.abs());
        if excess > worst.0 || g.is_nan() != w.is_nan() {
            worst = (excess.max(f64::MIN_POSITIVE), i);
        }
    }
    let i = worst.1;
    assert!(
        worst.0 <= 0.0,
        "{name}[{i}]: got {} want {} (rtol {rtol}, atol {atol})",
        got[i],
        want[i]
    );
}

/// Like [`close`] with the absolute tolerance scaled by the largest reference magnitude
/// (gradients span orders of magnitude; bf16 error is relative to the tensor's scale).
/// ||got - want|| / ||want|| (Euclidean) at most `tol`.
fn close_rms(name: &str, got: &[f64], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{name}: length");
    let num: f64 = got.iter().zip(want).map(|(a, b)| (a - b) * (a - b)).sum();
    let den: f64 = want.iter().map(|b| b * b).sum();
    let e = (num / den.max(1e-300)).sqrt();
    assert!(e <= tol, "{name}: relative RMS error {e:.3e} > {tol:.1e}");
}

fn close_scaled(name: &str, got: &[f64], want: &[f64], (rtol, atol): (f64, f64)) {
    let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-30);
    close(name, got, want, (rtol, atol.max(rtol) * scale));
}

// ---------- no GPU: errors, not panics ----------

#[test]
fn missing_driver_is_an_error_not_a_panic() {
    if twinkle::engine::cuda::driver_available().is_ok() {
        eprintln!("SKIP missing_driver_is_an_error_not_a_panic: a CUDA driver is present");
        return;
    }
    let err = CudaDevice::new(0).unwrap_err();
    assert!(matches!(err, CudaError::DriverNotFound), "{err}");
    assert_eq!(CudaDevice::count(), 0);
}

// ---------- elementwise ----------

fn elementwise<T: TestT>(dev: &CudaDevice) -> Result<()> {
    let s = dev.stream();
    let mut r = Rng(7);
    let n = 5003; // not a multiple of 8: exercises the vector body and the scalar tail
    let (a, b) = (rt::<T>(&r.vec(n, 3.0)), rt::<T>(&r.vec(n, 3.0)));
    let (da, db) = (up::<T>(s, &a)?, up::<T>(s, &b)?);
    let mut out = s.alloc_zeros::<T>(n)?;
    k::add_fwd(dev, &mut out.as_view_mut(), &da.as_view(), &db.as_view())?;
    let want: Vec<f64> = a.iter().zip(&b).map(|(x, y)| x + y).collect();
    close("add", &down(s, &out)?, &want, T::TOL);
    k::scale_fwd(dev, &mut out.as_view_mut(), -0.5)?;
    close("scale", &down(s, &out)?, &want.iter().map(|x| -0.5 * x).collect::<Vec<_>>(), T::TOL);
    Ok(())
}

#[test]
fn elementwise_matches_cpu() -> Result<()> {
    let Some(dev) = device("elementwise") else { return Ok(()) };
    elementwise::<f32>(&dev)?;
    elementwise::<bf16>(&dev)?;
    let s = dev.stream();
    // casts: bf16 round-to-nearest-even on exactly representable halfway points
    let x = vec![1.0, 1.0 + 1.0 / 256.0, 1.0 + 3.0 / 256.0, -2.5, 65504.0];
    let dx = up32(s, &x)?;
    let mut h = s.alloc_zeros::<bf16>(x.len())?;
    k::cast_fwd(&dev, &mut h.as_view_mut(), &dx.as_view())?;
    assert_eq!(down(s, &h)?, vec![1.0, 1.0, 1.0 + 4.0 / 256.0, -2.5, 65536.0]);
    let mut back = s.alloc_zeros::<f32>(x.len())?;
    k::cast_fwd(&dev, &mut back.as_view_mut(), &h.as_view())?;
    assert_eq!(down(s, &back)?, vec![1.0, 1.0, 1.0 + 4.0 / 256.0, -2.5, 65536.0]);
    // sum of squares of 1..=1000 = 333_833_500
    let v: Vec<f64> = (1..=1000).map(|i| i as f64).collect();
    let dv = up32(s, &v)?;
    let mut acc = s.alloc_zeros::<f32>(1)?;
    k::sumsq_fwd(&dev, &mut acc.as_view_mut(), &dv.as_view())?;
    close("sumsq", &down(s, &acc)?, &[333_833_500.0], (1e-6, 0.0));
    Ok(())
}

// ---------- embedding, rmsnorm, rope, swiglu ----------

fn layers<T: TestT>(dev: &CudaDevice) -> Result<()> {
    let s = dev.stream();
    let mut r = Rng(11);
    let (n, d, vocab) = (7, 96, 13);
    // embedding (ids 13 and -1 are out of range: zero rows)
    let table = rt::<T>(&r.vec(vocab * d, 1.0));
    let ids = [3, 0, 12, 13, -1, 5, 3];
    let (dt, di) = (up::<T>(s, &table)?, upi(s, &ids)?);
    let mut emb = s.alloc_zeros::<T>(n * d)?;
    k::embedding_fwd(dev, &mut emb.as_view_mut(), (&dt.as_view(), d), &di.as_view())?;
    let tref = &table;
    let want: Vec<f64> = ids
        .iter()
        .flat_map(|&id| {
            (0..d).map(move |j| {
                if (0..vocab as i32).contains(&id) { tref[id as usize * d + j] } else { 0.0 }
            })
        })
        .collect();
    assert_eq!(down(s, &emb)?, want, "embedding copies rows exactly");

    // rmsnorm
    let x = rt::<T>(&r.vec(n * d, 2.0));
    let w = rt::<T>(&r.vec(d, 1.0));
    let g = rt::<T>(&r.vec(n * d, 1.0));
    let eps = 1e-6;
    let (dx_, dw_, dg_) = (up::<T>(s, &x)?, up::<T>(s, &w)?, up::<T>(s, &g)?);
    let mut y = s.alloc_zeros::<T>(n * d)?;
    let mut rstd = s.alloc_zeros::<f32>(n)?;
    launch!(k::rmsnorm_fwd, dev, mut [y, rstd], [dx_], None, &dw_.as_view(), eps as f32)?;
    let mut dx = s.alloc_zeros::<T>(n * d)?;
    launch!(k::rmsnorm_bwd, dev, mut [dx], [dg_, dx_], None, &dw_.as_view(), &rstd.as_view())?;
    let (mut wy, mut wdx, mut wr) = (vec![0.0; n * d], vec![0.0; n * d], vec![0.0; n]);
    for i in 0..n {
        let row = &x[i * d..(i + 1) * d];
        let rs = 1.0 / (row.iter().map(|v| v * v).sum::<f64>() / d as f64 + eps).sqrt();
        wr[i] = rs;
        let dot: f64 = (0..d).map(|j| g[i * d + j] * w[j] * row[j]).sum();
        for j in 0..d {
            wy[i * d + j] = row[j] * rs * w[j];
            wdx[i * d + j] = rs * (g[i * d + j] * w[j] - row[j] * rs * rs * dot / d as f64);
        }
    }
    close("rmsnorm rstd", &down(s, &rstd)?, &wr, (1e-5, 1e-6));
    close("rmsnorm y", &down(s, &y)?, &wy, T::TOL);
    close("rmsnorm dx", &down(s, &dx)?, &wdx, T::TOL);

    // rope on compact q, k and v (q, k rotated, v copied); the strided and padded layouts
    // are checked in cuda_gpu_ref/fused.rs
    let (hq, hkv, hd, p) = (3, 2, 32, 40);
    let half = hd / 2;
    let (mut cos, mut sin) = (vec![0.0; p * half], vec![0.0; p * half]);
    for pos in 0..p {
        for i in 0..half {
            let ang = pos as f64 * 10000f64.powf(-(2.0 * i as f64) / hd as f64);
            cos[pos * half + i] = (ang as f32).cos() as f64;
            sin[pos * half + i] = (ang as f32).sin() as f64;
        }
    }
    let pos = [0, 1, 2, 39, 17, 5, 6];
    let src: Vec<Vec<f64>> =
        [hq, hkv, hkv].iter().map(|&h| rt::<T>(&r.vec(n * h * hd, 1.0))).collect();
    let dsrc = src.iter().map(|v| up::<T>(s, v)).collect::<Result<Vec<_>>>()?;
    let (dc, dsn, dp) = (up32(s, &cos)?, up32(s, &sin)?, upi(s, &pos)?);
    let run = |dir| -> Result<Vec<Vec<f64>>> {
        let mut outs =
            src.iter().map(|v| Ok(s.alloc_zeros::<T>(v.len())?)).collect::<Result<Vec<_>>>()?;
        let views: Vec<_> = dsrc.iter().map(|d| d.as_view()).collect();
        let inp =
            k::RopeIn { t: [&views[0], &views[1], &views[2]], ld: [hq * hd, hkv * hd, hkv * hd] };
        let [o0, o1, o2] = &mut outs[..] else { unreachable!() };
        let (mut a, mut b, mut c) = (o0.as_view_mut(), o1.as_view_mut(), o2.as_view_mut());
        let holds = [[(0, hq * hd, 0)], [(1, hkv * hd, 0)], [(2, hkv * hd, 0)]];
        let mut out = [
            k::RopeDst { buf: &mut a, holds: &holds[0] },
            k::RopeDst { buf: &mut b, holds: &holds[1] },
            k::RopeDst { buf: &mut c, holds: &holds[2] },
        ];
        let shape = k::RopeShape { n, heads: (hq, hkv), hd, hs: (hd, hd) };
        let tables = (&dc.as_view(), &dsn.as_view(), &dp.as_view());
        k::rope(dev, dir, &mut out, &inp, tables, &shape)?;
        outs.iter().map(|o| down(s, o)).collect()
    };
    let (fwd, bwd) = (run(k::RopeDir::Forward)?, run(k::RopeDir::Backward)?);
    for (t, x) in src.iter().enumerate() {
        let heads = x.len() / (n * hd);
        let (mut wf, mut wb) = (x.clone(), x.clone());
        for (tok, &pt) in pos.iter().enumerate().filter(|_| t < 2) {
            // (v is copied)
            for h in 0..heads {
                let base = (tok * heads + h) * hd;
                for i in 0..half {
                    let ti = pt as usize * half + i;
                    let (c, sn) = (cos[ti], sin[ti]);
                    let (x1, x2) = (x[base + i], x[base + i + half]);
                    wf[base + i] = x1 * c - x2 * sn;
                    wf[base + i + half] = x2 * c + x1 * sn;
                    wb[base + i] = x1 * c + x2 * sn;
                    wb[base + i + half] = x2 * c - x1 * sn;
                }
            }
        }
        close("rope fwd", &fwd[t], &wf, T::TOL);
        close("rope bwd", &bwd[t], &wb, T::TOL);
    }
    assert_eq!(fwd[2], src[2], "rope copies v exactly");

    Ok(())
}

#[test]
fn layer_kernels_match_cpu() -> Result<()> {
    let Some(dev) = device("layers") else { return Ok(()) };
    layers::<f32>(&dev)?;
    layers::<bf16>(&dev)
}

mod engine_support;
#[path = "cuda_gpu_ref/mod.rs"]
mod refs;
use refs::model::{BF16, Check, F32, Tol};

#[test]
fn attention_matches_cpu() -> Result<()> {
    let Some(dev) = device("attention") else { return Ok(()) };
    refs::attention::<f32>(&dev, 64)?;
    refs::attention::<f32>(&dev, 128)?;
    refs::attention::<bf16>(&dev, 128)?;
    refs::attention::<bf16>(&dev, 256)
}

/// The tensor-core kernels (kernels/flash.cu, which serve bf16 at head dims 32, 64 and 128) over
/// several tiles of each kernel with a GQA group of 4, and attention.cu on the same shapes in f32.
#[test]
fn flash_attention_matches_cpu() -> Result<()> {
    let Some(dev) = device("flash attention") else { return Ok(()) };
    for hd in [32, 64, 128] {
        refs::attention_long::<bf16>(&dev, hd)?;
    }
    refs::attention_long::<f32>(&dev, 64)
}

/// `#[test] fn $name`: `$check` (generic over the storage type) in f32, then in bf16, on the
/// device (a pass without a GPU).
macro_rules! f32_and_bf16 {
    ($name:ident, $label:literal, $($check:ident)::+) => {
        #[test]
        fn $name() -> Result<()> {
            let Some(dev) = device($label) else { return Ok(()) };
            $($check)::+::<f32>(&dev)?;
            $($check)::+::<bf16>(&dev)
        }
    };
}

f32_and_bf16!(decode_attention_matches_cpu, "decode", refs::decode::paged);
f32_and_bf16!(lora_matches_cpu, "lora", refs::lora::segmented);
f32_and_bf16!(greedy_argmax_matches_cpu_definition, "argmax", refs::argmax);

#[test]
fn fused_projection_layouts_match_compact() -> Result<()> {
    let Some(dev) = device("fused layouts") else { return Ok(()) };
    refs::fused::layouts::<f32>(&dev)?;
    refs::fused::layouts::<bf16>(&dev)?;
    refs::fused::swiglu::<f32>(&dev)?;
    refs::fused::swiglu::<bf16>(&dev)
}

#[test]
fn cross_entropy_and_losses_match_cpu() -> Result<()> {
    let Some(dev) = device("xent") else { return Ok(()) };
    refs::xent::<f32>(&dev)?;
    refs::xent::<bf16>(&dev)?;
    refs::losses(&dev)
}

#[test]
fn loss_terms_match_lossfn_term_for_every_variant() -> Result<()> {
    let Some(dev) = device("loss terms") else { return Ok(()) };
    refs::loss_terms::loss_terms(&dev)
}

#[test]
fn adamw_matches_cpu() -> Result<()> {
    let Some(dev) = device("adamw") else { return Ok(()) };
    refs::adamw(&dev)
}

#[test]
fn stochastic_draw_equals_cpu_definition() -> Result<()> {
    let Some(dev) = device("sample") else { return Ok(()) };
    refs::sampling::exp_bits(&dev)?;
    refs::sampling::sample_parity::<f32>(&dev)?;
    refs::sampling::sample_parity_bf16(&dev)
}

fn gemm<T: TestT, O: TestT>(dev: &CudaDevice) -> Result<()> {
    let s = dev.stream();
    let mut r = Rng(53);
    let (m, n, kk) = (33, 20, 70);
    let a = rt::<T>(&r.vec(m * kk, 1.0));
    let b = rt::<T>(&r.vec(n * kk, 1.0));
    let c0 = rt::<O>(&r.vec(m * n, 1.0));
    let (da, db) = (up::<T>(s, &a)?, up::<T>(s, &b)?);
    for layout in [k::BLayout::Nk, k::BLayout::Kn] {
        // Nk: b is [n, k]; Kn: the same numbers read as [k, n]
        let bij = |i: usize, j: usize| match layout {
            k::BLayout::Nk => b[j * kk + i],
            k::BLayout::Kn => b[i * n + j],
        };
        let want: Vec<f64> = (0..m * n)
            .map(|x| 0.5 * (0..kk).map(|p| a[x / n * kk + p] * bij(p, x % n)).sum::<f64>() + c0[x])
            .collect();
        let mut dc = up::<O>(s, &c0)?;
        launch!(k::matmul, dev, mut [dc], [da, db], layout, (m, n, kk), 0.5, 1.0)?;
        close_scaled(&format!("gemm {layout:?}"), &down(s, &dc)?, &want, O::TOL);
    }
    Ok(())
}

#[test]
fn cublas_gemm_matches_cpu() -> Result<()> {
    let Some(dev) = device("gemm") else { return Ok(()) };
    gemm::<f32, f32>(&dev)?;
    gemm::<bf16, bf16>(&dev)?;
    gemm::<bf16, f32>(&dev)?;
    let s = dev.stream();
    let (a, b) = (s.alloc_zeros::<f32>(6)?, s.alloc_zeros::<f32>(6)?);
    let mut c = s.alloc_zeros::<bf16>(4)?;
    let err = launch!(k::matmul, &dev, mut [c], [a, b], k::BLayout::Nk, (2, 2, 3), 1.0, 0.0);
    assert!(matches!(err, Err(CudaError::Shape { .. })), "f32 -> bf16 must be refused");
    Ok(())
}

#[test]
fn cublaslt_epilogues_match_unfused() -> Result<()> {
    let Some(dev) = device("gemm lt") else { return Ok(()) };
    refs::epilogue::against_unfused::<f32>(&dev)?;
    refs::epilogue::against_unfused::<bf16>(&dev)
}

// ---------- the whole device path: golden fixtures, CPU engine parity ----------

fn arc_device(test: &str) -> Option<Arc<CudaDevice>> {
    device(test).map(Arc::new)
}

/// Runs `check` on every golden case, failures of all cases reported together (a pass without
/// a GPU).
fn every_case(
    test: &str,
    check: impl Fn(&Arc<CudaDevice>, &str, &mut refs::model::Report),
) -> Result<()> {
    let Some(dev) = arc_device(test) else { return Ok(()) };
    let mut rep = refs::model::Report::default();
    for case in refs::model::cases() {
        check(&dev, case, &mut rep);
    }
    rep.finish()
}

/// A golden case under the tolerances of one storage type.
fn check<'a>(dev: &'a Arc<CudaDevice>, case: &'a str, tol: &'a Tol) -> Check<'a> {
    Check { dev, case, tol }
}

#[test]
fn golden_fixtures_through_cuda_f32() -> Result<()> {
    every_case("golden f32", |dev, case, rep| {
        rep.case(case, |r| refs::model::golden::<f32>(&check(dev, case, &F32), r));
    })
}

#[test]
fn golden_fixtures_through_cuda_bf16() -> Result<()> {
    every_case("golden bf16", |dev, case, rep| {
        rep.case(case, |r| refs::model::golden::<bf16>(&check(dev, case, &BF16), r));
    })
}

#[test]
fn one_training_step_cpu_vs_gpu() -> Result<()> {
    every_case("train step", |dev, case, rep| {
        rep.case(&format!("{case} f32"), |r| {
            refs::model::train_step_vs_cpu::<f32>(&check(dev, case, &F32), r)
        });
        rep.case(&format!("{case} bf16"), |r| {
            refs::model::train_step_vs_cpu::<bf16>(&check(dev, case, &BF16), r)
        });
    })
}

/// The device seam: `CudaRuntime` against `CpuRuntime` through the calls the applications make,
/// alone and as two data-parallel replicas.
#[test]
fn cuda_runtime_matches_cpu_runtime_through_the_seam() -> Result<()> {
    if device("seam").is_none() {
        return Ok(());
    }
    refs::runtime::seam_parity::<f32>(2e-3, 1)?;
    refs::runtime::seam_parity::<f32>(2e-3, 2)?;
    refs::runtime::seam_parity::<bf16>(0.15, 1)
}

/// A non-finite gradient: the CUDA step refuses it like the CPU's, with nothing changed.
#[test]
fn cuda_optim_step_refuses_a_non_finite_gradient() -> Result<()> {
    if device("non-finite step").is_none() {
        return Ok(());
    }
    refs::runtime::non_finite_gradient_is_refused::<f32>()?;
    refs::runtime::non_finite_gradient_is_refused::<bf16>()
}

/// Decode steps replayed from captured CUDA graphs equal the plain runs bit for bit, with a
/// capture per step shape and replays otherwise.
#[test]
fn decode_graph_replays_equal_plain_steps() -> Result<()> {
    on_tiny_model("graphs", refs::graphs::graphs_equal_plain)
}

/// Several adapters' sequences decoded in one pass equal each decoded alone.
#[test]
fn several_tenants_in_one_pass_equal_each_alone() -> Result<()> {
    on_tiny_model("many", refs::many::many_equals_alone)
}

/// `check` on `engine_support`'s tiny synthetic model, when a GPU is present (the engine opens
/// its own device).
fn on_tiny_model(
    test: &str,
    check: impl FnOnce(&Arc<twinkle::engine::Model>) -> Result<()>,
) -> Result<()> {
    if device(test).is_none() {
        return Ok(());
    }
    let (_tmp, model) = engine_support::tiny_model();
    check(&model)
}

/// `--explain`'s accounting of one training step: every cuBLAS(Lt) GEMM is recorded with its
/// 2mnk FLOPs, which must sum to the analytic count of a LoRA step (per row, forward and input
/// gradient of every base linear, and the output head's forward, recomputation and input
/// gradient); the attention, LoRA and elementwise kernels state costs too, and each recorded
/// kernel has a measured time.
#[test]
fn explain_accounts_every_gemm_of_a_step() -> Result<()> {
    let Some(dev) = arc_device("explain") else { return Ok(()) };
    let spec = twinkle::engine::cuda::bench_shape("tiny").context("tiny shape")?;
    let model = twinkle::engine::cuda::CudaModel::<bf16>::synthetic(dev, &spec, 3)?;
    let opts = twinkle::bench::TrainOptions { seq: 48, batch: 2, rank: 8, steps: 1, warmup: 0 };
    let stats = twinkle::bench::explain::train_step(&model, &opts)?;
    let c = model.config();
    let (h, i, v) = (c.hidden_size as f64, c.intermediate_size as f64, c.vocab_size as f64);
    let (qd, kvd) = ((c.num_heads * c.head_dim) as f64, (c.num_kv_heads * c.head_dim) as f64);
    let per_layer = h * (qd + 2.0 * kvd) + qd * h + 3.0 * h * i;
    let rows = (opts.seq * opts.batch) as f64;
    let want = rows * (4.0 * c.num_layers as f64 * per_layer + 6.0 * v * h);
    let by = |name: &str| stats.iter().find(|s| s.name.starts_with(name));
    let gemm = by("cublasGemmEx").context("no GEMM recorded")?;
    let lt = by("cublasLtMatmul").context("no cuBLASLt GEMM recorded")?;
    let got = [gemm, lt].iter().map(|g| g.cost.map_or(0.0, |c| c.flops)).sum::<f64>();
    anyhow::ensure!(got == want, "GEMM FLOPs {got} vs the analytic {want}");
    // bf16 attention at head dim 32 runs on the tensor-core kernels of flash.cu
    let attn = ["flash_fwd", "flash_bwd_dq", "flash_bwd_dkdv", "attention_delta_bwd"];
    for k in attn.iter().chain(&["lora_seg", "rmsnorm_fwd"]) {
        let s = by(k).with_context(|| format!("{k} not recorded: {stats:?}"))?;
        anyhow::ensure!(s.launches > 0 && s.measured_ms >= 0.0, "{k}: {s:?}");
    }
    for k in attn.iter().chain(&["lora_seg"]) {
        let s = by(k).context(*k)?;
        anyhow::ensure!(s.cost.is_some_and(|c| c.flops > 0.0 && c.bytes > 0.0), "{k}: {s:?}");
    }
    // the profiler is off again: a second step records nothing new
    anyhow::ensure!(dev_profile_is_off(&model)?, "the profiler stayed on");
    Ok(())
}

/// A decode step under the profiler after the same step shape has been captured as a CUDA
/// graph and replayed: the profiled step runs kernel by kernel (graphs are off while profiling),
/// so its split-KV attention kernels and GEMMs are recorded with their costs, and no replay
/// happens meanwhile.
#[test]
fn profiled_decode_step_runs_kernel_by_kernel() -> Result<()> {
    use twinkle::engine::CachedGroup;
    use twinkle::engine::cuda::CudaKvCache;
    let Some(dev) = arc_device("explain decode") else { return Ok(()) };
    let spec = twinkle::engine::cuda::bench_shape("tiny").context("tiny shape")?;
    let model = twinkle::engine::cuda::CudaModel::<bf16>::synthetic(dev, &spec, 3)?;
    let mut cache = CudaKvCache::new(&model, 2, 16)?;
    let slots = [0usize, 1];
    let prompt = [3u32, 5, 7];
    let mut feed = |toks: [&[u32]; 2]| -> Result<()> {
        let mut g = CachedGroup { adapter: None, cache: &mut cache, slots: &slots, tokens: &toks };
        model.forward_cached_device(&mut g)?;
        Ok(())
    };
    feed([&prompt, &prompt])?;
    for t in 0..3u32 {
        feed([&[t], &[t + 1]])?;
    }
    let (captures, replays) = model.cuda_graph_stats();
    anyhow::ensure!(
        captures == 1 && replays == 1,
        "graphs {captures} / {replays} before profiling"
    );
    model.device().profile_start();
    let step = feed([&[9], &[10]]);
    let stats = model.device().profile_take()?;
    step?;
    anyhow::ensure!(model.cuda_graph_stats() == (1, 1), "a graph ran under the profiler");
    for k in ["decode_split_fwd", "decode_combine_fwd", "cublasGemmEx", "kv_append_fwd"] {
        let s = stats.iter().find(|s| s.name.starts_with(k));
        let s = s.with_context(|| format!("{k} not recorded: {stats:?}"))?;
        anyhow::ensure!(s.cost.is_some_and(|c| c.bytes > 0.0), "{k}: {s:?}");
    }
    Ok(())
}

fn dev_profile_is_off(model: &twinkle::engine::cuda::CudaModel<bf16>) -> Result<bool> {
    Ok(model.device().profile_take()?.is_empty())
}
