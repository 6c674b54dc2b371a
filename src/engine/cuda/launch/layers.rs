//! Launchers for the per-layer kernels: embedding (`embedding.cu`), RMSNorm (`rmsnorm.cu`),
//! RoPE (`rope.cu`) and SwiGLU (`swiglu.cu`).

use cudarc::driver::{CudaView, CudaViewMut, LaunchConfig, PushKernelArg};

use super::{Dtype, Kernel, grid_stride, int, need_len, shape_err, sym};
use crate::engine::cuda::{CudaDevice, CudaError};

/// One block per row: enough threads to stream a hidden row (up to 8192) in a few steps.
fn hidden_row_cfg(kernel: &'static str, rows: usize, d: usize) -> Result<LaunchConfig, CudaError> {
    let threads = if d >= 2048 {
        512
    } else if d >= 512 {
        256
    } else {
        128
    };
    super::row_cfg(kernel, rows, threads)
}

/// out[n, :] = table[ids[n], :]; ids outside [0, V) give a zero row (validate them on the host).
pub fn embedding_fwd<T: Dtype>(
    dev: &CudaDevice,
    out: &mut CudaViewMut<'_, T>,
    table: &CudaView<'_, T>,
    ids: &CudaView<'_, i32>,
    d: usize,
) -> Result<(), CudaError> {
    let k = sym!(T, "embedding_fwd");
    if d == 0 || table.len() % d != 0 {
        return Err(shape_err(k, format!("table of {} elements is not [V, {d}]", table.len())));
    }
    let n = ids.len();
    let v = table.len() / d;
    need_len(k, "out", out.len(), n * d)?;
    if n == 0 {
        return Ok(());
    }
    let (ni, di, vi) = (int(k, "n", n)?, int(k, "d", d)?, int(k, "vocab", v)?);
    let cfg = hidden_row_cfg(k, n, d)?;
    // a gather: one row read and written per id
    let f = Kernel::load(dev, "embedding.cu", k)?
        .cost(0.0, 2.0 * (n * d) as f64 * std::mem::size_of::<T>() as f64);
    // SAFETY: out is [n, d], table [v, d], ids [n] (checked); the kernel bounds-checks ids.
    unsafe {
        f.launch(cfg, |l| {
            l.arg(out).arg(table).arg(ids).arg(&ni).arg(&di).arg(&vi);
        })
    }
}

/// The shape both RMSNorm kernels share: `x` [n, d] with d = `w_len`, every buffer of `rows`
/// ([n, d]) and rstd [n] checked; returns the launch and the kernel's (n, d), or None for n = 0.
fn rmsnorm_setup(
    k: &'static str,
    x_len: usize,
    w_len: usize,
    rows: &[(&str, usize)],
    rstd_len: usize,
) -> Result<Option<(LaunchConfig, i32, i32)>, CudaError> {
    let d = w_len;
    if d == 0 || !x_len.is_multiple_of(d) {
        return Err(shape_err(k, format!("x of {x_len} elements is not [n, {d}]")));
    }
    let n = x_len / d;
    for &(name, len) in rows {
        need_len(k, name, len, n * d)?;
    }
    need_len(k, "rstd", rstd_len, n)?;
    if n == 0 {
        return Ok(None);
    }
    Ok(Some((hidden_row_cfg(k, n, d)?, int(k, "n", n)?, int(k, "d", d)?)))
}

/// y = x * rstd * w with rstd = 1/sqrt(mean(x^2) + eps) per row of `x` [n, d]; writes rstd [n]
/// for the backward.
pub fn rmsnorm_fwd<T: Dtype>(
    dev: &CudaDevice,
    out: &mut CudaViewMut<'_, T>,
    rstd: &mut CudaViewMut<'_, f32>,
    x: &CudaView<'_, T>,
    w: &CudaView<'_, T>,
    eps: f32,
) -> Result<(), CudaError> {
    let k = sym!(T, "rmsnorm_fwd");
    let Some((cfg, ni, di)) =
        rmsnorm_setup(k, x.len(), w.len(), &[("out", out.len())], rstd.len())?
    else {
        return Ok(());
    };
    // x read, out written; 4 FLOPs an element (square, sum, two multiplies)
    let nd = x.len() as f64;
    let f = Kernel::load(dev, "rmsnorm.cu", k)?
        .cost(4.0 * nd, 2.0 * nd * std::mem::size_of::<T>() as f64);
    // SAFETY: out/x are [n, d], w [d], rstd [n] (checked); one block per row, block <= 512.
    unsafe {
        f.launch(cfg, |l| {
            l.arg(out).arg(rstd).arg(x).arg(w).arg(&eps).arg(&ni).arg(&di);
        })
    }
}

/// dx for y = rmsnorm(x) * w (w frozen), from the saved rstd.
pub fn rmsnorm_bwd<T: Dtype>(
    dev: &CudaDevice,
    dx: &mut CudaViewMut<'_, T>,
    dout: &CudaView<'_, T>,
    x: &CudaView<'_, T>,
    w: &CudaView<'_, T>,
    rstd: &CudaView<'_, f32>,
) -> Result<(), CudaError> {
    let k = sym!(T, "rmsnorm_bwd");
    let rows = [("dx", dx.len()), ("dout", dout.len())];
    let Some((cfg, ni, di)) = rmsnorm_setup(k, x.len(), w.len(), &rows, rstd.len())? else {
        return Ok(());
    };
    // dout and x read, dx written; ~6 FLOPs an element (the row dot product and the update)
    let nd = x.len() as f64;
    let f = Kernel::load(dev, "rmsnorm.cu", k)?
        .cost(6.0 * nd, 3.0 * nd * std::mem::size_of::<T>() as f64);
    // SAFETY: dx/dout/x are [n, d], w [d], rstd [n] (checked).
    unsafe {
        f.launch(cfg, |l| {
            l.arg(dx).arg(dout).arg(x).arg(w).arg(rstd).arg(&ni).arg(&di);
        })
    }
}

/// Which way [`rope`] rotates: the forward, or its gradient (rotation by the negative angle).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeDir {
    Forward,
    Backward,
}

/// Rotates `x` [n, heads, hd] by the angles at `pos` [n] (HF rotate_half), or back for
/// [`RopeDir::Backward`] (then `x` is the output gradient and `out` the input's); cos/sin are
/// f32 tables [P, hd/2].
#[allow(clippy::too_many_arguments)]
pub fn rope<T: Dtype>(
    dev: &CudaDevice,
    dir: RopeDir,
    out: &mut CudaViewMut<'_, T>,
    x: &CudaView<'_, T>,
    cos: &CudaView<'_, f32>,
    sin: &CudaView<'_, f32>,
    pos: &CudaView<'_, i32>,
    heads: usize,
    hd: usize,
) -> Result<(), CudaError> {
    let k = match dir {
        RopeDir::Forward => sym!(T, "rope_fwd"),
        RopeDir::Backward => sym!(T, "rope_bwd"),
    };
    if hd == 0 || !hd.is_multiple_of(2) {
        return Err(shape_err(k, format!("head_dim {hd} must be even and > 0")));
    }
    let half = hd / 2;
    if cos.len() != sin.len() || cos.len() % half != 0 || cos.is_empty() {
        return Err(shape_err(
            k,
            format!("cos/sin must both be [P, {half}], got {} and {}", cos.len(), sin.len()),
        ));
    }
    let p = cos.len() / half;
    let n = pos.len();
    need_len(k, "x", x.len(), n * heads * hd)?;
    need_len(k, "out", out.len(), n * heads * hd)?;
    if n == 0 || heads == 0 {
        return Ok(());
    }
    let (ni, hi, hdi, pi) = (
        int(k, "n", n)?,
        int(k, "heads", heads)?,
        int(k, "head_dim", hd)?,
        int(k, "positions", p)?,
    );
    // x read, out written; a rotation is 6 FLOPs per pair
    let e = (n * heads * hd) as f64;
    let f =
        Kernel::load(dev, "rope.cu", k)?.cost(3.0 * e, 2.0 * e * std::mem::size_of::<T>() as f64);
    // SAFETY: x/out are [n, heads, hd], cos/sin [p, hd/2], pos [n] (checked); the kernel clamps
    // positions into [0, p).
    unsafe {
        f.launch(grid_stride(n * heads * half), |l| {
            l.arg(out).arg(x).arg(cos).arg(sin).arg(pos).arg(&ni).arg(&hi).arg(&hdi).arg(&pi);
        })
    }
}

/// Checks a SwiGLU call: `n` output elements [rows, inter] against the fused gate|up buffers
/// `gu` of [rows, 2 * inter] each; returns the kernel's (n, inter).
fn swiglu_shape(
    k: &'static str,
    n: usize,
    inter: usize,
    gu: &[(&str, usize)],
) -> Result<(i64, i32), CudaError> {
    if inter == 0 || !n.is_multiple_of(inter) {
        return Err(shape_err(k, format!("{n} elements are not [rows, {inter}]")));
    }
    for &(name, len) in gu {
        need_len(k, name, len, 2 * n)?;
    }
    Ok((super::long(k, "n", n)?, int(k, "inter", inter)?))
}

/// out [rows, inter] = silu(gate) * up, with `gu` the fused projection [rows, 2 * inter]
/// (each row's gate, then its up).
pub fn swiglu_fwd<T: Dtype>(
    dev: &CudaDevice,
    out: &mut CudaViewMut<'_, T>,
    gu: &CudaView<'_, T>,
    inter: usize,
) -> Result<(), CudaError> {
    let k = sym!(T, "swiglu_fwd");
    let n = out.len();
    let (nn, ni) = swiglu_shape(k, n, inter, &[("gu", gu.len())])?;
    if n == 0 {
        return Ok(());
    }
    // gate and up read, out written; ~5 FLOPs an element with the sigmoid
    let f = Kernel::load(dev, "swiglu.cu", k)?
        .cost(5.0 * n as f64, 3.0 * n as f64 * std::mem::size_of::<T>() as f64);
    // SAFETY: out holds n = rows * inter elements and gu 2n (checked).
    unsafe {
        f.launch(grid_stride(n), |l| {
            l.arg(out).arg(gu).arg(&nn).arg(&ni);
        })
    }
}

/// The gradient `dgu` [rows, 2 * inter] (dgate, then dup, per row: the layout of `gu`) of
/// out = silu(gate) * up, from `dout` [rows, inter].
pub fn swiglu_bwd<T: Dtype>(
    dev: &CudaDevice,
    dgu: &mut CudaViewMut<'_, T>,
    dout: &CudaView<'_, T>,
    gu: &CudaView<'_, T>,
    inter: usize,
) -> Result<(), CudaError> {
    let k = sym!(T, "swiglu_bwd");
    let n = dout.len();
    let (nn, ni) = swiglu_shape(k, n, inter, &[("dgu", dgu.len()), ("gu", gu.len())])?;
    if n == 0 {
        return Ok(());
    }
    // gate, up and dout read, dgate and dup written; ~10 FLOPs an element with the sigmoid
    let f = Kernel::load(dev, "swiglu.cu", k)?
        .cost(10.0 * n as f64, 5.0 * n as f64 * std::mem::size_of::<T>() as f64);
    // SAFETY: dout holds n = rows * inter elements, dgu and gu 2n (checked).
    unsafe {
        f.launch(grid_stride(n), |l| {
            l.arg(dgu).arg(dout).arg(gu).arg(&nn).arg(&ni);
        })
    }
}
