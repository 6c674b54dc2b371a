//! Launchers for `kernels/lora.cu`: the segmented (multi-tenant) LoRA shrink, expand-and-add
//! and weight gradient. A call covers rows `row_off .. row_off + n` of a pass whose rows are
//! split into segments, each with its own adapter or none ([`LoraSegs`], built per pass by
//! `cuda::segment`); one tenant is one segment. With A [r, K], B [J, r] (PEFT layout) and
//! s = alpha / r per segment, a LoRA linear is
//! - forward: `shrink(h, x, A)`, then `expand(y, h, B, scaled)`;
//! - backward: `shrink(dh, dy, B, scaled)`, `expand(dx, dh, A)`, `wgrad(dA, dh, x)`,
//!   `wgrad(dB, h, dy, scaled)`.

use std::ops::Range;

use cudarc::driver::{CudaView, CudaViewMut, DeviceRepr, LaunchConfig, PushKernelArg};

use super::{Dtype, Kernel, blocks, grid_dim, int, long, need_len, shape_err, sym};
use crate::engine::cuda::{CudaDevice, CudaError};

const SHRINK_ROWS: usize = 4;
const EXPAND_ROWS: usize = 8;
/// Largest rank the expand kernel's shared tile holds.
pub const MAX_RANK: usize = 256;
const WGRAD_K: usize = 8;
const WGRAD_NCHUNK: usize = 512;
/// u64 entries per segment in a table: (A, B, dA, dB addresses, rank, scale bits).
pub const TAB_STRIDE: usize = 6;

/// Which tensor of each segment's LoRA module a kernel reads or accumulates into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoraTensor {
    /// lora_A [r, in].
    A = 0,
    /// lora_B [out, r].
    B = 1,
    /// The gradient of lora_A.
    GradA = 2,
    /// The gradient of lora_B.
    GradB = 3,
}

/// One (layer, target)'s segmented adapter table, as the kernels read it.
///
/// `tab` holds [`TAB_STRIDE`] u64 per segment: the device addresses of the segment's A, B and
/// their gradients (0 where the segment has no LoRA here or does not train), its rank and its
/// scale's f32 bits; `seg` [nseg + 1] the segments' first rows (and the end); `bounds` and
/// `ranks` are the same numbers on the host, for sizing grids and checking buffers.
pub struct LoraSegs<'a> {
    pub tab: CudaView<'a, u64>,
    pub seg: CudaView<'a, i32>,
    pub bounds: &'a [usize],
    pub ranks: &'a [usize],
    /// (in, out) of the module: A is [r, in], B is [out, r].
    pub dims: (usize, usize),
}

impl LoraSegs<'_> {
    /// The largest rank among the segments: the row stride of rank-space buffers.
    pub fn max_rank(&self) -> usize {
        self.ranks.iter().copied().max().unwrap_or(0)
    }

    /// Tiles of `tile` rows over every segment's part of `rows` that has a LoRA (the kernels'
    /// `seg_tile` enumerates the same tiles, skipping none; a segment without one returns).
    fn tiles(&self, rows: &Range<usize>, tile: usize) -> usize {
        self.bounds
            .windows(2)
            .map(|w| {
                let (lo, hi) = (w[0].max(rows.start), w[1].min(rows.end));
                if hi > lo { (hi - lo).div_ceil(tile) } else { 0 }
            })
            .sum()
    }
}

/// The geometry of one call: its rows, the width `dim` of its row-space operand, the row
/// stride `hs` of its rank-space operand and the first column `col0` of a B-side tensor.
#[derive(Debug, Clone)]
pub struct SegCall {
    pub rows: Range<usize>,
    pub dim: usize,
    pub hs: usize,
    pub col0: usize,
}

/// Checks `call` against the table and the two operands' lengths (rank-space `rank_len`,
/// row-space `row_len`); returns (n, tiles of `tile` rows).
fn check(
    kn: &'static str,
    ls: &LoraSegs<'_>,
    which: LoraTensor,
    call: &SegCall,
    (rank_len, row_len): (usize, usize),
    tile: usize,
) -> Result<(usize, usize), CudaError> {
    let nseg = ls.ranks.len();
    need_len(kn, "table", ls.tab.len(), nseg * TAB_STRIDE)?;
    need_len(kn, "segment starts", ls.seg.len(), nseg + 1)?;
    need_len(kn, "host segment starts", ls.bounds.len(), nseg + 1)?;
    if !ls.bounds.is_sorted() || call.rows.end > ls.bounds[nseg] || call.rows.start > call.rows.end
    {
        return Err(shape_err(kn, format!("rows {:?} outside the segments", call.rows)));
    }
    let rmax = ls.max_rank();
    if rmax > MAX_RANK || call.hs < rmax {
        return Err(shape_err(kn, format!("rank {rmax} with stride {} (max {MAX_RANK})", call.hs)));
    }
    let (a_side, full) = match which {
        LoraTensor::A | LoraTensor::GradA => (true, ls.dims.0),
        LoraTensor::B | LoraTensor::GradB => (false, ls.dims.1),
    };
    // A-side tensors are addressed whole ([r, in] rows); B-side ones from column col0
    let fits =
        if a_side { call.col0 == 0 && call.dim == full } else { call.col0 + call.dim <= full };
    if !fits {
        return Err(shape_err(
            kn,
            format!("columns {}+{} of a {full}-wide tensor", call.col0, call.dim),
        ));
    }
    let n = call.rows.len();
    need_len(kn, "rank-space operand", rank_len, n * call.hs)?;
    need_len(kn, "row-space operand", row_len, n * call.dim)?;
    Ok((n, ls.tiles(&call.rows, tile)))
}

/// The kernels' first parameter: written (shrink, expand) or read (wgrad, whose output is
/// reached through the table).
enum First<'b, 'a, O> {
    Out(&'b mut CudaViewMut<'a, O>),
    In(&'b CudaView<'a, O>),
}

/// Enqueues one of lora.cu's kernels, which all take (first*, const in*, const u64* tab, int
/// which, int scaled, const int* seg, int nseg, int row_off, int n, int dim, int hs, long long
/// col0).
///
/// # Safety
/// The table's addresses must point at live tensors of the shapes `ls.ranks` / `ls.dims`
/// give, written by nothing else while the stream runs the kernel; `out` and `inp` are checked.
#[allow(clippy::too_many_arguments)]
unsafe fn launch_seg<O: DeviceRepr, I: DeviceRepr>(
    dev: &CudaDevice,
    kn: &'static str,
    cfg: LaunchConfig,
    first: First<'_, '_, O>,
    inp: &CudaView<'_, I>,
    ls: &LoraSegs<'_>,
    (which, scaled): (LoraTensor, bool),
    call: &SegCall,
) -> Result<(), CudaError> {
    let (which, scaled) = (which as i32, i32::from(scaled));
    let nseg = int(kn, "segments", ls.ranks.len())?;
    let (off, n) = (int(kn, "row offset", call.rows.start)?, int(kn, "rows", call.rows.len())?);
    let (dim, hs, col0) =
        (int(kn, "dim", call.dim)?, int(kn, "hs", call.hs)?, long(kn, "col0", call.col0)?);
    let f = Kernel::load(dev, "lora.cu", kn)?;
    // SAFETY: the buffers are checked by the callers, the table is this function's contract,
    // and the argument list is the shared signature above.
    unsafe {
        f.launch(cfg, |l| {
            match first {
                First::Out(o) => l.arg(o),
                First::In(u) => l.arg(u),
            };
            l.arg(inp).arg(&ls.tab).arg(&which).arg(&scaled).arg(&ls.seg).arg(&nseg);
            l.arg(&off).arg(&n).arg(&dim).arg(&hs).arg(&col0);
        })
    }
}

/// 256-column tiles of a `dim`-wide row along the grid's x (expand and wgrad).
fn column_tiles(k: &'static str, dim: usize) -> Result<u32, CudaError> {
    grid_dim(k, "column tiles", dim.div_ceil(256), i32::MAX as u32)
}

/// h[n, k] = s * sum_j x[n, j] W(k, j) over each segment's rows, W = its `which` tensor
/// (s = its scale when `scaled`, else 1); h is [n, hs], x [n, dim].
///
/// # Safety
/// See [`LoraSegs`]: the table must address live tensors of its stated shapes.
pub unsafe fn lora_seg_shrink<T: Dtype>(
    dev: &CudaDevice,
    h: &mut CudaViewMut<'_, f32>,
    x: &CudaView<'_, T>,
    ls: &LoraSegs<'_>,
    w: (LoraTensor, bool),
    call: &SegCall,
) -> Result<(), CudaError> {
    let kn = sym!(T, "lora_seg_shrink");
    let (n, tiles) = check(kn, ls, w.0, call, (h.len(), x.len()), SHRINK_ROWS)?;
    if n == 0 || tiles == 0 {
        return Ok(());
    }
    let cfg = blocks((grid_dim(kn, "row tiles", tiles, i32::MAX as u32)?, 1, 1), 256);
    // SAFETY: h [n, hs] and x [n, dim] (checked); the table is the caller's contract.
    unsafe { launch_seg(dev, kn, cfg, First::Out(h), x, ls, w, call) }
}

/// y[n, j] += s * sum_k h[n, k] W(k, j) over each segment's rows; y is [n, dim], h [n, hs].
///
/// # Safety
/// See [`lora_seg_shrink`].
pub unsafe fn lora_seg_expand<T: Dtype>(
    dev: &CudaDevice,
    y: &mut CudaViewMut<'_, T>,
    h: &CudaView<'_, f32>,
    ls: &LoraSegs<'_>,
    w: (LoraTensor, bool),
    call: &SegCall,
) -> Result<(), CudaError> {
    let kn = sym!(T, "lora_seg_expand");
    let (n, tiles) = check(kn, ls, w.0, call, (h.len(), y.len()), EXPAND_ROWS)?;
    if n == 0 || tiles == 0 || call.dim == 0 {
        return Ok(());
    }
    let cfg =
        blocks((column_tiles(kn, call.dim)?, grid_dim(kn, "row tiles", tiles, 65_535)?, 1), 256);
    // SAFETY: y [n, dim], h [n, hs] (checked); ranks <= 256 fit the kernel's static tile.
    unsafe { launch_seg(dev, kn, cfg, First::Out(y), h, ls, w, call) }
}

/// dW(k, j) += s * sum_n u[n, k] v[n, j] over each segment's rows, into its `which` gradient;
/// u is [n, hs], v [n, dim].
///
/// # Safety
/// See [`lora_seg_shrink`].
pub unsafe fn lora_seg_wgrad<T: Dtype>(
    dev: &CudaDevice,
    u: &CudaView<'_, f32>,
    v: &CudaView<'_, T>,
    ls: &LoraSegs<'_>,
    dw: (LoraTensor, bool),
    call: &SegCall,
) -> Result<(), CudaError> {
    let kn = sym!(T, "lora_seg_wgrad");
    if !matches!(dw.0, LoraTensor::GradA | LoraTensor::GradB) {
        return Err(shape_err(kn, "the weight gradient goes into a gradient tensor"));
    }
    let (n, tiles) = check(kn, ls, dw.0, call, (u.len(), v.len()), WGRAD_NCHUNK)?;
    let rmax = ls.max_rank();
    if n == 0 || tiles == 0 || call.dim == 0 || rmax == 0 {
        return Ok(());
    }
    let cfg = blocks(
        (
            column_tiles(kn, call.dim)?,
            grid_dim(kn, "rank groups", rmax.div_ceil(WGRAD_K), 65_535)?,
            grid_dim(kn, "row tiles", tiles, 65_535)?,
        ),
        256,
    );
    // SAFETY: u [n, hs], v [n, dim] (checked); the table is the caller's contract.
    unsafe { launch_seg(dev, kn, cfg, First::In(u), v, ls, dw, call) }
}
