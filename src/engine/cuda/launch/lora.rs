//! Launchers for `kernels/lora.cu`: the rank-r shrink, the expand-and-add, and the weight
//! gradient. With A [r, K], B [J, r] (PEFT layout) and s = alpha / r, a LoRA linear is
//! - forward: `lora_shrink_fwd(h, x, A, Rows, 1)`, then `lora_expand_fwd(y, h, B, Cols, s)`;
//! - backward: `lora_shrink_fwd(dh, dy, B, Cols, s)`, `lora_expand_fwd(dx, dh, A, Rows, 1)`,
//!   `lora_wgrad_bwd(dA, dh, x, Rows, 1)`, `lora_wgrad_bwd(dB, h, dy, Cols, s)`
//!
//! (`Rows`/`Cols` are [`LoraLayout`] variants.)

use cudarc::driver::{CudaView, CudaViewMut, DeviceRepr, LaunchConfig, PushKernelArg};

use super::{Dtype, Kernel, blocks, grid_dim, int, long, need_len, shape_err, sym};
use crate::engine::cuda::{CudaDevice, CudaError};

const SHRINK_ROWS: usize = 4;
const EXPAND_ROWS: usize = 8;
const MAX_RANK: usize = 256;
const WGRAD_K: usize = 8;
const WGRAD_NCHUNK: usize = 512;

/// Storage of a LoRA weight relative to the rank axis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoraLayout {
    /// [r, dim]: row k is contiguous (lora_A).
    Rows,
    /// [dim, r]: column k is strided by r (lora_B).
    Cols,
}

impl LoraLayout {
    /// (stride between rank index k, stride between dim index j) for a weight of `dim` x `r`.
    fn strides(self, dim: usize, r: usize) -> (usize, usize) {
        match self {
            LoraLayout::Rows => (dim, 1),
            LoraLayout::Cols => (1, r),
        }
    }
}

/// Enqueues one of lora.cu's kernels, which all take (out*, const a*, const b*, long long
/// stride, long long stride, int n, int dim, int rank, float scale); `strides` in the kernel's
/// order, `dims` = (n, dim, rank).
///
/// # Safety
/// `kn` must be a lora.cu kernel and `out`, `a`, `b` sized for `dims` as that kernel reads them.
#[allow(clippy::too_many_arguments)]
unsafe fn launch_lora<O: DeviceRepr, A: DeviceRepr, B: DeviceRepr>(
    dev: &CudaDevice,
    kn: &'static str,
    cfg: LaunchConfig,
    out: &mut CudaViewMut<'_, O>,
    a: &CudaView<'_, A>,
    b: &CudaView<'_, B>,
    strides: (usize, usize),
    (n, dim, rank): (usize, usize, usize),
    scale: f32,
) -> Result<(), CudaError> {
    let (s0, s1) = (long(kn, "stride", strides.0)?, long(kn, "stride", strides.1)?);
    let (ni, di, ri) = (int(kn, "n", n)?, int(kn, "dim", dim)?, int(kn, "rank", rank)?);
    let f = Kernel::load(dev, "lora.cu", kn)?;
    // SAFETY: the buffer sizes are this function's contract; the argument list is the shared
    // signature above.
    unsafe {
        f.launch(cfg, |l| {
            l.arg(out).arg(a).arg(b).arg(&s0).arg(&s1).arg(&ni).arg(&di).arg(&ri).arg(&scale);
        })
    }
}

/// 256-column tiles of a `dim`-wide row along the grid's x (expand and wgrad).
fn column_tiles(k: &'static str, dim: usize) -> Result<u32, CudaError> {
    grid_dim(k, "column tiles", dim.div_ceil(256), i32::MAX as u32)
}

/// (n, dim) of a LoRA product whose rank-side operand `u` is [n, rank] and whose weight-side
/// buffer `w` holds rank * dim elements; `what` names them in the error.
fn rank_split(
    k: &'static str,
    what: (&str, &str),
    w: usize,
    u: usize,
    rank: usize,
) -> Result<(usize, usize), CudaError> {
    check_rank(k, rank)?;
    if !w.is_multiple_of(rank) || !u.is_multiple_of(rank) {
        return Err(shape_err(
            k,
            format!("{} ({w}) and {} ({u}) must be multiples of rank {rank}", what.0, what.1),
        ));
    }
    Ok((u / rank, w / rank))
}

fn check_rank(k: &'static str, r: usize) -> Result<(), CudaError> {
    if r == 0 || r > MAX_RANK {
        return Err(shape_err(k, format!("rank {r} must be in 1..={MAX_RANK}")));
    }
    Ok(())
}

/// h[n, k] = s * sum_j x[n, j] W(k, j) for x [N, dim] and an f32 weight W of rank r.
pub fn lora_shrink_fwd<T: Dtype>(
    dev: &CudaDevice,
    h: &mut CudaViewMut<'_, f32>,
    x: &CudaView<'_, T>,
    w: &CudaView<'_, f32>,
    layout: LoraLayout,
    rank: usize,
    scale: f32,
) -> Result<(), CudaError> {
    let kn = sym!(T, "lora_shrink_fwd");
    check_rank(kn, rank)?;
    if w.len() % rank != 0 {
        return Err(shape_err(kn, format!("weight of {} elements is not rank {rank}", w.len())));
    }
    let dim = w.len() / rank;
    if dim == 0 || x.len() % dim != 0 {
        return Err(shape_err(kn, format!("x of {} elements is not [N, {dim}]", x.len())));
    }
    let n = x.len() / dim;
    need_len(kn, "h", h.len(), n * rank)?;
    if n == 0 {
        return Ok(());
    }
    let (wk, wj) = layout.strides(dim, rank);
    let groups = grid_dim(kn, "row groups", n.div_ceil(SHRINK_ROWS), i32::MAX as u32)?;
    let cfg = blocks((groups, 1, 1), 256);
    // SAFETY: x [n, dim], w [rank * dim], h [n, rank] (checked); strides address w within
    // rank * dim for both layouts.
    unsafe { launch_lora(dev, kn, cfg, h, x, w, (wk, wj), (n, dim, rank), scale) }
}

/// y[n, j] += s * sum_k h[n, k] W(j, k) for y [N, dim], h [N, r] f32.
pub fn lora_expand_fwd<T: Dtype>(
    dev: &CudaDevice,
    y: &mut CudaViewMut<'_, T>,
    h: &CudaView<'_, f32>,
    w: &CudaView<'_, f32>,
    layout: LoraLayout,
    rank: usize,
    scale: f32,
) -> Result<(), CudaError> {
    let kn = sym!(T, "lora_expand_fwd");
    let (n, dim) = rank_split(kn, ("weight", "h"), w.len(), h.len(), rank)?;
    need_len(kn, "y", y.len(), n * dim)?;
    if n == 0 || dim == 0 {
        return Ok(());
    }
    // the weight is read as W(j, k): j strides like the "dim" index of `strides`
    let (wk, wj) = layout.strides(dim, rank);
    let cfg = blocks(
        (column_tiles(kn, dim)?, grid_dim(kn, "row groups", n.div_ceil(EXPAND_ROWS), 65_535)?, 1),
        256,
    );
    // SAFETY: y [n, dim], h [n, rank], w [rank * dim] (checked); rank <= 256 fits the kernel's
    // static [8][256] shared tile.
    unsafe { launch_lora(dev, kn, cfg, y, h, w, (wj, wk), (n, dim, rank), scale) }
}

/// dW(k, j) += s * sum_n u[n, k] v[n, j] for u [N, r] f32, v [N, dim]; dW f32 in `layout`.
pub fn lora_wgrad_bwd<T: Dtype>(
    dev: &CudaDevice,
    dw: &mut CudaViewMut<'_, f32>,
    u: &CudaView<'_, f32>,
    v: &CudaView<'_, T>,
    layout: LoraLayout,
    rank: usize,
    scale: f32,
) -> Result<(), CudaError> {
    let kn = sym!(T, "lora_wgrad_bwd");
    let (n, dim) = rank_split(kn, ("dW", "u"), dw.len(), u.len(), rank)?;
    need_len(kn, "v", v.len(), n * dim)?;
    if n == 0 || dim == 0 {
        return Ok(());
    }
    let cfg = blocks(
        (
            column_tiles(kn, dim)?,
            grid_dim(kn, "rank groups", rank.div_ceil(WGRAD_K), 65_535)?,
            grid_dim(kn, "token chunks", n.div_ceil(WGRAD_NCHUNK), 65_535)?,
        ),
        256,
    );
    // SAFETY: dW [rank * dim], u [n, rank], v [n, dim] (checked).
    unsafe { launch_lora(dev, kn, cfg, dw, u, v, layout.strides(dim, rank), (n, dim, rank), scale) }
}
