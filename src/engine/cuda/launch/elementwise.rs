//! Launchers for `kernels/elementwise.cu`: residual add, in-place scale, the f32 / bf16 cast and the
//! sum of squares used for the global gradient norm, in-place accumulate, bias rows and the
//! column copy that pads / strips attention's head dimension.

use cudarc::driver::{CudaView, CudaViewMut};

use super::{Dtype, Kernel, grid_stride, int, long, map_n, need_len, shape_err, sym};
use crate::engine::cuda::{CudaDevice, CudaError};

const FILE: &str = "elementwise.cu";

/// out = a + b (elementwise, f32 math).
pub fn add_fwd<T: Dtype>(
    dev: &CudaDevice,
    out: &mut CudaViewMut<'_, T>,
    a: &CudaView<'_, T>,
    b: &CudaView<'_, T>,
) -> Result<(), CudaError> {
    // SAFETY: the kernel's signature is (T*, const T*, const T*, long long) and it touches
    // indices < n only.
    unsafe { map_n(dev, FILE, sym!(T, "add_fwd"), out, &[("a", a), ("b", b)]) }
}

/// x *= s in place.
pub fn scale_fwd<T: Dtype>(
    dev: &CudaDevice,
    x: &mut CudaViewMut<'_, T>,
    s: f32,
) -> Result<(), CudaError> {
    let k = sym!(T, "scale_fwd");
    let n = x.len();
    if n == 0 {
        return Ok(());
    }
    let nn = long(k, "n", n)?;
    let f = Kernel::load(dev, FILE, k)?;
    // SAFETY: x holds n elements; signature (T*, float, long long).
    unsafe { f.launch(grid_stride(n), (x, &s, &nn)) }
}

/// out = x in `O`'s dtype: f32 to bf16 rounds to nearest even, bf16 to f32 is exact. Refuses
/// a cast to the same dtype (a copy, which needs no kernel).
pub fn cast_fwd<I: Dtype, O: Dtype>(
    dev: &CudaDevice,
    out: &mut CudaViewMut<'_, O>,
    x: &CudaView<'_, I>,
) -> Result<(), CudaError> {
    let kernel = match (I::IS_BF16, O::IS_BF16) {
        (false, true) => "to_bf16_fwd_f32",
        (true, false) => "to_f32_fwd_bf16",
        _ => return Err(shape_err("cast_fwd", "input and output have the same dtype")),
    };
    // SAFETY: signature (O*, const I*, long long) for both kernels, indices < n only.
    unsafe { map_n(dev, FILE, kernel, out, &[("x", x)]) }
}

/// acc[0] += sum(x^2). `acc` is not cleared, so several tensors can add into one norm.
pub fn sumsq_fwd(
    dev: &CudaDevice,
    acc: &mut CudaViewMut<'_, f32>,
    x: &CudaView<'_, f32>,
) -> Result<(), CudaError> {
    let k = "sumsq_fwd_f32";
    if acc.len() != 1 {
        return Err(shape_err(k, format!("acc must hold 1 element, has {}", acc.len())));
    }
    let n = x.len();
    if n == 0 {
        return Ok(());
    }
    let nn = long(k, "n", n)?;
    let mut cfg = grid_stride(n);
    cfg.grid_dim.0 = cfg.grid_dim.0.min(1024);
    let f = Kernel::load(dev, FILE, k)?;
    // SAFETY: acc holds 1 float, x holds n; signature (float*, const float*, long long); the
    // kernel's 32-float static shared scratch fits any block of <= 1024 threads.
    unsafe { f.launch(cfg, (acc, x, &nn)) }
}

/// y += x in place.
pub fn acc_fwd<T: Dtype>(
    dev: &CudaDevice,
    y: &mut CudaViewMut<'_, T>,
    x: &CudaView<'_, T>,
) -> Result<(), CudaError> {
    // SAFETY: signature (T*, const T*, long long), indices < n only.
    unsafe { map_n(dev, FILE, sym!(T, "acc_fwd"), y, &[("x", x)]) }
}

/// y[r, c] += b[c] for y [rows, cols], cols = b.len().
pub fn bias_add_fwd<T: Dtype>(
    dev: &CudaDevice,
    y: &mut CudaViewMut<'_, T>,
    b: &CudaView<'_, T>,
) -> Result<(), CudaError> {
    let k = sym!(T, "bias_add_fwd");
    let (n, cols) = (y.len(), b.len());
    if cols == 0 || !n.is_multiple_of(cols) {
        return Err(shape_err(k, format!("y of {n} elements is not [rows, {cols}]")));
    }
    if n == 0 {
        return Ok(());
    }
    let (nn, ci) = (long(k, "n", n)?, int(k, "cols", cols)?);
    let f = Kernel::load(dev, FILE, k)?
        .cost(n as f64, 2.0 * n as f64 * std::mem::size_of::<T>() as f64);
    // SAFETY: y holds n = rows * cols elements, b cols (checked); signature
    // (T*, const T*, long long, int).
    unsafe { f.launch(grid_stride(n), (y, b, &nn, &ci)) }
}

/// dst [rows, dst_cols] from src [rows, src_ld]: the first `min(src_ld, dst_cols)` columns
/// copied, the rest zero (pads or strips trailing columns).
pub fn copy_cols_fwd<T: Dtype>(
    dev: &CudaDevice,
    dst: &mut CudaViewMut<'_, T>,
    dst_cols: usize,
    src: &CudaView<'_, T>,
    src_ld: usize,
) -> Result<(), CudaError> {
    let k = sym!(T, "copy_cols_fwd");
    if dst_cols == 0 || src_ld == 0 || !src.len().is_multiple_of(src_ld) {
        return Err(shape_err(k, format!("src of {} elements is not [rows, {src_ld}]", src.len())));
    }
    let rows = src.len() / src_ld;
    need_len(k, "dst", dst.len(), rows * dst_cols)?;
    if rows == 0 {
        return Ok(());
    }
    let copy = src_ld.min(dst_cols);
    let (rl, si, di, ci) = (
        long(k, "rows", rows)?,
        int(k, "src_ld", src_ld)?,
        int(k, "dst_cols", dst_cols)?,
        int(k, "copy", copy)?,
    );
    let f = Kernel::load(dev, FILE, k)?;
    // SAFETY: dst [rows, dst_cols], src [rows, src_ld] (checked), copy <= both widths;
    // signature (T*, const T*, long long, int, int, int).
    unsafe { f.launch(grid_stride(rows * dst_cols), (dst, src, &rl, &si, &di, &ci)) }
}
