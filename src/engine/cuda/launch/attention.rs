//! Launchers for `kernels/attention.cu` (packed causal GQA attention, forward and backward; bf16
//! at head dims 32/64/128 goes to the tensor-core kernels of [`super::flash`]); the paged KV
//! cache's kernels are launched from `decode.rs`.

use cudarc::driver::{CudaView, CudaViewMut, LaunchConfig};

use super::flash;
use super::views::Qkv;
use super::{Args, Dtype, Kernel, blocks, grid_dim, int, long, map_n, need_len, shape_err, sym};
use crate::engine::cuda::{CudaDevice, CudaError};

// Tile constants of attention.cu (keep in sync with the #defines there).
const ATT_BK: usize = 32;
const ATT_BQ: usize = 16;
const ATT_FWD_THREADS: u32 = 128;
const ATT_BWD_RB: usize = 8;
const ATT_BWD_THREADS: u32 = 256;
pub(super) const MAX_GRID_YZ: u32 = 65_535;

/// Shape of a packed attention call.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttentionShape {
    /// Query heads.
    pub q_heads: usize,
    /// Key/value heads (divides `q_heads`).
    pub kv_heads: usize,
    /// Head dimension (multiple of 32, at most 256).
    pub head_dim: usize,
    /// Longest sequence in the pack (sizes the grid; a smaller value leaves rows uncomputed).
    pub max_seqlen: usize,
    /// Softmax scale, usually 1/sqrt(head_dim).
    pub scale: f32,
}

fn kv_stride<T>(hd: usize) -> usize {
    hd + 4 / std::mem::size_of::<T>()
}

fn fwd_smem<T>(hd: usize) -> usize {
    2 * ATT_BK * kv_stride::<T>(hd) * std::mem::size_of::<T>() + ATT_BQ * hd * 4
}

fn bwd_smem<T>(hd: usize) -> usize {
    2 * ATT_BK * kv_stride::<T>(hd) * std::mem::size_of::<T>()
        + 2 * ATT_BWD_RB * hd * 4
        + 2 * ATT_BWD_RB * ATT_BK * 4
}

/// Checks that `q_heads` is a positive multiple of `kv_heads` (grouped-query attention).
pub(super) fn check_gqa(k: &'static str, q_heads: usize, kv_heads: usize) -> Result<(), CudaError> {
    if q_heads == 0 || kv_heads == 0 || !q_heads.is_multiple_of(kv_heads) {
        return Err(shape_err(
            k,
            format!("q_heads {q_heads} must be a positive multiple of kv_heads {kv_heads}"),
        ));
    }
    Ok(())
}

/// The kernels' (q_heads, kv_heads, head_dim) parameters as `int`s.
pub(super) fn head_ints(
    k: &'static str,
    q_heads: usize,
    kv_heads: usize,
    head_dim: usize,
) -> Result<(i32, i32, i32), CudaError> {
    Ok((int(k, "q_heads", q_heads)?, int(k, "kv_heads", kv_heads)?, int(k, "head_dim", head_dim)?))
}

/// Checks the head layout and returns (total tokens, batch).
fn check_shape(
    k: &'static str,
    s: &AttentionShape,
    q_len: usize,
    kv_len: usize,
    cu_len: usize,
) -> Result<(usize, usize), CudaError> {
    check_gqa(k, s.q_heads, s.kv_heads)?;
    if s.head_dim == 0 || !s.head_dim.is_multiple_of(32) || s.head_dim > 256 {
        return Err(shape_err(
            k,
            format!("head_dim {} must be a multiple of 32 and <= 256", s.head_dim),
        ));
    }
    if cu_len < 2 {
        return Err(shape_err(k, "cu_seqlens needs at least 2 entries (batch + 1)"));
    }
    let row = s.q_heads * s.head_dim;
    if !q_len.is_multiple_of(row) {
        return Err(shape_err(
            k,
            format!("q of {q_len} elements is not [T, {}, {}]", s.q_heads, s.head_dim),
        ));
    }
    let t = q_len / row;
    need_len(k, "k/v", kv_len, t * s.kv_heads * s.head_dim)?;
    Ok((t, cu_len - 1))
}

/// (FLOPs, bytes) of causal attention over `t` packed rows in `batch` sequences, counted as if
/// the sequences were of equal length: `mults.0` FLOPs per (query, key, head, dim) pair (4 for
/// the forward's two products, 10 for the backward's five) and `mults.1` passes over q, k, v
/// and the output (2 forward: read q, k, v, write out; 4 backward: those and their gradients).
pub(super) fn attention_cost<T>(
    s: &AttentionShape,
    t: usize,
    batch: usize,
    mults: (f64, f64),
) -> (f64, f64) {
    let len = t as f64 / batch.max(1) as f64;
    let pairs = t as f64 * (len + 1.0) / 2.0;
    let flops = mults.0 * pairs * (s.q_heads * s.head_dim) as f64;
    let elems = (t * (s.q_heads + s.kv_heads) * s.head_dim) as f64;
    (flops, mults.1 * elems * std::mem::size_of::<T>() as f64)
}

/// Grid of the tiled attention kernels: `tile.0` rows of the longest sequence per block along
/// x, `tile.1` heads along y, the batch along z; `smem` bytes of dynamic shared memory, opted
/// into on `f` where it exceeds the default.
pub(super) fn tile_cfg(
    f: &Kernel<'_>,
    smem: usize,
    threads: u32,
    tile: (usize, usize),
    s: &AttentionShape,
    batch: usize,
) -> Result<LaunchConfig, CudaError> {
    f.allow_smem(smem)?;
    let k = f.name();
    let grid = (
        grid_dim(k, "max_seqlen tiles", s.max_seqlen.div_ceil(tile.0).max(1), i32::MAX as u32)?,
        grid_dim(k, "heads", tile.1, MAX_GRID_YZ)?,
        grid_dim(k, "batch", batch, MAX_GRID_YZ)?,
    );
    Ok(LaunchConfig { shared_mem_bytes: smem as u32, ..blocks(grid, threads) })
}

/// Causal attention forward over packed sequences. q/out: [T, Hq, hd]; k/v: [T, Hkv, hd];
/// cu_seqlens: [B + 1] prefix sums on the device; lse: [T, Hq] (saved for the backward).
#[allow(clippy::too_many_arguments)]
pub fn attention_fwd<T: Dtype>(
    dev: &CudaDevice,
    out: &mut CudaViewMut<'_, T>,
    lse: &mut CudaViewMut<'_, f32>,
    qkv: Qkv<&CudaView<'_, T>>,
    cu_seqlens: &CudaView<'_, i32>,
    s: &AttentionShape,
) -> Result<(), CudaError> {
    let kn = sym!(T, "attention_fwd");
    let Qkv { q, k, v } = qkv;
    let (t, batch) = check_shape(kn, s, q.len(), k.len(), cu_seqlens.len())?;
    need_len(kn, "v", v.len(), k.len())?;
    need_len(kn, "out", out.len(), q.len())?;
    need_len(kn, "lse", lse.len(), t * s.q_heads)?;
    if t == 0 {
        return Ok(());
    }
    let a = |p: &CudaView<'_, T>| flash::addr(dev, p);
    let ptrs = [a(q), a(k), a(v), flash::addr(dev, &*out)];
    if flash::serves::<T>(s.head_dim, &ptrs) {
        let p = flash::Packed { cu_seqlens, s, t, batch };
        return flash::fwd(dev, (out, lse), qkv, &p);
    }
    let (fl, by) = attention_cost::<T>(s, t, batch, (4.0, 2.0));
    let f = Kernel::load(dev, "attention.cu", kn)?.cost(fl, by);
    let cfg =
        tile_cfg(&f, fwd_smem::<T>(s.head_dim), ATT_FWD_THREADS, (ATT_BQ, s.q_heads), s, batch)?;
    let ti = int(kn, "tokens", t)?;
    let (hq, hkv, hd) = head_ints(kn, s.q_heads, s.kv_heads, s.head_dim)?;
    // SAFETY: out/q are [t, hq, hd], k/v [t, hkv, hd], lse [t, hq] (checked); the kernel clamps
    // every cu_seqlens entry into [0, t]; smem matches attention.cu's carve-up (fwd_smem).
    unsafe { f.launch(cfg, (out, lse, q, k, v, cu_seqlens, &ti, &hq, &hkv, &hd, &s.scale)) }
}

/// Gradients of [`attention_fwd`] into `grads` (dq, dk, dv). `dq_accum` [T, Hq, hd] f32 and
/// `delta` [T, Hq] f32 are workspaces (overwritten; the tensor-core path leaves `dq_accum`
/// untouched: its dQ kernel owns whole rows); `out` and `lse` are the forward's outputs.
#[allow(clippy::too_many_arguments)]
pub fn attention_bwd<T: Dtype>(
    dev: &CudaDevice,
    grads: Qkv<&mut CudaViewMut<'_, T>>,
    dq_accum: &mut CudaViewMut<'_, f32>,
    delta: &mut CudaViewMut<'_, f32>,
    dout: &CudaView<'_, T>,
    qkv: Qkv<&CudaView<'_, T>>,
    (out, lse): (&CudaView<'_, T>, &CudaView<'_, f32>),
    cu_seqlens: &CudaView<'_, i32>,
    s: &AttentionShape,
) -> Result<(), CudaError> {
    let kn = sym!(T, "attention_bwd");
    let (Qkv { q: dq, k: dk, v: dv }, Qkv { q, k, v }) = (grads, qkv);
    let (t, batch) = check_shape(kn, s, q.len(), k.len(), cu_seqlens.len())?;
    for (name, len) in [("v", v.len()), ("dk", dk.len()), ("dv", dv.len())] {
        need_len(kn, name, len, k.len())?;
    }
    for (name, len) in
        [("dq", dq.len()), ("dq_accum", dq_accum.len()), ("dout", dout.len()), ("out", out.len())]
    {
        need_len(kn, name, len, q.len())?;
    }
    need_len(kn, "lse", lse.len(), t * s.q_heads)?;
    need_len(kn, "delta", delta.len(), t * s.q_heads)?;
    if t == 0 {
        return Ok(());
    }
    let ti = int(kn, "tokens", t)?;
    let (hq, hkv, hd) = head_ints(kn, s.q_heads, s.kv_heads, s.head_dim)?;

    let kd = sym!(T, "attention_delta_bwd");
    let rows = t * s.q_heads;
    let rows_l = long(kd, "rows", rows)?;
    let cfg_d = blocks((grid_dim(kd, "rows/8", rows.div_ceil(8), i32::MAX as u32)?, 1, 1), 256);
    let elems = (rows * s.head_dim) as f64;
    let bytes = 2.0 * elems * std::mem::size_of::<T>() as f64 + 4.0 * rows as f64;
    let fd = Kernel::load(dev, "attention.cu", kd)?.cost(2.0 * elems, bytes);
    // SAFETY: delta is [rows], dout/out are [rows, hd] (checked); 8 warps per block, one row each.
    unsafe {
        fd.launch(cfg_d, (&mut *delta, dout, out, &rows_l, &hd))?;
    }

    let (a, am) =
        (|p: &CudaView<'_, T>| flash::addr(dev, p), |p: &CudaViewMut<'_, T>| flash::addr(dev, p));
    let ptrs = [a(dout), a(q), a(k), a(v), am(dq), am(dk), am(dv)];
    if flash::serves::<T>(s.head_dim, &ptrs) {
        let delta_v = delta.as_view();
        let p = flash::Packed { cu_seqlens, s, t, batch };
        let grads = Qkv { q: dq, k: dk, v: dv };
        return flash::bwd(dev, grads, dout, qkv, (lse, &delta_v), &p);
    }
    dev.stream().memset_zeros(dq_accum).map_err(CudaError::driver("zeroing dq_accum"))?;
    let (fl, by) = attention_cost::<T>(s, t, batch, (10.0, 4.0));
    let f = Kernel::load(dev, "attention.cu", kn)?.cost(fl, by);
    let cfg =
        tile_cfg(&f, bwd_smem::<T>(s.head_dim), ATT_BWD_THREADS, (ATT_BK, s.kv_heads), s, batch)?;
    let delta_v = delta.as_view();
    // SAFETY: all buffers sized as checked above; cu_seqlens entries are clamped in the kernel;
    // smem matches attention.cu's carve-up (bwd_smem); dq_accum was zeroed on this stream.
    unsafe {
        f.launch_with(cfg, |l| {
            (&mut *dq_accum, dk, dv, dout, q, k, v, lse, &delta_v, cu_seqlens).push(l);
            (&ti, &hq, &hkv, &hd, &s.scale).push(l);
        })?;
    }

    let acc_v = dq_accum.as_view();
    // SAFETY: attention_dq_bwd is (T*, const float*, long long) over indices < n.
    unsafe { map_n(dev, "attention.cu", sym!(T, "attention_dq_bwd"), dq, &[("dq_accum", &acc_v)]) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::bf16;

    #[test]
    fn shared_memory_layout_matches_the_kernel_formulas() {
        // 2 tiles of 32 x (128 + 2) bf16, 16 query rows of 128 f32
        assert_eq!(fwd_smem::<bf16>(128), 2 * 32 * 130 * 2 + 16 * 128 * 4);
        // 2 tiles of 32 x (128 + 1) f32, Q and dO 8 x 128 f32, P and dS 8 x 32 f32
        assert_eq!(bwd_smem::<f32>(128), 2 * 32 * 129 * 4 + 2 * 8 * 128 * 4 + 2 * 8 * 32 * 4);
        // every supported configuration fits the 99 KiB opt-in limit of sm_80+ (sm_86/89)
        for hd in [32, 64, 128, 256] {
            assert!(
                fwd_smem::<f32>(hd) <= 99 * 1024 && bwd_smem::<f32>(hd) <= 99 * 1024,
                "hd {hd}"
            );
        }
    }

    #[test]
    fn shapes_are_checked_before_anything_touches_the_gpu() {
        let s =
            AttentionShape { q_heads: 6, kv_heads: 4, head_dim: 64, max_seqlen: 8, scale: 0.125 };
        assert!(check_shape("k", &s, 6 * 64 * 8, 4 * 64 * 8, 3).is_err());
        let s = AttentionShape { q_heads: 8, kv_heads: 2, head_dim: 80, ..s };
        assert!(check_shape("k", &s, 8 * 80, 2 * 80, 2).is_err());
        let s = AttentionShape { head_dim: 64, ..s };
        assert_eq!(check_shape("k", &s, 8 * 64 * 5, 2 * 64 * 5, 3).unwrap(), (5, 2));
        assert!(check_shape("k", &s, 8 * 64 * 5, 2 * 64 * 4, 3).is_err());
        assert!(check_shape("k", &s, 8 * 64 * 5, 2 * 64 * 5, 1).is_err());
    }
}
