//! Launchers for the per-layer kernels: embedding (`embedding.cu`), RMSNorm (`rmsnorm.cu`)
//! and SwiGLU (`swiglu.cu`); RoPE is in `rope.rs`.

use cudarc::driver::{CudaView, CudaViewMut, LaunchConfig};

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

/// out[n, :] = table[ids[n], :] for `table` [V, d] given with its row width d; ids outside
/// [0, V) give a zero row (validate them on the host).
pub fn embedding_fwd<T: Dtype>(
    dev: &CudaDevice,
    out: &mut CudaViewMut<'_, T>,
    (table, d): (&CudaView<'_, T>, usize),
    ids: &CudaView<'_, i32>,
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
    unsafe { f.launch(cfg, (out, table, ids, &ni, &di, &vi)) }
}

/// Where the rows of an RMSNorm's `x` (and `dx`) lie: `per` rows side by side in lines `ld`
/// apart, row i at (i / per) * ld + (i % per) * d (the view starting at row 0). One tensor's
/// heads in the fused q|k|v projection are such rows (per = heads, ld = the projection's
/// width), so Qwen3's q/k norms read it, and write its gradient, in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowMap {
    pub per: usize,
    pub ld: usize,
}

/// The shape both RMSNorm kernels share: n rows of d = `w_len` (n from the compact `out` /
/// `dout` of `n_len` elements); `x_lens` (x, and dx for the backward) hold them as `map` says
/// (compact without one), rstd [n]. Returns the launch and the kernel's (n, d, per, ld), or
/// None for n = 0.
fn rmsnorm_setup(
    k: &'static str,
    n_len: usize,
    w_len: usize,
    x_lens: &[(&str, usize)],
    map: Option<RowMap>,
    rstd_len: usize,
) -> Result<Option<(LaunchConfig, [i32; 3], i64)>, CudaError> {
    let d = w_len;
    if d == 0 || !n_len.is_multiple_of(d) {
        return Err(shape_err(k, format!("{n_len} elements are not [n, {d}]")));
    }
    let n = n_len / d;
    let map = map.unwrap_or(RowMap { per: 1, ld: d });
    if map.per == 0 || !n.is_multiple_of(map.per) || map.ld < map.per * d {
        return Err(shape_err(k, format!("{n} rows of {d} as {map:?}")));
    }
    let lines = n / map.per;
    // a strided x may end anywhere after its last line's rows (a window of a wider buffer)
    let need = if lines == 0 { 0 } else { (lines - 1) * map.ld + map.per * d };
    for &(name, len) in x_lens {
        let compact = map.per == 1 && map.ld == d;
        if (compact && len != need) || len < need {
            return Err(shape_err(k, format!("{name} of {len} elements for {n} rows of {d}")));
        }
    }
    need_len(k, "rstd", rstd_len, n)?;
    if n == 0 {
        return Ok(None);
    }
    let ints = [int(k, "n", n)?, int(k, "d", d)?, int(k, "per", map.per)?];
    Ok(Some((hidden_row_cfg(k, n, d)?, ints, super::long(k, "ld", map.ld)?)))
}

/// y = x * rstd * w with rstd = 1/sqrt(mean(x^2) + eps) per row of `x` (n rows of d = w.len(),
/// laid out as `map` says, compact [n, d] for None) into the compact `out` [n, d]; writes rstd
/// [n] for the backward.
pub fn rmsnorm_fwd<T: Dtype>(
    dev: &CudaDevice,
    out: &mut CudaViewMut<'_, T>,
    rstd: &mut CudaViewMut<'_, f32>,
    x: &CudaView<'_, T>,
    map: Option<RowMap>,
    w: &CudaView<'_, T>,
    eps: f32,
) -> Result<(), CudaError> {
    let k = sym!(T, "rmsnorm_fwd");
    let Some((cfg, [ni, di, pi], ld)) =
        rmsnorm_setup(k, out.len(), w.len(), &[("x", x.len())], map, rstd.len())?
    else {
        return Ok(());
    };
    // x read, out written; 4 FLOPs an element (square, sum, two multiplies)
    let nd = out.len() as f64;
    let f = Kernel::load(dev, "rmsnorm.cu", k)?
        .cost(4.0 * nd, 2.0 * nd * std::mem::size_of::<T>() as f64);
    // SAFETY: out is [n, d], x holds n rows of d as `map` says, w [d], rstd [n] (checked); one
    // block per row, block <= 512.
    unsafe { f.launch(cfg, (out, rstd, x, w, &eps, &ni, &di, &pi, &ld)) }
}

/// dx for y = rmsnorm(x) * w (w frozen), from the saved rstd and the compact `dout` [n, d];
/// `x` and `dx` laid out alike, as `map` says.
pub fn rmsnorm_bwd<T: Dtype>(
    dev: &CudaDevice,
    dx: &mut CudaViewMut<'_, T>,
    dout: &CudaView<'_, T>,
    x: &CudaView<'_, T>,
    map: Option<RowMap>,
    w: &CudaView<'_, T>,
    rstd: &CudaView<'_, f32>,
) -> Result<(), CudaError> {
    let k = sym!(T, "rmsnorm_bwd");
    let rows = [("dx", dx.len()), ("x", x.len())];
    let Some((cfg, [ni, di, pi], ld)) =
        rmsnorm_setup(k, dout.len(), w.len(), &rows, map, rstd.len())?
    else {
        return Ok(());
    };
    // dout and x read, dx written; ~6 FLOPs an element (the row dot product and the update)
    let nd = dout.len() as f64;
    let f = Kernel::load(dev, "rmsnorm.cu", k)?
        .cost(6.0 * nd, 3.0 * nd * std::mem::size_of::<T>() as f64);
    // SAFETY: dout is [n, d], dx and x hold n rows of d as `map` says, w [d], rstd [n]
    // (checked).
    unsafe { f.launch(cfg, (dx, dout, x, w, rstd, &ni, &di, &pi, &ld)) }
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
    unsafe { f.launch(grid_stride(n), (out, gu, &nn, &ni)) }
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
    unsafe { f.launch(grid_stride(n), (dgu, dout, gu, &nn, &ni)) }
}
