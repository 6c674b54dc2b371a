//! Launchers for `kernels/flash.cu`: tensor-core flash attention, the path [`super::attention_fwd`]
//! and [`super::attention_bwd`] take for bf16 at head dims 32, 64 and 128 (attention.cu's CUDA-core
//! kernels keep f32 and the other head dims). Callers have checked every shape already.

use cudarc::driver::{CudaView, CudaViewMut, DevicePtr, LaunchConfig};

use super::attention::{AttentionShape, attention_cost, tile_cfg};
use super::views::Qkv;
use super::{Dtype, Kernel, int};
use crate::engine::cuda::{CudaDevice, CudaError};

// Tile constants of flash.cu (keep in sync with the #defines there; each pass's inner tile,
// FL_BN / FL_BN_DQ / FL_BQ_KV, is in [`Pass::layout`]).
const FL_BM: usize = 64;
const FL_PAD: usize = 8;
const FL_THREADS: u32 = 128;

/// The (forward, dQ, dK/dV) kernels for head dim `hd`, if flash.cu instantiates it.
fn kernels(hd: usize) -> Option<[&'static str; 3]> {
    match hd {
        32 => Some(["flash_fwd_hd32_bf16", "flash_bwd_dq_hd32_bf16", "flash_bwd_dkdv_hd32_bf16"]),
        64 => Some(["flash_fwd_hd64_bf16", "flash_bwd_dq_hd64_bf16", "flash_bwd_dkdv_hd64_bf16"]),
        128 => {
            Some(["flash_fwd_hd128_bf16", "flash_bwd_dq_hd128_bf16", "flash_bwd_dkdv_hd128_bf16"])
        }
        _ => None,
    }
}

/// Device address of a view, for [`serves`] (event tracking is off, so the guard records
/// nothing).
pub(super) fn addr<P: DevicePtr<T>, T>(dev: &CudaDevice, p: &P) -> u64 {
    p.device_ptr(dev.stream()).0
}

/// Whether flash.cu serves a call: bf16, an instantiated head dim, and every row pointer 16-byte
/// aligned (the kernels move rows as `uint4`; a view at an odd offset takes attention.cu instead).
pub(super) fn serves<T: Dtype>(hd: usize, ptrs: &[u64]) -> bool {
    T::IS_BF16 && kernels(hd).is_some() && ptrs.iter().all(|p| p % 16 == 0)
}

/// The packed batch a call runs over: `batch` sequences of `t` rows in all, delimited by
/// `cu_seqlens` [batch + 1], in the head layout `s`.
pub(super) struct Packed<'a, 'c> {
    pub cu_seqlens: &'a CudaView<'c, i32>,
    pub s: &'a AttentionShape,
    pub t: usize,
    pub batch: usize,
}

/// Which of [`kernels`]' three a launch runs.
#[derive(Clone, Copy, Debug)]
enum Pass {
    Fwd = 0,
    Dq = 1,
    Dkdv = 2,
}

/// A pass's shared-memory carve-up in flash.cu.
struct Layout {
    /// Rows of the inner tile: FL_BN keys (forward), FL_BN_DQ keys (dQ), FL_BQ_KV queries (dK/dV).
    inner: usize,
    /// Row-major bf16 tiles hd + FL_PAD wide: how many of FL_BM rows, how many of `inner` rows.
    tiles: (usize, usize),
    /// Transposed bf16 tiles [hd][inner + FL_PAD].
    transposed: usize,
    /// f32 vectors of `inner` entries.
    vectors: usize,
}

impl Pass {
    fn layout(self) -> Layout {
        match self {
            // Q | K; V^T
            Pass::Fwd => Layout { inner: 64, tiles: (1, 1), transposed: 1, vectors: 0 },
            // Q, dO | K, V; K^T
            Pass::Dq => Layout { inner: 32, tiles: (2, 2), transposed: 1, vectors: 0 },
            // K, V | Q, dO; Q^T, dO^T; lse, delta
            Pass::Dkdv => Layout { inner: 32, tiles: (2, 2), transposed: 2, vectors: 2 },
        }
    }

    /// Dynamic shared memory (bytes) of the pass's kernel at head dim `hd`.
    fn smem(self, hd: usize) -> usize {
        let l = self.layout();
        let bf16 = std::mem::size_of::<half::bf16>();
        (l.tiles.0 * FL_BM + l.tiles.1 * l.inner) * (hd + FL_PAD) * bf16
            + l.transposed * hd * (l.inner + FL_PAD) * bf16
            + l.vectors * l.inner * std::mem::size_of::<f32>()
    }
}

/// Loads `pass`'s kernel for `p`'s head dim, costed at `mults` (see [`attention_cost`]), with
/// its grid (`heads` along y, the pass's shared memory) and the (tokens, q_heads, kv_heads)
/// parameters every flash kernel takes.
fn setup<'d, T>(
    dev: &'d CudaDevice,
    p: &Packed<'_, '_>,
    pass: Pass,
    mults: (f64, f64),
    heads: usize,
) -> Result<(Kernel<'d>, LaunchConfig, [i32; 3]), CudaError> {
    let s = p.s;
    let Some(names) = kernels(s.head_dim) else {
        return Err(super::shape_err("flash", format!("head_dim {}", s.head_dim)));
    };
    let kn = names[pass as usize];
    let (fl, by) = attention_cost::<T>(s, p.t, p.batch, mults);
    let f = Kernel::load(dev, "flash.cu", kn)?.cost(fl, by);
    let cfg = tile_cfg(&f, pass.smem(s.head_dim), FL_THREADS, (FL_BM, heads), s, p.batch)?;
    let ints =
        [int(kn, "tokens", p.t)?, int(kn, "q_heads", s.q_heads)?, int(kn, "kv_heads", s.kv_heads)?];
    Ok((f, cfg, ints))
}

/// Forward: out [t, Hq, hd] and lse [t, Hq] from q, k, v over the packed sequences.
pub(super) fn fwd<T: Dtype>(
    dev: &CudaDevice,
    (out, lse): (&mut CudaViewMut<'_, T>, &mut CudaViewMut<'_, f32>),
    Qkv { q, k, v }: Qkv<&CudaView<'_, T>>,
    p: &Packed<'_, '_>,
) -> Result<(), CudaError> {
    let (f, cfg, [ti, hq, hkv]) = setup::<T>(dev, p, Pass::Fwd, (4.0, 2.0), p.s.q_heads)?;
    // SAFETY: out/q are [t, hq, hd], k/v [t, hkv, hd], lse [t, hq] (checked by the caller), every
    // pointer 16-byte aligned (serves); cu_seqlens entries are clamped in the kernel; smem
    // matches flash.cu's carve-up (Pass::layout).
    unsafe { f.launch(cfg, (out, lse, q, k, v, p.cu_seqlens, &ti, &hq, &hkv, &p.s.scale)) }
}

/// Backward: dq, dk, dv from dout and the forward's inputs, lse and `delta` (= rowsum(dO * O),
/// computed by the caller). Two kernels, so nothing is accumulated with atomics.
pub(super) fn bwd<T: Dtype>(
    dev: &CudaDevice,
    Qkv { q: dq, k: dk, v: dv }: Qkv<&mut CudaViewMut<'_, T>>,
    dout: &CudaView<'_, T>,
    Qkv { q, k, v }: Qkv<&CudaView<'_, T>>,
    (lse, delta): (&CudaView<'_, f32>, &CudaView<'_, f32>),
    p: &Packed<'_, '_>,
) -> Result<(), CudaError> {
    let (cu, scale) = (p.cu_seqlens, &p.s.scale);
    // dQ: Q K^T, dO V^T and dS K per pair (6 FLOPs per dim); reads q, dout, k, v, writes dq
    let (f, c, [ti, hq, hkv]) = setup::<T>(dev, p, Pass::Dq, (6.0, 3.0), p.s.q_heads)?;
    // SAFETY: dq/dout/q are [t, hq, hd], k/v [t, hkv, hd], lse/delta [t, hq] (checked by the
    // caller), pointers 16-byte aligned (serves); smem matches flash.cu (Pass::layout).
    unsafe {
        f.launch(c, (dq, dout, q, k, v, lse, delta, cu, &ti, &hq, &hkv, scale))?;
    }

    // dK/dV: K Q^T, V dO^T, P^T dO and dS^T Q per pair (8 FLOPs per dim)
    let (f, c, [ti, hq, hkv]) = setup::<T>(dev, p, Pass::Dkdv, (8.0, 4.0), p.s.kv_heads)?;
    // SAFETY: as above, dk/dv [t, hkv, hd]; smem matches flash.cu (Pass::layout).
    unsafe { f.launch(c, (dk, dv, dout, q, k, v, lse, delta, cu, &ti, &hq, &hkv, scale)) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_memory_fits_every_sm80_plus_card() {
        // hd 128: Q + K tiles of 64 x 136 and V^T 128 x 72
        assert_eq!(Pass::Fwd.smem(128), 128 * 136 * 2 + 128 * 72 * 2);
        // dQ: Q, dO 64 x 136 and K, V 32 x 136, K^T 128 x 40
        assert_eq!(Pass::Dq.smem(128), (2 * 64 + 2 * 32) * 136 * 2 + 128 * 40 * 2);
        // dK/dV: K, V 64 x 136 and Q, dO 32 x 136, Q^T and dO^T 128 x 40, lse and delta 32 f32
        assert_eq!(
            Pass::Dkdv.smem(128),
            (2 * 64 + 2 * 32) * 136 * 2 + 2 * 128 * 40 * 2 + 2 * 32 * 4
        );
        for hd in [32, 64, 128] {
            assert!(kernels(hd).is_some());
            // 99 KiB: the opt-in limit of sm_86 / sm_89, the smallest of the sm_80+ family
            for pass in [Pass::Fwd, Pass::Dq, Pass::Dkdv] {
                let b = pass.smem(hd);
                assert!(b <= 99 * 1024, "{pass:?} hd {hd}: {b} B");
            }
        }
        assert!(kernels(96).is_none() && kernels(256).is_none());
    }
}
