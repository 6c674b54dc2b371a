//! Launchers for `kernels/lora.cu`: the segmented (multi-tenant) LoRA shrink, expand-and-add
//! and weight gradient. A call covers rows `row_off .. row_off + n` of a pass whose rows are
//! split into segments, each with its own adapter or none ([`LoraSegs`], built per pass by
//! `cuda::segment`); one tenant is one segment. With A [r, K], B [J, r] (PEFT layout) and
//! s = alpha / r per segment, a LoRA linear is
//! - forward: `shrink(h, x, A)`, then `expand(y, h, B)`;
//! - backward: `shrink(dh, dy, B)`, `expand(dx, dh, A)`, `wgrad(dA, dh, x)`, `wgrad(dB, h, dy)`,
//!
//! the B side scaled by s (see [`lora_seg`]).

use std::ops::Range;

use cudarc::driver::{CudaView, CudaViewMut, PushKernelArg};

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
/// The row-space operand is the column window `off .. off + dim` of rows `ld` apart (element
/// (n, j) at `n * ld + off + j`), so one target's LoRA works in place on its part of a fused
/// projection's output; a compact operand has `ld = dim`, `off = 0` ([`SegCall::compact`]).
#[derive(Debug, Clone)]
pub struct SegCall {
    pub rows: Range<usize>,
    pub dim: usize,
    pub hs: usize,
    pub col0: usize,
    pub ld: usize,
    pub off: usize,
}

impl SegCall {
    /// A call whose row-space operand is a compact [n, dim] tensor.
    pub fn compact(rows: Range<usize>, dim: usize, hs: usize, col0: usize) -> Self {
        SegCall { rows, dim, hs, col0, ld: dim, off: 0 }
    }

    /// The same call on columns `off .. off + dim` of rows `ld` wide.
    pub fn window(self, ld: usize, off: usize) -> Self {
        SegCall { ld, off, ..self }
    }
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
    if call.off + call.dim > call.ld {
        return Err(shape_err(
            kn,
            format!("columns {}+{} of rows {} wide", call.off, call.dim, call.ld),
        ));
    }
    let n = call.rows.len();
    need_len(kn, "rank-space operand", rank_len, n * call.hs)?;
    // the row-space operand holds its rows whole (all `ld` columns), the window inside them
    need_len(kn, "row-space operand", row_len, n * call.ld)?;
    Ok((n, ls.tiles(&call.rows, tile)))
}

/// One segmented LoRA product and its operands (`f` f32 rank-space [n, hs], `t` row-space
/// [n, dim]); the kernel's `op`.
/// (`'o` and `'i` are the two operands' buffer lifetimes, `'b` their borrows'.)
pub enum SegOp<'b, 'o, 'i, T> {
    /// h[n, k] = s * sum_j x[n, j] W(k, j).
    Shrink { h: &'b mut CudaViewMut<'o, f32>, x: &'b CudaView<'i, T> },
    /// y[n, j] += s * sum_k h[n, k] W(k, j).
    Expand { y: &'b mut CudaViewMut<'o, T>, h: &'b CudaView<'i, f32> },
    /// dW(k, j) += s * sum_n u[n, k] v[n, j] (W is then a gradient tensor).
    Wgrad { u: &'b CudaView<'o, f32>, v: &'b CudaView<'i, T> },
}

/// 256-column tiles of a `dim`-wide row along the grid's x (expand and wgrad).
fn column_tiles(k: &'static str, dim: usize) -> Result<u32, CudaError> {
    grid_dim(k, "column tiles", dim.div_ceil(256), i32::MAX as u32)
}

/// Enqueues `op` over each segment's rows of `call`, W = each segment's tensor `w`, scaled by
/// the segment's s on the B side (B, dB) and by 1 on the A side.
///
/// # Safety
/// See [`LoraSegs`]: the table must address live tensors of the shapes its ranks and dims
/// give, written by nothing else while the stream runs the kernel (the operands are checked).
pub unsafe fn lora_seg<T: Dtype>(
    dev: &CudaDevice,
    op: SegOp<'_, '_, '_, T>,
    ls: &LoraSegs<'_>,
    w: LoraTensor,
    call: &SegCall,
) -> Result<(), CudaError> {
    let kn = sym!(T, "lora_seg");
    let grad = matches!(w, LoraTensor::GradA | LoraTensor::GradB);
    let (code, tile, lens) = match &op {
        SegOp::Shrink { h, x } => (0i32, SHRINK_ROWS, (h.len(), x.len())),
        SegOp::Expand { y, h } => (1, EXPAND_ROWS, (h.len(), y.len())),
        SegOp::Wgrad { u, v } => (2, WGRAD_NCHUNK, (u.len(), v.len())),
    };
    if grad != (code == 2) {
        return Err(shape_err(kn, "weight gradients, and only they, go into gradient tensors"));
    }
    let (n, tiles) = check(kn, ls, w, call, lens, tile)?;
    if n == 0 || tiles == 0 || call.dim == 0 {
        return Ok(());
    }
    let tiles = |max| grid_dim(kn, "row tiles", tiles, max);
    let grid = match code {
        0 => (tiles(i32::MAX as u32)?, 1, 1),
        1 => (column_tiles(kn, call.dim)?, tiles(65_535)?, 1),
        _ => {
            let ranks = grid_dim(kn, "rank groups", ls.max_rank().div_ceil(WGRAD_K), 65_535)?;
            (column_tiles(kn, call.dim)?, ranks, tiles(65_535)?)
        }
    };
    let which = w as i32;
    let nseg = int(kn, "segments", ls.ranks.len())?;
    let (off, rows) = (int(kn, "row offset", call.rows.start)?, int(kn, "rows", n)?);
    let (dim, hs) = (int(kn, "dim", call.dim)?, int(kn, "hs", call.hs)?);
    let col0 = long(kn, "col0", call.col0)?;
    let (tld, toff) = (long(kn, "ld", call.ld)?, long(kn, "off", call.off)?);
    let r = ls.max_rank();
    let flops = 2.0 * (n * call.dim * r) as f64;
    // a window moves only its own columns (whole 32-byte sectors for rows >= 16 wide)
    let bytes = n * call.dim * std::mem::size_of::<T>() * if code == 1 { 2 } else { 1 }
        + n * call.hs * 4
        + r * call.dim * 4 * if code == 2 { 2 } else { 1 };
    let f = Kernel::load(dev, "lora.cu", kn)?.cost(flops, bytes as f64);
    // SAFETY: both operands are checked against the call (`check`); the table is this
    // function's contract; the argument list is the kernel's signature.
    unsafe {
        f.launch_with(blocks(grid, 256), |l| {
            l.arg(&code);
            match op {
                SegOp::Shrink { h, x } => l.arg(h).arg(x),
                SegOp::Expand { y, h } => l.arg(h).arg(y),
                SegOp::Wgrad { u, v } => l.arg(u).arg(v),
            };
            l.arg(&ls.tab).arg(&which).arg(&ls.seg).arg(&nseg).arg(&off);
            l.arg(&rows).arg(&dim).arg(&hs).arg(&col0).arg(&tld).arg(&toff);
        })
    }
}
