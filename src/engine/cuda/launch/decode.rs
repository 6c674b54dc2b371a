//! Launchers for `kernels/kv_cache.cu`: paged KV-cache append, and split-KV ("flash-decoding")
//! decode attention — phase 1 streams each split of every sequence's context once per kv head,
//! phase 2 merges the splits' partial softmax states.

use cudarc::driver::{CudaView, CudaViewMut};

use super::attention::{MAX_GRID_YZ, check_gqa, head_ints};
use super::views::Kv;
use super::{Args, Dtype, Kernel, blocks, grid_dim, int, long, need_len, shape_err, sym};
use crate::engine::cuda::{CudaDevice, CudaError};

// Constants of kv_cache.cu (keep in sync with the #defines there).
/// Query heads (one warp each) a phase-1 block serves.
const DEC_HEADS: usize = 8;
/// Fewest keys one split covers: shorter chunks would cost more in merging than they save.
const DEC_MIN_CHUNK: usize = 64;
/// Phase-1 blocks to aim for: twice the 132 SMs of an H100, so every SM has a second block to
/// hide the first one's tail. A smaller GPU just runs more waves.
const TARGET_BLOCKS: usize = 2 * 132;
/// Upper bound on the split count (bounds the workspace and the combine's loop).
const MAX_SPLITS: usize = 256;

/// Shape of a decode-attention call.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DecodeShape {
    /// Query heads.
    pub q_heads: usize,
    /// Key/value heads (divides `q_heads`).
    pub kv_heads: usize,
    /// Head dimension (multiple of 32, at most 256).
    pub head_dim: usize,
    /// Tokens per cache block.
    pub block_size: usize,
    /// Columns of the block table.
    pub max_blocks: usize,
    /// Longest context in the batch as far as the caller knows (capped at `max_blocks *
    /// block_size`). It sizes the split count and the profiler's cost only: each sequence's
    /// whole context is attended to whatever this says (a longer one gets longer chunks).
    pub max_context: usize,
    /// Softmax scale.
    pub scale: f32,
}

impl DecodeShape {
    /// Query heads per kv head (0 for an invalid head layout, which the launcher refuses).
    fn group(&self) -> usize {
        self.q_heads.checked_div(self.kv_heads).unwrap_or(0)
    }

    /// Phase-1 blocks per (kv head, sequence, split): a group of more than DEC_HEADS query
    /// heads is served in several passes.
    fn passes(&self) -> usize {
        self.group().div_ceil(DEC_HEADS).max(1)
    }

    /// Context length the launch is sized for.
    fn context(&self) -> usize {
        self.max_context.min(self.max_blocks.saturating_mul(self.block_size))
    }

    /// Splits per sequence: enough phase-1 blocks to fill the GPU (TARGET_BLOCKS), but no
    /// chunk of the longest context shorter than DEC_MIN_CHUNK keys.
    fn splits(&self, batch: usize) -> usize {
        let by_len = self.context().div_ceil(DEC_MIN_CHUNK);
        let per_split = self.kv_heads.saturating_mul(self.passes()).saturating_mul(batch).max(1);
        by_len.min(TARGET_BLOCKS.div_ceil(per_split)).clamp(1, MAX_SPLITS)
    }
}

/// f32 elements of the workspace [`decode_attention_fwd`] needs for `batch` sequences: per
/// (sequence, query head, split) a partial state m, l, acc[head_dim].
pub fn decode_workspace_len(batch: usize, s: &DecodeShape) -> usize {
    batch
        .saturating_mul(s.q_heads)
        .saturating_mul(s.splits(batch))
        .saturating_mul(s.head_dim.saturating_add(2))
}

/// Writes k/v [N, Hkv, hd] into the paged caches [num_slots, Hkv, hd] at `slots` [N]; slots
/// outside [0, num_slots) (e.g. -1 for padding) are skipped.
pub fn kv_append_fwd<T: Dtype>(
    dev: &CudaDevice,
    cache: Kv<&mut CudaViewMut<'_, T>>,
    new: Kv<&CudaView<'_, T>>,
    slots: &CudaView<'_, i32>,
    row: usize,
) -> Result<(), CudaError> {
    let kn = sym!(T, "kv_append_fwd");
    let (Kv { k: k_cache, v: v_cache }, Kv { k, v }) = (cache, new);
    let n = slots.len();
    if row == 0 || k_cache.len() % row != 0 {
        return Err(shape_err(
            kn,
            format!("cache of {} elements is not [slots, {row}]", k_cache.len()),
        ));
    }
    need_len(kn, "v_cache", v_cache.len(), k_cache.len())?;
    need_len(kn, "k", k.len(), n * row)?;
    need_len(kn, "v", v.len(), n * row)?;
    if n == 0 {
        return Ok(());
    }
    let num_slots = long(kn, "num_slots", k_cache.len() / row)?;
    let (ni, ri) = (int(kn, "n", n)?, int(kn, "row", row)?);
    let cfg = blocks((grid_dim(kn, "n", n, i32::MAX as u32)?, 1, 1), 128);
    // k and v read, then written into the cache: a copy
    let bytes = 4.0 * (n * row) as f64 * std::mem::size_of::<T>() as f64;
    let f = Kernel::load(dev, "kv_cache.cu", kn)?.cost(0.0, bytes);
    // SAFETY: caches are [num_slots, row], k/v [n, row], slots [n] (checked); the kernel skips
    // slots outside [0, num_slots).
    unsafe { f.launch(cfg, (k_cache, v_cache, k, v, slots, &ni, &ri, &num_slots)) }
}

/// Checks a decode call's shapes; returns the batch.
fn check_decode(
    kn: &'static str,
    s: &DecodeShape,
    lens: (usize, usize, usize, usize),
    cache: (usize, usize),
) -> Result<usize, CudaError> {
    let (q, out, table, ctx) = lens;
    check_gqa(kn, s.q_heads, s.kv_heads)?;
    if s.head_dim == 0 || !s.head_dim.is_multiple_of(32) || s.head_dim > 256 || s.block_size == 0 {
        return Err(shape_err(
            kn,
            format!("head_dim {} must be a multiple of 32 <= 256, block_size > 0", s.head_dim),
        ));
    }
    let b = ctx;
    need_len(kn, "q", q, b * s.q_heads * s.head_dim)?;
    need_len(kn, "out", out, q)?;
    need_len(kn, "block_table", table, b * s.max_blocks)?;
    let row = s.kv_heads * s.head_dim;
    if !cache.0.is_multiple_of(row) {
        return Err(shape_err(
            kn,
            format!("cache of {} elements is not [slots, {}, {}]", cache.0, s.kv_heads, s.head_dim),
        ));
    }
    need_len(kn, "v_cache", cache.1, cache.0)?;
    Ok(b)
}

/// One new token per sequence attending to its cached context. q/out: [B, Hq, hd];
/// caches [num_slots, Hkv, hd]; block_table [B, max_blocks]; ctx_lens [B] (tokens in cache,
/// including the one just appended); `workspace` [`decode_workspace_len`] f32 (overwritten).
#[allow(clippy::too_many_arguments)]
pub fn decode_attention_fwd<T: Dtype>(
    dev: &CudaDevice,
    out: &mut CudaViewMut<'_, T>,
    workspace: &mut CudaViewMut<'_, f32>,
    q: &CudaView<'_, T>,
    cache: Kv<&CudaView<'_, T>>,
    block_table: &CudaView<'_, i32>,
    ctx_lens: &CudaView<'_, i32>,
    s: &DecodeShape,
) -> Result<(), CudaError> {
    let kn = sym!(T, "decode_split_fwd");
    let Kv { k: k_cache, v: v_cache } = cache;
    let lens = (q.len(), out.len(), block_table.len(), ctx_lens.len());
    let b = check_decode(kn, s, lens, (k_cache.len(), v_cache.len()))?;
    need_len(kn, "workspace", workspace.len(), decode_workspace_len(b, s))?;
    if b == 0 {
        return Ok(());
    }
    let num_slots = long(kn, "num_slots", k_cache.len() / (s.kv_heads * s.head_dim))?;
    let (hq, hkv, hd) = head_ints(kn, s.q_heads, s.kv_heads, s.head_dim)?;
    let (bs, mb) = (int(kn, "block_size", s.block_size)?, int(kn, "max_blocks", s.max_blocks)?);
    let (splits, passes) = (s.splits(b), s.passes());
    let warps = s.group().min(DEC_HEADS);
    let grid = (
        grid_dim(kn, "splits", splits, i32::MAX as u32)?,
        grid_dim(kn, "kv_heads x passes", s.kv_heads * passes, MAX_GRID_YZ)?,
        grid_dim(kn, "batch", b, MAX_GRID_YZ)?,
    );
    // costed as if every sequence had the longest context: 2 FLOPs per (key, head, dim) for
    // q.k and 2 for p.v; K and V read once per (kv head, pass), the states written once
    let (ctx, esz) = (s.context() as f64, std::mem::size_of::<T>() as f64);
    let heads = (b * s.q_heads * s.head_dim) as f64;
    let states = (b * s.q_heads * splits * (s.head_dim + 2)) as f64 * 4.0;
    let kv_bytes = 2.0 * ctx * (b * s.kv_heads * passes * s.head_dim) as f64 * esz;
    let f = Kernel::load(dev, "kv_cache.cu", kn)?
        .cost(4.0 * ctx * heads, kv_bytes + heads * esz + states);
    // SAFETY: q [b, hq, hd], block_table [b, max_blocks], caches [num_slots, hkv, hd],
    // workspace [b, hq, splits, hd + 2] with splits = grid.x (checked); the kernel clamps
    // ctx_lens to the table, skips slots outside the cache, and indexes q and the workspace
    // only for the heads of its group below hq (hq % hkv == 0).
    unsafe {
        f.launch_with(blocks(grid, (warps * 32) as u32), |l| {
            (&mut *workspace, q, k_cache, v_cache, block_table, ctx_lens).push(l);
            (&hq, &hkv, &hd, &bs, &mb, &num_slots, &s.scale).push(l);
        })?;
    }

    let kc = sym!(T, "decode_combine_fwd");
    let si = int(kc, "splits", splits)?;
    let grid = (
        grid_dim(kc, "q_heads", s.q_heads, i32::MAX as u32)?,
        grid_dim(kc, "batch", b, MAX_GRID_YZ)?,
        1,
    );
    // per element a weight and two FMAs per split
    let g = Kernel::load(dev, "kv_cache.cu", kc)?
        .cost(3.0 * heads * splits as f64, states + heads * esz);
    let ws = workspace.as_view();
    // SAFETY: out [b, hq, hd] and the workspace as above (checked); one thread per head-dim
    // element (block = hd), the kernel reads exactly the states phase 1 wrote or flagged empty.
    unsafe { g.launch(blocks(grid, s.head_dim as u32), (out, &ws, &hq, &hd, &si)) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(q_heads: usize, kv_heads: usize, max_context: usize) -> DecodeShape {
        DecodeShape {
            q_heads,
            kv_heads,
            head_dim: 128,
            block_size: 16,
            max_blocks: 256,
            max_context,
            scale: 0.1,
        }
    }

    #[test]
    fn split_count_fills_the_gpu_without_short_chunks() {
        // batch 1, 4 kv heads, 4096 keys: 66 splits would fill 264 blocks, chunks of 64 allow 64
        assert_eq!(shape(28, 4, 4096).splits(1), 64);
        // a short context is not cut below 64 keys a chunk; an empty one still has one split
        assert_eq!(shape(28, 4, 100).splits(1), 2);
        assert_eq!(shape(28, 4, 0).splits(1), 1);
        // the context hint is capped at the table's capacity (256 x 16 keys)
        assert_eq!(shape(32, 1, 1 << 20).splits(1), 64);
        // a large batch already fills the GPU
        assert_eq!(shape(28, 4, 4096).splits(64), 2);
        assert_eq!(shape(28, 4, 4096).splits(1000), 1);
        // a group of 12 needs two passes of 8 warps: twice the blocks per split
        assert_eq!(shape(48, 4, 4096).passes(), 2);
        assert_eq!(shape(48, 4, 4096).splits(1), 33);
        // workspace: per (sequence, head, split) m, l and 128 accumulators
        assert_eq!(decode_workspace_len(1, &shape(28, 4, 4096)), 28 * 64 * 130);
        // an invalid head layout sizes nothing that could panic; the launcher refuses it
        assert_eq!(shape(28, 0, 4096).passes(), 1);
        assert!(decode_workspace_len(3, &shape(28, 0, 4096)) > 0);
    }
}
